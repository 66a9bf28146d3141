"""``python -m nnfast eval RUN_DIR_OR_HF_FOLDER --task hellaswag --data FILE.jsonl``.

HellaSwag's jsonl: one example a line, ``ctx`` (or ``ctx_a`` and ``ctx_b``), four
``endings`` and the right one's index ``label``. Each ending, after a space, is scored by its
tokens' log-probabilities given the context: ``acc`` picks the ending with the largest sum,
``acc_norm`` the largest mean per token (the length-normalised score, nanoGPT's and llm.c's
``acc_norm``). Candidates run in batches, padded on the right (a causal model never looks
right); a context longer than the model's window loses its oldest tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nnfast import data as D
from nnfast.runs import RunError, encode_prompt, load_run

N_ENDINGS = 4
TASKS = ("hellaswag",)


@dataclass
class Example:
    ctx: str
    endings: list[str]
    label: int


def read_hellaswag(path: str | Path) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise D.DataError(f"{path}: no such HellaSwag file")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise D.DataError(f"{where}: not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise D.DataError(f"{where}: not a JSON object")
            ctx = row.get("ctx")
            if ctx is None and "ctx_a" in row:
                ctx = f"{row['ctx_a']} {row.get('ctx_b', '')}".strip()
            if not isinstance(ctx, str):
                raise D.DataError(f"{where}: field 'ctx' (or 'ctx_a') missing or not a string")
            ends = row.get("endings")
            if not (isinstance(ends, list) and all(isinstance(e, str) for e in ends)):
                raise D.DataError(f"{where}: field 'endings' must be a list of strings")
            if len(ends) != N_ENDINGS:
                raise D.DataError(f"{where}: field 'endings' has {len(ends)} endings, "
                                  f"HellaSwag has {N_ENDINGS}")
            label = row.get("label")
            if isinstance(label, str) and label.isdigit():
                label = int(label)
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(ends):
                raise D.DataError(f"{where}: field 'label' must be an int in [0, {len(ends)}), "
                                  f"got {label!r}")
            out.append(Example(ctx, ends, label))
    if not out:
        raise D.DataError(f"{path}: no examples")
    return out


def _rows(ex: Example, tok, block: int) -> list[tuple[list[int], int]]:
    """Each candidate as (token ids, index of its first ending token), cut to ``block``."""
    ctx = encode_prompt(tok, ex.ctx)
    if not ctx:
        eot = getattr(tok, "eot", None)
        ctx = [eot if eot is not None else 0]
    rows = []
    for end in ex.endings:
        ids = encode_prompt(tok, " " + end)
        if not ids:
            ids = encode_prompt(tok, end)
        ids = ids[: block - 1]  # at least one context token predicts the first one
        full = (ctx + ids)[-block:]
        rows.append((full, len(full) - len(ids)))
    return rows


def ending_logprobs(model, rows: list[tuple[list[int], int]], device) -> list[torch.Tensor]:
    """Per row, the log-probabilities of its ending tokens (one forward for all rows)."""
    T = max(len(ids) for ids, _ in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    for r, (ids, _) in enumerate(rows):
        idx[r, : len(ids)] = torch.tensor(ids)
    idx = idx.to(device)
    logits = model(idx)[0].float()  # (R, T, V)
    logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, idx[:, 1:, None])[..., 0]
    return [logp[r, start - 1 : len(ids) - 1].cpu() for r, (ids, start) in enumerate(rows)]


def hellaswag(model, tok, examples: list[Example], batch_size: int = 16, device=None,
              progress: bool = False) -> dict:
    """``{"n", "acc", "acc_norm"}`` over ``examples``; ``batch_size`` examples per forward."""
    from tqdm.auto import tqdm

    if not hasattr(model, "config") or not hasattr(model.config, "block_size"):
        raise ValueError(f"hellaswag scores a decoder language model, not {type(model).__name__}")
    device = device or next(model.parameters()).device
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else None
    autocast = (torch.autocast("cuda", dtype=dtype) if dtype else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    acc = acc_norm = 0
    with torch.no_grad(), autocast, tqdm(total=len(examples), disable=not progress,
                                         desc="hellaswag") as bar:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            rows = [r for ex in chunk for r in _rows(ex, tok, model.config.block_size)]
            scores = ending_logprobs(model, rows, device)
            for j, ex in enumerate(chunk):
                mine = scores[j * N_ENDINGS : (j + 1) * N_ENDINGS]
                acc += int(torch.stack([s.sum() for s in mine]).argmax()) == ex.label
                acc_norm += int(torch.stack([s.mean() for s in mine]).argmax()) == ex.label
            bar.update(len(chunk))
    model.train(was_training)
    n = len(examples)
    return {"n": n, "acc": acc / n, "acc_norm": acc_norm / n}


def parser():
    p = argparse.ArgumentParser(prog="python -m nnfast eval", description=__doc__.split("\n")[0])
    p.add_argument("path", help="a run folder, a checkpoint, or a Hugging Face folder")
    p.add_argument("--task", default="hellaswag", choices=TASKS)
    p.add_argument("--data", required=True, help="the task's .jsonl (HellaSwag's format)")
    p.add_argument("--batch_size", type=int, default=16, help="examples per forward pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, default=None, help="score the first N examples only")
    return p


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    try:
        examples = read_hellaswag(a.data)[: a.limit]
        run = load_run(a.path, device)
        res = hellaswag(run.model, run.tokenizer, examples, a.batch_size, device,
                        progress=sys.stderr.isatty())
    except (D.DataError, RunError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"task": a.task, "data": a.data, "model": run.description, **res}))
    return 0
