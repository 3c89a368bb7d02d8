#!/usr/bin/env bash
# Train a recipe on every local GPU (8 by default, fewer if fewer are found) with torchrun.
#   bash scripts/train_8gpu.sh byol_bsim [section.key=value ...] [--resume auto|force|none|PATH]
#   bash scripts/train_8gpu.sh small/simclr_wbsim train.epochs=100
#   bash scripts/train_8gpu.sh ~/exp/my_byol.yaml          # a recipe file: configs/small/byol.yaml, or a copy
#   bash scripts/train_8gpu.sh --resume none byol_bsim data.val=     # options and overrides in any order
# A recipe is a name under configs/ or a .yaml file; a fragment (configs/_base/...) is refused.
# The ranks end with this script's process (the launcher), whatever ends it; SIGTERM asks them for a checkpoint
# and exits 0 once written (preemption), Ctrl-C stops them with one line (exit 130): the same command resumes.
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node; they go to torchrun's
# c10d rendezvous. Without GPUs the same entry point runs on CPU with gloo (NPROC processes, default 1).
# The config, dataset paths and --resume are checked before torchrun starts; a user error is one line and exit 2.
case "${1:-}" in -h|--help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
# the recipe is the first argument that is neither an option (nor an option's value) nor a key=value override
recipe="" rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --resume) rest+=("$1" "${2:-}"); shift; [ $# -gt 0 ] && shift ;;
    --config) recipe=${2:-}; shift; [ $# -gt 0 ] && shift ;;
    -*|*=*) rest+=("$1"); shift ;;
    *) if [ -z "$recipe" ]; then recipe=$1; else rest+=("$1"); fi; shift ;;
  esac
done
set -- ${rest[@]+"${rest[@]}"}
if [ -z "$recipe" ]; then
  echo "error: no recipe; usage: bash scripts/train_8gpu.sh RECIPE [section.key=value ...] (see --help)" >&2
  exit 2
fi
rdzv_name=${recipe//[^A-Za-z0-9_]/_}
# a recipe file named relative to the caller's folder: made absolute before the script moves to the repository
[ -f "$recipe" ] && recipe=$(cd "$(dirname "$recipe")" && pwd)/$(basename "$recipe")
cd "$(dirname "$0")/.."
for var in NPROC NNODES NODE_RANK MASTER_PORT; do
  value=${!var:-}
  if [ -n "$value" ] && ! [[ "$value" =~ ^[0-9]+$ ]]; then
    echo "error: ${var}=${value} is not a whole number" >&2
    exit 2
  fi
done
NNODES=${NNODES:-1}
if [ "${NPROC:-1}" -lt 1 ] || [ "$NNODES" -lt 1 ]; then
  echo "error: NPROC and NNODES must be at least 1" >&2
  exit 2
fi
if [ "$NNODES" -gt 1 ] && { [ -z "${MASTER_ADDR:-}" ] || [ -z "${NODE_RANK:-}" ]; }; then
  echo "error: NNODES=${NNODES} needs MASTER_ADDR and NODE_RANK set on every node" >&2
  exit 2
fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
cores=$(nproc)
if [ "$gpus" -gt 0 ]; then
  nproc=${NPROC:-$(( gpus < 8 ? gpus : 8 ))}
  threads=$(( cores / nproc > 0 ? cores / nproc : 1 ))
else
  nproc=${NPROC:-1}
  threads=$(( cores / (2 * nproc) > 0 ? cores / (2 * nproc) : 1 ))   # bsim_fast.dist.cpu_threads: why half
fi
# the recipe, the config, dataset paths and --resume, before any process starts (seconds instead of a torchrun
# report); bsim_fast.recipes resolves the recipe, as every entry point does
WORLD_SIZE=$(( nproc * NNODES )) "$PY" -m bsim_fast.train --check-only --config "$recipe" "$@"
[ "$gpus" -gt 0 ] || echo "[train_8gpu] no GPU found: running ${nproc} CPU process(es) with gloo, ${threads} thread(s) each"
if [ "$NNODES" -gt 1 ]; then
  rdzv=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --rdzv_backend c10d
        --rdzv_endpoint "${MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-bsim_${rdzv_name}}")
else
  rdzv=(--standalone --nnodes 1)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
# bsim_fast.dist: torchrun, with a child's one-line error (exit 2) instead of torchrun's failure report
exec "$PY" -m bsim_fast.dist "${rdzv[@]}" --nproc_per_node "$nproc" -m bsim_fast.train --config "$recipe" "$@"
