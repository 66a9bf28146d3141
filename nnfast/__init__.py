"""nnfast: fused Triton kernels for training transformer language models fast.

Layers: ``nnfast.kernels`` (Triton), ``nnfast.functional`` (public functions that pick the
kernel or the PyTorch reference), ``nnfast`` modules (thin ``nn.Module`` wrappers), and
``nnfast.models`` (architectures assembled from the modules; imported on first use of
``nnfast.models``, so ``import nnfast`` stays as fast as the kernels alone need).
"""

import importlib

from nnfast import functional
from nnfast._backend import backend
from nnfast.modules.attention import Attention, CrossAttention, KVCache, SelfAttention, patch
from nnfast.modules.mlp import MLP, GatedMLP, SwiGLU
from nnfast.modules.norm import LayerNorm, RMSNorm
from nnfast.modules.rope import RotaryEmbedding
from nnfast.modules.token_merge import TokenExpand, TokenMerge

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "CrossAttention",
    "KVCache",
    "SelfAttention",
    "GatedMLP",
    "LayerNorm",
    "MLP",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TokenExpand",
    "TokenMerge",
    "backend",
    "functional",
    "models",
    "patch",
]


def __getattr__(name: str):
    # PEP 562: `nnfast.models` after a plain `import nnfast`, loaded only when first touched.
    if name == "models":
        return importlib.import_module("nnfast.models")
    raise AttributeError(f"module 'nnfast' has no attribute {name!r}")
