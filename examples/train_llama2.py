"""Train a Llama 2 (RMSNorm, RoPE, SwiGLU, no biases, untied head) from scratch with nnfast.

On a GPU: Llama's architecture at nanoGPT's shakespeare-char size (6 layers, 6 heads,
384 wide, block 256) on Tiny Shakespeare. On a CPU: 4 layers, 128 wide, on Tiny Shakespeare
when it is already on this machine, else on the Python standard library's own source (no
download); a few minutes. Llama uses no dropout, so the GPU run is shorter than GPT-2's.

    python examples/train_llama2.py
    python examples/train_llama2.py --n_kv_head 2 --out runs/llama-gqa   # grouped-query attention
    torchrun --nproc_per_node 8 examples/train_llama2.py

Later flags win, so anything on the command line overrides the defaults below.
"""

import sys

import torch

from nnfast.__main__ import main

GPU = """--model llama2 --preset llama2-124m --data shakespeare --n_layer 6 --n_head 6
--n_embd 384 --block_size 256 --multiple_of 64 --max_steps 3000 --batch_size 64 --lr 1e-3
--min_lr_ratio 0.1 --beta2 0.99 --warmup_steps 100 --eval_interval 250 --eval_steps 100
--log_interval 10 --out runs/llama2-shakespeare-char"""

CPU = """--model llama2 --preset llama2-124m --data auto --n_layer 4 --n_head 4 --n_embd 128
--block_size 64 --multiple_of 32 --max_steps 1500 --batch_size 32 --lr 2e-3 --beta2 0.99
--warmup_steps 50 --eval_interval 250 --eval_steps 20 --log_interval 25 --device cpu
--out runs/llama2-cpu"""

if __name__ == "__main__":
    defaults = (GPU if torch.cuda.is_available() else CPU).split()
    sys.exit(main(["train", *defaults, *sys.argv[1:]]))
