"""Copy a few held-out real-speech clips (one per speaker, 2.5-6 s, 5+ words, first in key order)
from the real-speech dev set into examples/, so that the demo shows real speech too.

    python recipes/game_speech/add_real_examples.py --dev corpus/real/dev.jsonl --keys 290006P2 C3C__081 C72A_031 CINTR052 12001EJ1
"""
import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dev", default="corpus/real/dev.jsonl")
    p.add_argument("--keys", nargs="+", required=True)
    p.add_argument("--examples", default=str(ROOT / "examples"))
    args = p.parse_args(argv)
    dev = Path(args.dev)
    lines = {x["key"]: x for x in map(json.loads, dev.read_text().splitlines())}
    examples = Path(args.examples)
    jsonl = examples / "examples.jsonl"
    existing = {json.loads(x)["key"] for x in jsonl.read_text().splitlines()}
    (examples / "wav" / "real").mkdir(parents=True, exist_ok=True)
    added = []
    for key in args.keys:
        x = lines[key]
        name = f"real-{key}"
        if name in existing:
            continue
        shutil.copy(dev.parent / x["wav"], examples / "wav" / "real" / f"{name}.wav")
        added.append(dict(key=name, wav=f"wav/real/{name}.wav", txt=x["txt"], duration=x["duration"],
                          voice=f"real: {x['speaker']} (Flight of the Amazon Queen, scene {x['scene']})"))
    with open(jsonl, "a") as f:
        f.writelines(json.dumps(x) + "\n" for x in added)
    print(f"added {len(added)} clips to {jsonl}")


if __name__ == "__main__":
    main()
