"""Hugging Face interop against ``transformers`` itself: ``from_hf`` (logits equal), ``to_hf``
(``from_pretrained`` loads with no missing/unexpected keys, logits equal), ``nnfast.patch``
on HF models (outputs and every gradient equal, keys unchanged, nnfast ops really called),
bad input, ``save_model``, weights_only checkpoints, ``python -m nnfast export`` and the
fine-tuning example. Tiny random models built from configs; never the hub.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it: local folders only
tr = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import nnfast  # noqa: E402
import nnfast.functional as F  # noqa: E402
from nnfast import models as M  # noqa: E402

V = 61
GPT2 = dict(n_layer=2, n_embd=16, n_head=4, vocab_size=V, n_positions=24, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0)
LLAMA = dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=24, vocab_size=V, max_position_embeddings=32)
BERT = dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, intermediate_size=24,
            vocab_size=V, max_position_embeddings=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
T5 = dict(num_layers=2, num_decoder_layers=1, d_model=16, num_heads=4, d_kv=4, d_ff=24,
          vocab_size=V, dropout_rate=0.0, relative_attention_num_buckets=8,
          relative_attention_max_distance=20)


@pytest.fixture(autouse=True)
def _torch_path(request, monkeypatch):
    # Loading and exporting test the name tables: the reference path is exact and fast. The
    # patch tests run the real (interpreted) kernels.
    if "patch" not in request.node.name:
        monkeypatch.setenv("NNFAST_BACKEND", "torch")


def build(family: str, **kw):
    torch.manual_seed(0)
    if family == "gpt2":
        return tr.GPT2LMHeadModel(tr.GPT2Config(**{**GPT2, **kw}))
    if family == "gpt2-base":
        return tr.GPT2Model(tr.GPT2Config(**{**GPT2, **kw}))
    if family == "llama":
        return tr.LlamaForCausalLM(tr.LlamaConfig(**{**LLAMA, **kw}))
    if family == "qwen2":
        return tr.Qwen2ForCausalLM(tr.Qwen2Config(**{**LLAMA, **kw}))
    if family == "bert":
        return tr.BertForMaskedLM(tr.BertConfig(**{**BERT, **kw}))
    return tr.T5ForConditionalGeneration(tr.T5Config(**{**T5, **kw}))


def inputs(family: str, pad: bool = False):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V - 5, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, -3:] = 0
    kw = dict(input_ids=ids, attention_mask=mask)
    if family == "t5":
        kw["decoder_input_ids"] = torch.randint(0, V - 5, (2, 5), generator=g)
    return kw


def ours_logits(model, kw):
    ids, mask = kw["input_ids"], kw["attention_mask"].bool()
    if isinstance(model, M.Decoder):
        return model(ids)[0]
    if isinstance(model, M.Bert):
        return model(ids, padding_mask=mask)[0]
    return model(ids, kw["decoder_input_ids"], src_mask=mask)[0]


def theirs(hf, kw):
    out = hf(**kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def save(hf, tmp_path, name="hf", **kw):
    folder = tmp_path / name
    hf.save_pretrained(folder, **kw)
    return folder


LOAD_CASES = {
    "gpt2-tied": ("gpt2", {}),
    "gpt2-untied-n_inner-eps": ("gpt2", dict(tie_word_embeddings=False, n_inner=40,
                                             layer_norm_epsilon=1e-3,
                                             activation_function="gelu_pytorch_tanh")),
    "llama-gqa-theta-bias": ("llama", dict(rope_theta=500.0, rms_norm_eps=1e-4,
                                           attention_bias=True, mlp_bias=True)),
    "llama-tied": ("llama", dict(tie_word_embeddings=True)),
    "bert": ("bert", {}),
    "t5-v1.1-gated-gelu": ("t5", dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "t5-relu": ("t5", dict(feed_forward_proj="relu")),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_from_hf_logits_equal_and_round_trip(case, tmp_path):
    family, kw = LOAD_CASES[case]
    hf = build(family, **kw).eval()
    ids = inputs(family)
    model = M.from_hf(save(hf, tmp_path))
    assert not model.training
    with torch.no_grad():
        want, got = theirs(hf, ids), ours_logits(model, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # ... and back: transformers loads nnfast's export with nothing missing or unexpected.
    M.to_hf(model, tmp_path / "back")
    back, info = type(hf).from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(theirs(back.eval(), ids), want, rtol=0, atol=1e-4)


def test_gpt2_base_model_and_weight_formats(tmp_path):
    hf = build("gpt2").eval()
    ids = inputs("gpt2")
    with torch.no_grad():
        want = hf(**ids).logits
        hidden = build("gpt2-base")(**ids).last_hidden_state  # same seed: same weights
    base = M.from_hf(save(build("gpt2-base"), tmp_path, "base"))
    with torch.no_grad():
        torch.testing.assert_close(base.hidden_states(ids["input_ids"]), hidden, rtol=0,
                                   atol=1e-4)
    folders = {"bin": save(hf, tmp_path, "bin"),
               "sharded": save(hf, tmp_path, "sharded", max_shard_size="20KB")}
    (folders["bin"] / "model.safetensors").unlink()  # transformers 5 writes no .bin itself
    torch.save(hf.state_dict(), folders["bin"] / "pytorch_model.bin")
    assert (folders["sharded"] / "model.safetensors.index.json").is_file()
    single = save(hf, tmp_path, "single")
    for path in (*folders.values(), single / "model.safetensors"):
        with torch.no_grad():
            torch.testing.assert_close(M.from_hf(path)(ids["input_ids"])[0], want, rtol=0,
                                       atol=1e-4)
    half = save(hf.half(), tmp_path, "fp16")
    assert M.from_hf(half).wte.weight.dtype == torch.float16
    assert M.from_hf(half, dtype=torch.float32).wte.weight.dtype == torch.float32
    assert M.load_gpt2_hf(single).config.n_layer == GPT2["n_layer"]


REFUSED = [
    ("gpt2", dict(scale_attn_weights=False), "scale_attn_weights"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("gpt2", dict(activation_function="relu"), "activation_function"),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type"),
    ("llama", dict(head_dim=8), "head_dim"),
    ("llama", dict(attention_bias=True), "mlp_bias"),
    ("llama", dict(hidden_act="gelu"), "hidden_act"),
    ("bert", dict(position_embedding_type="relative_key"), "position_embedding_type"),
    ("bert", dict(hidden_act="relu"), "hidden_act"),
    ("t5", dict(feed_forward_proj="gated-silu"), "feed_forward_proj"),
]


@pytest.mark.parametrize("family, kw, field", REFUSED, ids=[r[2] for r in REFUSED])
def test_unhonourable_config_fields_are_refused_by_name(family, kw, field, tmp_path):
    folder = save(build(family), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **kw}))
    with pytest.raises(ValueError, match=field):
        M.from_hf(folder)


def test_bad_folders_and_weights_name_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save(build("llama"), tmp_path)
    weights = folder / "model.safetensors"
    config = json.loads((folder / "config.json").read_text())

    def rewrite(**changes):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        M.from_hf(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        M.from_hf(tmp_path / "missing")
    rewrite(model_type="gemma")
    with pytest.raises(ValueError, match="model_type 'gemma'"):
        M.from_hf(folder)
    rewrite(architectures=["LlamaForSequenceClassification"])
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        M.from_hf(folder)
    rewrite(num_hidden_layers=3)  # the checkpoint has 2 layers
    with pytest.raises(ValueError, match="model.layers.2"):
        M.from_hf(folder)
    rewrite(intermediate_size=30)
    with pytest.raises(ValueError, match="gate_proj.weight.*shape"):
        M.from_hf(folder)
    rewrite()
    state = load_file(weights)
    save_file({**state, "model.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match="unexpected weight 'model.extra.weight'"):
        M.from_hf(folder)
    del state["model.norm.weight"]
    save_file(state, weights)
    with pytest.raises(ValueError, match="missing weight 'model.norm.weight'"):
        M.from_hf(folder)
    weights.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model.safetensors"):
        M.from_hf(folder)


@pytest.mark.parametrize("name, kw", [("gpt2", {}), ("gpt2", {"tie_embeddings": False}),
                                      ("llama2", {}), ("bert", {}), ("t5", {}),
                                      ("t5", {"tie_embeddings": True, "mlp": "relu"})])
def test_to_hf_of_native_models(name, kw, tmp_path):
    torch.manual_seed(0)
    model = M.create(name, "debug", **kw).eval()
    with torch.no_grad():  # norms and biases away from their init, so the test sees them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    M.to_hf(model, tmp_path / "out")
    auto = {"bert": tr.AutoModelForMaskedLM, "t5": tr.AutoModelForSeq2SeqLM}.get(
        name, tr.AutoModelForCausalLM)
    hf, info = auto.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    kw = inputs("t5" if name == "t5" else "gpt2")
    with torch.no_grad():
        torch.testing.assert_close(theirs(hf.eval(), kw), ours_logits(model, kw), rtol=0,
                                   atol=1e-4)
    with pytest.raises(FileExistsError, match="not empty"):
        M.to_hf(model, tmp_path / "out")
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        M.to_hf(M.create("transformer", "small"), tmp_path / "x")


def test_save_model_ties_and_never_overwrites(tmp_path):
    model = M.create("gpt2", "debug")
    M.save_model(model, tmp_path / "m.safetensors")
    with pytest.raises(FileExistsError):
        M.save_model(model, tmp_path / "m.safetensors")
    fresh = M.load_model(M.create("gpt2", "debug"), tmp_path / "m.safetensors")
    assert fresh.lm_head.weight is fresh.wte.weight
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_checkpoint_weights_only_and_export_cli(tmp_path):
    from nnfast import train as T
    from nnfast.__main__ import main, parse_args

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 40)
    argv = ["--model", "llama2", "--preset", "debug", "--data", str(corpus), "--out",
            str(tmp_path / "run"), "--n_layer", "1", "--block_size", "16", "--batch_size", "2",
            "--max_steps", "2", "--eval_interval", "1000", "--eval_steps", "1",
            "--sample_tokens", "4", "--device", "cpu"]
    result = T.train(*parse_args(argv)[:3], show_progress=False)
    ckpt = T.latest_checkpoint(tmp_path / "run")
    torch.load(ckpt, weights_only=True)  # no pickled numpy objects
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2  # not empty
    hf = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, result["model"].config.vocab_size, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, result["model"].eval()(ids)[0], rtol=0,
                                   atol=1e-4)


# ----------------------------------------------------------------------------- patch
COUNTED = ("scaled_dot_product_attention", "apply_rotary", "rms_norm", "layer_norm",
           "silu_mul", "gelu_mul")


def _grads(model, kw):
    model.zero_grad()
    out = theirs(model, kw)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family, calls", [
    ("gpt2", {"scaled_dot_product_attention", "layer_norm"}),
    ("llama", {"scaled_dot_product_attention", "apply_rotary", "rms_norm", "silu_mul"}),
    ("qwen2", {"scaled_dot_product_attention", "apply_rotary", "rms_norm", "silu_mul"}),
    ("bert", {"scaled_dot_product_attention", "layer_norm"}),
    ("t5", {"scaled_dot_product_attention", "rms_norm", "gelu_mul"}),
])
def test_patch_hf_model_outputs_and_gradients_equal(family, calls, monkeypatch):
    kw = dict(n_layer=1) if family == "gpt2" else {}
    if family == "t5":
        kw = dict(feed_forward_proj="gated-gelu")
    hf = build(family, **kw).train()  # dropout 0: train mode is deterministic
    ids = inputs(family, pad=True)
    ref = copy.deepcopy(hf)
    want, want_grads = _grads(ref, ids)  # before patching: RoPE's patch is process-wide
    keys, params = list(hf.state_dict()), set(map(id, hf.parameters()))
    seen = set()
    for name in COUNTED:
        original = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, _f=original, _n=name, **k: (seen.add(_n),
                                                                            _f(*a, **k))[1])
    patched, report = nnfast.patch(hf, report=True)
    assert patched is hf and list(hf.state_dict()) == keys
    assert set(map(id, hf.parameters())) == params  # same Parameters: optimizers stay valid
    assert report["attention"] == "nnfast" and report["norms"]
    got, got_grads = _grads(hf, ids)
    assert calls <= seen, seen
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def test_patch_switches(monkeypatch):
    hf = build("llama")
    report = nnfast.patch(hf, norms=False, mlps=False, rope=False, attention=False,
                          report=True)[1]
    assert report == {"norms": {}, "mlps": {}, "rope": [], "attention": None}
    assert type(hf.model.norm).__name__ == "LlamaRMSNorm"
    assert nnfast.patch(hf, mlps=False, report=True)[1]["mlps"] == {}
    assert type(hf.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert type(hf.model.norm).__name__ == "HFRMSNorm"


def test_hf_finetune_example_tiny(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "hf_finetune.py"
    spec = importlib.util.spec_from_file_location("hf_finetune", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--steps", "2", "--batch_size", "2", "--block_size", "16",
                        "--device", "cpu"])
    assert out["max_loss_diff"] < 1e-4
    assert out["report"]["mlps"] == {"LlamaMLP": 2}
    assert "max loss difference" in capsys.readouterr().out


def test_cached_generation_and_left_padding_unchanged_by_nnfast(monkeypatch):
    """Decoding with transformers' KV cache (one query against the cache), left padding and
    Mistral's sliding window go through the patched ops as they went through sdpa's (the
    reference path here: this checks the plumbing; the kernels are checked above)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V - 5, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for hf in (build("llama").eval(),
               tr.MistralForCausalLM(tr.MistralConfig(**LLAMA, sliding_window=4)).eval()):
        ref = copy.deepcopy(hf)
        with torch.no_grad():
            want = ref.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
            logits = ref(input_ids=ids, attention_mask=mask).logits
            nnfast.patch(hf)
            got = hf.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
            torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits, logits,
                                       rtol=0, atol=1e-5)
        assert torch.equal(got, want)
