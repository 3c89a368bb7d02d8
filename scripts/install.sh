#!/usr/bin/env bash
# Idempotent installer: a venv in .venv, torch, ffcv (and the system libraries it builds against), DALI, triton
# and this package with its commands (bsim-train, bsim-write-ffcv, ...). Quick the second time: every step checks
# before it acts. One OpenCV (the headless build; ffcv's opencv-python is swapped for it) and the DALI build for
# torch's CUDA major (nvidia-dali-cuda120 with a CUDA 12 torch, nvidia-dali-cuda130 with CUDA 13 or a CPU torch).
#   bash scripts/install.sh                   # reuses a compatible torch/torchvision/triton of $PYTHON (python3)
#   bash scripts/install.sh --offline DIR     # no network: from a wheelhouse of scripts/pack_offline.sh
#   bash scripts/install.sh --no-venv         # into $PYTHON's own environment (same as VENV=none)
#   bash scripts/install.sh --fresh-torch     # never reuse: torch from PyPI into the venv (~5 GB with CUDA)
#   VENV=/path/to/venv PYTHON=python3.12 bash scripts/install.sh
# Reuse: when $PYTHON already has torch 2.11-2.14.1 with torchvision and triton (a CUDA build where a GPU is
# present), the venv is made with --system-site-packages (and, if $PYTHON is itself a venv, a .pth file that
# adds its site-packages), so torch is not downloaded again. It says which torch it chose.
case "${1:-}" in -h|--help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
OFFLINE=""; FRESH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --offline) [ $# -ge 2 ] && [ -d "$2" ] || { echo "error: --offline needs a wheelhouse folder" >&2; exit 2; }
               OFFLINE=$(cd "$2" && pwd); shift 2 ;;
    --no-venv) VENV=none; shift ;;
    --fresh-torch) FRESH=1; shift ;;
    *) echo "usage: bash scripts/install.sh [--offline DIR] [--no-venv] [--fresh-torch]" >&2; exit 2 ;;
  esac
done
say() { echo "[install] $*"; }
if [ -n "$OFFLINE" ] && [ -z "$(find "$OFFLINE" -maxdepth 2 -name SHA256SUMS -print -quit)" ]; then
  echo "error: $OFFLINE: no SHA256SUMS (not a wheelhouse written by scripts/pack_offline.sh)" >&2; exit 2
fi

# Does $1 (a python) hold a torch this project can use? Prints "torch X (CUDA Y) at PATH" or why not.
torch_ok() { "$1" - <<'PYEOF'
import shutil, subprocess, sys
try:
    import torch, torchvision  # noqa: F401
except Exception as e:  # noqa: BLE001
    print(f"no torch/torchvision ({type(e).__name__}: {e})"); sys.exit(1)
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:3])
if not (2, 11, 0) <= v <= (2, 14, 1):
    print(f"torch {torch.__version__} is outside 2.11-2.14.1"); sys.exit(1)
try:
    import triton  # noqa: F401
except ImportError:
    if sys.platform.startswith("linux"):
        print(f"torch {torch.__version__} without triton"); sys.exit(1)
gpu = shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
if gpu and torch.version.cuda is None:
    print(f"torch {torch.__version__} is a CPU build on a machine with a GPU"); sys.exit(1)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) at {torch.__file__.rsplit('/', 2)[0]}")
PYEOF
}

# 1. The environment: $PY itself (VENV=none), or a venv that reuses $PY's torch when it is compatible.
if [ "$VENV" = none ]; then
  ENV_PY=$PY
  say "installing into $("$PY" -c 'import sys; print(sys.prefix)') (no venv)"
else
  ENV_PY=$VENV/bin/python
  if [ ! -x "$ENV_PY" ]; then
    if [ "$FRESH" = 0 ] && found=$(torch_ok "$PY"); then
      say "reusing $found: creating $VENV with --system-site-packages"
      # Without its own pip (and, before Python 3.12, an old setuptools that would shadow the newer one torch
      # requires) when $PYTHON has pip: that pip then installs into the venv.
      nopip=$("$PY" -c 'import pip' 2>/dev/null && echo --without-pip || true)
      "$PY" -m venv --system-site-packages $nopip "$VENV"
      # A venv made from a venv sees only the base interpreter's packages: add the parent's explicitly.
      "$PY" - "$("$ENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" <<'PYEOF'
import site, sys
if sys.prefix != sys.base_prefix:
    # addsitedir, not a bare path: the parent's own .pth files (editable installs) must run too
    open(sys.argv[1] + "/_parent_env.pth", "w").write(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages()))
PYEOF
    else
      [ "$FRESH" = 1 ] && why="--fresh-torch" || why=${found:-no torch}
      say "not reusing $PY's torch ($why): creating $VENV"
      "$PY" -m venv "$VENV"
      [ -n "$OFFLINE" ] || "$ENV_PY" -m pip install -q --upgrade pip setuptools wheel >/dev/null
    fi
  fi
