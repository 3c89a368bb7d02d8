#!/usr/bin/env bash
# The main job on the built-in dataset: install, convert it to FFCV and DALI, train byol_bsim briefly, then
# print the k-NN top-1 of the trained network beside the same network untrained (same seed, same k-NN).
# Uses the GPUs when present (20 epochs), the CPU otherwise (10 steps of 32 images, about a minute of
# training: it shows the pipeline runs end to end, not learning). QUICK_ARGS replaces the training overrides.
case "${1:-}" in -h|--help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=.venv/bin/python
for split in train test; do
  $PY data_prep/write_ffcv.py --split $split --output data_out/cifar10_mini_$split.beton --overwrite
  $PY data_prep/write_dali.py --split $split --output data_out/cifar10_mini_${split}_dali --overwrite
done
# A short run: a few hundred optimiser steps on a GPU; on a CPU ten steps of 32 images, a line each
if $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  device=gpu
  args=${QUICK_ARGS:-"train.epochs=20 train.knn_every_epochs=10"}
else
  device=cpu
  args=${QUICK_ARGS:-"train.epochs=1 train.max_steps=10 data.batch_size=32 data.workers=2 train.log_every=1"}
fi
# runs/quickstart is this script's own scratch run: each quickstart starts it afresh (a real run resumes or,
# with --resume none, keeps the earlier run in out_dir/previous_N/)
rm -rf runs/quickstart
bash scripts/train_8gpu.sh small/byol_bsim train.out_dir=runs/quickstart $args
echo "[quickstart] the k-NN of the same network untrained (the run's seed and set-up, the run's k-NN)"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} QUICK_DEVICE=$device $PY - <<'PY'
import json
import os
import sys

from bsim_fast.config import from_dict
from bsim_fast.eval import knn_monitor
from bsim_fast.loaders import build_eval_loader
from bsim_fast.run import build

trained = json.load(open("runs/quickstart/final.json"))
if "knn_top1" not in trained:
    print(f"[quickstart] done after {trained['step']} steps; no k-NN (data.val is off in QUICK_ARGS)")
    sys.exit(0)
cfg = from_dict(json.load(open("runs/quickstart/config.json")), "runs/quickstart/config.json")
run = build(cfg)  # the run's own set-up and seed: its network as it was before step 1
untrained = knn_monitor(run.method.backbone, cfg, build_eval_loader, 0, 1, run.device)
queries = "the built-in test split" if cfg.data.val == "builtin:test" else cfg.data.val
print(
    f"k-NN top-1 on {queries}: {trained['knn_top1']:.2f}% after {trained['step']} steps, "
    f"{untrained['knn_top1']:.2f}% untrained"
)
if os.environ["QUICK_DEVICE"] == "cpu":
    print(
        "This CPU run shows that the pipeline runs end to end (convert, load, augment, mix, train, checkpoint, "
        f"k-NN); {trained['step']} CPU steps do not learn, so the two numbers are alike. Learning is shown on a "
        "GPU: docs/RESULTS.md, `bash scripts/gpu_check.sh runs/check` and `python -m bsim_fast.tools.speedrun`."
    )
else:
    print("The difference is what this short GPU run learned; docs/RESULTS.md has the longer runs.")
PY
