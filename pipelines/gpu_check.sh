#!/usr/bin/env bash
# The GPU check, for any CUDA machine with DALI installed (`pip install -e .` installs it):
# prints the DALI / torch / CUDA versions, then runs every GPU check and benchmark into $OUT
# (default gpu_check_out/, ~6 min). results/bench/README.md describes the checks.
#   OUT=gpu_check_out bash pipelines/gpu_check.sh [--budget 300 --skip train]
# Extra arguments go to `python3 -m pipelines.gpu_check`. On a machine without network access,
# DALI can come from local wheels: if it is missing, .devwheels/INSTALL.txt (an install command
# for wheels copied next to it) is run first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
if ! python3 -c "import nvidia.dali" 2>/dev/null; then
    [[ -f .devwheels/INSTALL.txt ]] || {
        echo "gpu_check.sh: DALI is not installed and .devwheels/INSTALL.txt is missing;" \
             "install it with: pip install -e . (or pip install nvidia-dali-cuda120==2.4.0)" >&2
        exit 2
    }
    t0=$SECONDS
    eval "$(cat .devwheels/INSTALL.txt)"
    echo "DALI installed in $((SECONDS - t0)) s"
fi
python3 -c "import nvidia.dali as d, torch; print('DALI', d.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec python3 -m pipelines.gpu_check --out "$out" "$@"
