"""Train the projector of a SpeechLLM with HF Trainer (single process, torchrun DDP or DeepSpeed).

    torchrun --nproc_per_node=8 train.py --llm_model_name_or_path Qwen/Qwen2-1.5B-Instruct \
        --whisper_model_name_or_path large-v3 --data_path train.jsonl --output_dir exp/x \
        --deepspeed ds_config_zero3.json --bf16 True --gradient_checkpointing
"""
import contextlib
import json
import os
import socket
import sys
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
import transformers.trainer
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed
from transformers.integrations.deepspeed import deepspeed_load_checkpoint
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import get_last_checkpoint

from data import Collator, LengthGroupedSampler, SpeechDataset, audio_duration, read_jsonl
from model import SpeechLLM, SpeechLLMConfig


@dataclass
class ModelArguments:
    llm_model_name_or_path: str = field(metadata={"help": "hub id, local directory or .gguf file"})
    whisper_model_name_or_path: str = field(metadata={"help": "whisper name, .pt file or CTranslate2 directory"})
    projector_kernel: int = field(default=5, metadata={"help": "encoder frames per audio token (50 frames/s)"})
    projector_hidden: int = 2048
    instruction: str = field(default="Transcribe the speech.", metadata={"help": "default; jsonl `instruction` wins"})
    pad_to_30s: bool = field(default=False, metadata={"help": "Whisper's native 30 s input (slower)"})
    cpu_bf16_autocast: bool = field(default=False, metadata={
        "help": "CPU only: forward under torch.autocast(bfloat16), weights stay fp32 (--bf16 refuses CPU)"})
    init_projector: str | None = field(default=None, metadata={
        "help": "warm start: the projector of a saved model dir (a checkpoint in output_dir still wins)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "let the LLM's repo run its own Python code"})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": 'jsonl lines {"key", "wav", "txt"}'})
    eval_data_path: str | None = None
    length_grouped: bool = field(default=True, metadata={"help": "batches of similar duration (less padding)"})
    pad_text_to: int | None = field(default=None, metadata={
        "help": "pad every batch's tokens to at least this length (West v0: 512); only to measure its cost"})


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProjectorTrainer(Trainer):
    """Trainer that samples length-grouped batches and saves only the trainable projector."""

    def __init__(self, *args, train_durations=None, cpu_bf16_autocast=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_durations = train_durations  # None: the Trainer's own random sampler
        self.cpu_bf16_autocast = cpu_bf16_autocast

    def compute_loss_context_manager(self):
        if self.cpu_bf16_autocast:  # on CPUs with native bf16 (AVX512-BF16, AMX) a train step takes ~half the time
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return super().compute_loss_context_manager()

    def _get_train_sampler(self, train_dataset=None):
        if self.train_durations is None:
            self.length_sampler = None
            return super()._get_train_sampler(train_dataset)
        self.length_sampler = LengthGroupedSampler(self.train_durations, self._train_batch_size, seed=self.args.seed)
        return self.length_sampler

    def _run_epoch(self, *args, epoch, **kwargs):
        # accelerate's skip-batches wrapper (used on resume) does not forward set_epoch to our sampler
        if self.length_sampler is not None:
            self.length_sampler.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        with gathered(list(model.projector.parameters()), self.is_deepspeed_enabled):
            if self.args.should_save:
                model.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # (not used with DeepSpeed) A checkpoint holds only the projector; the rest is pretrained.
        self.accelerator.unwrap_model(model or self.model).load_projector(resume_from_checkpoint)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # The frozen encoder and LLM are not in the checkpoint: it stays the size of the projector + Adam state.
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))


def load_checkpoint_without_frozen(engine, checkpoint_path, load_module_strict=True):
    """Our DeepSpeed checkpoints exclude the frozen encoder and LLM, so resume loads them non-strictly
    (HF Trainer does this only for PEFT models); the frozen weights stay the pretrained ones."""
    return deepspeed_load_checkpoint(engine, checkpoint_path, load_module_strict=False)


transformers.trainer.deepspeed_load_checkpoint = load_checkpoint_without_frozen


def gathered(params, deepspeed_enabled: bool):
    """Under ZeRO-3 parameters are sharded over ranks; gather them to save (all ranks must enter)."""
    if deepspeed_enabled:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def main(argv: list[str] | None = None) -> ProjectorTrainer:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = setup_distributed(sys.argv[1:] if argv is None else argv)
    model_args, data_args, args = parser.parse_args_into_dataclasses(argv)
    args.remove_unused_columns = False  # our batches are dicts of tensors the model takes as they are
    args.label_names = ["labels"]

    set_seed(args.seed)  # the projector's initialization, like everything else, follows --seed
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    config = SpeechLLMConfig(
        whisper_model=model_args.whisper_model_name_or_path, llm_model=model_args.llm_model_name_or_path,
        projector_kernel=model_args.projector_kernel, projector_hidden=model_args.projector_hidden,
        instruction=model_args.instruction, pad_to_30s=model_args.pad_to_30s)
    model = SpeechLLM(config, dtype, trust_remote_code=model_args.trust_remote_code)
    if model_args.init_projector:
        model.load_projector(model_args.init_projector)

    def dataset(path):
        return SpeechDataset(read_jsonl(path), model.n_mels, config.instruction, config.pad_to_30s)

    train_dataset = dataset(data_args.data_path)
    eval_dataset = dataset(data_args.eval_data_path) if data_args.eval_data_path else None
    train_durations = [audio_duration(e) for e in train_dataset.entries] if data_args.length_grouped else None
    trainer = ProjectorTrainer(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=Collator(model, pad_text_to=data_args.pad_text_to), train_durations=train_durations,
        cpu_bf16_autocast=model_args.cpu_bf16_autocast and not torch.cuda.is_available())
    last_checkpoint = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    trainer.train(resume_from_checkpoint=last_checkpoint)
    trainer.save_model(args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # live gloo threads can abort the interpreter's exit
        torch.distributed.destroy_process_group()
