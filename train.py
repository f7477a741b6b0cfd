"""Train a SpeechLLM with HF Trainer (single process, torchrun DDP or DeepSpeed): the projector, and
optionally LoRA adapters on the LLM, the encoder's top blocks or the whole LLM.

    torchrun --nproc_per_node=8 train.py --llm_model_name_or_path Qwen/Qwen2-1.5B-Instruct \
        --whisper_model_name_or_path large-v3 --data_path train.jsonl --output_dir exp/x \
        --deepspeed ds_config_zero3.json --bf16 True --activation_checkpointing
"""
import copy
import json
import math
import os
import shutil
import socket
import sys
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from types import MappingProxyType

import torch
from accelerate import PartialState
import transformers.trainer
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.integrations.deepspeed import deepspeed_load_checkpoint, is_deepspeed_zero3_enabled
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import get_last_checkpoint, seed_worker

from data import (Collator, DataSpec, DurationBatchSampler, InputError, LengthGroupedSampler, SpeechDataset,
                  check_entries, count_reasons, read_jsonl, text_problem)
from decoding import DecodingOptions, transcript_token_rate
from model import CONFIG_NAME, WEIGHTS_NAME, SpeechLLM, SpeechLLMConfig, model_part, option
from shards import (ShardDataset, TrackedLoader, collate_with_position, estimate_batches, expand_shards,
                    index_summary, is_shard_spec, write_json)


@dataclass
class RunArguments:
    """How this run treats the model (SpeechLLMConfig: what the model is, saved with it)."""
    cpu_bf16_autocast: bool = option(False, help=(
        "CPU only: forward under torch.autocast(bfloat16), weights stay fp32 (--bf16 refuses CPU)"))
    encoder_learning_rate: float | None = option(None, range=">= 0", help=(
        "learning rate of the encoder's trained blocks (default: --learning_rate)"))
    projector_learning_rate: float | None = option(None, range=">= 0", help=(
        "learning rate of the projector (default: --learning_rate): a new projector under adapters "
        "warm-started (--init_from) wants a larger one than they do"))
    llm_learning_rate: float | None = option(None, range=">= 0", help=(
        "learning rate of the LLM's weights under --train_llm (default: --learning_rate): a pretrained "
        "LLM wants a far smaller step than a projector trained from scratch"))
    init_from: str | None = option(None, help=(
        "warm start (staged training): every trained part a saved model dir holds; this run may train more, "
        "or at a larger --lora_rank (the old adapters become its first ranks); a checkpoint in output_dir still wins"))
    init_projector: str | None = option(None, help="the older name of --init_from")
    trust_remote_code: bool = option(False, help="let the LLM's repo run its own Python code")


@dataclass
class DataArguments:
    """The data the run trains and evaluates on, and how it is batched."""
    data_path: str = option(help='jsonl lines {"key", "wav", "txt"}, or shards (docs/shards.md): .tar files, a '
                                 'comma-separated list, glob or {000..009} pattern, local or URLs')
    shuffle_buffer: int = option(1000, range=">= 1", help=(
        "shards: utterances per buffer, shuffled and cut into batches of similar duration"))
    eval_data_path: str | None = None
    length_grouped: bool = option(True, help="batches of similar duration (less padding)")
    batch_seconds: float | None = option(None, range="> 0", help=(
        "instead of --per_device_train_batch_size utterances: as many as fit this many seconds of padded "
        "audio per batch (utterances x the longest), and --batch_tokens"))
    batch_tokens: int | None = option(None, range=">= 1", help=(
        "with --batch_seconds: at most this many padded LLM tokens per batch (utterances x the longest "
        "prompt + audio + transcript); default: what --batch_seconds of the longest clips take"))
    pad_text_to: int | None = option(None, range=">= 1", help=(
        "pad every batch's tokens to at least this length (West v0: 512); only to measure its cost"))
    max_audio_seconds: float = option(30.0, range="> 0", help="longer utterances are skipped (counted)")
    strict: bool = option(False, help="an unusable utterance is an error instead of a skip")
    overwrite_output_dir: bool = option(False, help=(
        "replace a finished model in output_dir (its checkpoints go too); without it that is an error"))


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser over fields made by model.option(): a field with flag=False is no flag (the run
    sets it), and "range" is for validate_arguments, not for argparse."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        if not field.metadata.get("flag", True):
            parser.set_defaults(**{field.name: field.default})  # the parser hands every field to the dataclass
            return
        field = copy.copy(field)  # HfArgumentParser rewrites the type of the field it is given
        field.metadata = MappingProxyType({k: v for k, v in field.metadata.items() if k not in ("flag", "range")})
        HfArgumentParser._parse_dataclass_field(parser, field)


