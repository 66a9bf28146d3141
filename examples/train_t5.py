"""Pre-train T5 (v1.1 recipe) with span corruption on nnfast's kernels; prints the span
accuracy (teacher-forced accuracy on the masked-out spans).

On a GPU: t5-small's shapes on Tiny Shakespeare, inputs of 256.
On a CPU: a 2+2-layer, 128-wide T5, inputs of 96; a few minutes.

    python examples/train_t5.py                        # the defaults for this machine
    python examples/train_t5.py --max_steps 50 --out runs/try   # any trainer or model field
"""

import sys

import torch

from nnfast.__main__ import parse_args
from nnfast.train import train

GPU = """--model t5 --preset t5-small --data shakespeare --block_size 256 --max_steps 3000
--batch_size 64 --lr 1e-3 --warmup_steps 200 --eval_interval 500 --eval_steps 50
--log_interval 50 --out runs/t5-small"""

CPU = """--model t5 --preset t5-small --data auto --n_layer 2 --n_head 4 --n_embd 128
--hidden_dim 256 --n_sentinels 32 --block_size 96 --max_steps 500 --batch_size 32 --lr 2e-3
--beta2 0.99 --warmup_steps 50 --eval_interval 250 --eval_steps 10 --log_interval 50
--device cpu --out runs/t5-cpu"""

if __name__ == "__main__":
    defaults = (GPU if torch.cuda.is_available() else CPU).split()
    cfg, overrides, resume, given = parse_args([*defaults, *sys.argv[1:]])
    result = train(cfg, overrides, resume, given)
    print(f"span accuracy (val): {result['val_metrics'].get('span_acc', float('nan')):.4f}")
