"""The LLM families users train, each with its real tokenizer and chat template and a tiny random LLM
of its architecture (conftest.family_llm_dir): Qwen2 and Qwen2.5 (ChatML, a default system prompt),
Qwen3 (the <think> block), Llama 3 (<|eot_id|>, no pad token, the date of 3.1+ templates) and SmolLM2.
What must hold for each: the label mask covers exactly the answer and its end of turn, the eos ids
come from the template, the prompt is the same in training and decoding, and train.py + recognize.py
overfit a few utterances and decode them back."""
import datetime
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, write_corpus
from transformers import AutoTokenizer

from decoding import RepetitionGuard
from prompt import TEMPLATE_VARIABLES, ChatPrompt

FAMILIES = ["smollm2", "qwen2", "qwen2.5", "qwen3", "llama3"]
INSTRUCTION = "Transcribe the speech."
# What each family's prompt looks like around the audio placeholders, and the token that ends its turns
OPENING = {"smollm2": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\n",
           "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
           "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                      "<|im_end|>\n<|im_start|>user\n",
           "qwen3": "<|im_start|>user\n",  # no default system prompt
           "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"}
CHATML_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
AFTER_AUDIO = {"smollm2": CHATML_ASSISTANT, "qwen2": CHATML_ASSISTANT, "qwen2.5": CHATML_ASSISTANT,
               "qwen3": CHATML_ASSISTANT + "<think>\n\n</think>\n\n",  # non-thinking mode
               "llama3": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"}
END_OF_TURN = {"smollm2": "<|im_end|>", "qwen2": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>",
               "llama3": "<|eot_id|>"}
TRANSCRIPTS = ["hello world", "甚至出现交易几乎停滞的情况"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer(family, family_llm_dir):
    return AutoTokenizer.from_pretrained(family_llm_dir(family))


@pytest.mark.parametrize("transcript", TRANSCRIPTS)
def test_prompt_is_the_templates_own_tokenization(tokenizer, transcript):
    """Tokenized piece by piece (ChatPrompt), a sample is what the template makes of the conversation
    as a whole, up to the whitespace it writes after the end of turn (never generated, never trained)."""
    ours = ChatPrompt(tokenizer)(INSTRUCTION, 0, transcript)["input_ids"]
    conversation = [{"role": "user", "content": INSTRUCTION}, {"role": "assistant", "content": transcript}]
    template = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                             **TEMPLATE_VARIABLES)["input_ids"]
    assert template[:len(ours)] == ours
    assert tokenizer.decode(template[len(ours):]).strip() == ""


@pytest.mark.parametrize("transcript", TRANSCRIPTS)
def test_label_mask_covers_exactly_answer_and_end_of_turn(family, tokenizer, transcript):
    prompt = ChatPrompt(tokenizer)
    sample = prompt(INSTRUCTION, 7, transcript)
    ids, labels = sample["input_ids"], sample["labels"]
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    answer = tokenizer(transcript, add_special_tokens=False)["input_ids"] + [end_of_turn]
    trained = [i for i, label in enumerate(labels) if label != -100]
    assert trained == list(range(len(ids) - len(answer), len(ids)))  # one span, at the end
    assert [labels[i] for i in trained] == [ids[i] for i in trained] == answer
    assert tokenizer.decode(answer[:-1]) == transcript
    # the template's end of turn stops decoding (the tokenizer's eos too, when it is another token)
    assert prompt.end_of_turn_ids == [end_of_turn]
    assert prompt.eos_token_ids[0] == end_of_turn and tokenizer.eos_token_id in prompt.eos_token_ids
    audio = [i for i, is_audio in enumerate(sample["audio_mask"]) if is_audio]
    assert len(audio) == 7 and audio == list(range(audio[0], audio[0] + 7))
    assert tokenizer.decode(ids[:audio[0]]).endswith(INSTRUCTION)


def test_training_and_decoding_prompts_are_identical(family, tokenizer):
    prompt = ChatPrompt(tokenizer)
    training = prompt(INSTRUCTION, 5, "hello world")
    decoding = prompt(INSTRUCTION, 5)
    n = len(decoding["input_ids"])
    assert training["input_ids"][:n] == decoding["input_ids"]
    assert training["audio_mask"][:n] == decoding["audio_mask"] and set(training["labels"][:n]) == {-100}
    first_audio = decoding["audio_mask"].index(True)
    before, after = decoding["input_ids"][:first_audio], decoding["input_ids"][first_audio + 5:]
    assert tokenizer.decode(before) == OPENING[family] + INSTRUCTION
    assert tokenizer.decode(after) == AFTER_AUDIO[family]
    if family == "llama3":  # one <|begin_of_text|>, from the template; no pad token, so placeholders are token 0
        assert before.count(tokenizer.bos_token_id) == 1
        assert tokenizer.pad_token_id is None and prompt.placeholder_id == 0


def test_qwen3_prompt_holds_the_empty_think_block_it_trains_with(family_llm_dir):
    """Qwen3's template writes an empty <think> block into an answer after the last user turn, but its
    default generation prompt (thinking mode) ends before it: without enable_thinking=False the
    prompt would differ from what training fed the LLM."""
    tokenizer = AutoTokenizer.from_pretrained(family_llm_dir("qwen3"))
    user = [{"role": "user", "content": INSTRUCTION}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True).endswith("assistant\n")
    trained = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "hi"}], tokenize=False)
    assert trained.endswith("assistant\n<think>\n\n</think>\n\nhi<|im_end|>\n")
    decoding = ChatPrompt(tokenizer)(INSTRUCTION, 1)["input_ids"]
    assert tokenizer.decode(decoding).endswith("assistant\n<think>\n\n</think>\n\n")


