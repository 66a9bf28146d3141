"""Fused (flash) scaled dot-product attention: forward and backward in Triton.

Layout (B, H, L, D); q has Hq heads, k/v have Hk (GQA: q head h reads kv head
h // (Hq // Hk), never repeated in memory). One kernel family; the variants are constexpr
flags: HAS_RIGHT / HAS_LEFT (key j takes part only if j <= i + diag + wr, resp.
j >= i + diag - wl: causal is HAS_RIGHT with wr = 0, sliding windows set either side; the
diagonal ``diag`` is 0, top-left, or Lk - Lq, bottom-right), HAS_SOFTCAP (scores
``softcap * tanh(s / softcap)``, Gemma 2), IS_VARLEN (packed sequences: q (total_q, Hq, D),
k/v (total_k, Hk, D) seen as (1, H, total, D) with a zero batch stride; program (m, b, h)
reads sequence b's bounds from int32 ``cu_seqlens`` and exits at once past its end),
HAS_MASK + MASK_IS_BOOL (a bool or additive float mask read through broadcast strides,
stride 0 on broadcast dims), HAS_DROPOUT (philox `tl.rand`, regenerated in the backward),
STORE_DS (dS for dbias).

Key blocks outside a query block's window are never visited (loop bounds from ``_span``),
and, symmetrically, query blocks outside a key block's window in the dK/dV pass.

Forward (per query block, looping over key blocks): online softmax in fp32 in base 2,
with the softmax scale folded into ``scale * log2(e)`` so each score costs one multiply and
one ``exp2``. Blocks outside the window (above the causal diagonal) are skipped; blocks
fully in bounds and inside the window run without any score masking, the edges with it.
On the TMA path (Hopper, fp16/bf16) the row sums of P come from the tensor cores, a dot of
the rounded P (the weights the P V product uses) with a tile of ones, instead of a
reduction on the CUDA cores; with dropout or softcap, and elsewhere, an fp32 reduction.
The base-2 log-sum-exp of each row, ``lse2 = log2(sum_j 2^(s2_ij))`` with
``s2 = log2(e) * (scale * q.k + bias)``, is kept (B, Hq, Lq) fp32 for the backward; a fully
masked row stores ``+inf`` so that the backward's ``p = 2^(s2 - lse2)`` is exactly 0 there.

Backward. With P = softmax(S), dropout keep mask Z and r = 1 / (1 - p_drop):
    O = (P * Z * r) V,  dV = (P * Z * r)^T dO,  dP = (dO V^T) * Z * r,
    dS = P * (dP - delta)  with  delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id,
    dQ = scale * dS K,  dK = scale * dS^T Q,  dBias = dS (summed to the mask's shape).
With softcap, S = c * tanh(scale * q.k / c) + bias and dQ, dK take dS * (1 - tanh^2).
A gradient dlse of the returned log-sum-exp adds dlse_i * P_ij to dS_ij (d lse_i / d S_ij =
P_ij, the undropped softmax), i.e. delta_i -> delta_i - dlse_i: one torch op in the launcher.
dK/dV: one program per key block, looping over the q heads of its GQA group and over query
blocks; dQ (and dS) in a separate pass per query block looping over key blocks. Every
gradient element is written by exactly one program: no atomics, bitwise deterministic.
dBias (a float mask that requires grad, e.g. T5's learned bias): the dQ pass writes the full
(B, Hq, Lq, Lk) fp32 dS -- 4 bytes per score, the N x N memory flash attention otherwise
avoids, paid only then -- and torch sums it down to the mask's broadcast shape.

Dropout: keep = philox(seed, b, h, i, j) >= p, the same formula in the forward, both backward
passes and ``dropout_mask`` (which tests hand to the reference); varlen uses the sequence
index for b and local i, j, with the longest key length as the row stride, so
``dropout_mask(seed, n_seqs, Hq, max_seqlen_q, max_seqlen_k, p)[b, :, :Lq_b, :Lk_b]`` is
sequence b's mask. The seed is drawn from
torch's CPU generator, so ``torch.manual_seed`` makes a run reproducible.
"""

import math
from typing import Optional

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from nnfast._backend import interpreting, warn_once
from nnfast.kernels.attention_bwd import (
    _attn_bwd_delta,
    _dkdv_kernel,
    _dq_kernel,
    _dropout_mask_kernel,
)
from nnfast.kernels.attention_fwd import _fwd_kernel

LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------- launchers
def _mask_view(mask: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor):
    """(tensor, strides, HAS_MASK, MASK_IS_BOOL): the mask expanded to (B, Hq, Lq, Lk) as a
    view, so broadcast dims have stride 0 and nothing is copied."""
    if mask is None:
        return like, (0, 0, 0, 0), False, False
    m = mask.expand(shape)
    if m.dtype == torch.bool:
        return m.view(torch.uint8), m.stride(), True, True
    return m, m.stride(), True, False


class _Problem:
    """What the three kernels of one attention call share: the (B, H, L, D) views (varlen:
    (1, H, total, D) with a zero batch stride, B = the number of sequences), the lengths the
    grid and the dropout counters use (varlen: the longest), the window and the constexprs.

    ``window`` = (left, right), -1 = unbounded; ``is_causal`` sets right = 0."""

    def __init__(self, q, k, mask, seed, dropout_p, is_causal, window, bottom_right, softcap,
                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.varlen = cu_seqlens_q is not None
        if self.varlen:
            self.B, Hq, D = cu_seqlens_q.numel() - 1, q.shape[1], q.shape[2]
            self.Lq, self.Lk = max_seqlen_q, max_seqlen_k
            self.cu = (cu_seqlens_q, cu_seqlens_k)
        else:
            self.B, Hq, self.Lq, D = q.shape
            self.Lk = k.shape[2]
            self.cu = (q, q)  # unused pointers
        self.Hq = Hq
        wl, wr = window
        if is_causal:
            wr = 0
        m, self.m_strides, has_mask, is_bool = _mask_view(
            mask, (self.B, Hq, self.Lq, self.Lk), q)
        self.mask = m
        self.consts = dict(
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
            HAS_LEFT=wl >= 0, HAS_RIGHT=wr >= 0, HAS_SOFTCAP=softcap > 0.0,
            IS_VARLEN=self.varlen, HAS_MASK=has_mask, MASK_IS_BOOL=is_bool,
            HAS_DROPOUT=dropout_p > 0.0,
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        )
        self.buckets = (triton.next_power_of_2(self.Lq), triton.next_power_of_2(self.Lk))
        self.seed = int(seed.item()) if seed is not None and dropout_p > 0.0 else 0
        # Runtime scalars, in kernel order: cap2, bottom_right, wl, wr, dropout_p, seed.
        self.scalars = (softcap * LOG2E, int(bool(bottom_right)), max(wl, 0), max(wr, 0),
                        dropout_p, self.seed)

    def view(self, t):
        """The kernels' (B, H, L, D) view of q/k/v/out/grads."""
        return t.permute(1, 0, 2).unsqueeze(0) if self.varlen else t

    def strides(self, t4):
        st = t4.stride()
        return (0, *st[1:]) if self.varlen else st

    def new_out(self, q):
        if self.varlen:
            return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                    torch.empty((self.Hq, q.shape[0]), dtype=torch.float32, device=q.device))
        B, Hq, Lq, D = q.shape
        return (torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device),
                torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device))

    def lse_strides(self, lse):
        return (0, lse.stride(0)) if self.varlen else lse.stride()[:2]


def _tma_ok(*ts: torch.Tensor) -> bool:
    """Whether the forward can read/write these (B, H, L, D) views through TMA descriptors:
    CUDA sm_90+ (not the interpreter), fp16/bf16, unit last stride, 16-byte aligned base and
    strides. fp32 keeps pointers: its exact (ieee) dot runs on the CUDA cores, not HGMMA, and
    spills several KB more through descriptors (scripts/compile_check.py)."""
    if interpreting() or not all(t.is_cuda for t in ts) or ts[0].element_size() != 2:
        return False
    if torch.cuda.get_device_capability(ts[0].device)[0] < 9:
        return False
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
               and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) for t in ts)


def _desc(t: torch.Tensor) -> TensorDescriptor:
    # The tile shape is a placeholder: each autotune config sets its own before launching.
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, 16])


