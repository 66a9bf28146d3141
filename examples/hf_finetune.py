"""Fine-tune a Hugging Face causal LM with nnfast's kernels: ``nnfast.patch(model)`` swaps
its norms, gated MLP, RoPE and attention in place, and the loss is nnfast's fused linear +
cross-entropy (the (B*T, V) logits are never materialized).

    python examples/hf_finetune.py --model_dir PATH/TO/HF_FOLDER --steps 50
    python examples/hf_finetune.py                      # a tiny random Llama, built here

The corpus is the built-in one (the Python standard library's source, byte-level ids), so
nothing is downloaded. The same steps run twice from the same weights: plain transformers
(``model(input_ids, labels=...)``) and patched. On CUDA it prints time per step and peak
memory of both; on CPU it shows that both give the same losses.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import torch

import nnfast
import nnfast.functional as F
from nnfast import data as D


def tiny_llama(folder: str) -> str:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def batches(steps: int, batch_size: int, block: int, seed: int = 0):
    """Byte ids of the built-in corpus, random windows (the same for both runs)."""
    text, _ = D.pystdlib_text(max_bytes=300_000)
    ids = torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, len(ids) - block - 1, (batch_size,), generator=g)
        yield torch.stack([ids[s:s + block] for s in start.tolist()])


def hf_loss(model, x):
    return model(input_ids=x, labels=x).loss


def nnfast_loss(model, x):
    """Next-token loss from the final hidden states and the head weight, fused."""
    h = model.base_model(input_ids=x).last_hidden_state[:, :-1]  # (B, T-1, d)
    W = model.get_output_embeddings().weight  # (V, d)
    return F.linear_cross_entropy(h, W, x[:, 1:])


def finetune(model, loss_fn, args, device) -> tuple[list[float], float, float]:
    """Losses, seconds per step (after the first) and peak memory in MiB."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, t0 = [], None
    for i, x in enumerate(batches(args.steps, args.batch_size, args.block_size)):
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model, x.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / max(1, args.steps - 1) if t0 else float("nan")
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return losses, per_step, peak


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_dir", help="a Hugging Face causal-LM folder (default: tiny Llama)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder; never the hub
    import transformers

    folder = args.model_dir or tiny_llama(tempfile.mkdtemp(prefix="nnfast-hf-"))
    device = torch.device(args.device)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base = base.to(device)
    plain = copy.deepcopy(base)
    ref = finetune(plain, hf_loss, args, device)
    model, report = nnfast.patch(base, report=True)
    print(f"nnfast.patch swapped: {report}")
    ours = finetune(model, nnfast_loss, args, device)
    for name, (losses, per_step, peak) in (("transformers", ref), ("nnfast.patch", ours)):
        extra = f", {per_step * 1e3:.1f} ms/step, peak {peak:.0f} MiB" if device.type == "cuda" \
            else ""
        print(f"{name:>13}: loss {losses[0]:.4f} -> {losses[-1]:.4f}{extra}")
    diff = max(abs(a - b) for a, b in zip(ref[0], ours[0]))
    print(f"max loss difference over {args.steps} steps: {diff:.2e}")
    if device.type == "cuda":
        print(f"speed-up {ref[1] / ours[1]:.2f}x, memory {ours[2] / ref[2]:.2f}x of transformers'")
    return {"ref": ref, "ours": ours, "max_loss_diff": diff, "report": report}


if __name__ == "__main__":
    main()
