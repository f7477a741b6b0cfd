#!/usr/bin/env bash
# What to train besides the projector, at equal steps from the same start: projector only, + LoRA
# (r8, r32), + the encoder's top 2 blocks, + both; each then decodes the dev sets (greedy, batch 16).
# Resumable: a finished setting is skipped, a killed one resumes from its last checkpoint.
#   bash recipes/game_speech/compare_trainable.sh OUT_DIR TRAIN_JSONL STEPS DEV_JSONL [DEV_JSONL ...]
#   bash recipes/game_speech/compare_trainable.sh exp/cmp100 corpus/mix/train.jsonl 100 corpus/real/dev.jsonl
# Start: a projector-only model dir (INIT, default exp/stage1, which recipes/game_speech/train_real_speech.sh makes). Settings in
# SETTINGS (default: all five). Prints a table: setting, trainable params, model dir size, train wall
# time, dev WER per dev set. LoRA settings take 2 x 4 utterances per rank and step (the same 16 per step): at
# 8 per rank a LoRA rank grew past 11 GB on 30 s clips and was killed (24 GB machine, 2 ranks).
set -euo pipefail
out=${1:?output dir}; train=${2:?train jsonl}; steps=${3:?steps}; shift 3
devs=("$@")
init=${INIT:-exp/stage1}
[ -f "$init/model.safetensors" ] || { echo "error: INIT=$init holds no model.safetensors: give a projector-only model dir" >&2; exit 1; }
declare -A flags=(
  [projector]=""
  [lora8]="--lora_rank 8 --per_device_train_batch_size 4 --gradient_accumulation_steps 2"
  [lora32]="--lora_rank 32 --per_device_train_batch_size 4 --gradient_accumulation_steps 2"
  [encoder2]="--train_encoder_layers 2 --encoder_learning_rate 1e-4"
  [lora8+encoder2]="--lora_rank 8 --per_device_train_batch_size 4 --gradient_accumulation_steps 2 --train_encoder_layers 2 --encoder_learning_rate 1e-4"
)
settings=(${SETTINGS:-projector lora8 lora32 encoder2 lora8+encoder2})
mkdir -p "$out"
for s in "${settings[@]}"; do
  dir="$out/$s"
  if [ ! -f "$dir/model.safetensors" ]; then
    start=$(date +%s)
    # shellcheck disable=SC2086
    NPROC=${NPROC:-2} bash recipes/game_speech/train_shipped_projector.sh "$dir" --data_path "$train" --init_from "$init" \
      --learning_rate 5e-4 --warmup_steps 15 --max_steps "$steps" --eval_strategy no --save_steps 50 \
      --save_total_limit 1 ${flags[$s]} > "$out/$s.train.log" 2>&1
    echo $(( $(date +%s) - start )) > "$dir/train_seconds"
  fi
  for dev in "${devs[@]}"; do
    result="$out/$s.$(basename "$(dirname "$dev")")_$(basename "$dev" .jsonl).txt"
    [ -f "$result" ] || python recognize.py --model_dir "$dir" --data_path "$dev" --result_path "$result" \
      --batch_size 16 > "$result.log" 2>&1
  done
done

printf '| setting | trainable params | model dir MB | train s |'; for dev in "${devs[@]}"; do printf ' WER %s |' "$dev"; done; echo
printf '|---|---|---|---|'; for _ in "${devs[@]}"; do printf -- '---|'; done; echo
for s in "${settings[@]}"; do
  dir="$out/$s"
  params=$(python -c "from safetensors.torch import load_file; import sys; w = load_file(sys.argv[1]); print(f'{sum(v.numel() for k, v in w.items() if k != \"projector.ctc_blank\") / 1e6:.2f} M')" "$dir/model.safetensors")
  printf '| %s | %s | %s | %s |' "$s" "$params" "$(du -m "$dir/model.safetensors" | cut -f1)" "$(cat "$dir/train_seconds")"
  for dev in "${devs[@]}"; do
    result="$out/$s.$(basename "$(dirname "$dev")")_$(basename "$dev" .jsonl).txt"
    printf ' %s |' "$(python compute_wer.py "$dev" "$result" | grep -oE '^WER [0-9.]+ \[[^]]*\]' | sed 's/^WER //')"
  done
  echo
done
