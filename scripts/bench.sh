#!/usr/bin/env bash
# Throughput benchmark on this machine: loader-only (FFCV, DALI, torchvision), model-only, end-to-end, CutMix.
#   bash scripts/bench.sh [--tiny] [--ffcv X.beton --dali DIR --folder DIR] [--only model ...]
# With no dataset given it converts the built-in one first. Writes runs/bench/bench.{json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
for arg in "$@"; do  # the help (and nothing else) before any conversion
  case "$arg" in -h|--help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exec $PY -m bsim_fast.tools.bench --help ;; esac
done
[ -f data_out/cifar10_mini_train.beton ] || $PY data_prep/write_ffcv.py --split train --output data_out/cifar10_mini_train.beton
[ -d data_out/cifar10_mini_train_dali ] || $PY data_prep/write_dali.py --split train --output data_out/cifar10_mini_train_dali
exec $PY -m bsim_fast.tools.bench "$@"
