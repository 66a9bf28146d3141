"""``Attention``, a drop-in for ``torch.nn.MultiheadAttention`` on nnfast's attention kernel
(same constructor, parameter names, masks in MHA's convention, return value), and
``patch(model)``, which swaps a model's ``nn.MultiheadAttention``/``nn.LayerNorm``/
``nn.RMSNorm`` for nnfast's in place.

One deliberate difference from PyTorch: a query that may attend to no key at all (a fully
masked row) gives a zero output row where PyTorch gives NaN.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from nnfast import functional as F
from nnfast.modules.norm import LayerNorm, RMSNorm
from nnfast.reference.attention import _allowed


def _check_mask_dtype(name: str, mask: torch.Tensor | None) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")


def _pad_key(mask: torch.Tensor | None) -> torch.Tensor | None:
    """One more key column that takes part: False (MHA's bool convention) or 0.0."""
    if mask is None:
        return None
    return torch.nn.functional.pad(mask, (0, 1), value=False if mask.dtype == torch.bool else 0.0)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MHA-convention mask (bool True = masked out, or float) as a float additive mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


def _sdpa_mask(attn_mask, key_padding_mask, dtype):
    """Merge MHA's masks, (1 or B, 1 or H, L, S) and (B, 1, 1, S), into one SDPA mask:
    bool "True = takes part" when every mask is bool, else the float sum, as PyTorch does."""
    masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        allowed = ~masks[0]
        return allowed & ~masks[1] if len(masks) == 2 else allowed
    total = _additive(masks[0], dtype)
    return total + _additive(masks[1], dtype) if len(masks) == 2 else total


class Attention(nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention`` on nnfast's attention kernel.

    Same constructor, parameters (an ``nn.MultiheadAttention`` state dict loads), masks
    (MHA's convention: a bool ``True`` is *not* allowed to attend; floats are added) and
    return value ``(attn_output, attn_weights or None)``.

    ``need_weights=False`` is the fast path: one fused ``scaled_dot_product_attention`` call.
    ``need_weights=True`` (PyTorch's default!) computes the attention matrix explicitly to
    return it, which is slower and uses memory quadratic in the sequence length; pass
    ``need_weights=False`` whenever the weights are not used.

    Difference from PyTorch: a query row whose keys are all masked gives a zero output (and
    zero weights) where PyTorch gives NaN.

    nnfast extras (keyword-only; the defaults are PyTorch's module): ``window_size=(left,
    right)``, query i sees keys ``i - left .. i + right`` (-1 = unbounded), and ``softcap``
    (``softcap * tanh(scores / softcap)``), as in ``nnfast.functional``.
    """

    __constants__ = ["batch_first"]
    bias_k: torch.Tensor | None
    bias_v: torch.Tensor | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        window_size: tuple[int, int] | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.window_size, self.softcap = F._check_extras(window_size, softcap)
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                f"and num_heads={num_heads}"
            )
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        kw = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **kw))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **kw))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **kw))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **kw))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **kw)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **kw))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **kw))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialization, step for step.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    def _project(self, query, key, value):
        """The input projections, (L, B, E) -> q (L, B, E), k/v (S, B, E)."""
        b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.chunk(3)
        lin = torch.nn.functional.linear
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one GEMM
                return lin(query, self.in_proj_weight, b).chunk(3, dim=-1)
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return lin(query, w_q, b_q), lin(key, w_k, b_k), lin(value, w_v, b_v)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward``. ``is_causal`` is a hint that ``attn_mask``
        is the causal mask; as in PyTorch it requires ``attn_mask``, and the mask is used
        instead of the hint when a key padding mask is given or weights are needed."""
        is_batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_mask_dtype("attn_mask", attn_mask)
        if (
            key_padding_mask is not None
            and attn_mask is not None
            and key_padding_mask.dtype != attn_mask.dtype
        ):
            warnings.warn(
                "Support for mismatched key_padding_mask and attn_mask is deprecated. "
                "Use same type for both instead.",
                stacklevel=2,
            )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention); "
                "nn.Transformer.generate_square_subsequent_mask makes one."
            )
        # PyTorch trusts the hint only where it can hand it to SDPA unchanged.
        use_causal = is_causal and key_padding_mask is None and not need_weights
        if use_causal:
            attn_mask = None

        if self.batch_first and is_batched:  # (B, L, E) -> (L, B, E), keeping `is` identities
            same_kv, same_qk = key is value, query is key
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        elif not is_batched:  # (L, E) -> (L, 1, E)
            same_kv, same_qk = key is value, query is key
            query = query.unsqueeze(1)
            key = query if same_qk else key.unsqueeze(1)
            value = key if same_kv else value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
        L, B, E = query.shape
        H, D = self.num_heads, self.head_dim

        q, k, v = self._project(query, key, value)  # (L, B, E), (S, B, E), (S, B, E)
        if attn_mask is not None:
            # (L, S) -> (1, 1, L, S); (B * H, L, S) -> (B, H, L, S)
            lead = (1, 1) if attn_mask.dim() == 2 else (B, H)
            attn_mask = attn_mask.view(*lead, L, attn_mask.shape[-1])
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.view(B, 1, 1, -1)  # (B, 1, 1, S)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(1, B, E)])  # (S + 1, B, E)
            v = torch.cat([v, self.bias_v.expand(1, B, E)])  # (S + 1, B, E)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        q = q.reshape(L, B, H, D).permute(1, 2, 0, 3)  # (B, H, L, D)
        k = k.reshape(k.shape[0], B, H, D).permute(1, 2, 0, 3)  # (B, H, S, D)
        v = v.reshape(v.shape[0], B, H, D).permute(1, 2, 0, 3)  # (B, H, S, D)
        if self.add_zero_attn:
            zeros = k.new_zeros(B, H, 1, D)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)  # (B, H, S + 1, D)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        S = k.shape[2]
        if key_padding_mask is not None and key_padding_mask.shape[-1] != S:
            raise ValueError(f"key_padding_mask covers {key_padding_mask.shape[-1]} keys, not {S}")
        mask = _sdpa_mask(attn_mask, key_padding_mask, q.dtype)  # broadcasts to (B, H, L, S)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            y, weights = self._explicit(q, k, v, mask, dropout_p, self.window_size,
                                        self.softcap)  # (B, H, L, D), (B, H, L, S)
            if average_attn_weights:
                weights = weights.mean(dim=1)  # (B, L, S)
            if not is_batched:
                weights = weights.squeeze(0)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=use_causal,
                window_size=self.window_size, softcap=self.softcap,
            )  # (B, H, L, D)
        y = y.permute(2, 0, 1, 3).reshape(L, B, E)  # (L, B, E)
        out = self.out_proj(y)
        if not is_batched:
            out = out.squeeze(1)  # (L, E)
        elif self.batch_first:
            out = out.transpose(0, 1)  # (B, L, E)
        return out, weights

    @staticmethod
    def _explicit(q, k, v, mask, dropout_p, window=(-1, -1), softcap=0.0):
        """Attention with its probabilities materialized (the ``need_weights`` path), in
        fp32, with fully masked rows sent to zeros as the kernel does."""
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if softcap > 0.0:
            s = softcap * torch.tanh(s / softcap)
        allowed = _allowed(s.shape[-2], s.shape[-1], False, window, False, s.device)
        if allowed is not None:
            s = s.masked_fill(~allowed, -math.inf)
        if mask is not None:  # s: (B, H, L, S)
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.float()
        # No key at all (empty memory): a max of 0, so the output and weights are zeros.
        m = s.detach().amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_zeros(1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        denom = e.sum(dim=-1, keepdim=True)
        p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
        if dropout_p > 0.0:
            p = torch.nn.functional.dropout(p, p=dropout_p)
        p = p.to(q.dtype)
        return torch.matmul(p, v), p

    def merge_masks(self, attn_mask, key_padding_mask, query):
        """PyTorch's helper for the fused ``TransformerEncoderLayer`` inference path, kept so
        that path still works when this module is placed in a layer by hand (``patch``
        switches that path off, since it would bypass nnfast)."""
        return nn.MultiheadAttention.merge_masks(self, attn_mask, key_padding_mask, query)

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """``nn.MultiheadAttention``'s shape rules, as ValueErrors. True for batched input."""
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D, got {query.dim()}-D")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key and value must have the same number of dims, got "
                f"{query.dim()}, {key.dim()}, {value.dim()}"
            )
        if query.shape[-1] != self.embed_dim:
            raise ValueError(
                f"query's last dim must be embed_dim={self.embed_dim}, got {query.shape[-1]}"
            )
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"key/value last dims must be kdim={self.kdim}/vdim={self.vdim}, got "
                f"{key.shape[-1]}/{value.shape[-1]}"
            )
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} disagree")
        seq = 1 if (batched and self.batch_first) else 0
        L, S = query.shape[seq], key.shape[seq]
        B = query.shape[1 - seq] if batched else 1
        if batched and key.shape[1 - seq] != B:
            raise ValueError(f"query has batch size {B} but key {key.shape[1 - seq]}")
        if key_padding_mask is not None:
            want = (B, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(
                    f"key_padding_mask must have shape {want}, got {tuple(key_padding_mask.shape)}"
                )
        if attn_mask is not None:
            want2, want3 = (L, S), ((B if batched else 1) * self.num_heads, L, S)
            if tuple(attn_mask.shape) not in (want2, want3):
                raise ValueError(
                    f"attn_mask must have shape {want2} or {want3}, got {tuple(attn_mask.shape)}"
                )
        return batched

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )


# ----------------------------------------------------------------------------- patch
def _convert(m: nn.Module, norms: bool = True, attention: bool = True) -> nn.Module | None:
    """nnfast's counterpart of ``m`` with its weights, device, dtype and mode, or None.
    Exact types only: a subclass may override ``forward`` (e.g. an fp32-upcasting norm)."""
    p = next(m.parameters(), None)
    kw = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    if not (attention if type(m) is nn.MultiheadAttention else norms):
        return None
    if type(m) is nn.MultiheadAttention:
        new = Attention(
            m.embed_dim, m.num_heads, m.dropout, bias=m.in_proj_bias is not None,
            add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn,
            kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first, **kw,
        )
    elif type(m) is nn.LayerNorm:
        new = LayerNorm(
            m.normalized_shape, m.eps, m.elementwise_affine,
            bias=not m.elementwise_affine or m.bias is not None, **kw,
        )
    elif hasattr(nn, "RMSNorm") and type(m) is nn.RMSNorm:
        new = RMSNorm(m.normalized_shape, m.eps, m.elementwise_affine, **kw)
    else:
        return None
    new.load_state_dict(m.state_dict())
    for p_new, p_old in zip(new.parameters(), m.parameters()):
        p_new.requires_grad_(p_old.requires_grad)
    return new.train(m.training)