def _fwd(q, k, v, mask, seed, dropout_p, is_causal, scale, window=(-1, -1), bottom_right=False,
         softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    P = _Problem(q, k, mask, seed, dropout_p, is_causal, window, bottom_right, softcap,
                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    q4, k4, v4 = P.view(q), P.view(k), P.view(v)
    Hq, Hk = q4.shape[1], k4.shape[1]
    out, lse = P.new_out(q)
    o4 = P.view(out)
    use_tma = _tma_ok(q4, k4, v4, o4)
    # TMA: descriptors over the views (varlen's output stays a pointer: see attention_fwd).
    args = ((_desc(q4), _desc(k4), _desc(v4), o4 if P.varlen else _desc(o4)) if use_tma
            else (q4, k4, v4, o4))
    grid = lambda META: (triton.cdiv(P.Lq, META["BLOCK_M"]), P.B * Hq)
    _fwd_kernel[grid](
        *args[:3], P.mask, args[3], lse, *P.cu, *P.strides(q4), *P.strides(k4), *P.strides(v4),
        *P.strides(o4), *P.m_strides, *P.lse_strides(lse),
        Hq, P.Lq, P.Lk, Hq // Hk, scale * LOG2E, *P.scalars, *P.buckets, **P.consts,
        USE_TMA=use_tma, SCALE_NEG=scale < 0)
    return out, lse


def _bwd(do, q, k, v, out, lse, mask, seed, dropout_p, is_causal, scale, need_ds,
         window=(-1, -1), bottom_right=False, softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
         max_seqlen_q=0, max_seqlen_k=0, grad_lse=None):
    P = _Problem(q, k, mask, seed, dropout_p, is_causal, window, bottom_right, softcap,
                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    q4, k4, v4, o4, do4 = P.view(q), P.view(k), P.view(v), P.view(out), P.view(do)
    Hq, Hk, D = q4.shape[1], k4.shape[1], q4.shape[3]
    delta = torch.empty_like(lse)
    block = 16 if interpreting() else 64
    # delta per query row; varlen rows are one (1, Hq, total_q) problem here.
    _attn_bwd_delta[(triton.cdiv(o4.shape[2], block), o4.shape[0] * Hq)](
        o4, do4, delta, *o4.stride(), *do4.stride(), Hq, o4.shape[2],
        HEAD_DIM=D, BLOCK_D=P.consts["BLOCK_D"], BLOCK_M=block)
    if grad_lse is not None:
        # The lse's gradient: d lse_i / d s_ij = p_ij, so dS = P * (dP - delta + dlse) and
        # the kernels take it as delta - dlse. grad_lse is w.r.t. the base-2 lse2 they
        # return, lse = ln(2) lse2, so dL/dlse = grad_lse * log2(e); fully masked rows
        # (lse2 = +inf, P = 0) get none.
        delta -= torch.where(torch.isposinf(lse), 0.0, grad_lse.float() * LOG2E)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dq4, dk4, dv4 = P.view(dq), P.view(dk), P.view(dv)
    # dS for a float mask that requires grad: a full (B, Hq, Lq, Lk) fp32 tensor, i.e. the
    # N x N memory the fused kernel otherwise avoids; only paid when the bias is learned.
    shape = (P.B, Hq, P.Lq, P.Lk) if need_ds else (0,)
    ds = torch.zeros(shape, dtype=torch.float32, device=q.device)
    common = (*P.strides(q4), *P.strides(k4), *P.strides(v4), *P.strides(do4))
    args = (Hq // Hk, scale, scale * LOG2E, *P.scalars, *P.buckets)
    _dkdv_kernel[lambda META: (triton.cdiv(P.Lk, META["BLOCK_N"]), P.B * Hk)](
        q4, k4, v4, P.mask, do4, lse, delta, dk4, dv4, *P.cu, *common,
        *P.strides(dk4), *P.strides(dv4), *P.m_strides, *P.lse_strides(lse),
        Hq, Hk, P.Lq, P.Lk, *args, **P.consts)
    _dq_kernel[lambda META: (triton.cdiv(P.Lq, META["BLOCK_M"]), P.B * Hq)](
        q4, k4, v4, P.mask, do4, lse, delta, dq4, ds, *P.cu, *common,
        *P.strides(dq4), *P.m_strides, *P.lse_strides(lse),
        Hq, P.Lq, P.Lk, *args, STORE_DS=need_ds, **P.consts)
    return dq, dk, dv, ds


def dropout_mask(seed: int, B: int, H: int, Lq: int, Lk: int, p: float,
                 device: torch.device | str) -> torch.Tensor:
    """The bool (B, H, Lq, Lk) keep mask (True = kept) that the kernels draw for ``seed``."""
    out = torch.empty((B, H, Lq, Lk), dtype=torch.int8, device=device)
    grid = (triton.cdiv(Lq, 32), triton.cdiv(Lk, 32), B * H)
    _dropout_mask_kernel[grid](out, Lq, Lk, int(seed), float(p), BLOCK_M=32, BLOCK_N=32)
    return out.bool()


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("nnfast::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],  # noqa: UP045 (torch's schema inference wants Optional)
    seed: Optional[torch.Tensor],  # noqa: UP045 (int64 (1,) on the CPU)
    dropout_p: float,
    is_causal: bool,
    scale: float,
    window_left: int = -1,
    window_right: int = -1,
    bottom_right: bool = False,
    softcap: float = 0.0,
    cu_seqlens_q: Optional[torch.Tensor] = None,  # noqa: UP045 (varlen: int32 (B + 1,))
    cu_seqlens_k: Optional[torch.Tensor] = None,  # noqa: UP045
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(q, k, v, attn_mask, seed, dropout_p, is_causal, scale, (window_left, window_right),
                bottom_right, softcap, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@attention_fwd.register_fake
def _(q, k, v, attn_mask, seed, dropout_p, is_causal, scale, window_left=-1, window_right=-1,
      bottom_right=False, softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
      max_seqlen_k=0):
    if cu_seqlens_q is not None:  # varlen: lse (Hq, total_q)
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    B, Hq, Lq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, Lq), dtype=torch.float32)


@torch.library.custom_op("nnfast::attention_bwd", mutates_args=())
def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: Optional[torch.Tensor],  # noqa: UP045
    seed: Optional[torch.Tensor],  # noqa: UP045
    dropout_p: float,
    is_causal: bool,
    scale: float,
    need_ds: bool,
    window_left: int = -1,
    window_right: int = -1,
    bottom_right: bool = False,
    softcap: float = 0.0,
    cu_seqlens_q: Optional[torch.Tensor] = None,  # noqa: UP045
    cu_seqlens_k: Optional[torch.Tensor] = None,  # noqa: UP045
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    grad_lse: Optional[torch.Tensor] = None,  # noqa: UP045 (the gradient of lse, if it has one)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(grad_out, q, k, v, out, lse, attn_mask, seed, dropout_p, is_causal, scale,
                need_ds, (window_left, window_right), bottom_right, softcap, cu_seqlens_q,
                cu_seqlens_k, max_seqlen_q, max_seqlen_k, grad_lse)


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, attn_mask, seed, dropout_p, is_causal, scale, need_ds,
      *rest):
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if need_ds else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, seed, dropout_p, is_causal, scale, *opts = inputs
    out, lse = output
    # An output the loss does not use gets a None gradient, not zeros: without return_lse
    # (or when the loss ignores lse, or ignores out) the backward does no extra work.
    ctx.set_materialize_grads(False)
    cu_q, cu_k = (opts[4], opts[5]) if len(opts) > 4 else (None, None)
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed, cu_q, cu_k)
    ctx.args = (dropout_p, is_causal, scale)
    ctx.opts = tuple(opts[:4]), tuple(opts[6:])
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask, seed, cu_q, cu_k = ctx.saved_tensors
    need_ds = bool(attn_mask is not None and attn_mask.dtype != torch.bool
                   and ctx.needs_input_grad[3])
    head, tail = ctx.opts
    lse_only = grad_out is None
    if lse_only:  # a loss of lse alone: dP = 0
        grad_out = torch.zeros_like(out)
    dq, dk, dv, ds = attention_bwd(grad_out, q, k, v, out, lse, attn_mask, seed, *ctx.args,
                                   need_ds, *head, *((cu_q, cu_k, *tail) if tail else ()),
                                   grad_lse=grad_lse)
    # dS summed over the mask's broadcast dims: a deterministic torch reduction.
    dbias = ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if need_ds else None
    if lse_only:  # lse does not depend on v: no gradient, as on the reference path
        dv = None
    return (dq, dk, dv, dbias) + (None,) * (ctx.n_inputs - 4)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry
def draw_seed_tensor() -> torch.Tensor:
    """The dropout seed, int64 (1,) on the CPU, from torch's default CPU generator: so
    ``torch.manual_seed`` makes dropout reproducible (and a tensor, so torch.compile traces
    it instead of breaking the graph on ``.item()``)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def draw_seed() -> int:
    """The seed the next dropout call will use after the same ``torch.manual_seed``, for
    ``dropout_mask(draw_seed(), ...)`` in tests."""
    return int(draw_seed_tensor().item())


def _natural_lse(lse2: torch.Tensor) -> torch.Tensor:
    """The kernels' base-2 lse (+inf on fully masked rows) as the natural log-sum-exp of the
    scores (-inf on fully masked rows: the log of an empty sum)."""
    return torch.where(torch.isposinf(lse2), float("-inf"), lse2 * math.log(2.0))


def _why_reference(q, k, n_programs: int, Lq: int, Lk: int, dropout_p: float) -> str | None:
    """Why a call must run the PyTorch reference instead of the kernels, or None."""
    if q.numel() == 0 or k.numel() == 0:
        return "empty inputs"
    if dropout_p > 0.0 and Lq * Lk >= 2**31:
        return "dropout with Lq * Lk >= 2^31 (32-bit philox counters)"
    if n_programs > 65535:
        return "batch (or sequences) * heads > 65535 (grid limit)"
    return None


def _fallback(why: str, run_reference):
    warn_once(f"nnfast attention: {why} runs the PyTorch reference")
    return run_reference()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float,
    *,
    window: tuple[int, int] = (-1, -1),
    bottom_right: bool = False,
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """Called by ``nnfast.functional.scaled_dot_product_attention`` after validation.

    ``window`` = (left, right) keys around the diagonal, -1 = unbounded; the diagonal is
    top-left (query i at key i) or, with ``bottom_right``, at key ``i + Lk - Lq``.
    ``softcap`` > 0: scores ``softcap * tanh(scale * q.k / softcap)``. ``return_lse``: also
    the natural log-sum-exp (B, Hq, Lq) fp32 of each row, differentiable (-inf and no
    gradient on fully masked rows; with dropout, that of the undropped softmax).

    Without grad mode or inputs requiring grad, the custom op's autograd layer is bypassed:
    nothing is saved and the log-sum-exp is dropped right away."""
    B, Hq, Lq, _ = q.shape
    why = _why_reference(q, k, B * Hq, Lq, k.shape[2], dropout_p)
    if why is not None:
        from nnfast.reference.attention import attention as reference

        return _fallback(why, lambda: reference(
            q, k, v, attn_mask, dropout_p, is_causal, scale, window=window,
            bottom_right=bottom_right, softcap=softcap, return_lse=return_lse))
    seed = draw_seed_tensor() if dropout_p > 0.0 else None
    out, lse = attention_fwd(q, k, v, attn_mask, seed, dropout_p, is_causal, scale,
                             int(window[0]), int(window[1]), bool(bottom_right), float(softcap))
    return (out, _natural_lse(lse)) if return_lse else out


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
    *,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
):
    """Called by ``nnfast.functional.varlen_attention`` after validation: q (total_q, Hq, D),
    k/v (total_k, Hk, D), sequence b at rows ``cu_seqlens[b] : cu_seqlens[b + 1]``; causal
    and window aligned bottom-right per sequence (flash-attention's varlen). One program per
    (query block of the longest sequence, sequence, head): blocks past a sequence's end exit
    at once, so no padding is ever computed. lse: (Hq, total_q) fp32, natural log,
    differentiable as ``attention``'s."""
    n_programs = (cu_seqlens_q.numel() - 1) * q.shape[1]
    why = _why_reference(q, k, n_programs, max_seqlen_q, max_seqlen_k, dropout_p)
    if why is not None:
        from nnfast.reference.attention import varlen_attention as reference

        return _fallback(why, lambda: reference(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            is_causal, scale, window=window, softcap=softcap, return_lse=return_lse))
    seed = draw_seed_tensor() if dropout_p > 0.0 else None
    out, lse = attention_fwd(q, k, v, None, seed, dropout_p, is_causal, scale,
                             int(window[0]), int(window[1]), True, float(softcap),
                             cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    return (out, _natural_lse(lse)) if return_lse else out
