"""nnfast's public functions. Each validates its input (the same checks on every path),
then runs the Triton kernel (``nnfast.kernels.<op>``) or the PyTorch reference
(``nnfast.reference.<op>``) as ``nnfast._backend.use_triton`` decides. The kernel entry
point and its reference take the same arguments, so the choice is one line.
"""

from __future__ import annotations

import ctypes
import math

import torch

from nnfast import _checks as C
from nnfast._backend import cpu_reference, use_triton

# Largest normalized size the norm kernels take: one row must fit in one program.
MAX_NORM_SIZE = 65536
MAX_HEAD_DIM = 256
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _impl(op: str, x: torch.Tensor):
    """The module that implements ``op`` for tensors like ``x``: kernel or reference.

    Plain ``import`` statements, not ``importlib.import_module``: dynamo traces the former
    (so ``torch.compile(fullgraph=True)`` sees no break) and refuses the latter. The kernels
    are imported only once one is chosen, so ``import nnfast`` never needs triton. Each
    package is imported once and then held in ``_PACKAGES`` (six import statements cost
    more per call than some of the ops at small shapes).
    """
    kernel = use_triton(x)
    return getattr(_PACKAGES[kernel] or _load(kernel), op)


_PACKAGES = [None, None]  # [reference package, kernels package] once imported


def _load(kernel: bool):
    if kernel:
        import nnfast.kernels.activation
        import nnfast.kernels.attention
        import nnfast.kernels.cross_entropy
        import nnfast.kernels.norm
        import nnfast.kernels.rope
        import nnfast.kernels.token_merge  # noqa: F401

        _PACKAGES[1] = nnfast.kernels
        return nnfast.kernels
    import nnfast.reference.activation
    import nnfast.reference.attention
    import nnfast.reference.cross_entropy
    import nnfast.reference.norm
    import nnfast.reference.rope
    import nnfast.reference.token_merge  # noqa: F401

    _PACKAGES[0] = nnfast.reference
    return nnfast.reference


# ----------------------------------------------------------------------------- fast paths
# The usual call on a CPU (fp32, the reference path) costs a few attribute reads more than
# the plain torch op (issue 16): cheap type tests, then the reference's own op. Shapes and
# devices are left to that op, which raises on any mismatch the full checks reject; the
# error sends the call down the full path, whose checks raise nnfast's message naming the
# argument (or which raises torch's error again). What the torch op would accept but nnfast
# rejects (dtypes, shapes it broadcasts, sizes over a kernel's limit) is tested before.
_F32, _I64 = torch.float32, torch.int64
_F32_EPS = torch.finfo(torch.float32).eps  # rms_norm's eps=None, as torch's for fp32 math
_FAST_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, AttributeError)
_silu, _gelu = torch._C._nn.silu, torch._C._nn.gelu  # F.silu / F.gelu without the wrapper
_linear, _ce_loss = torch._C._nn.linear, torch._C._nn.cross_entropy_loss


def _fast_norm(x, normalized_shape, weight, bias) -> int:
    """``n`` when a norm call takes the fast path: fp32 ``x`` on the CPU reference path, one
    normalized dim of size 1 < n <= MAX_NORM_SIZE (n = 1 is the reference's exact special
    case), fp32 CPU parameters or None; else 0. Every tensor's device is tested: torch
    computes CPU with meta tensors without complaint."""
    n = normalized_shape
    if n.__class__ is tuple:
        if len(n) != 1:
            return 0
        n = n[0]
    if n.__class__ is not int or not 1 < n <= MAX_NORM_SIZE or x.dtype is not _F32:
        return 0
    if (weight is not None and (weight.dtype is not _F32 or not weight.is_cpu)) or (
            bias is not None and (bias.dtype is not _F32 or not bias.is_cpu)):
        return 0
    return n if cpu_reference(x) else 0


# ----------------------------------------------------------------------------- norms
_FLOATS = frozenset(C.FLOAT_DTYPES)


