"""Pre-train BERT with masked-language modeling on nnfast's kernels; prints the MLM accuracy.

On a GPU: BERT-Small (4 layers, 512 wide) on Tiny Shakespeare, sequences of 128.
On a CPU: a 2-layer, 128-wide BERT, sequences of 64; a few minutes. The trainer feeds raw text
windows; ``Bert.prepare_batch`` wraps them in [CLS] .. [SEP], pads a quarter of the rows to a
random length and masks 15% of the tokens (80% [MASK], 10% random, 10% kept).

    python examples/train_bert.py                        # the defaults for this machine
    python examples/train_bert.py --max_steps 50 --out runs/try   # any trainer or model field
"""

import sys

import torch

from nnfast.__main__ import parse_args
from nnfast.train import train

GPU = """--model bert --preset bert-small --data shakespeare --block_size 128 --max_steps 3000
--batch_size 64 --lr 5e-4 --warmup_steps 200 --eval_interval 500 --eval_steps 50
--log_interval 50 --out runs/bert-small"""

CPU = """--model bert --preset bert-small --data auto --n_layer 2 --n_head 4 --n_embd 128
--block_size 64 --dropout 0.0 --max_steps 300 --batch_size 32 --lr 1e-3 --beta2 0.99
--warmup_steps 50 --eval_interval 150 --eval_steps 10 --log_interval 50 --device cpu
--out runs/bert-cpu"""

if __name__ == "__main__":
    defaults = (GPU if torch.cuda.is_available() else CPU).split()
    cfg, overrides, resume, given = parse_args([*defaults, *sys.argv[1:]])
    result = train(cfg, overrides, resume, given)
    print(f"MLM accuracy (val): {result['val_metrics'].get('mlm_acc', float('nan')):.4f}")