# The system header of Llama 3.1+ templates: today's date unless the caller gives date_string
LLAMA_31_STYLE_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n"
    "Today Date: ' + date_string + '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def test_llama_31_date_in_the_system_prompt_is_frozen(family_llm_dir):
    tokenizer = AutoTokenizer.from_pretrained(family_llm_dir("llama3"))
    tokenizer.chat_template = LLAMA_31_STYLE_TEMPLATE
    today = datetime.datetime.now().strftime("%d %b %Y")
    user = [{"role": "user", "content": INSTRUCTION}]
    assert f"Today Date: {today}<|eot_id|>" in tokenizer.apply_chat_template(user, tokenize=False)
    text = tokenizer.decode(ChatPrompt(tokenizer)(INSTRUCTION, 1, "hi")["input_ids"])
    assert f"Today Date: {TEMPLATE_VARIABLES['date_string']}<|eot_id|>" in text
    if today != TEMPLATE_VARIABLES["date_string"]:
        assert today not in text


def test_instruction_given_at_decoding_changes_the_prompt(tiny_model, tmp_path, monkeypatch):
    """recognize.py --instruction replaces the trained default in every prompt (a jsonl `instruction`
    still wins): what measuring prompt sensitivity relies on."""
    import recognize

    tiny_model.save_pretrained(tmp_path / "model")
    jsonl = write_corpus(tmp_path / "data", ["a", "b"], [0.5, 0.6])
    lines = jsonl.read_text().splitlines()
    lines[1] = json.dumps(json.loads(lines[1]) | {"instruction": "请转写这段语音。"}, ensure_ascii=False)
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prompts = []

    def recording_decode(model, batch, options):
        prompts.extend(model.tokenizer.decode(row[mask.bool()])
                       for row, mask in zip(batch["input_ids"], batch["attention_mask"]))
        return torch.full((len(batch["input_ids"]), 1), model.prompt.eos_token_ids[0])  # empty transcripts

    monkeypatch.setattr(recognize, "decode_batch", recording_decode)
    for instruction in [None, "Write down every word you hear."]:
        prompts.clear()
        recognize.main(["--model_dir", str(tmp_path / "model"), "--data_path", str(jsonl), "--result_path",
                        str(tmp_path / "result.txt"), "--batch_size", "2"]
                       + (["--instruction", instruction] if instruction else []))
        assert len(prompts) == 2
        audio = tiny_model.tokenizer.decode([tiny_model.prompt.placeholder_id])
        per_sample = [p for p in prompts if f"user\n请转写这段语音。{audio}" in p]
        by_flag = [p for p in prompts if f"user\n{instruction or tiny_model.config.instruction}{audio}" in p]
        assert len(per_sample) == 1 and len(by_flag) == 1, prompts
    assert "Write down every word you hear." not in tiny_model.config.instruction


def run(*args):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