def _usual_norm_call(x, normalized_shape, weight, bias, residual) -> int | None:
    """``n`` when the call is the usual one — one trailing dim, 1-D parameters, everything
    on x's device in x's dtype (fp32 parameters too) — accepted in a few attribute reads;
    else None, and ``_norm`` runs the full checks (which raise the messages). It accepts
    only what those checks accept."""
    n = normalized_shape
    if type(n) is tuple and len(n) == 1:
        n = n[0]
    if type(n) is not int or not isinstance(x, torch.Tensor) or not 0 < n <= MAX_NORM_SIZE:
        return None
    dtype, device = x.dtype, x.device
    if dtype not in _FLOATS or x.dim() == 0 or x.shape[-1] != n:
        return None
    for p in (weight, bias):
        if p is not None and not (
            isinstance(p, torch.Tensor) and (p.dtype is dtype or p.dtype is torch.float32)
            and p.dim() == 1 and p.shape[0] == n and p.device == device
        ):
            return None
    if residual is not None and not (
        isinstance(residual, torch.Tensor) and residual.dtype is dtype
        and residual.shape == x.shape and residual.device == device
    ):
        return None
    return n


def _norm(x, normalized_shape, weight, bias, eps, rms, residual):
    n = _usual_norm_call(x, normalized_shape, weight, bias, residual)
    if n is None:
        n = _check_norm(x, normalized_shape, weight, bias, residual)
    if eps is None:
        # As torch.nn.functional.rms_norm: the eps of the compute type (fp32 for fp16/bf16).
        eps = torch.finfo(torch.float32).eps
    return _impl("norm", x).layer_norm(x, n, weight, bias, float(eps), rms, residual)


def _check_norm(x, normalized_shape, weight, bias, residual) -> int:
    C.check_float("input", x)
    C.check_same_device("input", x, weight=weight, bias=bias, residual=residual)
    n, shape = C.normalized_size(x, normalized_shape, MAX_NORM_SIZE)
    C.check_param_dtype("weight", weight, x)
    C.check_param_dtype("bias", bias, x)
    C.check_shape("weight", weight, shape)
    C.check_shape("bias", bias, shape)
    if residual is not None:
        C.check_float("residual", residual)
        C.check_same_dtype("input", x, residual=residual)
        C.check_shape("residual", residual, tuple(x.shape))
    return n


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm``: y = x / sqrt(mean(x^2) + eps) * weight."""
    try:  # the fast path (see above): the reference's op on fp32 rows
        n = _fast_norm(input, normalized_shape, weight, None)
        if n:
            return torch.rms_norm(input, (n,), weight, _F32_EPS if eps is None else float(eps))
    except _FAST_ERRORS:
        pass
    return _norm(input, normalized_shape, weight, None, eps, True, None)[0]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm``."""
    try:
        n = _fast_norm(input, normalized_shape, weight, bias)
        if n:
            return torch.layer_norm(input, (n,), weight, bias, float(eps))
    except _FAST_ERRORS:
        pass
    return _norm(input, normalized_shape, weight, bias, eps, False, None)[0]


