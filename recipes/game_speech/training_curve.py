"""Summarize a run's loss curve from its trainer_state.json (for TRAINING.md).

    python recipes/game_speech/training_curve.py exp/ctc/checkpoint-2200 [--every 200]

Prints one markdown row per `--every` steps: the mean train loss over those steps, the eval loss
logged at that step (if any) and the learning rate.
"""
import argparse
import json
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint dir (or the trainer_state.json itself)")
    p.add_argument("--every", type=int, default=200)
    args = p.parse_args(argv)
    path = Path(args.checkpoint)
    history = json.loads((path / "trainer_state.json" if path.is_dir() else path).read_text())["log_history"]

    print("| steps | train loss (mean) | eval loss | learning rate |\n|---|---|---|---|")
    train = [h for h in history if "loss" in h]
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    last_step = max([h["step"] for h in train] + list(evals) + [0])
    for end in range(args.every, last_step + args.every, args.every):
        window = [h for h in train if end - args.every < h["step"] <= end]
        if not window:
            continue
        mean = sum(h["loss"] for h in window) / len(window)
        eval_loss = f"{evals[end]:.3f}" if end in evals else ""
        print(f"| {end - args.every + 1}-{window[-1]['step']} | {mean:.3f} | {eval_loss} | "
              f"{window[-1]['learning_rate']:.2e} |")


if __name__ == "__main__":
    main()
