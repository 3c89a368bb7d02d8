#!/usr/bin/env bash
# The main job on the built-in dataset: install, convert it to FFCV and DALI, train byol_bsim briefly,
# print k-NN top-1. Uses the GPUs when present, the CPU otherwise.
case "${1:-}" in -h|--help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
for split in train test; do
  $PY data_prep/write_ffcv.py --split $split --output data_out/cifar10_mini_$split.beton --overwrite
  $PY data_prep/write_dali.py --split $split --output data_out/cifar10_mini_${split}_dali --overwrite
done
# A short run: a few hundred optimiser steps on a GPU, a few dozen on a CPU (overrides in QUICK_ARGS).
if $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  args=${QUICK_ARGS:-"train.epochs=20 train.knn_every_epochs=10"}
else
  args=${QUICK_ARGS:-"train.epochs=1 train.max_steps=12 data.batch_size=128 data.workers=2"}
fi
# runs/quickstart is this script's own scratch run: each quickstart starts it afresh (a real run resumes or,
# with --resume none, keeps the earlier run in out_dir/previous_N/)
rm -rf runs/quickstart
bash scripts/train_8gpu.sh small/byol_bsim train.out_dir=runs/quickstart $args
$PY - <<'PY'
import json; r = json.load(open("runs/quickstart/final.json"))
print(f"k-NN top-1 on the built-in test split: {r['knn_top1']:.2f}% (step {r['step']})")
PY
