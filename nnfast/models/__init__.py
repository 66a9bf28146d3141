"""Architectures assembled from nnfast's modules, created by name:

    model = nnfast.models.create("gpt2", preset="gpt2-124m", dropout=0.1)
    nnfast.models.list_models()  # {"gpt2": ["gpt2-124m", ...], "llama2": [...]}

A new family plugs in with ``register(name, config_cls, model_cls, presets)``.
"""

from nnfast.models.bert import BERT_PRESETS, Bert, BertConfig
from nnfast.models.classic import (
    BIGRAM_PRESETS,
    MLP_PRESETS,
    MLPLM,
    RESMLP_PRESETS,
    WAVENET_PRESETS,
    Bigram,
    BigramConfig,
    MLPConfig,
    ResMLP,
    ResMLPConfig,
    WaveNet,
    WaveNetConfig,
)
from nnfast.models.conv_transformer import (
    CONV_TRANSFORMER_PRESETS,
    ConvTransformer,
    ConvTransformerConfig,
)
from nnfast.models.decoder import Decoder, DecoderConfig, sample
from nnfast.models.encoder import EncDecConfig, EncoderDecoder
from nnfast.models.flops import peak_flops
from nnfast.models.hf import from_hf, load_gpt2_hf, load_model, save_model, to_hf
from nnfast.models.presets import GPT2_PRESETS, LLAMA2_PRESETS
from nnfast.models.progressive import PROGRESSIVE_PRESETS, ProgressiveConfig, ProgressiveGPT
from nnfast.models.registry import (
    create,
    field_types,
    list_models,
    make_config,
    parse_overrides,
    register,
)
from nnfast.models.t5 import T5, T5_PRESETS, T5Config
from nnfast.models.transformer import TRANSFORMER_PRESETS, Transformer, TransformerConfig

register("gpt2", DecoderConfig, Decoder, GPT2_PRESETS, default_preset="gpt2-124m")
register("llama2", DecoderConfig, Decoder, LLAMA2_PRESETS, default_preset="llama2-124m")
register("bigram", BigramConfig, Bigram, BIGRAM_PRESETS, default_preset="shakespeare-char")
register("mlp", MLPConfig, MLPLM, MLP_PRESETS, default_preset="shakespeare-char")
register("wavenet", WaveNetConfig, WaveNet, WAVENET_PRESETS, default_preset="shakespeare-char")
register("resmlp", ResMLPConfig, ResMLP, RESMLP_PRESETS, default_preset="shakespeare-char")
register("conv-transformer", ConvTransformerConfig, ConvTransformer, CONV_TRANSFORMER_PRESETS,
         default_preset="shakespeare-char")
register("progressive-gpt", ProgressiveConfig, ProgressiveGPT, PROGRESSIVE_PRESETS,
         default_preset="shakespeare-char")
register("bert", BertConfig, Bert, BERT_PRESETS, default_preset="bert-base")
register("t5", T5Config, T5, T5_PRESETS, default_preset="t5-small")
register("transformer", TransformerConfig, Transformer, TRANSFORMER_PRESETS,
         default_preset="base")

__all__ = [
    "Bert",
    "BertConfig",
    "Bigram",
    "BigramConfig",
    "ConvTransformer",
    "ConvTransformerConfig",
    "Decoder",
    "DecoderConfig",
    "EncDecConfig",
    "EncoderDecoder",
    "T5",
    "T5Config",
    "Transformer",
    "TransformerConfig",
    "create",
    "field_types",
    "from_hf",
    "list_models",
    "load_gpt2_hf",
    "load_model",
    "MLPConfig",
    "MLPLM",
    "make_config",
    "parse_overrides",
    "peak_flops",
    "ProgressiveConfig",
    "ProgressiveGPT",
    "register",
    "ResMLP",
    "ResMLPConfig",
    "sample",
    "save_model",
    "to_hf",
    "WaveNet",
    "WaveNetConfig",
]
