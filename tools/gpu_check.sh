#!/usr/bin/env bash
# The GPU check on any CUDA machine with DALI installed: python -m tools.gpu_check into
# $OUT (default gpu_check_out), about 7 minutes on one H100/H200-class GPU (--time-limit 420).
#   bash tools/gpu_check.sh [--time-limit S] [--only a,b] [--skip a,b]
# results/bench/README.md describes the steps. On a machine without network access DALI can
# come from local wheels: if it is missing, .devwheels/INSTALL.txt (an install command for
# wheels copied next to it) is run first; else the script says how to install it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import nvidia.dali" 2>/dev/null; then
    if [[ -f .devwheels/INSTALL.txt ]]; then
        t0=$SECONDS
        eval "$(cat .devwheels/INSTALL.txt)"
        echo "DALI installed in $((SECONDS - t0)) s"
    else
        echo "gpu_check.sh: DALI is not installed; install it with: pip install -e ." \
             "(or pip install nvidia-dali-cuda120==2.4.0), then rerun" >&2
        exit 2
    fi
fi
exec python3 -m tools.gpu_check --out "${OUT:-gpu_check_out}" "$@"
