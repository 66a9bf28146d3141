"""Scaled dot-product attention in plain PyTorch: the CPU path, the test oracle and the
benchmark baseline for ``nnfast.kernels.attention``.

The math runs in fp32 whatever the input dtype and materializes the (B, H, Lq, Lk) score
matrix, which is what the fused kernel avoids. Semantics follow
``torch.nn.functional.scaled_dot_product_attention`` except for one deliberate difference:
a query row with no key to attend to (fully masked) gives zeros and zero gradients, where
PyTorch gives NaN.
"""

from __future__ import annotations

import torch


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
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` for q ``(B, Hq, Lq, D)``, k/v ``(B, Hk, Lk, D)``.

    ``attn_mask``: bool (True takes part) or float (added to the scores), broadcastable to
    ``(B, Hq, Lq, Lk)``; a float mask that requires grad gets its gradient.
    ``is_causal``: top-left aligned, query i sees keys j <= i.
    ``dropout_mask``: bool ``(B, Hq, Lq, Lk)``, True = kept; drawn from torch's RNG when
    ``dropout_p > 0`` and none is given. Kept probabilities are scaled by ``1 / (1 - p)``.
    """
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    kf = _expand_kv(k, Hq).float()
    vf = _expand_kv(v, Hq).float()
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # (B, Hq, Lq, Lk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.float()
    if is_causal:
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    # Softmax that sends a row of -inf to zeros: subtract a finite row max (0 for such rows),
    # and divide by a denominator of 1 where the row sum is 0. exp(-inf) = 0 and its
    # derivative is 0, so the masked entries contribute no NaN to the gradients.
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= dropout_p
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    return torch.matmul(p, vf).to(q.dtype)  # (B, Hq, Lq, D)
