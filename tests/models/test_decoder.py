"""The GPT-2 / Llama2 decoder: registry, shapes, kernels vs reference, causality,
generation with the KV cache, parameter counts, and Hugging Face GPT-2 loading."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as torch_F

import nnfast.models as models
from nnfast._backend import use_triton
from tests.helpers import assert_close_lowp

FAMILIES = ("gpt2", "llama2")
KERNELS_RUN = use_triton(torch.empty(0)) or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_kernels = pytest.mark.skipif(not KERNELS_RUN, reason="the Triton kernels cannot run here")


def _model(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return models.create(name, preset="debug", **overrides).to(DEVICE)


def _batch(model, B=2, T=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    idx = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    return idx.to(DEVICE), targets.to(DEVICE)


# ----------------------------------------------------------------------------- registry
def test_list_models_and_presets():
    listed = models.list_models()
    assert set(listed["gpt2"]) >= {"gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b",
                                   "shakespeare-char", "debug"}
    assert set(listed["llama2"]) >= {"llama2-7b", "llama2-13b", "llama2-124m", "debug"}


def test_create_overrides_rederive_fields():
    m = models.create("llama2", preset="debug", n_embd=64, n_layer=3)
    c = m.config
    assert len(m.blocks) == 3 and c.n_embd == 64 and c.head_dim == 16
    # Llama's rule: int(2 * 4 * 64 / 3) = 170, rounded up to the preset's multiple_of=16.
    assert c.hidden_dim == 176
    assert c.n_kv_head == 2 and c.n_kv_head < c.n_head  # GQA in the debug preset
    g = models.create("gpt2", preset="debug", n_embd=48, n_head=3, dropout=0)
    assert g.config.hidden_dim == 4 * 48 and g.config.dropout == 0.0
    assert isinstance(g.config.dropout, float)
    assert g.config.vocab_size == 97 and g.config.block_size == 32


def test_gelu_exact_mlp_is_nanogpts():
    """mlp="gelu_exact": fc -> exact (erf) GELU -> proj, nanoGPT's MLP, 4d wide; "gelu" keeps
    GPT-2's tanh approximation."""
    m = models.create("gpt2", preset="debug", mlp="gelu_exact", bias=False)
    mlp = m.blocks[0].mlp
    assert m.config.hidden_dim == 4 * m.config.n_embd and mlp.activation == "gelu"
    assert models.create("gpt2", preset="debug").blocks[0].mlp.activation == "gelu_tanh"
    x = torch.randn(2, 5, m.config.n_embd)
    want = torch_F.linear(torch_F.gelu(torch_F.linear(x, mlp.fc.weight)), mlp.proj.weight)
    torch.testing.assert_close(mlp(x), want)


def test_create_errors():
    with pytest.raises(ValueError, match=r"unknown model 'gpt3'.*gpt2.*llama2"):
        models.create("gpt3")
    with pytest.raises(ValueError, match=r"unknown preset 'huge'.*gpt2-124m"):
        models.create("gpt2", preset="huge")
    with pytest.raises(ValueError, match=r"unknown config field 'n_layers'.*n_layer"):
        models.create("gpt2", preset="debug", n_layers=3)
    with pytest.raises(TypeError, match="'n_layer' expects int"):
        models.create("gpt2", preset="debug", n_layer="3")
    with pytest.raises(TypeError, match="'n_layer' expects int"):
        models.create("gpt2", preset="debug", n_layer=True)
    with pytest.raises(TypeError, match="'bias' expects bool"):
        models.create("gpt2", preset="debug", bias=1)
    with pytest.raises(ValueError, match="norm must be one of"):
        models.create("gpt2", preset="debug", norm="batchnorm")
    with pytest.raises(ValueError, match="must be divisible by n_head"):
        models.create("gpt2", preset="debug", n_head=3)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        models.create("llama2", preset="debug", n_kv_head=3)


def test_parse_overrides():
    got = models.parse_overrides("llama2", {"n_layer": "4", "dropout": "0.1", "bias": "true",
                                            "n_kv_head": "none", "norm": "layernorm"})
    assert got == {"n_layer": 4, "dropout": 0.1, "bias": True, "n_kv_head": None,
                   "norm": "layernorm"}
    with pytest.raises(TypeError, match="'n_layer' expects an int"):
        models.parse_overrides("gpt2", {"n_layer": "four"})
    with pytest.raises(ValueError, match="unknown config field"):
        models.parse_overrides("gpt2", {"depth": "4"})


