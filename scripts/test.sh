#!/usr/bin/env bash
# Install, then run the test suite (GPU tests skip themselves without a GPU).
case "${1:-}" in -h|--help) sed -n '2,/^set -/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# exit 5 = no tests collected: that is a failure of the suite, not a pass
[ "$rc" = 5 ] && echo "error: pytest collected no tests" >&2
exit $rc
