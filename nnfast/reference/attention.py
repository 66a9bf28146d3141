"""Scaled dot-product attention in plain PyTorch: the CPU path, the test oracle and the
benchmark baseline for ``nnfast.kernels.attention``.

The math runs in fp32 whatever the input dtype (fp16/bf16 are upcast). Semantics follow
``torch.nn.functional.scaled_dot_product_attention`` except for one deliberate difference:
a query row with no key to attend to (fully masked) gives zeros and zero gradients, where
PyTorch gives NaN.

Two implementations of the same math:

* ``_explicit``: materializes the (B, H, Lq, Lk) scores, the written-out oracle. Used on
  GPUs (where the kernel's tests and benchmarks compare against it), with dropout (the
  caller's ``dropout_mask`` must be applied, or one drawn from torch's RNG as the kernel
  draws its own), and for empty inputs.
* ``_fused``: PyTorch's flash kernel for CPU (``F.scaled_dot_product_attention``'s), which
  makes the reference path as fast as plain PyTorch. Fully masked rows are made NaN-free
  before the call, and inputs where the kernel's NaN handling is not the math's go to
  ``_explicit`` (see ``flash`` and ``_finite``).

The extras (sliding ``window``, ``bottom_right`` causal alignment, ``softcap``,
``return_lse``) always take ``_explicit``. ``varlen_attention`` is the packed layout's oracle:
each sequence on its own through ``attention``, in fp32, bottom-right aligned.
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for the compute; fp32 (and fp64) tensors are used without a copy."""
    return t.float() if t.element_size() < 4 else t