ENGLISH = ["hello world", "good morning", "thank you very much", "see you later"]
CHINESE = ["你好世界", "早上好", "非常感谢你", "明天见"]
# One run per family, each also covering an encoder, projector type or language users train with:
# family -> (Whisper's mel bins, train.py options, transcripts, the jsonl's per-sample instruction, --lang, steps).
# A random Qwen3 (its q/k norms flatten attention) takes a projector alone longer to steer.
END_TO_END = {
    "qwen2": (80, ["--projector_hidden", 1024], CHINESE, "请转写这段语音。", "zh", 200),  # West's AISHELL setting
    "qwen2.5": (128, ["--projector_type", "qwen2-audio", "--lora_rank", 8, "--lora_alpha", 32],  # Qwen2-Audio-style
                ENGLISH, None, "en", 200),
    "qwen3": (80, ["--projector_type", "linear", "--projector_hidden", 1024], ENGLISH, None, "en", 400),  # SLAM-ASR's
    "llama3": (80, ["--projector_hidden", 1024], ENGLISH, None, "en", 200),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", END_TO_END)
def test_overfit_train_then_recognize(family, family_llm_dir, tiny_whisper_path, tiny_whisper_128_path, tmp_path):
    n_mels, options, transcripts, instruction, lang, steps = END_TO_END[family]
    jsonl = write_corpus(tmp_path / "data", transcripts, [1.0, 1.5, 2.0, 1.2], instruction)
    exp = tmp_path / "exp"
    run("train.py", "--llm_model_name_or_path", family_llm_dir(family), "--whisper_model_name_or_path",
        tiny_whisper_128_path if n_mels == 128 else tiny_whisper_path, *options, "--data_path", jsonl,
        "--output_dir", exp, "--per_device_train_batch_size", 4, "--learning_rate", 3e-3,
        "--lr_scheduler_type", "constant", "--max_steps", steps, "--logging_steps", 10, "--save_strategy", "no",
        "--report_to", "none", "--seed", 1)
    config = json.loads((exp / "speechllm_config.json").read_text())
    assert config["projector_type"] == (options[1] if options[0] == "--projector_type" else "conv")

    result_path = tmp_path / "result.txt"
    out = run("recognize.py", "--model_dir", exp, "--data_path", jsonl, "--result_path", result_path,
              "--batch_size", 3, "--lang", lang)
    assert result_path.read_text(encoding="utf-8").splitlines() == [f"utt{i}\t{t}" for i, t in enumerate(transcripts)]
    units = sum(map(len, transcripts)) if lang == "zh" else sum(len(t.split()) for t in transcripts)
    assert f"{'CER' if lang == 'zh' else 'WER'} 0.00 [ 0 / {units}, 0 ins, 0 del, 0 sub ]" in out.stdout


def test_text_ends_at_the_end_of_turn_without_a_pad_token(family_llm_dir, tiny_whisper_path):
    """Llama 3 has no pad token: rows that finished early are padded with token 0, "!", a real token."""
    from decoding import transcripts
    from model import SpeechLLM, SpeechLLMConfig

    model = SpeechLLM(SpeechLLMConfig(whisper_model=str(tiny_whisper_path), llm_model=str(family_llm_dir("llama3")),
                                      projector_hidden=64))
    tok, eot = model.tokenizer, model.prompt.eos_token_ids[0]
    rows = [tok("good morning", add_special_tokens=False)["input_ids"] + [eot],
            tok("hi", add_special_tokens=False)["input_ids"] + [eot]]
    padded = torch.tensor([row + [model.prompt.placeholder_id] * (5 - len(row)) for row in rows])
    assert model.prompt.placeholder_id == 0 and tok.decode(padded[1], skip_special_tokens=True) == "hi!!!"
    assert transcripts(model, padded) == ["good morning", "hi"]


def test_repetition_guard_reads_words_from_each_tokenizer(tokenizer):
    """The guard's word view (ChatPrompt.token_text) finds the word boundaries of every family's
    tokenizer: copies of a word in other cases and punctuation are one loop, and the tokens that
    began them are what it bans."""
    guard = RepetitionGuard(max_repeats=3, token_text=ChatPrompt(tokenizer).token_text)
    ids = tokenizer("Well, H! H? h??", add_special_tokens=False)["input_ids"]
    assert [word for word, _ in guard.words(ids, complete=True)] == ["well", "h", "h", "h"]
    starts = {tokenizer.decode([token]) for token in guard.word_loop_starts(ids, complete=True)}
    assert starts == {" H", " h"}
