"""nnfast's Triton kernels, installed as ``nnfast.kernels``.

One file per op (``norm``, ``rope``, ``activation``, ``attention``, ``cross_entropy``):
the ``@triton.jit`` kernels, their launchers, and the ``torch.library`` custom ops that
make them autograd- and ``torch.compile``-friendly. Nothing is imported here, so that
``import nnfast`` works where triton is missing; ``nnfast.functional`` imports an op's
file the first time a kernel is chosen for it.
"""