def _expand_kv(t: torch.Tensor, hq: int) -> torch.Tensor:
    """GQA: q head h reads kv head ``h // (Hq // Hk)``. The reference may repeat in memory."""
    hk = t.shape[1]
    if hk == hq:
        return t
    return t.repeat_interleave(hq // hk, dim=1)  # (B, Hq, Lk, D)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    dropout_mask: torch.Tensor | None = None,
    *,
    window: tuple[int, int] = (-1, -1),
    bottom_right: bool = False,
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """``softmax(q k^T * scale + mask) v`` for q ``(B, Hq, Lq, D)``, k/v ``(B, Hk, Lk, D)``.

    ``attn_mask``: bool (True takes part) or float (added to the scores), broadcastable to
    ``(B, Hq, Lq, Lk)``; a float mask that requires grad gets its gradient.
    ``is_causal``: top-left aligned, query i sees keys j <= i.
    ``dropout_mask``: bool ``(B, Hq, Lq, Lk)``, True = kept; drawn from torch's RNG when
    ``dropout_p > 0`` and none is given. Kept probabilities are scaled by ``1 / (1 - p)``.
    ``window`` = (left, right): query i sees keys ``i + d - left .. i + d + right`` (-1 =
    unbounded; causal sets right = 0), d = 0, or ``Lk - Lq`` with ``bottom_right``.
    ``softcap`` > 0: scores ``softcap * tanh(scale * q.k / softcap)``, before the mask.
    ``return_lse``: also the natural log-sum-exp of each row's scores, (B, Hq, Lq) fp32
    (fp64 for fp64 inputs), differentiable; -inf and no gradient for a fully masked row;
    with dropout, that of the undropped softmax.
    """
    extras = tuple(window) != (-1, -1) or bottom_right or softcap > 0.0 or return_lse
    if extras:
        return _explicit(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_mask,
                         window, bottom_right, softcap, return_lse)
    fused = (
        q.is_cpu
        and dropout_p == 0.0
        and dropout_mask is None
        and not (is_causal and attn_mask is not None)
        and not (is_causal and scale <= 0.0)  # PyTorch's CPU kernel: NaN rows (a bug)
        and q.numel() > 0
        and k.numel() > 0
        and (attn_mask is None or _finite(q, k))
    )
    if fused:
        out = _fused(q, k, v, attn_mask, is_causal, scale)
        if out is not None:
            return out
    return _explicit(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_mask)


# F.scaled_dot_product_attention's CPU kernel, called as it calls it, which also returns the
# rows' log-sum-exp: the test for the rows where it is not the math reads that (see flash).
_FLASH_CPU = torch._scaled_dot_product_flash_attention_for_cpu


def _word_finder():
    """libc's ``wmemchr`` where a wchar_t is 4 bytes (Linux, macOS): the first 4-byte word
    equal to a given one in memory, found in place (SIMD in glibc). None elsewhere."""
    if ctypes.sizeof(ctypes.c_wchar) != 4:
        return None
    try:
        find = ctypes.CDLL(None).wmemchr
    except (AttributeError, OSError):
        return None
    find.restype = ctypes.c_void_p
    find.argtypes = (ctypes.c_void_p, ctypes.c_wchar, ctypes.c_size_t)
    return find


_WMEMCHR = _word_finder()


def _has_zero(lse: torch.Tensor) -> bool:
    """Whether the kernel's fresh CPU lse holds a +0.0 (fp32's all-zero word; fp64's zero
    holds two, so the test finds it too, and a few other fp64 values: the math then, never
    a wrong answer). The kernel allocates lse dense ((B, Lq, H) in memory), so its nbytes
    from its first element are its own memory."""
    if _WMEMCHR is None:
        return bool((lse == 0).any())
    return _WMEMCHR(lse.data_ptr(), "\0", lse.nbytes >> 2) is not None


def flash(q, k, v, is_causal, scale) -> torch.Tensor | None:
    """PyTorch's fused CPU kernel on CPU q, k, v of one head count without a mask
    (``scale`` None: 1/sqrt(D)), or None where it may differ from the math (``_explicit``)
    and for empty inputs. ``nnfast.functional``'s fast path calls it straight away, without
    attention()'s dispatch.

    The kernel differs where a row's running max stays -inf to the end: its max skips NaN
    scores in a block's scalar tail (all of a row shorter than the CPU's vector), or every
    score is -inf. It gives zeros there, the math NaN (or its zeros, with another
    gradient). It then stores the row's max as 0 and its sum as 1, so that row's lse is
    exactly +0.0; any +0.0 in lse (rare otherwise: a zero query's first causal row) gives
    None. The test reads lse in place (a torch or numpy reduction of it after the kernel,
    or a pass over q before, costs 3-5% of a small call). Under ``torch.compile``: PyTorch's
    kernel through F.scaled_dot_product_attention, whose graph the test would break."""
    if torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    if q.numel() == 0:
        return None
    # The kernel reads a head's row as D contiguous values: copy a strided last dim.
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    out, lse = _FLASH_CPU(q, k, v, 0.0, is_causal, scale=scale)
    return None if _has_zero(lse) else out


def _finite(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the fused CPU kernel gives PyTorch's math under a mask (whose fully masked
    rows ``_fused`` has made harmless): it does not for a NaN/inf in q (zeros for that row,
    not NaN) nor in k (a masked-out NaN key poisons every row). One sum each, synced (cheap
    on a CPU). Under ``torch.compile`` the check (a graph break) is skipped: compiled code
    follows PyTorch's CPU kernel there."""
    if torch.compiler.is_compiling():
        return True
    return math.isfinite(q.detach().sum() + k.detach().sum())


def _fused(q, k, v, attn_mask, is_causal, scale):
    """``F.scaled_dot_product_attention`` in fp32 with zeros for rows that see no key, or
    None where PyTorch's kernel may differ from the math (see ``flash``).

    Without a mask (causal rows always see key 0): ``flash``, on k, v repeated for GQA as
    PyTorch repeats them. With a mask, a row with no allowed key (all False, or all -inf)
    would give NaN: such rows get an allow-all mask instead (finite, harmless), and the
    output is multiplied by the row's 0/1 validity, so their output and every gradient
    through them are exactly 0 (and the mask's gradient there is 0: ``torch.where`` passes
    none to the replaced entries)."""
    qf, kf, vf = _fp32(q), _fp32(k), _fp32(v)
    if attn_mask is None:
        hq = q.shape[1]
        out = flash(qf, _expand_kv(kf, hq), _expand_kv(vf, hq), is_causal, scale)
        return out if out is None or out.dtype == q.dtype else out.to(q.dtype)
    if attn_mask.dim() < 2:  # SDPA's CPU kernel wants at least (Lq or 1, Lk)
        attn_mask = attn_mask.reshape((1,) * (2 - attn_mask.dim()) + attn_mask.shape)
    if attn_mask.dtype == torch.bool:
        valid = attn_mask.any(dim=-1, keepdim=True)  # (..., Lq or 1, 1)
        attn_mask = attn_mask | ~valid
    else:
        m = _fp32(attn_mask)
        if m.dtype != qf.dtype:  # e.g. an fp32 mask next to fp64 inputs
            m = m.to(qf.dtype)
        valid = (m.detach() > float("-inf")).any(dim=-1, keepdim=True)
        attn_mask = torch.where(valid, m, torch.zeros((), dtype=m.dtype, device=m.device))
    out = F.scaled_dot_product_attention(
        qf, kf, vf, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    ) * valid.to(qf.dtype)  # (B, Hq, Lq, D)
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _allowed(Lq, Lk, is_causal, window, bottom_right, device) -> torch.Tensor | None:
    """(Lq, Lk) bool: the keys each query may see under causal / window, None = all."""
    left, right = window
    if is_causal:
        right = 0
    if left < 0 and right < 0:
        return None
    d = Lk - Lq if bottom_right else 0
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    keep = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if right >= 0:
        keep &= j <= i + d + right
    if left >= 0:
        keep &= j >= i + d - left
    return keep


def _explicit(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_mask,
              window=(-1, -1), bottom_right=False, softcap=0.0, return_lse=False):
    """The math written out, materializing the (B, Hq, Lq, Lk) scores."""
    Hq, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
    kf = _fp32(_expand_kv(k, Hq))
    vf = _fp32(_expand_kv(v, Hq))
    s = torch.matmul(_fp32(q), kf.transpose(-1, -2)) * scale  # (B, Hq, Lq, Lk)
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + _fp32(attn_mask)
    keep = _allowed(Lq, Lk, is_causal, window, bottom_right, q.device)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    # Softmax that sends a row of -inf to zeros: subtract a finite row max (0 for such rows),
    # and divide by a denominator of 1 where the row sum is 0. exp(-inf) = 0 and its
    # derivative is 0, so the masked entries contribute no NaN to the gradients.
    if Lk == 0:  # no key at all: zeros, as PyTorch (amax has nothing to reduce)
        m = s.new_zeros(s.shape[:-1] + (1,))
    else:
        m = s.detach().amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    p = e / safe
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= dropout_p
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p, vf).to(q.dtype)  # (B, Hq, Lq, D)
    if return_lse:
        # m + log(sum exp(s - m)), differentiable (m is detached, and its derivative,
        # 1 - sum_j p_ij, is 0); -inf with zero gradient where the row is all -inf (through
        # ``safe``, not logsumexp, whose backward is NaN there).
        lse = torch.where(denom > 0, m + torch.log(safe), float("-inf")).squeeze(-1)
        return out, lse if lse.dtype == torch.float64 else lse.float()
    return out


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    dropout_mask: torch.Tensor | None = None,
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """Packed sequences, q ``(total_q, Hq, D)``, k/v ``(total_k, Hk, D)``: sequence b is rows
    ``cu_seqlens[b] : cu_seqlens[b + 1]``, attended on its own (``attention`` on a batch of
    one, causal/window bottom-right aligned). ``dropout_mask``: bool
    ``(B, Hq, max_seqlen_q, max_seqlen_k)``, sequence b reads its top-left corner. lse:
    ``(Hq, total_q)``. A sequence with no keys gives zeros (lse -inf)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    Hq = q.shape[1]
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq_b, D)
        ks = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hk, Lk_b, D)
        vs = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        Lq, Lk = qs.shape[2], ks.shape[2]
        if Lk == 0:  # nothing to attend to (and no reduction over an empty dim)
            outs.append(q.new_zeros((Lq, Hq, v.shape[2])))
            lses.append(torch.full((Hq, Lq), float("-inf"), device=q.device))
            continue
        dm = None if dropout_mask is None else dropout_mask[b:b + 1, :, :Lq, :Lk]
        o, lse = _explicit(qs, ks, vs, None, dropout_p, is_causal, scale, dm, window, True,
                           softcap, True)
        outs.append(o[0].transpose(0, 1))  # (Lq_b, Hq, D)
        lses.append(lse[0])
    out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape)
    if return_lse:
        lse = torch.cat(lses, 1) if lses else torch.zeros((Hq, 0), device=q.device)
        return out, lse
    return out
