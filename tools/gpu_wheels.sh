#!/usr/bin/env bash
# The wheels a GPU machine without network lacks (Python 3.12, x86-64), into .whl/ (git-ignored):
# what requirements.txt needs beyond that machine's image (torch, accelerate, peft, numba, tiktoken,
# pytest, hypothesis are there). openai-whisper and deepspeed are source-only on PyPI: built here as
# py3-none-any wheels, deepspeed with DS_ACCELERATOR=cuda (a wheel built on a CPU machine records cpu).
#   bash tools/gpu_wheels.sh && du -sh .whl      # then carry .whl (tools/gpu_run.sh installs it)
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
binary=(soundfile==0.13.1 cffi==2.0.0 pycparser==2.23 soxr==1.0.0 jiwer==4.0.0 rapidfuzz==3.14.3 gguf==0.19.0
        more-itertools==10.8.0 hjson==3.1.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0
        typing-inspection==0.4.2 typing-extensions==4.15.0 transformers==5.23.0 click==8.3.1)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${binary[@]}"
for source in openai-whisper==20250625 deepspeed==0.19.8; do
  name=${source%%==*}
  ls .whl | grep -qi "^${name//-/_}-" || DS_ACCELERATOR=cuda DS_BUILD_OPS=0 \
    python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "$source"
done
ls .whl
