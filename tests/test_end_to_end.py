"""Overfit a handful of utterances through the CLIs: train.py drives the loss down, then
recognize.py reproduces the transcripts, in input order."""
import json
import subprocess
import sys

import pytest
from conftest import ROOT, write_corpus

TRANSCRIPTS = ["hello world", "good morning", "thank you very much", "see you later"]


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# LoRA on the LLM and the encoder's top block through the CLI: a small projector, the adapters do the rest
TRAINS = {"projector": ["--projector_hidden", 1024],
          "lora+encoder": ["--projector_hidden", 64, "--lora_rank", 8, "--lora_alpha", 32, "--train_encoder_layers", 1,
                           "--encoder_learning_rate", 1e-3]}


@pytest.mark.slow
@pytest.mark.parametrize("trains", TRAINS)
def test_overfit_train_then_recognize(trains, tmp_path, tiny_llm_dir, tiny_whisper_path):
    jsonl = write_corpus(tmp_path / "data", TRANSCRIPTS, [1.0, 1.5, 2.0, 1.2])
    exp = tmp_path / "exp"
    run("train.py", "--llm_model_name_or_path", tiny_llm_dir, "--whisper_model_name_or_path", tiny_whisper_path,
        *TRAINS[trains], "--data_path", jsonl, "--output_dir", exp, "--per_device_train_batch_size", 4,
        "--learning_rate", 3e-3, "--lr_scheduler_type", "constant", "--max_steps", 300, "--logging_steps", 10,
        "--save_steps", 150, "--report_to", "none", "--seed", 1)
    losses = [log["loss"] for log in json.loads((exp / "checkpoint-300" / "trainer_state.json").read_text())
              ["log_history"] if "loss" in log]
    assert losses[-1] < 0.5 * losses[0], losses
    assert sorted(p.name for p in exp.iterdir()) == ["checkpoint-150", "checkpoint-300", "model.safetensors",
                                                      "speechllm_config.json"]
    config = json.loads((exp / "speechllm_config.json").read_text())
    assert (config["lora_rank"], config["train_encoder_layers"]) == ((8, 1) if trains == "lora+encoder" else (0, 0))

    result_path = tmp_path / "result.txt"
    out = run("recognize.py", "--model_dir", exp, "--data_path", jsonl, "--result_path", result_path,
              "--batch_size", 3)
    lines = result_path.read_text().splitlines()
    assert lines == [f"utt{i}\t{txt}" for i, txt in enumerate(TRANSCRIPTS)]
    assert "4 utterances" in out.stdout and "RTF" in out.stdout
    assert "WER 0.00 [ 0 / 11, 0 ins, 0 del, 0 sub ]" in out.stdout
