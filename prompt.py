"""The chat prompt of one sample, in token ids: the LLM's own chat template around the instruction,
the audio placeholders and the transcript; the same pieces at training and at decoding time. And the
layout of a batch of prompts: the opening they share, which one KV cache can serve."""
import torch

_AUDIO_MARKER = "\x00AUDIO\x00"  # only splits the templated text; never tokenized
_ANSWER_MARKER = "\x00ANSWER\x00"
# Variables every chat template is rendered with (a template that does not use one ignores it).
# enable_thinking=False: Qwen3's non-thinking mode, its empty "<think>\n\n</think>\n\n" block in the
# prompt (the answer is a transcript, never reasoning). date_string: Llama 3.1+ templates write it into
# the system prompt, else today's date: training and decoding prompts would differ from one day to the
# next. The fixed date is the Llama 3.1 template's own fallback.
TEMPLATE_VARIABLES = dict(enable_thinking=False, date_string="26 Jul 2024")


class ChatPrompt:
    """Token ids of one sample: the chat template's user turn = instruction + audio placeholders,
    its assistant turn = transcript + end-of-turn. Pieces are tokenized once per instruction."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.placeholder_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._cache, self._token_texts = {}, {}

    def _pieces(self, instruction: str):
        if instruction not in self._cache:
            user = [{"role": "user", "content": instruction + _AUDIO_MARKER}]
            prompt = self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True,
                                                        **TEMPLATE_VARIABLES)
            answer = [{"role": "assistant", "content": _ANSWER_MARKER}]
            full = self.tokenizer.apply_chat_template(user + answer, tokenize=False, **TEMPLATE_VARIABLES)
            if not full.startswith(prompt) or prompt.count(_AUDIO_MARKER) != 1:
                raise ValueError("the tokenizer's chat template does not extend the user turn with the "
                                 "assistant turn; cannot separate prompt from answer")
            before_audio, after_audio = prompt.split(_AUDIO_MARKER)
            answer_prefix, end_of_turn = full[len(prompt):].split(_ANSWER_MARKER)
            # The template's trailing newline after end-of-turn is never generated, so not trained.
            end_of_turn = end_of_turn.rstrip()
            self._cache[instruction] = (self._ids(before_audio), self._ids(after_audio + answer_prefix),
                                        self._ids(end_of_turn))
        return self._cache[instruction]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds the specials

    def token_text(self, token_id: int) -> str:
        """One token's text (" the", "!"), cached: the repetition guard reads words from the ids."""
        if token_id not in self._token_texts:
            text = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            if self.tokenizer.convert_ids_to_tokens(token_id).startswith("\u2581"):  # SentencePiece drops its space
                text = " " + text.lstrip(" ")
            self._token_texts[token_id] = text
        return self._token_texts[token_id]

    @property
    def end_of_turn_ids(self) -> list[int]:
        """The tokens that close every answer (labels end with them); the same for any instruction."""
        return self._pieces("")[2]

    @property
    def eos_token_ids(self) -> list[int]:
        return list(dict.fromkeys(self.end_of_turn_ids[:1] + [self.tokenizer.eos_token_id]))

    def __call__(self, instruction: str, num_audio_tokens: int, transcript: str | None = None) -> dict:
        """-> input_ids, audio_mask (True at placeholders), labels (-100 except the answer + end-of-turn).
        Without a transcript: the prompt up to the assistant's answer, for generation."""
        before_audio, after_audio, end_of_turn = self._pieces(instruction)
        prompt = before_audio + [self.placeholder_id] * num_audio_tokens + after_audio
        answer = [] if transcript is None else self._ids(transcript) + end_of_turn
        audio_mask = [False] * len(before_audio) + [True] * num_audio_tokens + [False] * (len(after_audio) + len(answer))
        return dict(input_ids=prompt + answer, audio_mask=audio_mask, labels=[-100] * len(prompt) + answer)


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, audio_mask: torch.Tensor) -> int:
    """How many tokens open every left-padded prompt of the batch identically, before any audio:
    the chat template's system prompt and the instruction when the batch shares one."""
    starts = attention_mask.int().argmax(1)  # (B,) first real token of each row
    first_audio = audio_mask.int().argmax(1)  # (B,)
    length = max(0, int((first_audio - starts).min()))
    tokens = input_ids.gather(1, starts[:, None] + torch.arange(length, device=input_ids.device))  # (B, length)
    same = (tokens == tokens[:1]).all(0)  # (length,)
    return int(same.int().cumprod(0).sum())


def move_padding_after_prefix(x: torch.Tensor, attention_mask: torch.Tensor, prefix_length: int):
    """Left padding -> padding between the shared prefix and the rest of each row, so that the
    prefix occupies the same positions 0..P-1 in every row and one KV cache serves them all. Position
    ids come from the attention mask's cumulative sum, so every real token keeps its position.
    x: (B, L, ...), attention_mask: (B, L) -> both rearranged, same shapes."""
    starts = attention_mask.int().argmax(1)[:, None]  # (B, 1): left padding of each row
    j = torch.arange(attention_mask.shape[1], device=x.device)[None]  # (1, L)
    source = torch.where(j < prefix_length, starts + j, torch.where(j < prefix_length + starts, j - prefix_length, j))
    gathered = x.gather(1, source.view(*source.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
    return gathered, attention_mask.gather(1, source)
