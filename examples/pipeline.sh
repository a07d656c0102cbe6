#!/usr/bin/env bash
# The study's chain as shell commands, on the offline digits data. Each stage prints only its output
# path on stdout, so stages chain with pipes; logs and progress go to stderr.
#
#   bash examples/pipeline.sh [WORKDIR]
set -euo pipefail
work=${1:-rcomp-pipeline}
eps=${EPS:-0.1}
epochs=${EPOCHS:-10}
mkdir -p "$work"
cd "$work"

# 1. a dense baseline, trained from scratch
rcomp finetune --arch convnet8 --input-shape 1,8,8 --data digits --epochs "$epochs" \
  --optimizer adam --lr 0.003 -o dense.safetensors --force >/dev/null

# 2. prune it, then fine-tune the pruned model adversarially (PGD), in one pipeline
rcomp prune dense.safetensors --ratio 0.5 -o pruned.safetensors --force \
  | rcomp finetune --data digits --adv pgd --eps "$eps" --epochs 3 -o robust.safetensors --force >/dev/null

# 3. quantize the robust model to int8 and compare everything side by side
rcomp quantize robust.safetensors --data digits -o robust-int8.safetensors --force >/dev/null
rcomp bench dense.safetensors pruned.safetensors robust.safetensors robust-int8.safetensors \
  --data digits --attack fgsm,pgd --eps "$eps"

# 4. transfer: examples crafted on the dense model, replayed against the robust one
rcomp attack dense.safetensors --data digits --attack pgd --eps "$eps" -o adv.safetensors --force >/dev/null
rcomp attack robust.safetensors --from adv.safetensors
