#!/usr/bin/env bash
# The path to a shipped file, on the offline digits data: prune -> adversarial fine-tune -> export to
# ONNX -> ONNX Runtime int8 -> bench of the .onnx files beside the checkpoint they came from.
# Needs the ONNX extra: pip install 'rcomp[onnx]'.
#
#   bash examples/ship-onnx.sh [WORKDIR]
set -euo pipefail
work=${1:-rcomp-ship}
eps=${EPS:-0.1}
epochs=${EPOCHS:-10}
n=${N:-360}
adv_epochs=${ADV_EPOCHS:-3}
exporter=${EXPORTER:-dynamo}  # legacy: faster, for smoke runs
mkdir -p "$work"
cd "$work"

# 1. a dense baseline, pruned at 0.5, then fine-tuned adversarially (PGD)
rcomp finetune --arch convnet8 --input-shape 1,8,8 --data digits --epochs "$epochs" \
  --optimizer adam --lr 0.003 -o dense.safetensors --force >/dev/null
rcomp prune dense.safetensors --ratio 0.5 -o pruned.safetensors --force \
  | rcomp finetune --data digits --adv pgd --eps "$eps" --epochs "$adv_epochs" -o robust.safetensors --force >/dev/null

# 2. export: ONNX Runtime must reproduce the checkpoint (top-1 agreement >= 99%) or nothing is written
rcomp export robust.safetensors -o robust.onnx --exporter "$exporter" --force >/dev/null

# 3. int8 with ONNX Runtime (static QDQ; the activation type is chosen for this CPU and said on stderr)
rcomp quantize robust.onnx --backend onnxruntime --data digits -o robust.int8.onnx --force >/dev/null

# 4. the checkpoint and the files you ship, side by side. Gradient attacks on the .onnx files run on the
#    source checkpoint their metadata names (found at its path with its sha256) and are scored on the
#    ONNX model (transfer); square queries the ONNX model itself; worst = per-example worst of all.
rcomp bench robust.safetensors robust.onnx robust.int8.onnx --data digits -n "$n" \
  --attack pgd,square --eps "$eps"
