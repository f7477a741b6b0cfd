"""Train-step time of DDP, ZeRO-2 and ZeRO-3 on 2 ranks, printed as a table.

    python tools/bench_distributed.py --data_path corpus/dev.jsonl [--nproc 2 --batch_size 4 --steps 12]

Each mode runs `torchrun --standalone --nproc_per_node=N train.py` (through this file, which adds a
step timer) with the real offline weights (Whisper tiny.en + SmolLM2-135M-Instruct) and the same
data, seed and batch size; the first steps (warm-up) are left out of the median. On a machine
without CUDA the ranks run on gloo, one thread each.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"ddp": [], "zero2": ["--deepspeed", str(ROOT / "ds_config_zero2.json")],
         "zero3": ["--deepspeed", str(ROOT / "ds_config_zero3.json")]}


def run_worker():
    """Inside torchrun: train.py with a callback that records each optimizer step's wall time on rank 0."""
    sys.path.insert(0, str(ROOT))
    from transformers import TrainerCallback

    import train

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                Path(os.environ["STEP_TIMES"]).write_text(json.dumps(self.times))

    trainer_init = train.SpeechLLMTrainer.__init__

    def init_with_timer(self, *args, **kwargs):
        trainer_init(self, *args, **kwargs)
        self.add_callback(StepTimer())

    train.SpeechLLMTrainer.__init__ = init_with_timer
    train.main(sys.argv[2:])


def run_mode(mode: str, args, workdir: Path) -> list[float]:
    times = workdir / f"{mode}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           __file__, "--worker",
           "--whisper_model_name_or_path", args.whisper, "--llm_model_name_or_path", args.llm,
           "--data_path", args.data_path, "--output_dir", str(workdir / mode),
           "--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(args.steps),
           "--learning_rate", "1e-4", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
           "--dataloader_num_workers", "0", "--disable_tqdm", "True", *MODES[mode]]
    env = dict(os.environ, STEP_TIMES=str(times), OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{mode} failed:\n{result.stderr[-3000:]}")
    return json.loads(times.read_text())


def main():
    if sys.argv[1:2] == ["--worker"]:
        return run_worker()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True)
    p.add_argument("--whisper", default="bundled:whisper-tiny.en")
    p.add_argument("--llm", default="bundled:smollm2-135m-instruct")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=4, help="per rank")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    args = p.parse_args()

    print(f"{args.nproc} ranks x {args.batch_size} utterances per step, {args.steps} steps "
          f"(median of the last {args.steps - args.warmup}), {os.cpu_count()} CPUs")
    print("| mode | median step (s) | utterances/s | vs DDP |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        medians = {}
        for mode in MODES:
            medians[mode] = statistics.median(run_mode(mode, args, Path(tmp))[args.warmup:])
            print(f"| {mode} | {medians[mode]:.2f} | {args.nproc * args.batch_size / medians[mode]:.2f} | "
                  f"{medians[mode] / medians['ddp']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
