"""``nnfast.patch`` for ``transformers`` models: nnfast's kernels inside a Hugging Face model,
in place, as Liger-Kernel's one-liners do. Exact by construction: each swap computes the
same function of the same Parameter objects (state-dict keys and an existing optimizer's
parameters stay valid).

* norms: ``nn.LayerNorm`` (GPT-2, BERT) and the RMSNorms of the form ``weight * x / rms(x)``
  (``LlamaRMSNorm`` and its copies in Mistral/Qwen2/Qwen3, ``T5LayerNorm``) -> nnfast's.
  Gemma's ``(1 + weight)`` norm and other look-alikes are not in the list and stay.
* gated MLPs: ``LlamaMLP``-style ``down(silu(gate(x)) * up(x))`` -> nnfast's fused
  ``silu_mul``; T5 v1.1's ``wo(dropout(gelu_tanh(wi_0 x) * wi_1 x))`` -> ``gelu_mul``.
  The ``gate_proj``/``up_proj``/``down_proj`` (``wi_0``/``wi_1``/``wo``) Linears are kept
  as they are, so the keys do not change (nnfast's own SwiGLU fuses gate|up into one).
* RoPE: the model family's ``apply_rotary_pos_emb`` -> nnfast's rotary kernel fed with
  the cos/sin the model computed (any ``rope_type``). This is a module-level function, so it
  applies to every model of that family in the process (as Liger does).
* attention: an ``"nnfast"`` implementation registered in transformers' ``AttentionInterface``
  (with sdpa's mask format) and selected with ``model.set_attn_implementation("nnfast")``.
  T5's relative position bias reaches the kernel as an additive mask (with its gradient).
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch import nn

from nnfast import functional as F
from nnfast.modules.norm import LayerNorm, RMSNorm

RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm",
             "Qwen3RMSNorm", "T5LayerNorm", "MT5LayerNorm")
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
ROPE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_ORIGINAL_ROPE: dict[str, object] = {}  # modeling module -> its own apply_rotary_pos_emb


def is_hf_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__) and \
        hasattr(model, "config")


class HFRMSNorm(RMSNorm):
    """nnfast's RMSNorm under the attribute names HF code reads (``variance_epsilon``)."""

    @property
    def variance_epsilon(self) -> float:
        return self.eps


class SwiGLUProj(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the product fused."""

    def __init__(self, old: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = old.gate_proj, old.up_proj, old.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu_mul(self.gate_proj(x), self.up_proj(x)))


class T5GatedGelu(nn.Module):
    """T5 v1.1's ``T5DenseGatedActDense`` with ``gelu_tanh(wi_0 x) * wi_1 x`` fused."""

    def __init__(self, old: nn.Module) -> None:
        super().__init__()
        self.wi_0, self.wi_1, self.wo, self.dropout = old.wi_0, old.wi_1, old.wo, old.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.gelu_mul(self.wi_0(x), self.wi_1(x), approximate="tanh"))
        return self.wo(h.to(self.wo.weight.dtype))


def _new_norm(m: nn.Module) -> nn.Module | None:
    if type(m) is nn.LayerNorm and m.elementwise_affine:
        new = LayerNorm(m.normalized_shape, m.eps, bias=m.bias is not None, device="meta")
        new.weight, new.bias = m.weight, m.bias
        return new
    if type(m).__name__ in RMS_NORMS and isinstance(getattr(m, "weight", None), nn.Parameter):
        new = HFRMSNorm(m.weight.shape, eps=m.variance_epsilon, device="meta")
        new.weight = m.weight
        return new
    return None


def _new_mlp(m: nn.Module) -> nn.Module | None:
    from transformers.activations import NewGELUActivation, SiLUActivation

    name = type(m).__name__
    if name in SWIGLU_MLPS and isinstance(m.act_fn, (SiLUActivation, nn.SiLU)):
        return SwiGLUProj(m)
    if name == "T5DenseGatedActDense" and type(m.act) is NewGELUActivation:
        return T5GatedGelu(m)
    return None


