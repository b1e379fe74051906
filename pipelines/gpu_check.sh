#!/usr/bin/env bash
# The last command on a lent GPU machine (../shared/device/README.md): install the staged DALI
# wheels, then run every GPU check and benchmark into $OUT (~6 min).
#   run(command="bash pipelines/gpu_check.sh", carry=[".devwheels/pNN"], timeout_s=540)
# Extra arguments go to `python3 -m pipelines.gpu_check` (e.g. --budget 300 --skip train).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
if ! python3 -c "import nvidia.dali" 2>/dev/null; then
    [[ -f .devwheels/INSTALL.txt ]] || {
        echo "gpu_check.sh: DALI is not installed and .devwheels/INSTALL.txt is missing;" \
             "stage it with: bash ../shared/device/stage-dali.sh (then carry the parts)" >&2
        exit 2
    }
    t0=$SECONDS
    eval "$(cat .devwheels/INSTALL.txt)"
    echo "DALI installed in $((SECONDS - t0)) s"
fi
python3 -c "import nvidia.dali as d, torch; print('DALI', d.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec python3 -m pipelines.gpu_check --out "$out" "$@"