def test_register_new_family():
    models.register("tiny-test", models.DecoderConfig, models.Decoder,
                    {"x": {"n_layer": 1, "n_head": 1, "n_embd": 8, "vocab_size": 5,
                           "block_size": 4}})
    try:
        assert models.list_models()["tiny-test"] == ["x"]
        assert models.create("tiny-test").config.n_embd == 8
    finally:
        models.registry._REGISTRY.pop("tiny-test")
    with pytest.raises(ValueError, match="unknown fields"):
        models.register("bad", models.DecoderConfig, models.Decoder, {"x": {"width": 3}})


# ----------------------------------------------------------------------------- sizes
def test_param_counts_match_published():
    with torch.device("meta"):
        gpt2 = models.create("gpt2", preset="gpt2-124m")
        llama7 = models.create("llama2", preset="llama2-7b")
        llama13 = models.create("llama2", preset="llama2-13b")
    assert gpt2.num_params() == 124_439_808
    # The Hugging Face checkpoints' sizes (gpt2-medium, -large, -xl).
    for preset, n in (("gpt2-350m", 354_823_168), ("gpt2-774m", 774_030_080),
                      ("gpt2-1.5b", 1_557_611_200)):
        with torch.device("meta"):
            assert models.create("gpt2", preset=preset).num_params() == n, preset
    assert gpt2.num_params(exclude_embeddings=True) == 124_439_808 - 1024 * 768
    assert llama7.config.hidden_dim == 11008 and llama13.config.hidden_dim == 13824
    assert llama7.num_params() == 6_738_415_616
    assert llama13.num_params() == 13_015_864_320
    # 6 FLOPs per matmul parameter per token + attention's 12 L H D T.
    flops = gpt2.estimate_flops_per_token(seq_len=1024)
    assert flops == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024
    assert gpt2.estimate_mfu(1e5, peak=1e15) == pytest.approx(1e5 * flops / 1e15)


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    m = models.create("gpt2", preset="debug", n_layer=8, n_embd=256, n_head=4)
    std = lambda t: t.detach().float().std().item()
    assert std(m.blocks[0].mlp.fc.weight) == pytest.approx(0.02, rel=0.05)
    assert std(m.blocks[3].attn.proj.weight) == pytest.approx(0.02 / 4, rel=0.05)
    assert std(m.blocks[3].mlp.proj.weight) == pytest.approx(0.02 / 4, rel=0.05)
    assert m.blocks[0].mlp.fc.bias.abs().max() == 0


def test_gpt2_ties_embeddings_llama_does_not():
    g, ll = _model("gpt2"), _model("llama2")
    assert g.lm_head.weight is g.wte.weight
    assert ll.lm_head.weight is not ll.wte.weight
    assert [n for n, p in g.named_parameters() if p is g.wte.weight] == ["wte.weight"]
    idx, targets = _batch(g)
    _, loss = g(idx, targets)
    loss.backward()
    # One gradient for both uses: the lookup's rows plus the head's (every row).
    assert g.wte.weight.grad is not None and (g.wte.weight.grad != 0).all(dim=1).all()


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", FAMILIES)
def test_forward_shapes_and_loss(name, monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    m = _model(name)
    idx, targets = _batch(m)
    logits, loss = m(idx)
    assert logits.shape == (2, 13, m.config.vocab_size) and loss is None
    last, _ = m(idx, last_only=True)
    torch.testing.assert_close(last[:, 0], logits[:, -1])
    none, loss = m(idx, targets)
    assert none is None and loss.ndim == 0
    ref = torch_F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, ref)
    # ignore_index drops positions from the mean.
    masked = targets.clone()
    masked[:, 5:] = -100
    _, loss_m = m(idx, masked)
    torch.testing.assert_close(loss_m, torch_F.cross_entropy(logits[:, :5].flatten(0, 1),
                                                             targets[:, :5].flatten()))
    # The unfused path returns logits with the same loss.
    m.config.fused_loss = False
    logits2, loss2 = m(idx, targets)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(loss2, loss)