def _fast_residual(x, residual) -> bool:
    """The residual of a fast-path norm: fp32 on the CPU, x's shape (the add would broadcast
    others)."""
    return residual.dtype is _F32 and x.shape == residual.shape and residual.is_cpu


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None):
    """Pre-norm blocks: ``s = input + residual`` and ``rms_norm(s)`` in one pass.
    Returns ``(normed, s)``."""
    try:
        n = _fast_norm(input, normalized_shape, weight, None)
        if n and _fast_residual(input, residual):
            s = input + residual
            return torch.rms_norm(s, (n,), weight, _F32_EPS if eps is None else float(eps)), s
    except _FAST_ERRORS:
        pass
    return _norm(input, normalized_shape, weight, None, eps, True, residual)


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``s = input + residual`` and ``layer_norm(s)`` in one pass. Returns ``(normed, s)``."""
    try:
        n = _fast_norm(input, normalized_shape, weight, bias)
        if n and _fast_residual(input, residual):
            s = input + residual
            return torch.layer_norm(s, (n,), weight, bias, float(eps)), s
    except _FAST_ERRORS:
        pass
    return _norm(input, normalized_shape, weight, bias, eps, False, residual)


# ----------------------------------------------------------------------------- RoPE
def apply_rotary(q, k, cos, sin, *, position_ids=None, offset=0, interleaved=False):
    """Rotary position embedding applied to q and k in one launch.

    Layout (the whole library's): q ``(B, H, T, D)``, k ``(B, Hk, T, D)``.
    ``cos``/``sin``: float32 ``(max_seq_len, rotary_dim // 2)`` tables
    (``nnfast.reference.rope.rotary_cos_sin``); only the first ``rotary_dim`` channels of
    each head rotate (partial rotary), the rest pass through.
    Token t of the sequence sits at position ``offset + t``, or at ``position_ids[..., t]``
    (shape ``(T,)`` or ``(B, T)``) when given.
    ``interleaved=False``: half-split pairs (i, i + rotary_dim/2), GPT-NeoX / Hugging Face;
    ``interleaved=True``: adjacent pairs (2i, 2i+1), Meta's Llama.
    Returns ``(q_rotated, k_rotated)``.
    """
    try:  # the fast path (see above): every check below, on plain attributes
        if _fast_rope(q, k, cos, sin, position_ids, offset, interleaved):
            impl = (_PACKAGES[0] or _load(False)).rope
            return impl.apply_rotary(q, k, cos, sin, None, offset, interleaved)
    except _FAST_ERRORS:
        pass
    C.check_float("q", q)
    C.check_float("k", k)
    C.check_same_dtype("q", q, k=k)
    C.check_same_device("q", q, k=k, cos=cos, sin=sin, position_ids=position_ids)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be 4-D (B, H, T, D); got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, Hk, T={T}, D={D}); got {tuple(k.shape)}")
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise TypeError(f"cos and sin must be float32, got {cos.dtype} and {sin.dtype}")
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(
            f"cos and sin must both be (max_seq_len, rotary_dim // 2); "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    rotary_dim = 2 * cos.shape[1]
    if rotary_dim > D or rotary_dim == 0:
        raise ValueError(f"rotary_dim {rotary_dim} (2 * cos.shape[1]) must be in [2, head dim {D}]")
    offset = C.check_index("offset", offset)
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor):
            raise TypeError(f"position_ids must be a tensor, got {type(position_ids).__name__}")
        if position_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"position_ids must be int32 or int64, got {position_ids.dtype}")
        if tuple(position_ids.shape) not in ((T,), (B, T)):
            raise ValueError(
                f"position_ids must have shape ({T},) or ({B}, {T}); "
                f"got {tuple(position_ids.shape)}"
            )
        # Out of the table, the reference would read the wrong row and the kernel NaN.
        C.check_positions("position_ids", position_ids, cos.shape[0])
    elif offset < 0 or offset + T > cos.shape[0]:
        raise ValueError(
            f"positions offset={offset} .. {offset + T - 1} exceed the table's {cos.shape[0]} rows"
        )
    return _impl("rope", q).apply_rotary(
        q, k, cos, sin, position_ids, offset, bool(interleaved)
    )


def _fast_rope(q, k, cos, sin, position_ids, offset, interleaved) -> bool:
    """Whether apply_rotary takes the fast path: fp32 q, k, cos, sin on the CPU reference
    path, no position_ids, and the checks of the full path pass (the reference would
    broadcast or slice what they reject)."""
    if position_ids is not None or offset.__class__ is not int or interleaved.__class__ is not bool:
        return False
    if q.dtype is not _F32 or k.dtype is not _F32 or cos.dtype is not _F32 \
            or sin.dtype is not _F32:
        return False
    if not (k.is_cpu and cos.is_cpu and sin.is_cpu and cpu_reference(q)):
        return False
    qs, ks, cs = q.shape, k.shape, cos.shape
    return (
        len(qs) == 4 and len(ks) == 4 and qs[0] == ks[0] and qs[2] == ks[2] and qs[3] == ks[3]
        and len(cs) == 2 and cs == sin.shape and 0 < 2 * cs[1] <= qs[3]
        and 0 <= offset and offset + qs[2] <= cs[0]
    )


# ----------------------------------------------------------------------------- gated MLP
def _act(x, up, activation):
    C.check_float("gate" if up is not None else "input", x)
    if up is not None:
        C.check_float("up", up)
        C.check_same_dtype("gate", x, up=up)
        C.check_same_device("gate", x, up=up)
        C.check_shape("up", up, tuple(x.shape))
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return _impl("activation", x).act_mul(x, up, activation)


def _need_up(up) -> None:
    if up is None:  # not silently silu(gate): that would be a different layer
        raise TypeError("up must be a tensor of gate's shape, got None (for the plain "
                        "activation call nnfast.functional.gelu or torch's silu)")


def silu_mul(gate, up):
    """SwiGLU's ``silu(gate) * up``, fused forward and backward."""
    try:  # the fast path (see above)
        if gate.dtype is _F32 and up.dtype is _F32 and gate.shape == up.shape and up.is_cpu \
                and cpu_reference(gate):
            return _silu(gate) * up
    except _FAST_ERRORS:
        pass
    _need_up(up)
    return _act(gate, up, "silu")


def gelu_mul(gate, up, approximate="tanh"):
    """Gated GELU (T5 v1.1): ``gelu(gate) * up``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    _need_up(up)
    return _act(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")


def gelu(input, approximate="none"):
    """``torch.nn.functional.gelu`` through the same kernel (GPT-2's MLP uses ``'tanh'``)."""
    try:
        if input.dtype is _F32 and (approximate == "none" or approximate == "tanh") \
                and cpu_reference(input):
            return _gelu(input, approximate=approximate)
    except _FAST_ERRORS:
        pass
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _act(input, None, "gelu_tanh" if approximate == "tanh" else "gelu")


# ----------------------------------------------------------------------------- attention
def _check_attention(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    dropout_p, scale = _check_dropout_scale(dropout_p, scale)
    for name, t in (("query", query), ("key", key), ("value", value)):
        C.check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
    C.check_same_dtype("query", query, key=key, value=value)
    C.check_same_device("query", query, key=key, value=value, attn_mask=attn_mask)
    B, Hq, Lq, D = query.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: query {B}, key {key.shape[0]}, value {value.shape[0]}"
        )
    if key.shape[3] != D:
        raise ValueError(f"key's head dim {key.shape[3]} must equal query's {D}")
    if key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2]:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in H and L"
        )
    if value.shape[3] != D:
        raise ValueError(f"value's head dim {value.shape[3]} must equal query's {D}")
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"head dim {D} is outside the supported range 1..{MAX_HEAD_DIM}")
    Hk = key.shape[1]
    if Hk != Hq:
        if not enable_gqa:
            raise ValueError(
                f"query has {Hq} heads but key/value {Hk}; pass enable_gqa=True for GQA"
            )
        if Hq % Hk:
            raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hk})")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in C.FLOAT_DTYPES:
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        target = (B, Hq, Lq, key.shape[2])
        try:
            torch.broadcast_shapes(tuple(attn_mask.shape), target)
            ok = attn_mask.dim() <= 4
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"(B, H, Lq, Lk) = {target}"
            )
    return dropout_p, scale