fi
pip() { "$ENV_PY" -m pip "$@"; }
have() { "$ENV_PY" - "$@" <<'PYEOF'
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)
PYEOF
}
# The DALI build for another CUDA major than torch's, removed from this environment (both provide nvidia/dali).
other_dali() {
  local other
  for other in $("$ENV_PY" scripts/wheelhouse.py installed-here nvidia-dali-cuda120 nvidia-dali-cuda130); do
    if [ "$other" != "$dali" ]; then
      say "removing $other: torch here is built for CUDA $("$ENV_PY" -c 'import torch; print(torch.version.cuda)')"
      pip uninstall -q -y "$other"
    fi
  done
}
ready() {
  "$ENV_PY" scripts/wheelhouse.py one-opencv "$@"
  say "ready: $("$ENV_PY" -c 'from importlib.metadata import version as v, PackageNotFoundError as E
def f(p):
    try: return f"{p} {v(p)}"
    except E: return None
names = ("torch", "torchvision", "ffcv", "nvidia-dali-cuda120", "nvidia-dali-cuda130", "triton", "opencv-python-headless")
print(*filter(None, (f(p) for p in names)), sep=", ")')"
}

# 2a. Offline: everything from the wheelhouse (torch must already be there: a wheelhouse carries none).
if [ -n "$OFFLINE" ]; then
  found=$(torch_ok "$ENV_PY") || { echo "error: --offline needs a usable torch in $ENV_PY ($found); a wheelhouse has none" >&2; exit 1; }
  say "offline from $OFFLINE; torch: $found"
  stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
  missing=$("$ENV_PY" scripts/wheelhouse.py assemble "$OFFLINE" "$stage")
  base=(--no-index --find-links "$stage" -q)
  # From the stage folder, without PYTHONPATH: this checkout on the path would pass for an installed package.
  pip() { (cd "$stage" && env -u PYTHONPATH "$ENV_PY" -m pip "$@"); }
  pip install "${base[@]}" -r "$stage/requirements.txt"
  if [ -f "$stage/requirements-dali.txt" ]; then
    read -r dali _ < <("$ENV_PY" scripts/wheelhouse.py dali-package)
    packed=$(cut -d'<' -f1 < "$stage/requirements-dali.txt" | cut -d'>' -f1 | cut -d'=' -f1)
    if echo "$missing" | grep -q .; then
      say "not installing DALI: wheels missing or damaged in $OFFLINE: $(echo $missing)"
    elif [ "$packed" != "$dali" ]; then
      say "not installing DALI: the wheelhouse carries $packed, torch here needs $dali (pack_offline.sh --dali-cuda)"
    else
      other_dali
      pip install "${base[@]}" -r "$stage/requirements-dali.txt"
    fi
  elif echo "$missing" | grep -q .; then
    echo "error: wheels missing or damaged in $OFFLINE: $(echo $missing)" >&2; exit 1
  fi
  ready "${base[@]}"
  exit 0
fi

# 2b. torch + torchvision: the newest release in the supported range (a CUDA build where pip gives one;
#     it runs on CPU too).
if ! have torch torchvision; then
  say "installing torch, torchvision"
  pip install -q "torch>=2.11,<=2.14.1" "torchvision>=0.26,<=0.29.1"
fi

# 3. ffcv compiles against numpy, libturbojpeg and OpenCV; built without isolation so it sees the venv's numpy,
#    as a wheel that asks for the headless OpenCV instead of opencv-python (one OpenCV). Also rebuilt once where an
#    earlier install left an ffcv asking for opencv-python, which pip would otherwise bring back.
gui_opencv() { "$ENV_PY" -c 'import sys; from importlib.metadata import requires as r
sys.exit(0 if "opencv-python" in (r("ffcv") or []) else 1)' 2>/dev/null; }
if ! have ffcv || gui_opencv; then
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
  say "building ffcv"
  pip install -q "numpy>=1.26" cython pkgconfig "numba>=0.60" assertpy fastargs terminaltables psutil \
      "opencv-python-headless" pytorch_pfn_extras
  built=$(mktemp -d)
  pip wheel -q --no-deps --no-build-isolation -w "$built" "ffcv==1.0.2"
  pip install -q --force-reinstall --no-deps "$("$ENV_PY" scripts/wheelhouse.py headless "$built"/ffcv-*.whl "$built/headless")"
  rm -rf "$built"
fi

# 4. The package itself with its remaining dependencies (DALI, triton, pyyaml, timm, tqdm, tensorboard) and
#    the test extras. DALI: the build for torch's CUDA major, the other one removed (they share nvidia/dali).
read -r dali dali_extra < <("$ENV_PY" scripts/wheelhouse.py dali-package)
other_dali
prefix=$("$ENV_PY" -c 'import sys; print(sys.prefix)')
stamp="$prefix/.bsim_fast-installed"
want=$( (cat setup.cfg setup.py pyproject.toml; echo "$dali") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! have bsim_fast nvidia.dali triton; then
  say "installing bsim_fast[dev,$dali_extra]"
  pip install -q -e ".[dev,$dali_extra]"
  echo "$want" > "$stamp" 2>/dev/null || true
fi
ready
