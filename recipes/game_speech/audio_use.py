"""How much a trained projector lets the LLM use the audio: the transcript loss with each utterance's
own audio against the loss with its neighbour's audio (same texts, same prompts).

    python recipes/game_speech/audio_use.py exp/ctc/checkpoint-200 --data_path corpus/dev.jsonl [--num_utts 48]

Early in training the dev WER is above 100% whatever the setup (the LLM writes fluent sentences of
its own), but this gap already shows whether the audio is being listened to: 0 means not at all.
It also prints the audio embeddings' norm against the token embeddings'.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the library

import torch  # noqa: E402

from audio import load_entry_audio, log_mel  # noqa: E402
from data import Collator, read_jsonl  # noqa: E402
from model import SpeechLLM  # noqa: E402


@torch.inference_mode()
def mean_loss(model, collate, items, batch_size: int) -> float:
    losses = [model(**collate(items[i:i + batch_size])).loss.item() for i in range(0, len(items), batch_size)]
    return sum(losses) / len(losses)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--data_path", default="corpus/dev.jsonl")
    p.add_argument("--num_utts", type=int, default=48)
    p.add_argument("--batch_size", type=int, default=8)
    args = p.parse_args(argv)

    model = SpeechLLM.from_pretrained(args.model_dir)
    entries = read_jsonl(args.data_path)[: args.num_utts]
    mels = [log_mel(load_entry_audio(e), model.n_mels, model.config.pad_to_30s) for e in entries]
    own = [dict(mel=mel, txt=e["txt"], instruction=model.config.instruction) for mel, e in zip(mels, entries)]
    neighbours = [dict(item, mel=mels[(i + 1) % len(mels)]) for i, item in enumerate(own)]
    collate = Collator(model.data_spec())
    own_loss, other_loss = mean_loss(model, collate, own, args.batch_size), mean_loss(model, collate, neighbours, args.batch_size)
    print(f"{args.model_dir}: loss with own audio {own_loss:.3f}, with a neighbour's audio {other_loss:.3f}, "
          f"gap {other_loss - own_loss:.3f} nats/token ({len(entries)} utterances)")
    with torch.inference_mode():  # how loud the audio is to the LLM: a spliced-in embedding vs a token's
        batch = collate(own[: args.batch_size])
        audio_norm = model.encode_audio(batch["mel"], batch["mel_lengths"]).norm(dim=-1).mean().item()
    token_norm = model.llm.get_input_embeddings().weight.norm(dim=-1).mean().item()
    print(f"mean norm of an audio embedding {audio_norm:.2f}, of a token embedding {token_norm:.2f} "
          f"({audio_norm / token_norm:.1f}x)")


if __name__ == "__main__":
    main()