def setup_distributed(argv: list[str]) -> list[str]:
    """Runs before TrainingArguments exist (they fix the device and world size when built).
    DeepSpeed outside a launcher looks for MPI: give it a one-process world instead. Without CUDA
    under torchrun: DeepSpeed needs accelerate's state created on gloo first (else world size 1);
    plain DDP needs use_cpu (else every rank silently trains a model of its own)."""
    deepspeed = any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv)
    if deepspeed and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if torch.cuda.is_available() or (int(os.environ.get("WORLD_SIZE", "1")) == 1 and not deepspeed):
        return argv
    if not deepspeed:
        return argv + ["--use_cpu", "True"]  # accelerate then sets up multi-CPU DDP on gloo itself
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return argv + ["--accelerator_config", json.dumps({"use_configured_state": True})]


def feed_the_gpu(args: TrainingArguments, argv: list[str]) -> None:
    """HF's default of 0 DataLoader workers loads the audio and computes the log-mels in the training
    process, between steps, while the GPU waits. Unless --dataloader_num_workers is given, each rank
    on a GPU gets up to 4 workers (a core left to the rank itself)."""
    if args.device.type != "cuda" or any(a.split("=")[0] == "--dataloader_num_workers" for a in argv):
        return
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    args.dataloader_num_workers = max(1, min(4, (os.cpu_count() or 1) // ranks_here - 1))


def prepare_output_dir(args: TrainingArguments, overwrite: bool):
    """A finished model is never silently replaced. A dir holding only checkpoints is a killed run: resume it."""
    output_dir = Path(args.output_dir)
    if not ((output_dir / WEIGHTS_NAME).exists() and (output_dir / CONFIG_NAME).exists()):
        return
    if not overwrite:
        raise InputError(f"{output_dir} already holds a trained model ({WEIGHTS_NAME}, {CONFIG_NAME}); "
                         "pass --overwrite_output_dir to train it again, or choose another --output_dir")
    with args.main_process_first(local=False):  # rank 0 clears it; the other ranks then find nothing to clear
        if args.process_index == 0:
            for path in [output_dir / WEIGHTS_NAME, output_dir / CONFIG_NAME, *output_dir.glob("checkpoint-*")]:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def checked_entries(path: str, entries: list[dict], spec: DataSpec, data_args: DataArguments, skipped_log: Path,
                    is_main: bool) -> list[dict]:
    """The shared check pass over path's entries: unusable utterances are skipped (appended to skipped_log
    with their reason, counted in a summary), or with --strict stop the run before any training step."""
    usable, problems = check_entries(entries, spec, for_training=True, max_audio_seconds=data_args.max_audio_seconds)
    counts = count_reasons(p["reason"] for p in problems)
    if problems and data_args.strict:
        listing = "\n".join(f"  {p['where']}: {p['wav']}: {p['reason']}" for p in problems[:20])
        raise InputError(f"{len(problems)} of {len(entries)} utterances in {path} cannot be used ({counts}):\n{listing}")
    if not usable:
        raise InputError(f"no usable utterance in {path} ({counts})")
    if is_main and problems:
        log_skipped(skipped_log, problems)
        print(f"{path}: skipped {len(problems)} of {len(entries)} utterances ({counts}), listed in {skipped_log}",
              flush=True)
    return usable


def log_skipped(skipped_log: Path, problems: list[dict]):
    """One json line per skipped utterance. Appended with one write each: ranks and dataloader workers
    share the file."""
    with open(skipped_log, "a", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({k: p[k] for k in ("key", "wav", "where", "reason")}, ensure_ascii=False) + "\n")


def print_skip_summary(skipped_log: Path):
    """All skips of the run, the check pass's and those found while loading audio (once per key)."""
    if not skipped_log.exists():
        return
    problems = list({p["key"]: p for p in map(json.loads, skipped_log.read_text().splitlines())}.values())
    if problems:
        print(f"skipped {len(problems)} utterances in all ({count_reasons(p['reason'] for p in problems)}), "
              f"listed in {skipped_log}")


def report_skip(entry: dict, skipped_log: Path, strict: bool):
    """Audio found unusable while training (entry with its "reason"): logged and skipped, or with --strict
    an error. The datasets' on_error (data.py): the clip is left out, or the next one takes its place."""
    if strict:
        raise InputError(f"{entry['where']}: {entry['wav']}: {entry['reason']}")
    print(f"warning: skipped {entry['where']}: {entry['wav']}: {entry['reason']}", file=sys.stderr, flush=True)
    log_skipped(skipped_log, [entry])


def data_positions_name(rank: int) -> str:
    return f"data_positions_rank{rank}.json"


def shard_dataset(path: str, model, data_args: DataArguments, args: TrainingArguments, skipped_log: Path,
                  resume: dict | None) -> ShardDataset:
    """--data_path shards: the streamed dataset, the token rate from (a sample of) the index's transcripts,
    and --max_steps from the index's durations when it is not given (an iterable dataset has no length)."""
    num_slots = args.world_size * max(1, args.dataloader_num_workers)
    if resume and resume["num_slots"] != num_slots and args.process_index == 0:
        print(f"warning: the checkpoint's data positions are for {resume['num_slots']} readers (ranks x dataloader "
              f"workers), this run has {num_slots}: the data stream starts from the beginning", file=sys.stderr)
    shards = expand_shards(path)
    durations, sample = index_summary(shards)
    if not len(durations):
        raise InputError(f"{path}: the shards hold no utterance")
    if not sample:
        raise InputError(f"{path}: no transcript in the shards' index")
    model.config.max_tokens_per_second, model.config.max_tokens_extra = training_token_rate(model, sample)
    spec = model.data_spec()
    dataset = ShardDataset(
        shards, spec.n_mels, spec.instruction, spec.pad_to_30s, batch_size=args.per_device_train_batch_size,
        batch_seconds=data_args.batch_seconds, batch_tokens=data_args.batch_tokens, length_grouped=data_args.length_grouped,
        buffer_size=data_args.shuffle_buffer, seed=args.seed, rank=args.process_index, world_size=args.world_size,
        check=partial(text_problem, spec=spec, max_audio_seconds=data_args.max_audio_seconds),
        on_error=partial(report_skip, skipped_log=skipped_log, strict=data_args.strict), resume=resume)
    if args.max_steps <= 0:
        batches = estimate_batches(durations, data_args.shuffle_buffer,
                                   args.per_device_train_batch_size, data_args.batch_seconds)
        args.max_steps = math.ceil(args.num_train_epochs * batches / args.world_size / args.gradient_accumulation_steps)
        if args.process_index == 0:
            print(f"{path}: {len(durations)} utterances in {len(shards)} shards; --max_steps {args.max_steps} "
                  f"(about {args.num_train_epochs:g} epochs; give --max_steps to set it)", flush=True)
    return dataset


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpeechLLMTrainer(Trainer):
    """Trainer that samples length-grouped batches (a fixed size, or by duration) and saves only what trains."""

    def __init__(self, *args, train_durations=None, train_batch_sampler=None, cpu_bf16_autocast=False,
                 encoder_learning_rate=None, projector_learning_rate=None, llm_learning_rate=None, data_resume=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.data_resume, self.tracked_loader = data_resume, None  # shards: where the data stream stands
        self.train_durations = train_durations  # None: the Trainer's own random sampler
        self.train_batch_sampler = train_batch_sampler  # a DurationBatchSampler: batches of varying size
        self.length_sampler = None
        self.cpu_bf16_autocast = cpu_bf16_autocast
        # model part (see model_part) -> its learning rate, where it is not --learning_rate
        self.part_learning_rates = {part: lr for part, lr in (("encoder", encoder_learning_rate),
                                                              ("projector", projector_learning_rate),
                                                              ("llm", llm_learning_rate)) if lr is not None}

    def create_optimizer(self):
        """The Trainer's optimizer, with the encoder's blocks (or the projector, or the LLM's own weights)
        in groups of their own learning rate: a pretrained encoder wants a smaller one than a projector
        trained from scratch."""
        if not self.part_learning_rates:
            return super().create_optimizer()
        decay = set(self.get_decay_parameter_names(self.model))
        groups = {}  # (lr, weight decay) -> parameters
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                lr = self.part_learning_rates.get(model_part(name), self.args.learning_rate)
                groups.setdefault((lr, self.args.weight_decay if name in decay else 0.0), []).append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = optimizer_cls([dict(params=params, lr=lr, weight_decay=wd) for (lr, wd), params in groups.items()],
                                       **optimizer_kwargs)
        return self.optimizer

    def compute_loss_context_manager(self):
        if self.cpu_bf16_autocast:  # on CPUs with native bf16 (AVX512-BF16, AMX) a train step takes ~half the time
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return super().compute_loss_context_manager()

    def _get_train_sampler(self, train_dataset=None):
        if self.train_durations is None:
            self.length_sampler = None
            return super()._get_train_sampler(train_dataset)
        self.length_sampler = LengthGroupedSampler(self.train_durations, self._train_batch_size, seed=self.args.seed,
                                                   num_replicas=self.args.world_size)
        return self.length_sampler

    def get_train_dataloader(self):
        args = self.args
        if isinstance(self.train_dataset, ShardDataset):
            # The dataset splits the shards over ranks and workers and batches itself: no sampler, and
            # no accelerate wrapper (it would deal one stream's batches out to the ranks).
            loader = torch.utils.data.DataLoader(
                self.train_dataset, batch_size=None, collate_fn=partial(collate_with_position, self.data_collator),
                num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                persistent_workers=args.dataloader_persistent_workers, prefetch_factor=args.dataloader_prefetch_factor)
            num_slots = args.world_size * max(1, args.dataloader_num_workers)
            self.tracked_loader = TrackedLoader(loader, num_slots, self.data_resume)
            return self.tracked_loader
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        # Batches of varying size go to the DataLoader as its batch_sampler (the Trainer's own loader
        # only takes a sampler of indices). accelerate deals them to the ranks in turn; their count is a
        # multiple of the world size, so no rank waits for a batch and none is repeated.
        self.length_sampler = self.train_batch_sampler
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=self.train_batch_sampler, collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers, prefetch_factor=args.dataloader_prefetch_factor,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index))
        return self.accelerator.prepare(loader)

    def _run_epoch(self, *args, epoch, **kwargs):
        # accelerate's skip-batches wrapper (used on resume) does not forward set_epoch to our samplers
        if self.length_sampler is not None:
            self.length_sampler.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.tracked_loader is not None:  # each rank: where its slots' streams stand after this step
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            write_json(folder / data_positions_name(self.args.process_index), self.tracked_loader.state())

    def save_model(self, output_dir=None, _internal_call=False):
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        state_dict = None
        if self.is_deepspeed_enabled and self.model_wrapped.zero_optimization_partition_weights():
            # ZeRO-3: every rank takes part; the trained weights are gathered on rank 0 one module at a time
            state_dict = self.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        if self.args.should_save:
            model.save_pretrained(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # (not used with DeepSpeed) A checkpoint holds only what trains; the rest is pretrained.
        self.accelerator.unwrap_model(model or self.model).load_trained(resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and not self.is_deepspeed_enabled:
            check_optimizer_state(self.optimizer, checkpoint)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Frozen weights are not in the checkpoint: it stays the size of what trains + its Adam state.
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))


def check_optimizer_state(optimizer: torch.optim.Optimizer, checkpoint) -> None:
    """A resumed optimizer state is matched to the parameters by position alone. A checkpoint saved by
    code that orders or shapes them differently would hand Adam moments of the wrong shape to a
    parameter: the fused CPU kernel then crashes (SIGSEGV), the others train on nonsense."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.ndim and value.shape != param.shape:
                    raise InputError(
                        f"{checkpoint}: its optimizer state does not fit this model (a {tuple(value.shape)} {name!r} "
                        f"for a {tuple(param.shape)} parameter): it was saved by other code or options. Start a "
                        f"new run from its weights instead: --init_from {checkpoint} and a new --output_dir")


def load_checkpoint_without_frozen(engine, checkpoint_path, load_module_strict=True):
    """Our DeepSpeed checkpoints exclude the frozen weights, so resume loads them non-strictly
    (HF Trainer does this only for PEFT models); the frozen weights stay the pretrained ones."""
    return deepspeed_load_checkpoint(engine, checkpoint_path, load_module_strict=False)


transformers.trainer.deepspeed_load_checkpoint = load_checkpoint_without_frozen


# TrainingArguments takes any of these; our sampler and the Trainer's steps cannot
TRAINING_RANGES = {"per_device_train_batch_size": ">= 1", "per_device_eval_batch_size": ">= 1",
                   "gradient_accumulation_steps": ">= 1"}


def validate_arguments(config: SpeechLLMConfig, run_args: RunArguments, data_args: DataArguments,
                       args: TrainingArguments):
    """Out-of-range numbers stop the run here, before anything is loaded, not as a traceback later.
    A numeric option has a range (tests/test_fuzz.py fails for one without), the decoding weight is
    DecodingOptions' own check; NaN and inf never pass."""
    ranges = {f.name: f.metadata["range"] for x in (config, run_args, data_args) for f in fields(x)
              if "range" in f.metadata} | TRAINING_RANGES
    holds = {">=": lambda v, bound: v >= bound, ">": lambda v, bound: v > bound, "<": lambda v, bound: v < bound}
    values = {**vars(args), **vars(run_args), **vars(data_args), **vars(config)}
    for name, rule in ranges.items():
        value = values.get(name)  # None: an optional number left unset
        if value is not None and not (float("-inf") < value < float("inf") and all(
                holds[op](value, float(bound)) for op, bound in map(str.split, rule.split(", ")))):
            raise InputError(f"--{name} must be {rule}, got {value}")
    try:  # the decoding weight saved with the model: DecodingOptions checks it, as every decoding weight
        DecodingOptions(ctc_decode_weight=config.ctc_decode_weight)
    except ValueError as e:
        raise InputError(f"--{e}") from None
    if config.ctc_decode_weight and not config.ctc_weight:
        raise InputError("--ctc_decode_weight needs the CTC head that --ctc_weight > 0 trains")
    if data_args.batch_seconds and not data_args.length_grouped:
        raise InputError("--batch_seconds makes length-grouped batches: it cannot go with --length_grouped False")
    if data_args.batch_tokens and not data_args.batch_seconds:
        raise InputError("--batch_tokens caps --batch_seconds batches: give --batch_seconds too")


def move_buffers(model: torch.nn.Module, device) -> None:
    """DeepSpeed ZeRO-3 moves to the GPU the parameters of what it did not build itself (the Whisper
    encoder, the projector), but not their buffers: Whisper's positional table stayed on the CPU."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def cpu_bf16_autocast_wanted(asked: bool) -> bool:
    """--cpu_bf16_autocast pays off only where the CPU computes bf16 natively (AVX512-BF16, AMX):
    elsewhere bf16 is emulated and a step takes ~10x longer (seen: 174 s against 15 s in fp32, AVX2)."""
    if not asked or torch.cuda.is_available():
        return False
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("warning: --cpu_bf16_autocast ignored: this CPU has no native bf16 (it would be ~10x slower); "
              "training in fp32", file=sys.stderr)
        return False
    return True


def training_token_rate(model, entries: list[dict]) -> tuple[float, int]:
    """The decoding token budget the training transcripts call for (decoding.transcript_token_rate): a
    transcript no longer than the fastest speech trained on is never cut, a runaway is cut soon."""
    num_tokens = [len(ids) for ids in model.tokenizer([e["txt"] for e in entries], add_special_tokens=False)["input_ids"]]
    return transcript_token_rate([e["duration"] for e in entries], num_tokens)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> SpeechLLMTrainer:
    """callbacks: TrainerCallbacks for the run (tools/gpu_check.py times and profiles steps with one)."""
    parser = ArgumentParser((SpeechLLMConfig, RunArguments, DataArguments, TrainingArguments))
    argv = setup_distributed(sys.argv[1:] if argv is None else argv)
    try:  # a dataclass's own check (SpeechLLMConfig's, TrainingArguments') refuses the flags: no traceback
        config, run_args, data_args, args = parser.parse_args_into_dataclasses(argv)
    except ValueError as e:
        raise InputError(str(e)) from None
    validate_arguments(config, run_args, data_args, args)
    feed_the_gpu(args, argv)
    args.remove_unused_columns = False  # our batches are dicts of tensors the model takes as they are
    args.label_names = ["labels"]

    prepare_output_dir(args, data_args.overwrite_output_dir)
    # format errors stop the run before any model is loaded
    if data_args.eval_data_path and is_shard_spec(data_args.eval_data_path):
        raise InputError("--eval_data_path must be a jsonl (shards are for --data_path)")
    manifests = {path: read_jsonl(path) for path in [data_args.data_path, data_args.eval_data_path]
                 if path and not is_shard_spec(path)}

    set_seed(args.seed)  # the projector's initialization, like everything else, follows --seed
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    model = SpeechLLM(config, dtype, trust_remote_code=run_args.trust_remote_code)
    if is_deepspeed_zero3_enabled():
        move_buffers(model, args.device)
    init_from = run_args.init_from or run_args.init_projector
    if init_from:
        model.load_trained(init_from, warm_start=True)

    skipped_log = Path(args.output_dir) / "skipped.jsonl"  # written only if something is skipped
    if args.process_index == 0:
        skipped_log.parent.mkdir(parents=True, exist_ok=True)
        skipped_log.unlink(missing_ok=True)  # this run's skips only

    spec = model.data_spec()

    def dataset(path):
        entries = checked_entries(path, manifests[path], spec, data_args, skipped_log, args.process_index == 0)
        return SpeechDataset(entries, spec.n_mels, spec.instruction, spec.pad_to_30s,
                             on_error=partial(report_skip, skipped_log=skipped_log, strict=data_args.strict))

    last_checkpoint = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    data_resume = None
    if is_shard_spec(data_args.data_path):  # streamed: the dataset batches itself
        args.ignore_data_skip = True  # a resumed stream starts where it stood (data_resume), not by skipping batches
        if last_checkpoint and (positions := Path(last_checkpoint) / data_positions_name(args.process_index)).exists():
            data_resume = json.loads(positions.read_text())
        train_dataset = shard_dataset(data_args.data_path, model, data_args, args, skipped_log, data_resume)
    else:
        train_dataset = dataset(data_args.data_path)
        config.max_tokens_per_second, config.max_tokens_extra = training_token_rate(model, train_dataset.entries)
    eval_dataset = dataset(data_args.eval_data_path) if data_args.eval_data_path else None
    train_durations = None
    if data_args.length_grouped and not isinstance(train_dataset, ShardDataset):
        train_durations = [e["duration"] for e in train_dataset.entries]
    train_batch_sampler = None
    if data_args.batch_seconds and train_durations is not None:
        train_batch_sampler = DurationBatchSampler(
            train_durations, [e["num_tokens"] for e in train_dataset.entries], data_args.batch_seconds,
            data_args.batch_tokens, num_replicas=args.world_size, seed=args.seed)
        if args.process_index == 0:
            sizes = [len(b) for b in train_batch_sampler.batches]
            print(f"--batch_seconds {data_args.batch_seconds:g}, --batch_tokens {train_batch_sampler.max_tokens}: "
                  f"{len(sizes)} batches of {min(sizes)}-{max(sizes)} utterances ({sum(sizes) / len(sizes):.1f} on average)",
                  flush=True)
    trainer = SpeechLLMTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=Collator(spec, pad_text_to=data_args.pad_text_to), train_durations=train_durations,
        train_batch_sampler=train_batch_sampler,
        cpu_bf16_autocast=cpu_bf16_autocast_wanted(run_args.cpu_bf16_autocast),
        encoder_learning_rate=run_args.encoder_learning_rate, projector_learning_rate=run_args.projector_learning_rate,
        llm_learning_rate=run_args.llm_learning_rate,
        data_resume=data_resume, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=last_checkpoint)
    trainer.save_model(args.output_dir)
    if args.process_index == 0:
        print_skip_summary(skipped_log)
    return trainer


if __name__ == "__main__":
    try:
        main()
    except InputError as e:  # the message names the file (and line): a traceback would only hide it
        sys.exit(f"error: {e}")
    finally:
        if torch.distributed.is_initialized():  # live gloo threads can abort the interpreter's exit
            torch.distributed.destroy_process_group()
    # Everything is saved by now. Under torchrun, C++ threads still joinable at interpreter teardown
    # now and then abort it ("terminate called without an active exception", exit -6), which torchrun
    # reports as a failed run: leave without running those destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
