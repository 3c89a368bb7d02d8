#!/usr/bin/env bash
# Idempotent installer: system libraries for FFCV, a venv in .venv, torch, ffcv, DALI, triton and this package.
# Quick the second time: every step checks before it acts.
#   bash scripts/install.sh            # everything
#   VENV=/path/to/venv bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

say() { echo "[install] $*"; }

# 1. System libraries FFCV compiles against (libturbojpeg, OpenCV, pkg-config).
apt_pkgs="libturbojpeg0-dev libopencv-dev pkg-config"
missing=""
for p in $apt_pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "apt-get install$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "[install] FFCV needs system libraries; run: sudo apt-get install -y$missing" >&2
    exit 1
  fi
fi

# 2. The venv.
pip() { "$VENV/bin/python" -m pip "$@"; }
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PY" -m venv "$VENV"
  pip install -q --upgrade pip setuptools wheel >/dev/null
fi

have() { "$VENV/bin/python" - "$@" <<'PYEOF'
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)
PYEOF
}

# 3. torch + torchvision: the newest release in the supported range (a CUDA build where pip gives one;
#    it runs on CPU too).
if ! have torch torchvision; then
  say "installing torch, torchvision"
  pip install -q "torch>=2.11,<=2.14.1" "torchvision>=0.26,<=0.29.1"
fi

# 4. ffcv compiles against numpy and OpenCV; build it without isolation so it sees the venv's numpy.
if ! have ffcv; then
  say "building ffcv"
  pip install -q "numpy>=1.26" cython pkgconfig "numba>=0.60" assertpy fastargs terminaltables psutil \
      "opencv-python-headless" pytorch_pfn_extras
  pip install -q --no-build-isolation "ffcv==1.0.2"
fi

# 5. The package itself with its remaining dependencies (DALI, triton, pyyaml, timm, tqdm, tensorboard) and
#    the test extras.
stamp="$VENV/.bsim_fast-installed"
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! have bsim_fast nvidia.dali triton; then
  say "installing bsim_fast[dev]"
  pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
say "ready: $("$VENV/bin/python" -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("torch", "torchvision", "ffcv", "nvidia-dali-cuda120", "triton")), sep=", ")')"
