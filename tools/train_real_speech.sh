#!/usr/bin/env bash
# The shipped real-speech model, from nothing: the corpora, the training mix, then projector + LoRA
# training on CPU, warm-started from the TTS-trained projector (stage 1). Every step is resumable:
# re-running the same command skips what exists and resumes training from its last checkpoint.
#   bash tools/install_tts.sh && bash tools/install_real_speech.sh
#   bash tools/train_real_speech.sh exp/real [extra train.py flags]
# INIT: the stage-1 projector dir (default: the projector shipped before this model, taken from git
# history, commit 97b4956; its own recipe is in that commit's TRAINING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?output dir}; shift
init=${INIT:-exp/stage1}
if [ ! -f "$init/model.safetensors" ]; then
  mkdir -p "$init"
  for f in model.safetensors speechllm_config.json; do
    git show "97b4956:pretrained/whisper-tiny.en_smollm2-135m/$f" > "$init/$f"
  done
fi
[ -f corpus/real/dev.jsonl ] || python tools/make_real_speech.py --out corpus/real --teacher none
[ -f corpus/dev.jsonl ] || python tools/make_corpus.py --out corpus --num_train 4000 --num_dev 300 --jobs 2
[ -f corpus/mix/train.jsonl ] || python tools/make_training_mix.py \
  --sources corpus/train.jsonl corpus/real/train.jsonl --out corpus/mix --jobs 2
NPROC=${NPROC:-2} bash tools/train_shipped_projector.sh "$out" \
  --data_path corpus/mix/train.jsonl --eval_data_path corpus/real/dev.jsonl --init_from "$init" \
  --lora_rank 8 --per_device_train_batch_size 4 --gradient_accumulation_steps 2 \
  --learning_rate 5e-4 --warmup_steps 30 --max_steps 600 \
  --eval_strategy steps --eval_steps 150 --save_steps 50 --save_total_limit 8 --logging_steps 10 \
  "$@"