def _check_dropout_scale(dropout_p, scale) -> tuple[float, float | None]:
    """dropout_p a number in [0, 1), scale None or a finite number (both attention APIs)."""
    dropout_p = C.check_number("dropout_p", dropout_p)
    scale = C.check_number("scale", scale, allow_none=True)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return dropout_p, scale


def _check_extras(window_size, softcap) -> tuple[tuple[int, int], float]:
    """window_size (None or (left, right), -1 = unbounded) and softcap (None/0 or > 0),
    normalized to ((left, right), softcap) with (-1, -1) and 0.0 meaning off."""
    if window_size is None:
        window_size = (-1, -1)
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(
        isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    if not ok:
        raise ValueError(
            "window_size must be (left, right) integers >= -1 (-1 = unbounded), "
            f"got {window_size!r}"
        )
    if softcap is None:
        softcap = 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) \
            or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap!r}")
    return (int(window_size[0]), int(window_size[1])), float(softcap)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
    enable_gqa=False, *, window_size=None, softcap=None, causal_alignment="top_left",
    return_lse=False,
):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (layout (B, H, L, D)).

    ``is_causal`` is top-left aligned as in PyTorch. Boolean masks: True takes part.
    A row with no key to attend to gives zeros (PyTorch gives NaN there).

    Keyword-only extras (their defaults keep PyTorch's results):
    ``window_size=(left, right)``: query i sees keys ``i + d - left .. i + d + right``
    (-1 = unbounded; with ``is_causal`` right is 0), Mistral's sliding window is
    ``(w - 1, 0)`` with ``is_causal=True``; key blocks outside the window are skipped.
    ``softcap``: Gemma 2's ``softcap * tanh(scores / softcap)`` before the mask.
    ``causal_alignment``: ``"top_left"`` (d = 0, PyTorch's) or ``"bottom_right"``
    (d = Lk - Lq: the last query sees the last key, as for new tokens against a KV cache);
    it places the causal diagonal and the window.
    ``return_lse``: return ``(out, lse)``, lse the natural log-sum-exp of each row's scores,
    (B, Hq, Lq) fp32, -inf on fully masked rows; differentiable (fully masked rows get no
    gradient; with dropout it is the undropped softmax's).
    """
    try:
        if _fast_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                           window_size, softcap, causal_alignment, return_lse):
            out = (_PACKAGES[0] or _load(False)).attention.flash(
                query, key, value, is_causal, scale)
            if out is not None:  # else the full path: the math (or nnfast's error)
                return out
    except _FAST_ERRORS:
        pass
    dropout_p, scale = _check_attention(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as in PyTorch)")
    window, cap = _check_extras(window_size, softcap)
    if causal_alignment not in ("top_left", "bottom_right"):
        raise ValueError(
            f"causal_alignment must be 'top_left' or 'bottom_right', got {causal_alignment!r}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    return _impl("attention", query).attention(
        query, key, value, attn_mask, float(dropout_p), bool(is_causal), float(scale),
        window=window, bottom_right=causal_alignment == "bottom_right", softcap=cap,
        return_lse=bool(return_lse),
    )


def _fast_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, window_size, softcap,
                    causal_alignment, return_lse) -> bool:
    """Whether an attention call takes the fast path: fp32 q of k's and v's 4-D shape, all
    three on the CPU (PyTorch's kernel does not test devices: it reads a meta k's null
    pointer) and q on the CPU reference path (so Lq == Lk, where bottom-right alignment is
    top-left), no mask, dropout, window, softcap or lse, a positive finite scale or None.
    k's and v's dtypes are the kernel's to test: it raises for any but q's, and the full
    path then names the argument."""
    shape = q.shape
    return (
        attn_mask is None and dropout_p.__class__ is float and dropout_p == 0.0
        and is_causal.__class__ is bool and return_lse is False
        and (scale is None or scale.__class__ is float and 0.0 < scale < math.inf)
        and (window_size is None or window_size == (-1, -1))
        and (softcap is None or softcap.__class__ is float and softcap == 0.0)
        and (causal_alignment == "top_left" or causal_alignment == "bottom_right")
        and q.dtype is _F32 and shape == k.shape == v.shape and len(shape) == 4
        and 0 < shape[3] <= MAX_HEAD_DIM and k.is_cpu and v.is_cpu and cpu_reference(q)
    )


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_name: str, max_len,
                      like: torch.Tensor) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
        what = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) \
            else type(cu).__name__
        raise ValueError(f"{name} must be a 1-D int32 tensor (B + 1,), got {what}")
    if cu.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like q, got {cu.device}")
    if cu.numel() < 2:
        raise ValueError(f"{name} needs at least 2 entries (B + 1 with B >= 1), got {cu.numel()}")
    # The value checks need a host sync; a model calls this once per layer with the same
    # tensor, so a passed check is remembered on it (keyed by its version counter, which
    # any in-place change bumps). Skipped while torch.compile traces, as Decoder's idx check.
    stamp = (cu._version, total, max_len)
    if getattr(cu, "_nnfast_checked", None) == stamp or torch.compiler.is_compiling():
        return cu.numel()
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals, vals[1:])]
    if min(lens) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] = {vals[-1]} must equal the number of rows, {total}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < max(lens):
        raise ValueError(
            f"{max_name} must be an integer >= the longest sequence ({max(lens)}), got {max_len!r}"
        )
    cu._nnfast_checked = stamp
    return len(vals)


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
    window_size=(-1, -1), softcap=0.0, scale=None, dropout_p=0.0, return_lse=False,
):
    """Attention over sequences of different lengths packed without padding, as
    flash-attention's ``flash_attn_varlen_func``.

    q ``(total_q, Hq, D)``, k/v ``(total_k, Hk, D)`` (Hq a multiple of Hk: GQA); sequence b
    is rows ``cu_seqlens_q[b] : cu_seqlens_q[b + 1]`` of q and ``cu_seqlens_k[b] :
    cu_seqlens_k[b + 1]`` of k/v (int32 ``(B + 1,)``, starting at 0, ending at total).
    Tokens attend only within their own sequence. ``causal`` and ``window_size`` are
    aligned to the bottom-right of each sequence pair (query i of a sequence sees keys up
    to ``i + Lk_b - Lq_b``). ``softcap``, ``scale``, ``dropout_p`` as in
    ``scaled_dot_product_attention``. Returns ``(total_q, Hq, D)``, or ``(out, lse)`` with
    ``return_lse`` (lse ``(Hq, total_q)`` fp32, natural log, differentiable).
    Validation reads ``cu_seqlens_*`` on the host (a device sync) once per tensor: a passed
    check is remembered until the tensor changes in place.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        C.check_float(name, t)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total, H, D), got shape {tuple(t.shape)}")
    C.check_same_dtype("q", q, k=k, v=v)
    C.check_same_device("q", q, k=k, v=v)
    D, Hq, Hk = q.shape[2], q.shape[1], k.shape[1]
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[2] != D:
        raise ValueError(f"k's head dim {k.shape[2]} must equal q's {D}")
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(f"head dim {D} is outside the supported range 1..{MAX_HEAD_DIM}")
    if Hk < 1 or Hq % Hk:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hk})")
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q",
                           max_seqlen_q, q)
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k",
                           max_seqlen_k, q)
    if cq != ck:
        raise ValueError(
            f"cu_seqlens_q ({cq} entries) and cu_seqlens_k ({ck}) must describe "
            "the same number of sequences"
        )
    window, cap = _check_extras(window_size, softcap)
    dropout_p, scale = _check_dropout_scale(dropout_p, scale)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    return _impl("attention", q).varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
        float(dropout_p), bool(causal), float(scale), window=window, softcap=cap,
        return_lse=bool(return_lse),
    )


