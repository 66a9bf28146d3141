"""The four Hugging Face architectures nnfast reads and writes, each as config translation
(both ways) plus one name table (``mapping.Entry`` rows). GPT-2 and Llama are nnfast's one
``Decoder``, BERT its ``Bert``, T5 its ``T5``: what differs is data, not code.

A Hugging Face field nnfast cannot compute exactly is refused with a ValueError naming it;
fields that change nothing nnfast computes (token ids for generation, init ranges, ...) are
kept in ``model.hf_config`` and written back on export.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from nnfast.models.hf.mapping import Entry, layer_entries


def _get(cfg: dict, *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json: {field}={value!r} is not supported: {why}")


def _require(cfg: dict, field: str, allowed: tuple, default: Any, why: str) -> Any:
    value = cfg.get(field, default)
    if value is None:
        value = default
    if value not in allowed:
        raise refuse(field, value, why)
    return value


def _tied(cfg: dict, hf: dict, head: str, emb: str, default: bool = True) -> bool:
    """Tied as transformers decides: the config says so and the checkpoint has no head of
    its own (a head with other values than the embedding stays untied)."""
    if not cfg.get("tie_word_embeddings", default):
        return False
    return head not in hf or torch.equal(hf[head], hf[emb])


def _dropout(cfg: dict, *names: str) -> float:
    return float(_get(cfg, *names, default=0.0))


@dataclass
class Family:
    """One Hugging Face architecture: how its config and weights become an nnfast model."""

    name: str  # nnfast registry name
    model_type: str
    architecture: str  # written on export
    architectures: tuple[str, ...]  # accepted on load
    prefix: str  # of the base model's keys ("transformer." ...), added when absent
    ignore: re.Pattern | None
    config_from_hf: Callable[[dict, dict], dict]  # (config.json, tensors) -> nnfast fields
    config_to_hf: Callable[[Any], dict]  # nnfast model -> config.json fields
    entries: Callable[[Any, Any], tuple[list[Entry], dict[str, str]]]  # -> rows, aliases


# ----------------------------------------------------------------------------- GPT-2
_H = "transformer.h.{i}."
GPT2_LAYER = [  # (ours, theirs, sizes, transpose): HF's Conv1D weights are (in, out)
    ("blocks.{i}.norm1.weight", (_H + "ln_1.weight",), None, False),
    ("blocks.{i}.norm1.bias", (_H + "ln_1.bias",), None, False),
    ("blocks.{i}.attn.qkv.weight", (_H + "attn.c_attn.weight",), None, True),
    ("blocks.{i}.attn.qkv.bias", (_H + "attn.c_attn.bias",), None, False),
    ("blocks.{i}.attn.proj.weight", (_H + "attn.c_proj.weight",), None, True),
    ("blocks.{i}.attn.proj.bias", (_H + "attn.c_proj.bias",), None, False),
    ("blocks.{i}.norm2.weight", (_H + "ln_2.weight",), None, False),
    ("blocks.{i}.norm2.bias", (_H + "ln_2.bias",), None, False),
    ("blocks.{i}.mlp.fc.weight", (_H + "mlp.c_fc.weight",), None, True),
    ("blocks.{i}.mlp.fc.bias", (_H + "mlp.c_fc.bias",), None, False),
    ("blocks.{i}.mlp.proj.weight", (_H + "mlp.c_proj.weight",), None, True),
    ("blocks.{i}.mlp.proj.bias", (_H + "mlp.c_proj.bias",), None, False),
]

def gpt2_from_hf(cfg: dict, hf: dict) -> dict:
    _require(cfg, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new",
             "nnfast's GPT-2 MLP is the tanh GELU (gelu_new)")
    _require(cfg, "scale_attn_weights", (True,), True,
             "nnfast's attention always scales by 1/sqrt(head_dim)")
    _require(cfg, "scale_attn_by_inverse_layer_idx", (False,), False,
             "per-layer attention scaling is not implemented")
    _require(cfg, "add_cross_attention", (False,), False, "GPT-2 with cross-attention")
    return dict(
        vocab_size=cfg.get("vocab_size", 50257), block_size=cfg.get("n_positions", 1024),
        n_layer=cfg.get("n_layer", 12), n_head=cfg.get("n_head", 12),
        n_embd=cfg.get("n_embd", 768), hidden_dim=cfg.get("n_inner"),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        dropout=_dropout(cfg, "resid_pdrop"),
        tie_embeddings=_tied(cfg, hf, "lm_head.weight", "transformer.wte.weight"),
    )


def gpt2_to_hf(model) -> dict:
    c = model.config
    if (c.norm, c.mlp, c.pos, c.bias) != ("layernorm", "gelu", "learned", True):
        raise ValueError("to_hf: a GPT-2 export needs norm=layernorm, mlp=gelu, pos=learned, "
                         f"bias=True; got {c.norm}, {c.mlp}, {c.pos}, bias={c.bias}")
    if c.n_kv_head != c.n_head:
        raise ValueError(f"to_hf: GPT-2 has no GQA (n_kv_head={c.n_kv_head} != {c.n_head})")
    return dict(vocab_size=c.vocab_size, n_positions=c.block_size, n_layer=c.n_layer,
                n_head=c.n_head, n_embd=c.n_embd, n_inner=c.hidden_dim,
                layer_norm_epsilon=c.norm_eps, activation_function="gelu_new",
                resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                tie_word_embeddings=c.tie_embeddings)


def gpt2_entries(c, model) -> tuple[list[Entry], dict[str, str]]:
    rows = [Entry("wte.weight", ("transformer.wte.weight",)),
            Entry("wpe.weight", ("transformer.wpe.weight",)),
            Entry("norm_f.weight", ("transformer.ln_f.weight",)),
            Entry("norm_f.bias", ("transformer.ln_f.bias",))]
    rows += layer_entries(GPT2_LAYER, c.n_layer)
    aliases = {}
    if c.tie_embeddings:
        aliases["lm_head.weight"] = "transformer.wte.weight"
    else:
        rows.append(Entry("lm_head.weight", ("lm_head.weight",)))
    return rows, aliases


# ----------------------------------------------------------------------------- Llama
_L = "model.layers.{i}."
_A, _M = _L + "self_attn.", _L + "mlp."
LLAMA_LAYER = [  # (ours, theirs, how ours fuses them)
    ("blocks.{i}.norm1.weight", (_L + "input_layernorm.weight",), None),
    ("blocks.{i}.attn.qkv.weight", tuple(_A + f"{x}_proj.weight" for x in "qkv"), "qkv"),
    ("blocks.{i}.attn.qkv.bias", tuple(_A + f"{x}_proj.bias" for x in "qkv"), "qkv"),
    ("blocks.{i}.attn.proj.weight", (_A + "o_proj.weight",), None),
    ("blocks.{i}.attn.proj.bias", (_A + "o_proj.bias",), None),
    ("blocks.{i}.norm2.weight", (_L + "post_attention_layernorm.weight",), None),
    ("blocks.{i}.mlp.gate_up.weight", (_M + "gate_proj.weight", _M + "up_proj.weight"),
     "gate_up"),
    ("blocks.{i}.mlp.gate_up.bias", (_M + "gate_proj.bias", _M + "up_proj.bias"), "gate_up"),
    ("blocks.{i}.mlp.down.weight", (_M + "down_proj.weight",), None),
    ("blocks.{i}.mlp.down.bias", (_M + "down_proj.bias",), None),
]

def rope_base(cfg: dict) -> float:
    """RoPE's theta; only unscaled ("default") RoPE is computed exactly by nnfast. Both the
    current ``rope_parameters`` and the legacy ``rope_scaling`` are checked."""
    theta = cfg.get("rope_theta", 10000.0)
    for field in ("rope_parameters", "rope_scaling"):
        params = cfg.get(field) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise refuse(f"{field}.rope_type", kind, "nnfast's RoPE supports only 'default'")
        factor = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if float(factor) != 1.0:
            raise refuse("partial_rotary_factor", factor, "Llama rotates the whole head")
        theta = params.get("rope_theta", theta)
    return float(theta)


def llama_from_hf(cfg: dict, hf: dict) -> dict:
    _require(cfg, "hidden_act", ("silu",), "silu", "nnfast's Llama MLP is SwiGLU (silu)")
    n_embd, n_head = cfg.get("hidden_size", 4096), cfg.get("num_attention_heads", 32)
    if cfg.get("head_dim") not in (None, n_embd // n_head):
        raise refuse("head_dim", cfg["head_dim"], f"nnfast's head dim is hidden_size / "
                     f"num_attention_heads = {n_embd // n_head}")
    bias = bool(cfg.get("attention_bias", False))
    if bool(cfg.get("mlp_bias", False)) != bias:
        raise refuse("mlp_bias", cfg.get("mlp_bias"), "nnfast has one bias flag: attention_bias"
                     f"={bias} and mlp_bias must agree")
    return dict(
        vocab_size=cfg.get("vocab_size", 32000),
        block_size=cfg.get("max_position_embeddings", 2048),
        n_layer=cfg.get("num_hidden_layers", 32), n_head=n_head,
        n_kv_head=_get(cfg, "num_key_value_heads", default=n_head), n_embd=n_embd,
        hidden_dim=cfg.get("intermediate_size", 11008),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_base=rope_base(cfg), bias=bias, dropout=_dropout(cfg, "attention_dropout"),
        tie_embeddings=_tied(cfg, hf, "lm_head.weight", "model.embed_tokens.weight", False),
    )


def llama_to_hf(model) -> dict:
    c = model.config
    if (c.norm, c.mlp, c.pos) != ("rmsnorm", "swiglu", "rope"):
        raise ValueError("to_hf: a Llama export needs norm=rmsnorm, mlp=swiglu, pos=rope; got "
                         f"{c.norm}, {c.mlp}, {c.pos}")
    if c.rope_interleaved:
        raise ValueError("to_hf: rope_interleaved=True (Meta's pairing) is not Hugging Face's "
                         "half-split RoPE")
    return dict(vocab_size=c.vocab_size, max_position_embeddings=c.block_size,
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                num_key_value_heads=c.n_kv_head, hidden_size=c.n_embd, head_dim=c.head_dim,
                intermediate_size=c.hidden_dim, rms_norm_eps=c.norm_eps, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
                attention_bias=c.bias, mlp_bias=c.bias, attention_dropout=c.dropout,
                tie_word_embeddings=c.tie_embeddings)


def llama_entries(c, model) -> tuple[list[Entry], dict[str, str]]:
    rows = [Entry("wte.weight", ("model.embed_tokens.weight",)),
            Entry("norm_f.weight", ("model.norm.weight",))]
    kv = c.n_kv_head * c.head_dim
    qkv = (c.n_embd, kv, kv)
    for ours, theirs, sizes in LLAMA_LAYER:
        if ours.endswith(".bias") and not c.bias:
            continue
        sz = {"qkv": qkv, "gate_up": (c.hidden_dim, c.hidden_dim)}.get(sizes)
        rows += layer_entries([(ours, theirs, sz)], c.n_layer)
    aliases = {}
    if c.tie_embeddings:
        aliases["lm_head.weight"] = "model.embed_tokens.weight"
    else:
        rows.append(Entry("lm_head.weight", ("lm_head.weight",)))
    return rows, aliases


# ----------------------------------------------------------------------------- BERT
_B = "bert.encoder.layer.{i}."
_E = "encoder.layers.{i}."
BERT_LAYER = [  # (ours, theirs, fused q|k|v)
    *[(_E + f"attn.qkv.{p}", tuple(_B + f"attention.self.{x}.{p}" for x in
                                   ("query", "key", "value")), True) for p in ("weight", "bias")],
    *[(_E + f"{ours}.{p}", (_B + f"{theirs}.{p}",), False) for p in ("weight", "bias")
      for ours, theirs in (("attn.proj", "attention.output.dense"),
                           ("norm1", "attention.output.LayerNorm"),
                           ("mlp.fc", "intermediate.dense"), ("mlp.proj", "output.dense"),
                           ("norm2", "output.LayerNorm"))],
]
N_BERT_SPECIAL = 4  # nnfast's Bert appends [PAD] [MASK] [CLS] [SEP]: HF's vocab holds them


def bert_from_hf(cfg: dict, hf: dict) -> dict:
    _require(cfg, "hidden_act", ("gelu",), "gelu", "nnfast's BERT (and its MLM head) uses the "
             "exact GELU")
    _require(cfg, "position_embedding_type", ("absolute",), "absolute",
             "only absolute position embeddings")
    _require(cfg, "is_decoder", (False,), False, "BERT as a decoder")
    _require(cfg, "add_cross_attention", (False,), False, "BERT with cross-attention")
    vocab = cfg.get("vocab_size", 30522)
    if vocab <= N_BERT_SPECIAL:
        raise refuse("vocab_size", vocab, f"must exceed {N_BERT_SPECIAL}")
    return dict(
        vocab_size=vocab - N_BERT_SPECIAL, block_size=cfg.get("max_position_embeddings", 512),
        n_layer=cfg.get("num_hidden_layers", 12), n_head=cfg.get("num_attention_heads", 12),
        n_embd=cfg.get("hidden_size", 768), hidden_dim=cfg.get("intermediate_size", 3072),
        type_vocab_size=cfg.get("type_vocab_size", 2),
        norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        dropout=_dropout(cfg, "hidden_dropout_prob"),
    )


def bert_to_hf(model) -> dict:
    c = model.config
    if (c.norm, c.prenorm, c.mlp, c.bias, c.attn_scale) != ("layernorm", False, "gelu", True,
                                                            None):
        raise ValueError("to_hf: a BERT export needs norm=layernorm, prenorm=False, mlp=gelu, "
                         "bias=True, attn_scale=None")
    return dict(vocab_size=c.total_vocab, max_position_embeddings=c.block_size,
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, hidden_size=c.n_embd,
                intermediate_size=c.hidden_dim, type_vocab_size=c.type_vocab_size,
                layer_norm_eps=c.norm_eps, hidden_act="gelu", hidden_dropout_prob=c.dropout,
                attention_probs_dropout_prob=c.dropout, pad_token_id=model.pad_id,
                position_embedding_type="absolute", tie_word_embeddings=True)


def bert_entries(c, model) -> tuple[list[Entry], dict[str, str]]:
    e = "bert.embeddings."
    rows = [Entry("wte.weight", (e + "word_embeddings.weight",)),
            Entry("wpe.weight", (e + "position_embeddings.weight",)),
            Entry("wtt.weight", (e + "token_type_embeddings.weight",)),
            Entry("norm_emb.weight", (e + "LayerNorm.weight",)),
            Entry("norm_emb.bias", (e + "LayerNorm.bias",)),
            Entry("head_fc.weight", ("cls.predictions.transform.dense.weight",)),
            Entry("head_fc.bias", ("cls.predictions.transform.dense.bias",)),
            Entry("head_norm.weight", ("cls.predictions.transform.LayerNorm.weight",)),
            Entry("head_norm.bias", ("cls.predictions.transform.LayerNorm.bias",)),
            Entry("head_bias", ("cls.predictions.bias",))]
    d = c.n_embd
    for ours, theirs, sizes in BERT_LAYER:
        rows += layer_entries([(ours, theirs, (d, d, d) if sizes else None)], c.n_layer)
    aliases = {"cls.predictions.decoder.weight": e + "word_embeddings.weight",
               "cls.predictions.decoder.bias": "cls.predictions.bias"}
    return rows, aliases


# ----------------------------------------------------------------------------- T5
T5_MLPS = {"relu": "relu", "gated-gelu": "gated-gelu"}


def t5_from_hf(cfg: dict, hf: dict) -> dict:
    ff = cfg.get("feed_forward_proj", "relu")
    if ff not in T5_MLPS:
        raise refuse("feed_forward_proj", ff, f"nnfast's T5 MLPs are {sorted(T5_MLPS)}")
    d, heads = cfg.get("d_model", 512), cfg.get("num_heads", 8)
    if cfg.get("d_kv", d // heads) * heads != d:
        raise refuse("d_kv", cfg.get("d_kv"), f"nnfast's attention needs d_kv * num_heads == "
                     f"d_model ({d})")
    vocab = cfg.get("vocab_size", 32128)
    if vocab <= 3:
        raise refuse("vocab_size", vocab, "must exceed 3")
    tied = _tied(cfg, hf, "lm_head.weight", "shared.weight")
    scale = cfg.get("scale_decoder_outputs", cfg.get("tie_word_embeddings", True))
    n_layer = cfg.get("num_layers", 6)
    return dict(
        # nnfast appends [PAD] [EOS] and sentinels to its vocabulary; HF's holds them all.
        vocab_size=vocab - 3, n_sentinels=1, n_layer=n_layer,
        n_dec_layer=_get(cfg, "num_decoder_layers", default=n_layer), n_head=heads, n_embd=d,
        hidden_dim=cfg.get("d_ff", 2048), mlp=T5_MLPS[ff],
        rel_buckets=cfg.get("relative_attention_num_buckets", 32),
        rel_max_distance=cfg.get("relative_attention_max_distance", 128),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-6)),
        dropout=_dropout(cfg, "dropout_rate"), tie_embeddings=tied,
        scale_decoder_output=bool(scale),
    )


def t5_to_hf(model) -> dict:
    c = model.config
    want = ("rmsnorm", True, "relative", False, 1.0, False)
    got = (c.norm, c.prenorm, c.pos, c.bias, c.attn_scale, c.scale_embeddings)
    if got != want or c.mlp not in T5_MLPS.values():
        raise ValueError(f"to_hf: a T5 export needs (norm, prenorm, pos, bias, attn_scale, "
                         f"scale_embeddings) = {want} and mlp relu/gated-gelu; got {got}, "
                         f"mlp={c.mlp}")
    scale = c.scale_decoder_output
    scale = c.tie_embeddings if scale is None else scale
    ff = {v: k for k, v in T5_MLPS.items()}[c.mlp]
    return dict(vocab_size=c.total_vocab, d_model=c.n_embd, d_kv=c.head_dim, d_ff=c.hidden_dim,
                num_layers=c.n_layer, num_decoder_layers=c.n_dec_layer, num_heads=c.n_head,
                relative_attention_num_buckets=c.rel_buckets,
                relative_attention_max_distance=c.rel_max_distance, dropout_rate=c.dropout,
                layer_norm_epsilon=c.norm_eps, feed_forward_proj=ff, is_encoder_decoder=True,
                pad_token_id=model.pad_id, eos_token_id=model.eos_id,
                decoder_start_token_id=model.pad_id,
                # transformers derives "scale the decoder output" from this flag
                tie_word_embeddings=bool(scale), scale_decoder_outputs=bool(scale))


def _t5_attention(ours: str, theirs: str, d: int, cross: bool) -> list[tuple]:
    if cross:  # nnfast's CrossAttention: q, then k|v as one projection
        return [(ours + "q.weight", (theirs + "q.weight",), None),
                (ours + "kv.weight", (theirs + "k.weight", theirs + "v.weight"), (d, d)),
                (ours + "proj.weight", (theirs + "o.weight",), None)]
    return [(ours + "qkv.weight", tuple(theirs + f"{x}.weight" for x in "qkv"), (d, d, d)),
            (ours + "proj.weight", (theirs + "o.weight",), None)]


def _t5_layer(stack: str, c) -> list[tuple]:
    """Rows of one T5 block: HF's ``layer.0`` self-attention, (decoder) ``layer.1``
    cross-attention, then the MLP in the last sub-layer."""
    ours, theirs, d = stack + ".layers.{i}.", stack + ".block.{i}.layer.", c.n_embd
    rows = [(ours + "norm1.weight", (theirs + "0.layer_norm.weight",), None)]
    rows += _t5_attention(ours + "attn.", theirs + "0.SelfAttention.", d, False)
    ff, norm = 1, 2
    if stack == "decoder":
        rows.append((ours + "norm2.weight", (theirs + "1.layer_norm.weight",), None))
        rows += _t5_attention(ours + "cross.", theirs + "1.EncDecAttention.", d, True)
        ff, norm = 2, 3
    rows.append((ours + f"norm{norm}.weight", (theirs + f"{ff}.layer_norm.weight",), None))
    dense = theirs + f"{ff}.DenseReluDense."
    if c.mlp == "gated-gelu":
        rows += [(ours + "mlp.gate_up.weight", (dense + "wi_0.weight", dense + "wi_1.weight"),
                  (c.hidden_dim,) * 2), (ours + "mlp.down.weight", (dense + "wo.weight",), None)]
    else:
        rows += [(ours + "mlp.fc.weight", (dense + "wi.weight",), None),
                 (ours + "mlp.proj.weight", (dense + "wo.weight",), None)]
    return rows


def t5_entries(c, model) -> tuple[list[Entry], dict[str, str]]:
    rb = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    rows = [Entry("wte.weight", ("shared.weight",)),
            Entry("enc_bias.table.weight", ("encoder." + rb,)),
            Entry("dec_bias.table.weight", ("decoder." + rb,)),
            Entry("encoder.norm_f.weight", ("encoder.final_layer_norm.weight",)),
            Entry("decoder.norm_f.weight", ("decoder.final_layer_norm.weight",))]
    rows += layer_entries(_t5_layer("encoder", c), c.n_layer)
    rows += layer_entries(_t5_layer("decoder", c), c.n_dec_layer)
    aliases = {"encoder.embed_tokens.weight": "shared.weight",
               "decoder.embed_tokens.weight": "shared.weight"}
    if c.tie_embeddings:
        aliases["lm_head.weight"] = "shared.weight"
    else:
        rows.append(Entry("lm_head.weight", ("lm_head.weight",)))
    return rows, aliases


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "gpt2", "GPT2LMHeadModel", ("GPT2LMHeadModel", "GPT2Model"),
                   "transformer.", re.compile(r"\.attn\.(bias|masked_bias)$"),
                   gpt2_from_hf, gpt2_to_hf, gpt2_entries),
    "llama": Family("llama2", "llama", "LlamaForCausalLM", ("LlamaForCausalLM", "LlamaModel"),
                    "model.", re.compile(r"rotary_emb\.inv_freq$"),
                    llama_from_hf, llama_to_hf, llama_entries),
    "bert": Family("bert", "bert", "BertForMaskedLM", ("BertForMaskedLM", "BertForPreTraining"),
                   "bert.", re.compile(r"position_ids$|^bert\.pooler\.|^cls\.seq_relationship\."),
                   bert_from_hf, bert_to_hf, bert_entries),
    "t5": Family("t5", "t5", "T5ForConditionalGeneration", ("T5ForConditionalGeneration",),
                 "", None, t5_from_hf, t5_to_hf, t5_entries),
}
