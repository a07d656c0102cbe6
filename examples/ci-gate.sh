#!/usr/bin/env bash
# Gate a release on robustness: exit 1 (and say which model and metric fell short) when the compressed
# model's clean, PGD or worst-case accuracy drops below the thresholds. Exit 2 means bad input.
#
#   bash examples/ci-gate.sh model.safetensors [DATA] [EPS]
#   CLEAN=0.9 PGD=0.4 WORST=0.35 bash examples/ci-gate.sh robust-int8.safetensors cifar10 8/255
set -euo pipefail
ckpt=${1:?usage: ci-gate.sh CKPT [DATA] [EPS]}
data=${2:-digits}
eps=${3:-0.1}
rcomp bench "$ckpt" --data "$data" --attack fgsm,pgd --eps "$eps" -n "${N:-500}" \
  --format json -o bench-report.json --force \
  --fail-under "clean=${CLEAN:-0.9},pgd=${PGD:-0.4},worst=${WORST:-0.35}"
echo "robustness gate passed for $ckpt" >&2
