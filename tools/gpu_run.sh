#!/usr/bin/env bash
# The GPU checks on a GPU machine without network, writing into OUT as they go (for the device tool:
# carry .whl from tools/gpu_wheels.sh and .cache/tokenizers from tools/fetch_test_tokenizers.sh):
#   bash tools/gpu_run.sh OUT tests                # the suite on CUDA, the fast tests (-m "not slow")
#   bash tools/gpu_run.sh OUT check [gpu_check.py flags]   # tools/gpu_check.py, its table in OUT/table.md
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?output folder}; what=${2:?tests or check}; shift 2
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt"
python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)" >> "$out/gpu.txt"
case $what in
  tests) python3 -m pytest -q -n 4 -m "not slow" -p no:cacheprovider tests 2>&1 | tee "$out/pytest.txt" | tail -40 ;;
  check) python3 tools/gpu_check.py --out /tmp/gpu_check "$@" 2>&1 | tee "$out/gpu_check.txt" | tail -60
         cp /tmp/gpu_check/table.md /tmp/gpu_check/results.jsonl "$out/" ;;
  *) echo "tests or check, not $what" >&2; exit 2 ;;
esac
