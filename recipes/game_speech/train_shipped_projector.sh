#!/usr/bin/env bash
# Train the shipped projector: Whisper tiny.en (CTranslate2 bundle) + SmolLM2-135M-Instruct (GGUF)
# on the TTS corpus of recipes/game_speech/make_corpus.py, on CPU. Re-running the same command resumes from the
# last checkpoint in the output dir. Usage: [NPROC=2] recipes/game_speech/train_shipped_projector.sh OUT_DIR [extra train.py flags]
# NPROC > 1 runs that many DDP ranks on gloo (one thread each), so both CPU cores train one model.
set -euo pipefail
out=${1:?output dir}; shift
nproc=${NPROC:-1}
if [ "$nproc" -gt 1 ]; then
  launch=(env OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node="$nproc")
else
  launch=(python)
fi
"${launch[@]}" train.py \
  --whisper_model_name_or_path bundled:whisper-tiny.en \
  --llm_model_name_or_path bundled:smollm2-135m-instruct \
  --data_path corpus/train.jsonl --eval_data_path corpus/dev.jsonl \
  --output_dir "$out" \
  --per_device_train_batch_size 8 --per_device_eval_batch_size 8 \
  --learning_rate 1e-3 --lr_scheduler_type cosine --warmup_steps 100 --weight_decay 0.01 \
  --max_steps 2200 --logging_steps 20 \
  --eval_strategy steps --eval_steps 400 \
  --save_strategy steps --save_steps 100 --save_total_limit 3 \
  --dataloader_num_workers 1 --report_to none --seed 0 \
  --cpu_bf16_autocast True --ctc_weight 1.0 \
  "$@"
