"""Average the trained weights of several checkpoints into one model dir (FunASR's avg_nbest, a
"model soup"): the mean of nearby points on the loss surface often decodes better than any one.

    python tools/average_checkpoints.py exp/x --last 5 --out exp/x_avg5
    python tools/average_checkpoints.py exp/x --best 3 --out exp/x_best3     # lowest eval_loss
    python tools/average_checkpoints.py --dirs exp/x/checkpoint-1000 exp/y --out exp/avg
    python tools/average_checkpoints.py --dirs exp/x --out pretrained/y --dtype float16   # one dir, halved
    python tools/average_checkpoints.py --dirs exp/x --out pretrained/y --dtype int8      # a quarter
    python tools/average_checkpoints.py --dirs pretrained/y --out exp/y_wise05 --interpolate_encoder 0.5
    python tools/average_checkpoints.py --dirs exp/x --out exp/x_lora --parts lora   # the adapters alone
    python tools/average_checkpoints.py --dirs exp/a exp/b exp/c --weights 1.5 0.5 -1 --out exp/abc  # 1.5a + 0.5b - c

--weights W... (one per dir, summing to 1): a weighted mean instead of the plain one. A negative
weight extrapolates (task arithmetic, Ilharco et al. 2023): with dirs A, B, C and weights 1, 1, -1 the
result is A + (B - C), A moved by what training took C to B.

--interpolate_encoder ALPHA (WiSE-FT, Wortsman et al. 2022): the trained encoder weights (the top
blocks and ln_post that --train_encoder_layers tuned) become ALPHA * tuned + (1 - ALPHA) * pretrained,
the pretrained being the Whisper encoder the config names (e.g. bundled:whisper-tiny.en): a cheap
way back toward Whisper's generality after fine-tuning on narrow data. The projector, the LoRA
adapters and a fine-tuned LLM are left as they are; ALPHA 1 is the plain mean.

--parts keeps only the named trained parts: `--parts lora` is the --init_from of a run that puts
the adapters on another Whisper encoder, whose new projector fits its width.

Every safetensors file of the model dirs is averaged (model.safetensors, and llm/ when the LLM was
fine-tuned); the other files (config, tokenizer) are copied from the first. The dirs must come from
the same configuration.
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loading import dequantize_int8, load_whisper, quantize_int8  # noqa: E402
from model import CONFIG_NAME, WEIGHTS_NAME, model_part  # noqa: E402


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N dirs of a training run, by step."""
    found = [p for p in output_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def eval_losses(output_dir: Path) -> dict[int, float]:
    """step -> eval_loss, from the newest checkpoint's trainer_state.json (it holds the whole history)."""
    history = json.loads((checkpoints(output_dir)[-1] / "trainer_state.json").read_text())["log_history"]
    return {log["step"]: log["eval_loss"] for log in history if "eval_loss" in log}


def select(output_dir: Path, last: int | None, best: int | None) -> list[Path]:
    found = checkpoints(output_dir)
    if not found:
        raise SystemExit(f"error: no checkpoint-N dirs in {output_dir}")
    if last:
        return found[-last:]
    losses = eval_losses(output_dir)
    scored = [p for p in found if int(p.name.split("-")[1]) in losses]
    if len(scored) < best:
        raise SystemExit(f"error: {len(scored)} checkpoints of {output_dir} have an eval_loss; --best {best} needs more")
    return sorted(scored, key=lambda p: losses[int(p.name.split("-")[1])])[:best]


# Fields that change how a run trains, not the model it makes: runs that differ only there (a later
# stage with SpecAugment on) average into a model of the first dir's configuration.
TRAINING_ONLY = ("spec_augment", "vtlp", "lora_dropout")
# The decoding token budget measured on each run's training data (train.training_token_rate): runs on
# other data differ there; the mean takes the largest budget, one that fits every run's transcripts.
MEASURED_BUDGET = ("max_tokens_per_second", "max_tokens_extra")


def model_config(model_dir: Path) -> dict:
    config = json.loads((model_dir / CONFIG_NAME).read_text())
    return {k: v for k, v in sorted(config.items()) if k not in TRAINING_ONLY + MEASURED_BUDGET}


def merged_config(dirs: list[Path]) -> dict:
    """The first dir's configuration, with the largest token budget of all dirs."""
    configs = [json.loads((d / CONFIG_NAME).read_text()) for d in dirs]
    return dict(configs[0], **{k: max(c[k] for c in configs) for k in MEASURED_BUDGET if k in configs[0]})


def interpolate_encoder(weights: dict[str, torch.Tensor], whisper_model: str, alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: each trained encoder weight (encoder.*) -> alpha * it + (1 - alpha) * the pretrained
    Whisper encoder's weight of that name; the other weights unchanged (float64, like the mean)."""
    pretrained = load_whisper(whisper_model).state_dict()
    encoder = [k for k in weights if k.startswith("encoder.")]
    if not encoder:
        raise SystemExit("error: --interpolate_encoder: these checkpoints trained no encoder weights "
                         "(train_encoder_layers 0): nothing to interpolate")
    for k in encoder:
        if k not in pretrained or pretrained[k].shape != weights[k].shape:
            raise SystemExit(f"error: --interpolate_encoder: {whisper_model} has no weight {k} of shape "
                             f"{tuple(weights[k].shape)}")
    return {k: alpha * v + (1 - alpha) * pretrained[k].double() if k.startswith("encoder.") else v
            for k, v in weights.items()}


# The trained parts of model.safetensors that --parts names (model.model_part; a fine-tuned LLM is in llm/)
PARTS = ("encoder", "projector", "lora")


def keep_parts(weights: dict[str, torch.Tensor], parts: list[str]) -> dict[str, torch.Tensor]:
    """Only the weights of these trained parts; an asked-for part with no weight is an error."""
    for part in parts:
        if not any(model_part(k) == part for k in weights):
            raise SystemExit(f"error: --parts {part}: these checkpoints trained no {part} weights")
    return {k: v for k, v in weights.items() if model_part(k) in parts}


def average_dirs(dirs: list[Path], out: Path, dtype: torch.dtype | None = None, encoder_alpha: float | None = None,
                 parts: list[str] | None = None, weights: list[float] | None = None):
    """dtype: store the mean in this dtype (float16 halves a shipped model dir, int8 quarters it: one
    scale per 64 weights of a matrix row, see loading.quantize_int8; loading casts back).
    encoder_alpha: interpolate the mean's encoder weights toward the pretrained Whisper encoder (WiSE-FT).
    parts: keep only these trained parts (PARTS) of model.safetensors.
    weights: one per dir, summing to 1 (the plain mean when None); negative ones extrapolate."""
    if weights is not None and (len(weights) != len(dirs) or abs(sum(weights) - 1) > 1e-6):
        raise SystemExit(f"error: --weights needs one weight per dir ({len(dirs)}), summing to 1; got {weights}")
    configs = {json.dumps(model_config(d)) for d in dirs}
    if len(configs) != 1:
        raise SystemExit(f"error: {[str(d) for d in dirs]} were not trained with one configuration ({CONFIG_NAME} differ)")
    weight_files = sorted(p.relative_to(dirs[0]) for p in dirs[0].rglob("*.safetensors"))
    if dtype == torch.int8 and weight_files != [Path(WEIGHTS_NAME)]:
        raise SystemExit(f"error: int8 is for {WEIGHTS_NAME} alone; {dirs[0]} holds a fine-tuned LLM (llm/): use float16")
    if parts and weight_files != [Path(WEIGHTS_NAME)]:
        raise SystemExit(f"error: --parts is for {WEIGHTS_NAME} alone; {dirs[0]} holds a fine-tuned LLM (llm/)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in weight_files:
        tensors = [dequantize_int8(load_file(d / name)) for d in dirs]
        if any(t.keys() != tensors[0].keys() for t in tensors):
            raise SystemExit(f"error: {name} holds different weights in {dirs}")
        if weights is None:
            mean = {k: sum(t[k].double() for t in tensors) / len(tensors) for k in tensors[0]}
        else:
            mean = {k: sum(w * t[k].double() for w, t in zip(weights, tensors)) for k in tensors[0]}
        if encoder_alpha is not None and name == Path(WEIGHTS_NAME):
            mean = interpolate_encoder(mean, json.loads((dirs[0] / CONFIG_NAME).read_text())["whisper_model"],
                                       encoder_alpha)
        if parts:
            mean = keep_parts(mean, parts)
        if dtype == torch.int8:
            mean = quantize_int8({k: v.float() for k, v in mean.items()})
        else:
            mean = {k: v.to(dtype or tensors[0][k].dtype) for k, v in mean.items()}
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        save_file(mean, tmp / name)
    # the rest of a model dir (config, an LLM dir's config and tokenizer); not a checkpoint's optimizer state
    (tmp / CONFIG_NAME).write_text(json.dumps(merged_config(dirs), indent=2) + "\n")
    for path in (dirs[0] / "llm").glob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            (tmp / path.relative_to(dirs[0])).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, tmp / path.relative_to(dirs[0]))
    tmp.rename(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", nargs="?", type=Path, help="a training run's --output_dir")
    p.add_argument("--last", type=int, help="the last N checkpoints")
    p.add_argument("--best", type=int, help="the N checkpoints of lowest eval_loss")
    p.add_argument("--dirs", nargs="+", type=Path, help="these model / checkpoint dirs instead")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "int8"], default=None,
                   help="store the averaged weights in this dtype (default: as trained)")
    p.add_argument("--interpolate_encoder", type=float, default=None, metavar="ALPHA",
                   help="WiSE-FT: trained encoder weights = ALPHA * tuned (the mean) + (1 - ALPHA) * pretrained Whisper")
    p.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                   help="one weight per dir, summing to 1, for a weighted mean (negative: extrapolate)")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=None,
                   help="keep only these trained parts (default: all), e.g. lora: adapters for another encoder")
    args = p.parse_args(argv)
    if bool(args.dirs) == bool(args.output_dir) or (args.output_dir and bool(args.last) == bool(args.best)):
        p.error("give an output_dir with one of --last N / --best N, or --dirs")
    if args.out.exists():
        p.error(f"{args.out} exists; choose another --out")
    if args.interpolate_encoder is not None and not 0 <= args.interpolate_encoder <= 1:
        p.error("--interpolate_encoder takes an ALPHA from 0 (pretrained) to 1 (tuned)")
    dirs = args.dirs or select(args.output_dir, args.last, args.best)
    average_dirs(dirs, args.out, getattr(torch, args.dtype) if args.dtype else None, args.interpolate_encoder,
                 args.parts, args.weights)
    wise = "" if args.interpolate_encoder is None else f", encoder {args.interpolate_encoder} tuned + the rest pretrained"
    print(f"averaged {len(dirs)} checkpoints ({', '.join(d.name for d in dirs)}) into {args.out}{wise}")


if __name__ == "__main__":
    main()
