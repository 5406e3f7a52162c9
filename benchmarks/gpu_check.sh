#!/usr/bin/env bash
# Thin wrapper around benchmarks/gpu_check.py for the GPU machine (see docs/performance.md):
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [other gpu_check.py options]
# That machine has no registry access: packages it lacks travel as wheels in .whl/ (make
# gpu-wheels). They are installed into a private target directory put on PYTHONPATH, never into
# the machine's own environment. A failed install is reported and the run goes on: the
# environment check then names what is missing, and the phases that need it are skipped.
set -uo pipefail
# The run's time window starts now: gpu_check.py counts the wheel install against its budget.
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s.%N)}
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python   # a developer machine
else PY=python3; fi                                         # the GPU machine: its torch python

SITE=${GPU_CHECK_SITE:-/tmp/site}
shopt -s nullglob
wheels=(.whl/*.whl)
if (( ${#wheels[@]} )) && [[ " $* " != *" --dry-run "* ]]; then
    echo "[gpu_check.sh] installing ${#wheels[@]} wheels from .whl/ into $SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}"; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "[gpu_check.sh] wheel install failed; going on without them" >&2
    fi
fi
export GPU_CHECK_COMMAND="bash benchmarks/gpu_check.sh${*:+ $*}"
exec "$PY" benchmarks/gpu_check.py "$@"
