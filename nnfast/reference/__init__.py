"""Pure-PyTorch references, one file per op, with the same entry points as
``nnfast.kernels.<op>``. Each is the CPU path, the test oracle and the benchmark
baseline: written once, imported by all three."""
