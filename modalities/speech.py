"""Synthetic speech: espeak-ng (the library and voices that the PyPI package ``espeakng-loader``
carries), always run in a child process of its own.

Why a child process: libespeak-ng is native code that is not memory-safe (under valgrind it
branches on uninitialised stack memory in its rule matcher), and it calls ``setlocale``, which
is unsafe while other threads run; a Ray Train worker has dozens. Inside the training process
any such fault lands in the heap that torch and gloo use. The child is single-threaded,
imports neither torch nor Ray, and exits when the clips are made.

Each clip is seeded: voices with breath or whisper noise draw it from espeak-ng's own generator,
time-seeded unless ``espeak_ng_SetRandSeed`` is called (the same clip differed from run to run),
and some variants also call the C library's ``rand()``, whose state is the whole process's
(so a clip depended on every call made before it). Both are seeded from the utterance. A
whispering variant still carries some state over from the clip before it, so what is
reproducible is a request as a whole: the same utterances in the same order give the same
clips, in any process on any machine.

    python -m plait.modalities.speech < requests.json > clips.npz   (what ``speak`` runs)
"""
from __future__ import annotations

import ctypes
import io
import itertools
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from plait.core.errors import DataError


@dataclass(frozen=True)
class Utterance:
    text: str
    voice: str  # "language[+variant]", e.g. "en-US+m3"
    words_per_minute: int = 160
    pitch: int = 50
    pitch_range: int = 50
    seed: int = 0  # espeak-ng's own noise (breathy and whispering variants)


def voice_variants() -> list[str]:
    """The voice variants (``+name``) espeak-ng's data holds, sorted."""
    import espeakng_loader

    return sorted(p.name for p in (Path(espeakng_loader.get_data_path()) / "voices" / "!v").iterdir())


def speak(utterances: list[Utterance], progress: str | None = None) -> tuple[int, list[np.ndarray]]:
    """(sample rate, float32 waveforms), synthesized in a child process; ``progress``, when
    given, is the description of a progress bar the child draws on stderr."""
    request = json.dumps({"progress": progress, "utterances": [asdict(u) for u in utterances]})
    # stdout carries the clips; stderr is this process's own (the bar, and any error or crash report).
    child = subprocess.run([sys.executable, "-m", __name__], input=request.encode(), stdout=subprocess.PIPE,
                           check=False)
    if child.returncode != 0:
        raise DataError(f"speech synthesis (espeak-ng, in a child process) failed with exit code "
                        f"{child.returncode}; its error is on stderr above")
    with np.load(io.BytesIO(child.stdout), allow_pickle=False) as data:
        samples, offsets, rate = data["samples"], data["offsets"], int(data["rate"])
    return rate, [samples[start:end] for start, end in itertools.pairwise(offsets)]


class Espeak:
    """Minimal ctypes binding of libespeak-ng in synchronous mode. Only the child process
    (``main``) makes one: see the module docstring."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.rate = self.lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.rate <= 0:
            raise DataError("espeak-ng failed to initialise (espeakng-loader's library or data)")
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.libc = ctypes.CDLL(None)  # this process's C library: srand() for the variants that use rand()
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = callback_type(self._collect)  # keep a reference: C holds a pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: Any, count: int, events: Any) -> int:  # a C callback: ctypes arguments
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def say(self, utterance: Utterance) -> np.ndarray:
        """float32 waveform at ``self.rate`` Hz."""
        if self.lib.espeak_SetVoiceByName(utterance.voice.encode()) != 0:
            raise DataError(f"espeak-ng has no voice '{utterance.voice}'")
        for parameter, value in ((1, utterance.words_per_minute), (3, utterance.pitch), (4, utterance.pitch_range)):
            self.lib.espeak_SetParameter(parameter, value, 0)
        self.lib.espeak_ng_SetRandSeed(utterance.seed)
        self.libc.srand(ctypes.c_uint(utterance.seed))
        self._chunks = []
        data = utterance.text.encode()
        self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)
        self.lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(1, np.float32)
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


def main() -> None:
    """The child: requests as JSON on stdin, an .npz of the clips on stdout."""
    request = json.load(sys.stdin)
    espeak = Espeak()
    utterances = [Utterance(**u) for u in request["utterances"]]
    if request.get("progress"):
        from rich.console import Console
        from rich.progress import track

        shown = track(utterances, description=request["progress"], console=Console(stderr=True), transient=True)
    waves = [espeak.say(u) for u in (shown if request.get("progress") else utterances)]
    buffer = io.BytesIO()
    np.savez(buffer, samples=np.concatenate(waves) if waves else np.zeros(0, np.float32),
             offsets=np.cumsum([0] + [len(w) for w in waves]), rate=espeak.rate)
    sys.stdout.buffer.write(buffer.getvalue())


if __name__ == "__main__":
    try:
        main()
    except DataError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
