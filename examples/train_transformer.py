"""Train the original Transformer (Vaswani et al. 2017) on a generated task, reversing random
strings, on nnfast's kernels; prints the exact-match accuracy of greedy decoding (with the KV
cache) on held-out strings. No download: the trainer's text only supplies the vocabulary,
and ``Transformer.prepare_batch`` generates every batch.

On a GPU: Transformer-base (6+6 layers, d=512), strings of up to 32 symbols.
On a CPU: the ``small`` preset (3+3 layers, d=128), strings of up to 8; a few minutes.

    python examples/train_transformer.py                 # the defaults for this machine
    python examples/train_transformer.py --task sort     # any trainer or model field
"""

import sys

import torch

from nnfast.__main__ import parse_args
from nnfast.train import train

GPU = """--model transformer --preset base --data shakespeare --block_size 64 --max_len 32
--max_steps 4000 --batch_size 128 --lr 5e-4 --beta2 0.98 --warmup_steps 400
--eval_interval 500 --eval_steps 10 --log_interval 50 --out runs/transformer-base"""

CPU = """--model transformer --preset small --data auto --block_size 16 --max_len 8
--max_steps 400 --batch_size 64 --lr 1e-3 --beta2 0.98 --warmup_steps 50 --weight_decay 0.0
--eval_interval 200 --eval_steps 4 --log_interval 50 --device cpu --out runs/transformer-cpu"""

if __name__ == "__main__":
    defaults = (GPU if torch.cuda.is_available() else CPU).split()
    cfg, overrides, resume, given = parse_args([*defaults, *sys.argv[1:]])
    result = train(cfg, overrides, resume, given)
    print(f"exact match (val): {result['val_metrics'].get('exact_match', float('nan')):.4f}")
