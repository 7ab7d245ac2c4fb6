"""Audio: files -> mono 16 kHz waveforms, waveform augmentation, and the log-mel front end.

Every waveform inside plait is mono float32 at ``SAMPLE_RATE``; loaders resample.
Files are read with soundfile (wav, ogg, flac); torchaudio supplies the transforms.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF
import torchaudio.transforms as AT
from torch import nn

from plait.core.errors import DataError

SAMPLE_RATE = 16_000
TOP_DB = 60.0  # dynamic range kept by the log-mel front end
VAD_DB = 30.0  # frames within this of the loudest one are speech, for normalisation statistics
LN10_OVER_10 = math.log(10) / 10  # dB -> natural log of power


@functools.lru_cache(maxsize=32)
def _resampler(orig: int, new: int) -> AT.Resample:
    """Resampling kernels are costly to build and reused for every clip at that rate."""
    return AT.Resample(orig_freq=orig, new_freq=new)


def resample(wave: torch.Tensor, rate: int, target: int = SAMPLE_RATE) -> torch.Tensor:
    if rate == target:
        return wave
    with torch.no_grad():
        resampled: torch.Tensor = _resampler(rate, target)(wave)
    return resampled


def trim_silence(wave: torch.Tensor, top_db: float = 30.0, margin_s: float = 0.05) -> torch.Tensor:
    """``wave`` without the leading and trailing stretch quieter than ``top_db`` below its
    loudest 25 ms frame (keeping ``margin_s`` either side). Recordings come with any amount of
    silence around a word; models see the word."""
    frame, hop = int(0.025 * SAMPLE_RATE), int(0.010 * SAMPLE_RATE)
    if wave.shape[-1] <= frame:
        return wave
    power = wave.unfold(-1, frame, hop).pow(2).mean(-1)
    loud = (power >= power.max() * 10 ** (-top_db / 10)).nonzero().squeeze(1)
    if loud.numel() == 0:
        return wave
    margin = int(margin_s * SAMPLE_RATE)
    start = max(0, int(loud[0]) * hop - margin)
    end = min(wave.shape[-1], int(loud[-1]) * hop + frame + margin)
    return wave[start:end]


def load_audio(path: str | Path | BinaryIO, max_seconds: float | None = None) -> torch.Tensor:
    """Read an audio file as a mono float32 waveform at 16 kHz, silence at the ends trimmed.

    Any sample format soundfile reads (8/16/24/32-bit integer, float) comes scaled to [-1, 1];
    channels are averaged. A file longer than ``max_seconds`` is refused before it is read
    (one mislabelled hour-long recording would otherwise fill memory in a batch of clips), and
    so is one whose samples are NaN or infinite. ``path`` may be an open binary file (a tar shard's member),
    named in errors by its ``name``."""
    where = getattr(path, "name", path)
    try:
        with soundfile.SoundFile(path if hasattr(path, "read") else str(path)) as file:
            rate, frames = file.samplerate, file.frames
            if max_seconds is not None and frames > max_seconds * rate:
                raise DataError(f"{where}: audio is {frames / rate:.1f} s long, over the {max_seconds:g} s "
                                "allowed (plugins.manifest.audio_max_seconds)")
            data = file.read(dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise DataError(f"{where}: audio file not found") from None
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError) as exc:
        raise DataError(f"{where}: unreadable audio: {exc}") from None
    if data.shape[0] == 0:
        raise DataError(f"{where}: audio file has no samples")
    finite = np.isfinite(data)
    if not finite.all():
        first = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise DataError(f"{where}: audio holds NaN or infinite samples (the first at {first / rate:.3f} s)")
    return trim_silence(resample(torch.from_numpy(data).mean(dim=1), rate))


def coloured_noise(length: int, exponent: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unit-RMS noise with power spectrum 1/f**exponent (0 white, 1 pink, 2 brown)."""
    if exponent == 0:
        return torch.randn(length, generator=generator)
    size = _fast_length(length)
    spectrum = torch.fft.rfft(torch.randn(size, generator=generator))
    freqs = torch.arange(spectrum.shape[0], dtype=torch.float32).clamp(min=1.0)
    noise: torch.Tensor = torch.fft.irfft(spectrum / freqs ** (exponent / 2), n=size)[:length]
    return noise / noise.pow(2).mean().sqrt().clamp(min=1e-8)


def _fast_length(length: int) -> int:
    """The next power of two: FFTs of arbitrary (prime-ish) clip lengths are many times slower."""
    return 1 << max(0, length - 1).bit_length()


def convolve(wave: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``wave`` convolved with ``kernel``, cut to ``wave``'s length (FFT at a fast size)."""
    size = _fast_length(wave.shape[-1] + kernel.shape[-1] - 1)
    product = torch.fft.rfft(wave, n=size) * torch.fft.rfft(kernel, n=size)
    convolved: torch.Tensor = torch.fft.irfft(product, n=size)[..., : wave.shape[-1]]
    return convolved


def add_noise(wave: torch.Tensor, snr_db: float, exponent: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """``wave`` plus coloured noise at ``snr_db`` relative to the signal's power."""
    power = wave.pow(2).mean().clamp(min=1e-8)
    noise = coloured_noise(wave.shape[-1], exponent, generator)
    return wave + noise * torch.sqrt(power / 10 ** (snr_db / 10))


class WaveAugment:
    """Random speed, gain, silence, room reverb, band limits and noise: what separates a
    synthetic voice in a quiet file from a person at a microphone. Picklable."""

    def __init__(self, p: float = 0.8, snr_db: tuple[float, float] = (10.0, 40.0)) -> None:
        self.p = p
        self.snr_db = snr_db

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(()).item()

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) > self.p:
            return wave
        rate = SAMPLE_RATE
        if torch.rand(()) < 0.5:  # speed (tempo and pitch together), ratios with small gcd stay cheap
            speed = [0.85, 0.9, 0.95, 1.05, 1.1, 1.15][int(torch.randint(6, ()))]
            wave = resample(wave, int(rate * speed), rate)
        if torch.rand(()) < 0.25:  # room: exponentially decaying noise impulse response
            length = int(rate * self._uniform(0.05, 0.25))
            t = torch.arange(length, dtype=torch.float32) / rate
            impulse = torch.randn(length) * torch.exp(-t / self._uniform(0.01, 0.06))
            impulse[0] = 1.0
            wet = convolve(wave, impulse / impulse.norm())
            wave = wet * wave.abs().max() / wet.abs().max().clamp(min=1e-8)
        if torch.rand(()) < 0.5:
            wave = AF.lowpass_biquad(wave, rate, self._uniform(2500.0, 7000.0))
        if torch.rand(()) < 0.5:
            wave = AF.highpass_biquad(wave, rate, self._uniform(60.0, 400.0))
        pad = (int(rate * self._uniform(0, 0.03)), int(rate * self._uniform(0, 0.03)))
        wave = nn.functional.pad(wave, pad)
        if torch.rand(()) < 0.5:
            exponent = [0.0, 1.0, 2.0][int(torch.randint(3, ()))]
            wave = add_noise(wave, self._uniform(*self.snr_db), exponent)
        gain = 10 ** (self._uniform(-20.0, 6.0) / 20)
        return (wave * gain).clamp(-1.0, 1.0)


class LogMel(nn.Module):
    """Waveforms [B, T] with lengths -> per-utterance normalised log-mels [B, n_mels, frames].

    Normalising each utterance by its own mean and spread removes the level and the
    microphone's colouring, so the encoder learns the word, not the recording.
    """

    def __init__(self, n_mels: int = 40, hop_ms: float = 10.0, win_ms: float = 25.0,
                 f_min: float = 50.0, f_max: float = 7600.0) -> None:
        super().__init__()
        self.hop = int(SAMPLE_RATE * hop_ms / 1000)
        self.mel = AT.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=int(2 ** math.ceil(math.log2(SAMPLE_RATE * win_ms / 1000))),
            win_length=int(SAMPLE_RATE * win_ms / 1000), hop_length=self.hop,
            f_min=f_min, f_max=f_max, n_mels=n_mels, power=2.0,
        )

    def frames(self, lengths: torch.Tensor) -> torch.Tensor:
        return lengths // self.hop + 1

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Silence after every clip, the longest too: the windows of a clip's last frames then see zeros past
        # its end, as they do in a batch padded for a longer clip, not the STFT's reflection. So a clip's
        # features do not depend on the batch it is in (nor does a teacher's output cached apart from it).
        # It also gives a batch of clips shorter than one window the length the reflect padding needs.
        wave = nn.functional.pad(wave, (0, max(self.mel.n_fft // 2, self.mel.n_fft - wave.shape[-1])))
        spec = torch.log(self.mel(wave.float()) + 1e-10)  # [B, n_mels, frames]
        frames = self.frames(lengths).clamp(max=spec.shape[-1])
        mask = (torch.arange(spec.shape[-1], device=spec.device)[None, :] < frames[:, None]).unsqueeze(1)
        energy = torch.logsumexp(spec, dim=1, keepdim=True).masked_fill(~mask, float("-inf"))  # [B, 1, frames]
        peak = energy.amax(dim=-1, keepdim=True)
        # Floor at TOP_DB below the loudest frame: digital silence must not produce extreme values.
        spec = torch.maximum(spec, peak - math.log(spec.shape[1]) - TOP_DB * LN10_OVER_10)
        # Statistics from the loud frames only, so that any amount of silence around the word
        # leaves the word's features unchanged.
        loud = mask & (energy >= peak - VAD_DB * LN10_OVER_10)
        count = loud.sum(dim=-1, keepdim=True).clamp(min=1)
        mean = (spec * loud).sum(-1, keepdim=True) / count
        centred = spec - mean
        var = (centred.pow(2) * loud).sum(dim=(1, 2), keepdim=True) / (count * spec.shape[1])
        return centred * mask / var.sqrt().clamp(min=1e-3), mask.squeeze(1)


class SpecAugment(nn.Module):
    """Training-only spectrogram augmentation: a random warp of the frequency axis per
    utterance (vocal tract length perturbation: other speakers' formants), then frequency
    and time masks (Park et al. 2019)."""

    def __init__(self, warp: float = 0.12, freq_mask: int = 6, time_mask: int = 10, masks: int = 1) -> None:
        super().__init__()
        self.warp = warp
        self.freq = AT.FrequencyMasking(freq_mask, iid_masks=True)
        self.time = AT.TimeMasking(time_mask, iid_masks=True)
        self.masks = masks

    def warp_frequencies(self, spec: torch.Tensor) -> torch.Tensor:
        """Stretch each utterance's mel axis by a factor in [1 - warp, 1 + warp]."""
        size, bins, frames = spec.shape
        factor = 1 + (torch.rand(size, 1, 1, device=spec.device) * 2 - 1) * self.warp
        freq = torch.linspace(-1, 1, bins, device=spec.device).view(1, bins, 1)
        time = torch.linspace(-1, 1, frames, device=spec.device).view(1, 1, frames)
        grid = torch.stack([time.expand(size, bins, frames), ((freq + 1) / factor - 1).expand(size, bins, frames)], -1)
        return nn.functional.grid_sample(spec.unsqueeze(1), grid, align_corners=True, padding_mode="border").squeeze(1)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return spec
        if self.warp:
            spec = self.warp_frequencies(spec)
        spec = spec.unsqueeze(1)
        for _ in range(self.masks):
            spec = self.time(self.freq(spec))
        return spec.squeeze(1)
