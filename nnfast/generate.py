"""``python -m nnfast generate RUN_DIR_OR_HF_FOLDER --prompt TEXT``: sample a continuation
with the model's KV cache (the prompt in one pass, then one token per step); prints the
prompt and its continuation. ``--temperature 0`` is greedy; ``--seed`` makes it repeatable."""

from __future__ import annotations

import argparse
import sys

import torch

from nnfast import data as D
from nnfast.runs import RunError, encode_prompt, load_run


def generate_text(run, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 200, top_p: float | None = None, seed: int = 0) -> str:
    model, tok = run.model, run.tokenizer
    if not hasattr(model, "generate"):
        raise ValueError(f"{type(model).__name__} does not generate text")
    ids = encode_prompt(tok, prompt)
    if not ids:  # an empty prompt (or none of its characters known): start a document
        eot = getattr(tok, "eot", None)
        ids = [eot if eot is not None else 0]
    device = next(model.parameters()).device
    idx = torch.tensor([ids[-model.config.block_size :]], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, use_cache=True, generator=gen)
    return tok.decode(out[0].tolist())


def parser():
    p = argparse.ArgumentParser(prog="python -m nnfast generate",
                                description=__doc__.split("\n")[0])
    p.add_argument("path", help="a run folder, a checkpoint, or a Hugging Face folder")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    try:
        run = load_run(a.path, device)
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else None
        with torch.autocast("cuda", dtype=dtype) if dtype else torch.no_grad():
            text = generate_text(run, a.prompt, a.max_new_tokens, a.temperature, a.top_k,
                                 a.top_p, a.seed)
    except (D.DataError, RunError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0
