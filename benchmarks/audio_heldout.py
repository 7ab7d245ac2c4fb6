"""Audio-only accuracy of a trained run on spoken digits in voices it never heard.

The demo model is to be judged on real human recordings, which this repository does not
carry. The nearest stand-in here: espeak-ng voice variants held out from training (the
test split's), new speaking rates and pitches, written to .wav/.ogg files and read back
through `plait eval --data MANIFEST --modalities audio`, as a user's recordings would be.

    .venv/bin/python benchmarks/audio_heldout.py [RUN_DIR] [--per-digit N]

Last line: JSON {"overall": accuracy, "<language>": accuracy, ..., "files": count}.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import soundfile

from plait.launch.evaluate import evaluate_run
from plait.modalities.speech import Utterance, speak, voice_variants
from plait.plugins.spoken_digits import ACCENTS, WORDS, _voice_split


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", nargs="?", default="runs/digits")
    parser.add_argument("--per-digit", type=int, default=5, help="recordings per language and digit")
    parser.add_argument("--seed", type=int, default=0, help="the data set seed the run was trained with")
    args = parser.parse_args()

    held_out = _voice_split(voice_variants(), args.seed)["test"]
    rng = random.Random(12345)
    results: dict[str, float] = {}
    correct = total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for lang, words in WORDS.items():
            rows = ["audio,label"]
            takes = [(digit, take, Utterance(word, f"{rng.choice(ACCENTS[lang])}+{rng.choice(held_out)}",
                                             rng.randint(120, 220), rng.randint(20, 80), rng.randint(30, 80)))
                     for digit, word in enumerate(words.split()) for take in range(args.per_digit)]
            rate, waves = speak([utterance for *_, utterance in takes])
            for (digit, take, _), wave in zip(takes, waves, strict=True):
                name = f"{lang}-{digit}-{take}.{'ogg' if take % 2 else 'wav'}"
                soundfile.write(Path(tmp) / name, wave, rate)
                rows.append(f"{name},{digit}")
            manifest = Path(tmp) / f"{lang}.csv"
            manifest.write_text("\n".join(rows) + "\n")
            metrics = evaluate_run(Path(args.run_dir), data=str(manifest), modalities=["audio"])
            results[lang] = round(metrics["accuracy"], 4)
            correct += metrics["accuracy"] * metrics["samples"]
            total += metrics["samples"]
            print(f"{lang}: {metrics['accuracy']:.4f} ({metrics['samples']} files)")
    print(json.dumps({"overall": round(correct / total, 4), **results, "files": total}))


if __name__ == "__main__":
    main()