# ----------------------------------------------------------------------------- cross-entropy
def _check_ce(target, target_shape, reduction, label_smoothing) -> None:
    """Checks shared by both cross-entropies (target dtype and shape, reduction, smoothing)."""
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"target must be an int32 or int64 tensor, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if tuple(target.shape) != tuple(target_shape):
        raise ValueError(f"target must have shape {tuple(target_shape)}, got {tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def linear_cross_entropy(
    input, weight, target, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
    accum_dtype=None,
):
    """``cross_entropy(input @ weight.T + bias, target)`` without materializing the logits of
    the whole batch: the vocabulary projection and the loss run in chunks.
    ``input`` ``(N, C)`` (or ``(..., C)``), ``weight`` ``(V, C)``, ``target`` ``(N,)`` int.
    ``accum_dtype``: dtype the kernel accumulates the weight's gradient in across chunks
    (default the weight's; ``torch.float32`` costs a (V, C) fp32 buffer)."""
    try:  # the fast path (see above): (N, C) fp32 rows, int64 targets, the mean
        if _fast_ce(input, weight, target, bias, ignore_index, reduction, label_smoothing,
                    accum_dtype):
            loss = _ce_loss(_linear(input, weight), target, None, 1, ignore_index,
                            label_smoothing)
            if not _isnan_f32(loss):  # NaN: maybe a mean over no target (below)
                return loss
    except _FAST_ERRORS:  # an out-of-range target is torch's IndexError: the checks below
        pass
    C.check_float("input", input)
    C.check_float("weight", weight)
    C.check_same_device("input", input, weight=weight, target=target, bias=bias)
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"weight must be (V, {input.shape[-1]}), got {tuple(weight.shape)}")
    C.check_shape("bias", bias, (weight.shape[0],))
    _check_ce(target, input.shape[:-1], reduction, label_smoothing)
    if accum_dtype is not None and accum_dtype not in C.FLOAT_DTYPES:
        raise TypeError(f"accum_dtype must be None or a float dtype, got {accum_dtype}")
    ignore_index = C.check_index("ignore_index", ignore_index)
    args = (input, weight, target, bias, ignore_index, reduction, float(label_smoothing))
    return _ce_dispatch("linear_cross_entropy", input, target, weight.shape[0], ignore_index,
                        args, accum_dtype)