def _swap(model: nn.Module, make) -> Counter:
    """Replace every submodule ``make`` has a substitute for; shared modules stay shared."""
    done: dict[int, nn.Module] = {}
    counts: Counter = Counter()
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in done:
                new = make(child)
                done[id(child)] = child if new is None else new.train(child.training)
                if new is not None:
                    counts[type(child).__name__] += 1
            if done[id(child)] is not child:
                setattr(parent, name, done[id(child)])
    return counts


# ----------------------------------------------------------------------------- RoPE
def nnfast_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` on nnfast's kernel. HF's ``cos``/``sin``
    ``(B, T, D)`` repeat each frequency in both halves; their first halves, one row per
    (batch, position), are the table, addressed by ``position_ids = b * T + t``."""
    if unsqueeze_dim != 1 or cos.dim() != 3 or q.dim() != 4:
        raise ValueError("nnfast's RoPE patch expects q (B, H, T, D) and cos (B, T, D)")
    B, T, D = cos.shape
    half = D // 2
    cos_t = cos[..., :half].reshape(B * T, half).float()
    sin_t = sin[..., :half].reshape(B * T, half).float()
    pos = torch.arange(B * T, device=q.device)
    pos = pos if B == 1 else pos.view(B, T)  # one batch row of cos: shared by every sequence
    return F.apply_rotary(q, k, cos_t, sin_t, position_ids=pos)


def _patch_rope(model: nn.Module) -> list[str]:
    patched = []
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        family = type(m).__module__.split(".")[-1].removeprefix("modeling_")
        if mod is None or family not in ROPE_FAMILIES or not hasattr(mod, "apply_rotary_pos_emb"):
            continue
        if mod.__name__ not in _ORIGINAL_ROPE:
            _ORIGINAL_ROPE[mod.__name__] = mod.apply_rotary_pos_emb
            mod.apply_rotary_pos_emb = nnfast_apply_rotary_pos_emb
        if mod.__name__ not in patched:
            patched.append(mod.__name__)
    return patched


# ----------------------------------------------------------------------------- attention
def nnfast_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                             scaling=None, is_causal=None, position_bias=None, **kwargs):
    """transformers' attention-function contract (as ``sdpa_attention_forward``) on nnfast's
    attention: query (B, H, T, D), key/value (B, Hk, S, D) -> ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import create_position_bias_mask

    if kwargs.get("softcap") is not None:
        raise ValueError("nnfast attention does not implement softcap")
    q_len = query.shape[2]
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > q_len:  # prefill into a longer static cache
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal,
                                                   query, key)
        is_causal = False
    if attention_mask is not None and attention_mask.is_floating_point():
        # transformers masks with finfo.min; the kernel's exp2 scaling would overflow it to
        # -inf anyway, so say -inf (the same result, without overflow warnings).
        attention_mask = attention_mask.to(query.dtype)
        floor = torch.finfo(query.dtype).min / 2
        attention_mask = attention_mask.masked_fill(attention_mask < floor, float("-inf"))
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal,
        scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("nnfast", nnfast_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register("nnfast", sdpa_mask)


def _patch_attention(model: nn.Module) -> str | None:
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return None
    _register_attention()
    model.set_attn_implementation("nnfast")
    return model.config._attn_implementation


def patch_hf(model: nn.Module, *, norms: bool = True, mlps: bool = True, rope: bool = True,
             attention: bool = True) -> dict:
    """Patch a ``transformers`` model in place; returns what was swapped:
    ``{"norms": {class: n}, "mlps": {class: n}, "rope": [modules], "attention": impl}``."""
    report: dict = {"norms": {}, "mlps": {}, "rope": [], "attention": None}
    if norms:
        report["norms"] = dict(_swap(model, _new_norm))
    if mlps:
        report["mlps"] = dict(_swap(model, _new_mlp))
    if rope:
        report["rope"] = _patch_rope(model)
    if attention:
        report["attention"] = _patch_attention(model)
    return report
