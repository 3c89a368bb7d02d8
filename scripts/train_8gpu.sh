#!/usr/bin/env bash
# Train a recipe on every local GPU (8 by default, fewer if fewer are found) with torchrun.
#   bash scripts/train_8gpu.sh byol_bsim [section.key=value ...]
#   bash scripts/train_8gpu.sh small/simclr_wbsim train.epochs=100
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node; they go to torchrun's
# c10d rendezvous. Without GPUs the same entry point runs on CPU with gloo (NPROC processes, default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=${1:-}
if [ -z "$recipe" ] || [ ! -f "configs/${recipe%.yaml}.yaml" ]; then
  avail=$(cd configs && find . -name '*.yaml' -not -path './_base/*' | sed 's|^\./||; s|\.yaml$||' | sort | tr '\n' ' ')
  echo "error: unknown recipe '${recipe}'; choose one of: ${avail}" >&2
  exit 2
fi
shift
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$gpus" -gt 0 ]; then
  nproc=${NPROC:-$(( gpus < 8 ? gpus : 8 ))}
else
  nproc=${NPROC:-1}
  echo "[train_8gpu] no GPU found: running ${nproc} CPU process(es) with gloo"
fi
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR for a multi-node run}" "${NODE_RANK:?set NODE_RANK for a multi-node run}"
  rdzv=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --rdzv_backend c10d
        --rdzv_endpoint "${MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-bsim_${recipe//\//_}}")
else
  rdzv=(--standalone --nnodes 1)
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
exec "$PY" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$nproc" \
  -m bsim_fast.train --config "configs/${recipe%.yaml}.yaml" "$@"