def test_dropout_only_in_training(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    m = _model("gpt2", dropout=0.2)
    assert models.create("gpt2", preset="shakespeare-char").config.dropout == 0.2
    idx, targets = _batch(m)
    losses = {m(idx, targets)[1].item() for _ in range(3)}
    assert len(losses) == 3  # a fresh mask each call
    m.eval()
    assert len({m(idx, targets)[1].item() for _ in range(3)}) == 1


def test_bad_input():
    m = _model("gpt2")
    idx, targets = _batch(m)
    with pytest.raises(ValueError, match="int32/int64"):
        m(idx.float())
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        m(torch.zeros(1, 33, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        m(torch.full((1, 4), 97, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.full((1, 4), -1, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="targets must have idx's shape"):
        m(idx, targets[:, :-1])
    with pytest.raises(ValueError, match=r"\(batch, time\)"):
        m(idx[0])


def _grads(m, idx, targets):
    m.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits, _ = m(idx)
    _, loss = m(idx, targets)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


@requires_kernels
@pytest.mark.parametrize("name", FAMILIES)
def test_kernels_match_torch_backend(name, monkeypatch):
    """The whole model through nnfast's kernels (interpreted on CPU) vs NNFAST_BACKEND=torch:
    logits, loss and every parameter's gradient, in fp32."""
    m = _model(name)
    idx, targets = _batch(m, B=2, T=17)
    logits_k, loss_k, grads_k = _grads(m, idx, targets)
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    logits_t, loss_t, grads_t = _grads(m, idx, targets)
    torch.testing.assert_close(logits_k, logits_t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-6)
    assert grads_k.keys() == grads_t.keys()
    for n in grads_t:
        scale = grads_t[n].abs().max().item()
        torch.testing.assert_close(grads_k[n], grads_t[n], rtol=1e-4, atol=1e-5 * max(scale, 1e-2),
                                   msg=lambda s, n=n: f"grad of {n}: {s}")


@requires_kernels
@pytest.mark.parametrize("name", FAMILIES)
def test_kernels_fp16_within_torch_error(name, monkeypatch):
    """An fp16 model: the kernels' error against the fp32 model is at most 2x (outputs) /
    3x (gradients) the error of PyTorch's own fp16 computation (tests/helpers.py's rule)."""
    m32 = _model(name)
    m16 = _model(name).half()
    idx, targets = _batch(m32, B=2, T=17)
    logits_k, loss_k, grads_k = _grads(m16, idx, targets)
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    logits_ref, loss_ref, grads_ref = _grads(m32, idx, targets)
    logits_t, loss_t, grads_t = _grads(m16, idx, targets)
    # The floor relative to each tensor's own magnitude: the helpers' default (1e-3 absolute)
    # would hide everything in gradients that are ~1e-3 in size.
    floor = lambda ref: 1e-3 * ref.abs().max().item()
    assert_close_lowp("logits", logits_k, logits_ref, logits_t, floor=floor(logits_ref))
    assert_close_lowp("loss", loss_k.float(), loss_ref, loss_t.float(), floor=floor(loss_ref))
    for n in grads_ref:
        assert_close_lowp(f"grad of {n}", grads_k[n], grads_ref[n], grads_t[n], factor=3.0,
                          floor=floor(grads_ref[n]))


@pytest.mark.parametrize("name", FAMILIES)
def test_causal(name):
    """Changing token t leaves every logit before t unchanged (default path: the kernels)."""
    m = _model(name).eval()
    idx, _ = _batch(m, B=1, T=16)
    t = 9
    other = idx.clone()
    other[0, t] = (idx[0, t] + 1) % m.config.vocab_size
    with torch.no_grad():
        a, _ = m(idx)
        b, _ = m(other)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_autocast_bf16_cpu(monkeypatch):
    """Under autocast the residual stream runs in bf16 (the fused norms need one dtype)."""
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    m = _model("llama2")
    idx, targets = _batch(m)
    _, ref = m(idx, targets)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        _, loss = m(idx, targets)
    loss.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", FAMILIES)
def test_cached_greedy_equals_uncached(name):
    m = _model(name, block_size=10)
    idx, _ = _batch(m, B=2, T=4)
    # 4 + 8 > block_size 10: the cache fills and the last tokens use the full window.
    cached = m.generate(idx, 8, temperature=0.0, use_cache=True)
    plain = m.generate(idx, 8, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 12)
    assert torch.equal(cached[:, :4], idx)
    assert torch.equal(cached, plain)
    assert m.training  # generate restores the mode


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_logits_match_full_forward(name):
    """Prompt in one pass, then one token at a time against the cache: every step's logits
    equal the full forward's at that position (positions and RoPE offsets included)."""
    m = _model(name).eval()
    idx, _ = _batch(m, B=2, T=9)
    with torch.no_grad():
        full, _ = m(idx)  # (B, 9, V)
        caches = m.make_caches(2, 9)
        steps = [m.lm_head(m.hidden_states(idx[:, :6], caches))]  # (B, 6, V)
        for t in range(6, 9):
            steps.append(m.lm_head(m.hidden_states(idx[:, t:t + 1], caches)))
    assert caches[0].pos == 9
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_sampling_options(monkeypatch):
    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    m = _model("llama2").eval()
    idx, _ = _batch(m, B=3, T=4)
    greedy = m.generate(idx, 5, temperature=0.0)
    g = torch.Generator(device=DEVICE)
    # top_k=1 and a tiny top_p keep one candidate: sampling is then greedy.
    assert torch.equal(m.generate(idx, 5, top_k=1, generator=g.manual_seed(0)), greedy)
    assert torch.equal(m.generate(idx, 5, top_p=1e-6, generator=g.manual_seed(0)), greedy)
    a = m.generate(idx, 8, temperature=1.5, top_k=10, top_p=0.9, generator=g.manual_seed(3))
    b = m.generate(idx, 8, temperature=1.5, top_k=10, top_p=0.9, generator=g.manual_seed(3),
                   use_cache=False)
    assert torch.equal(a, b)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(500, 1)
    drawn = models.sample(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(drawn.flatten().tolist()) == {2, 3}
    # p(3) = 0.64, p(2) = 0.24: top_p=0.7 keeps exactly those two.
    drawn = models.sample(logits, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(drawn.flatten().tolist()) == {2, 3}
    with pytest.raises(ValueError, match="top_p"):
        m.generate(idx, 1, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(idx, 1, temperature=-1.0)


# ----------------------------------------------------------------------------- Hugging Face
def _hf_gpt2_logits(sd, idx, n_head, prefix):
    """GPT-2 as Hugging Face computes it, from its own tensor layout (Conv1D: x @ W + b)."""
    p = lambda k: sd[prefix + k]
    B, T = idx.shape
    C = p("wte.weight").shape[1]
    ln = lambda x, n: torch_F.layer_norm(x, (C,), p(n + ".weight"), p(n + ".bias"), 1e-5)
    conv = lambda x, n: x @ p(n + ".weight") + p(n + ".bias")
    x = p("wte.weight")[idx] + p("wpe.weight")[:T]
    names = [k[len(prefix):] for k in sd]
    n_layer = 1 + max(int(k.split(".")[1]) for k in names if k.startswith("h."))
    for i in range(n_layer):
        q, k, v = conv(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn").split(C, dim=-1)
        heads = lambda t: t.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, H, T, D)
        y = torch_F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + conv(y.transpose(1, 2).reshape(B, T, C), f"h.{i}.attn.c_proj")
        hid = torch_F.gelu(conv(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc"), approximate="tanh")
        x = x + conv(hid, f"h.{i}.mlp.c_proj")
    return ln(x, "ln_f") @ p("wte.weight").T


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_load_gpt2_hf(prefix, tmp_path, monkeypatch):
    safetensors = pytest.importorskip("safetensors.torch")
    from nnfast.models.hf import load_gpt2_hf

    monkeypatch.setenv("NNFAST_BACKEND", "torch")
    V, P, C, L, H = 53, 24, 32, 2, 4
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (0.1 * torch.randn(*s, generator=g)).contiguous()
    sd = {"wte.weight": r(V, C), "wpe.weight": r(P, C), "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(L):
        sd |= {
            f"h.{i}.ln_1.weight": 1 + r(C), f"h.{i}.ln_1.bias": r(C),
            f"h.{i}.attn.c_attn.weight": r(C, 3 * C), f"h.{i}.attn.c_attn.bias": r(3 * C),
            f"h.{i}.attn.c_proj.weight": r(C, C), f"h.{i}.attn.c_proj.bias": r(C),
            f"h.{i}.ln_2.weight": 1 + r(C), f"h.{i}.ln_2.bias": r(C),
            f"h.{i}.mlp.c_fc.weight": r(C, 4 * C), f"h.{i}.mlp.c_fc.bias": r(4 * C),
            f"h.{i}.mlp.c_proj.weight": r(4 * C, C), f"h.{i}.mlp.c_proj.bias": r(C),
            f"h.{i}.attn.bias": torch.ones(1, 1, P, P).tril(),  # HF's mask buffer: skipped
        }
    sd = {prefix + k: v for k, v in sd.items()}
    sd["lm_head.weight"] = sd[prefix + "wte.weight"].clone()
    safetensors.save_file(sd, str(tmp_path / "model.safetensors"))
    # Without config.json, width 32 names no published head count.
    with pytest.raises(ValueError, match="config.json"):
        load_gpt2_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_head": H, "layer_norm_epsilon": 1e-5}))
    model = load_gpt2_hf(tmp_path, preset="gpt2-124m").eval()
    c = model.config
    assert (c.vocab_size, c.block_size, c.n_embd, c.n_layer, c.n_head) == (V, P, C, L, H)
    idx = torch.randint(0, V, (2, 11), generator=g)
    with torch.no_grad():
        ours, _ = model(idx)
    torch.testing.assert_close(ours, _hf_gpt2_logits(sd, idx, H, prefix), rtol=1e-4, atol=1e-5)
    assert model.lm_head.weight is model.wte.weight
    with pytest.raises(FileNotFoundError):
        load_gpt2_hf(tmp_path / "missing")
