"""Train GPT-2 from scratch with nnfast's kernels.

On a GPU: nanoGPT's shakespeare-char model (6 layers, 6 heads, 384 wide, block 256,
dropout 0.2) on Tiny Shakespeare (downloaded once, or from $NNFAST_DATA_DIR).
On a CPU: a 4-layer, 128-wide model on Tiny Shakespeare when it is already on this machine
(``--data auto``: $NNFAST_DATA_DIR, the current folder, the cache), else on the Python
standard library's own source (no download); the first line printed says which. About
15-20 minutes on 2 busy cores with 1 thread; the sample at the end reads like its corpus.

    python examples/train_gpt2.py                                 # the defaults for this machine
    python examples/train_gpt2.py --max_steps 300 --out runs/try  # any trainer or model field
    torchrun --nproc_per_node 8 examples/train_gpt2.py            # DDP, same script

Later flags win, so anything on the command line overrides the defaults below.
"""

import sys

import torch

from nnfast.__main__ import main

GPU = """--model gpt2 --preset shakespeare-char --data shakespeare --max_steps 5000
--batch_size 64 --lr 1e-3 --min_lr_ratio 0.1 --beta2 0.99 --warmup_steps 100
--eval_interval 250 --eval_steps 100 --log_interval 10 --out runs/gpt2-shakespeare-char"""

CPU = """--model gpt2 --preset shakespeare-char --data auto --n_layer 4 --n_head 4 --n_embd 128
--block_size 64 --dropout 0.0 --max_steps 1500 --batch_size 32 --lr 2e-3 --beta2 0.99
--warmup_steps 50 --eval_interval 250 --eval_steps 20 --log_interval 25 --device cpu
--out runs/gpt2-cpu"""

if __name__ == "__main__":
    defaults = (GPU if torch.cuda.is_available() else CPU).split()
    sys.exit(main(["train", *defaults, *sys.argv[1:]]))