def patch(model: nn.Module, *, norms: bool = True, attention: bool = True, mlps: bool = True,
          rope: bool = True, report: bool = False):
    """Replace every ``nn.MultiheadAttention``, ``nn.LayerNorm`` and ``nn.RMSNorm`` in
    ``model`` by ``nnfast.Attention``/``LayerNorm``/``RMSNorm``, in place, keeping weights,
    device, dtype and train/eval mode; modules shared between parents stay shared.
    Returns ``model`` (or its replacement when ``model`` itself is one of those types);
    ``(model, report)`` with ``report=True``. ``norms``/``attention``/``mlps``/``rope``
    turn each kind of swap off.

    A ``transformers`` model is patched by ``nnfast.models.hf.patch.patch_hf`` instead:
    norms (LayerNorm, LlamaRMSNorm and kin, T5LayerNorm), gated MLPs, RoPE and attention
    (an ``"nnfast"`` attention implementation), sharing the same Parameters.

    PyTorch's ``TransformerEncoder``/``TransformerEncoderLayer`` have inference fast paths
    that call fused ATen kernels with the submodules' weights directly, which would bypass
    nnfast; they are switched off on the patched layers (their regular path gives the same
    result).
    """
    from nnfast.models.hf.patch import is_hf_model, patch_hf

    if is_hf_model(model):
        swapped = patch_hf(model, norms=norms, mlps=mlps, rope=rope, attention=attention)
        return (model, swapped) if report else model
    done: dict[int, nn.Module] = {}
    counts: dict[str, int] = {}

    def visit(parent: nn.Module) -> None:
        # _modules, not named_children(): that skips a second name for the same module.
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                new = _convert(child, norms, attention)
                done[id(child)] = child if new is None else new
                if new is not None:
                    counts[type(child).__name__] = counts.get(type(child).__name__, 0) + 1
                if new is None:
                    visit(child)
            if done[id(child)] is not child:
                setattr(parent, name, done[id(child)])

    root = _convert(model, norms, attention)
    if root is not None:
        return (root, {type(model).__name__: 1}) if report else root
    visit(model)
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and isinstance(m.self_attn, Attention):
            # The layer's fast path needs this flag non-zero; the regular path reads
            # `activation` instead, so clearing it changes nothing else.
            m.activation_relu_or_gelu = 0
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False  # nested-tensor inputs bypass the layers' modules
    return (model, counts) if report else model