def _isnan_f32(t: torch.Tensor) -> bool:
    """Whether CPU scalar ``t`` is NaN: an fp32 one read from its memory (``float(t)`` is a
    dispatcher op, 1% of a small call; this two attributes and a ctypes read)."""
    if t.dtype is not _F32:  # e.g. under an autocast that kept the loss in bf16
        return math.isnan(t)
    value = ctypes.c_float.from_address(t.data_ptr()).value
    return value != value


def _fast_ce(x, weight, target, bias, ignore_index, reduction, label_smoothing,
             accum_dtype) -> bool:
    """Whether linear_cross_entropy takes the fast path: the reference's own ops on fp32
    (N, C) rows, a (V, C) fp32 weight and int64 targets on the CPU reference path, no bias,
    the mean, a smoothing in [0, 1) (torch takes 1 too). Not while torch.compile traces,
    where the reference takes its graph-friendly mean."""
    return (
        bias is None and accum_dtype is None and reduction == "mean"
        and ignore_index.__class__ is int and label_smoothing.__class__ is float
        and 0.0 <= label_smoothing < 1.0
        and x.dtype is _F32 and weight.dtype is _F32 and target.dtype is _I64
        and x.dim() == 2 and weight.dim() == 2 and weight.is_cpu and target.is_cpu
        and cpu_reference(x)
        and not torch.compiler.is_compiling()
    )


