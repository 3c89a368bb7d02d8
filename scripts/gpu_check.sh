#!/usr/bin/env bash
# The acceptance run on one GPU in about 10 minutes: pytest -m gpu, time to accuracy on CIFAR-10 (--cifar DIR:
# small/byol and small/byol_wbsim, k-NN at the end), an ImageNet-like JPEG set written to FFCV and DALI, the
# benchmark, and OUT_DIR/report.md + report.json + bench.png, rewritten after every stage (docs/BENCHMARKS.md).
#   bash scripts/gpu_check.sh OUT_DIR [--cifar DIR] [--tiny] [--budget-s S] [--skip-tests] [bench options]
# Without a GPU it runs the --tiny CPU version. Uses .venv (scripts/install.sh) or $PYTHON; installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
case "${1:-}" in -h|--help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exec "$PY" -m bsim_fast.tools.gpu_check --help ;; esac
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_check.sh OUT_DIR [--cifar DIR] [--tiny] [--budget-s S] [--skip-tests] [bench options]" >&2
  exit 2
fi
exec "$PY" -m bsim_fast.tools.gpu_check "$@"