def _ce_dispatch(name, input, target, n_classes, ignore_index, args, *extra):
    """Run kernel or reference ``name``; targets outside [0, n_classes) (not ignore_index)
    raise a ValueError on both paths (``_checks.check_class_targets``)."""
    kernel = use_triton(input)
    impl = (_PACKAGES[kernel] or _load(kernel)).cross_entropy
    if kernel:  # the kernel reads target as an index without a bounds check: check first
        C.check_class_targets("target", target, n_classes, ignore_index)
        return getattr(impl, name)(*args, *extra)
    try:  # the reference checks the bounds itself (an IndexError): no extra pass
        return getattr(impl, name)(*args, *extra)
    except IndexError:
        C.check_class_targets("target", target, n_classes, ignore_index)
        raise


def cross_entropy(input, target, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """``F.cross_entropy`` of logits ``input`` ``(N, V)`` and class indices ``target``
    ``(N,)``, computed in fp32 and returned in the logits' dtype; the gradient is written
    once, in the logits' dtype. As ``linear_cross_entropy``: a mean over no valid target
    is 0, not NaN."""
    C.check_float("input", input)
    C.check_same_device("input", input, target=target)
    if input.dim() != 2:
        raise ValueError(f"input must be (N, V) logits, got shape {tuple(input.shape)}")
    _check_ce(target, input.shape[:1], reduction, label_smoothing)
    ignore_index = C.check_index("ignore_index", ignore_index)
    args = (input, target, ignore_index, reduction, float(label_smoothing))
    return _ce_dispatch("cross_entropy", input, target, input.shape[1], ignore_index, args)


# ----------------------------------------------------------------------------- token merging
def _check_token_conv(x, weight, bias, k, expand: bool) -> tuple[int, int]:
    """Shared checks of token_merge / token_expand; returns ``(k, C_out)``, ``k`` defaulting
    to the weight's last dim."""
    C.check_float("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (B, T, C), got shape {tuple(x.shape)}")
    C.check_float("weight", weight)
    C.check_same_device("x", x, weight=weight, bias=bias)
    C.check_param_dtype("weight", weight, x)
    C.check_param_dtype("bias", bias, x)
    if weight.dim() != 3:
        raise ValueError(f"weight must be 3-D (a Conv1d-style weight), got {tuple(weight.shape)}")
    if k is None:
        k = weight.shape[2]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    # Conv1d's weight is (C_out, C_in, k), ConvTranspose1d's (C_in, C_out, k).
    c_in_dim = 0 if expand else 1
    if weight.shape[c_in_dim] != x.shape[2] or weight.shape[2] != k:
        want = "(C_in, C_out, k)" if expand else "(C_out, C_in, k)"
        raise ValueError(
            f"weight must be {want} with C_in={x.shape[2]}, k={k}; got {tuple(weight.shape)}"
        )
    c_out = weight.shape[1 - c_in_dim]
    C.check_shape("bias", bias, (c_out,))
    return k, c_out


def token_merge(x, weight, bias=None, k=None, causal=False):
    """Merge each window of ``k`` tokens into one: ``(B, T, C_in) -> (B, ceil(T/k), C_out)``,
    ``nn.Conv1d(C_in, C_out, k, stride=k)`` on the ``(B, T, C)`` layout (weight
    ``(C_out, C_in, k)``, ``k`` defaults to its last dim); the tail is zero-padded.
    ``causal=True`` shifts the sequence right by ``k - 1`` first, so merged token ``j`` sees
    input tokens ``j*k - k + 1 .. j*k`` only (Hourglass Transformers); the exact contract is
    in ``nnfast/reference/token_merge.py``."""
    k, _ = _check_token_conv(x, weight, bias, k, expand=False)
    return _impl("token_merge", x).token_merge(x, weight, bias, k, bool(causal))


def token_expand(x, weight, bias=None, k=None, length=None):
    """The inverse of ``token_merge``: each token becomes ``k`` tokens,
    ``(B, T_m, C_in) -> (B, length, C_out)``, ``nn.ConvTranspose1d(C_in, C_out, k, stride=k)``
    on the ``(B, T, C)`` layout (weight ``(C_in, C_out, k)``). ``length`` (default
    ``T_m * k``) crops to the original sequence length. Output token ``t`` depends on input
    token ``t // k`` only."""
    k, _ = _check_token_conv(x, weight, bias, k, expand=True)
    full = x.shape[1] * k
    if length is not None and (
        isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= full
    ):
        raise ValueError(f"length must be an integer in [0, {full}] (T_m * k), got {length!r}")
    return _impl("token_merge", x).token_expand(x, weight, bias, k, length)
