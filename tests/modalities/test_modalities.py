import random

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from plait.core.errors import DataError
from plait.modalities.audio import SAMPLE_RATE, LogMel, SpecAugment, WaveAugment, add_noise, load_audio
from plait.modalities.batch import collate
from plait.modalities.image import ImageAugment, load_image
from plait.modalities.text import ByteTokenizer, WordPieceTokenizer, add_typos, drop_words, random_case


def sample(label, text=None, image=None, audio=None, sid="s"):
    return {"id": sid, "label": label, "text": text, "image": image, "audio": audio}


def test_collate_pads_and_masks_missing_modalities():
    batch = collate([
        sample(1, text="one", audio=torch.ones(5)),
        sample(2, image=torch.ones(1, 4, 4)),
        sample(3, text="three", image=torch.full((1, 4, 4), 2.0), audio=torch.ones(8)),
    ])
    assert batch["label"].tolist() == [1, 2, 3]
    assert batch["present"]["text"].tolist() == [True, False, True]
    assert batch["present"]["image"].tolist() == [False, True, True]
    assert batch["present"]["audio"].tolist() == [True, False, True]
    assert batch["inputs"]["text"]["text"] == ["one", "", "three"]
    assert batch["inputs"]["image"]["image"].shape == (3, 1, 4, 4)
    assert batch["inputs"]["image"]["image"][0].abs().sum() == 0
    audio = batch["inputs"]["audio"]
    assert audio["audio"].shape == (3, 8) and audio["lengths"].tolist() == [5, 0, 8]
    assert audio["audio"][0, 5:].abs().sum() == 0


def test_collate_rejects_mixed_image_shapes_naming_samples():
    with pytest.raises(DataError, match="different shapes"):
        collate([sample(0, image=torch.ones(1, 4, 4), sid="a"), sample(1, image=torch.ones(1, 5, 5), sid="b")])


def test_tokenizer_uses_minilm_wordpiece_vocab():
    tokenizer = WordPieceTokenizer(max_length=8)
    assert tokenizer.vocab_size == 30522
    ids, mask = tokenizer(["Seven", "a much longer sentence than eight pieces allows here"])
    assert ids.shape == mask.shape == (2, 8)
    assert mask[0].sum() == 3  # [CLS] seven [SEP]
    assert ids[0, 1] == tokenizer.tokenizer.token_to_id("seven")


def test_byte_tokenizer_lowercases_pads_and_truncates():
    ids, mask = ByteTokenizer(max_length=4)(["Ab", "zwölf", ""])
    assert ids.shape == mask.shape == (3, 4)
    assert ids[0].tolist() == [ord("a") + 1, ord("b") + 1, 0, 0]
    assert ids[1].tolist() == [b + 1 for b in "zwölf".encode()[:4]]  # bytes, not characters
    assert mask.sum(1).tolist() == [2, 4, 0]
    assert int(ids.max()) < ByteTokenizer.vocab_size


def test_typos_and_case_noise_change_text_reproducibly():
    noisy = [add_typos("quattro", random.Random(s), 0.5) for s in range(20)]
    assert any(n != "quattro" for n in noisy)
    assert noisy == [add_typos("quattro", random.Random(s), 0.5) for s in range(20)]
    assert add_typos("x", random.Random(0), 0.0) == "x"
    assert {random_case("acht", random.Random(s)).lower() for s in range(10)} == {"acht"}


def test_dropped_words_keep_the_order_and_one_word_and_draw_nothing_at_rate_zero():
    text = "Displaced fracture of lateral end of left clavicle"
    views = [drop_words(text, random.Random(s), 0.5) for s in range(30)]
    words = text.split()
    for view in views:
        rest = iter(words)
        assert view and all(word in rest for word in view.split())  # a subsequence of the text's words
    assert len(set(views)) > 10
    assert drop_words("clavicle", random.Random(0), 0.99) == "clavicle"
    rng = random.Random(7)
    assert drop_words(text, rng, 0.0) == text and rng.random() == random.Random(7).random()


def test_load_audio_resamples_and_mixes_down(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1).astype(np.float32)
    soundfile.write(tmp_path / "a.wav", stereo, 8000)
    soundfile.write(tmp_path / "a.ogg", stereo[:, 0], 8000)
    for name in ("a.wav", "a.ogg"):
        wave = load_audio(tmp_path / name)
        assert wave.ndim == 1 and abs(wave.shape[0] - SAMPLE_RATE) < 200
        assert 0.5 < wave.abs().max() < 1.1


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00garbage", b"\x00" * 100])
def test_unreadable_audio_is_a_data_error(tmp_path, content):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.wav"):
        load_audio(path)


def test_load_image_and_garbage_image(tmp_path):
    Image.fromarray((np.random.rand(20, 10, 3) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    image = load_image(tmp_path / "x.png", (32, 32), 1)
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png: unreadable image"):
        load_image(tmp_path / "bad.png", (32, 32), 1)
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.png", (32, 32), 1)


def test_log_mel_normalises_per_utterance_ignoring_padding():
    front = LogMel(n_mels=40)
    wave = torch.randn(2, 16000) * torch.tensor([[1.0], [0.01]])
    wave[1, 8000:] = 0
    spec, mask = front(wave, torch.tensor([16000, 8000]))
    assert spec.shape[:2] == (2, 40) and mask.shape == (2, spec.shape[-1])
    # a clip's frames are real up to its length; the silence after every clip (the longest too) is not
    assert mask.sum(1).tolist() == front.frames(torch.tensor([16000, 8000])).tolist() and not mask[0, -1]
    assert spec[1][:, ~mask[1]].abs().sum() == 0  # padding is zero after normalisation
    # the same signal at 1/100 of the level gives (nearly) the same features
    loud, _ = front(wave[:1] * 100, torch.tensor([16000]))
    assert torch.allclose(loud, spec[:1], atol=1e-3)


def test_spec_augment_only_in_training():
    augment = SpecAugment()
    spec = torch.randn(4, 40, 100)
    augment.eval()
    assert torch.equal(augment(spec), spec)
    augment.train()
    assert (augment(spec) == 0).sum() > 0


def test_wave_augment_keeps_waveforms_valid():
    torch.manual_seed(0)
    augment = WaveAugment(p=1.0)
    wave = torch.sin(torch.arange(8000) / 5.0) * 0.5
    outs = [augment(wave) for _ in range(20)]
    assert all(o.ndim == 1 and torch.isfinite(o).all() and o.abs().max() <= 1.0 for o in outs)
    assert len({o.shape[0] for o in outs}) > 1  # speed and silence change the length
    noisy = add_noise(wave, snr_db=0.0)
    assert 0.5 < (noisy - wave).pow(2).mean() / wave.pow(2).mean() < 2.0


def test_image_augment_keeps_shape_and_range():
    torch.manual_seed(0)
    image = torch.rand(1, 32, 32)
    out = ImageAugment()(image)
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1 and not torch.equal(out, image)


def test_speech_is_synthesized_in_a_child_process_and_seeded():
    from plait.modalities.speech import Utterance, speak

    breathy = [Utterance("sieben", "de+whisperf", seed=1), Utterance("sieben", "de+whisperf", seed=2),
               Utterance("one", "en-US+Reed", seed=1), Utterance("zwei", "de+caleb", seed=3)]
    rate, first = speak(breathy)
    _, again = speak(breathy)
    assert rate == 22050 and all(w.dtype == np.float32 and w.size > rate // 10 for w in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=False)), \
        "the same request gives the same clips"
    _, alone = speak(breathy[2:3])
    assert np.array_equal(alone[0], first[2]), "a variant that calls rand() is seeded by its own utterance"
    assert not np.array_equal(first[0], first[1]), "the seed drives the whisper noise"
    with open("/proc/self/maps") as maps:  # the native library never entered this process
        assert "libespeak-ng" not in maps.read()


def test_unknown_voice_is_one_error_from_the_child():
    from plait.modalities.speech import Utterance, speak

    with pytest.raises(DataError, match="exit code 2"):
        speak([Utterance("one", "xx-nonexistent")])


def test_a_clips_audio_embedding_does_not_depend_on_the_clips_it_is_batched_with():
    from plait.plugins.audio_encoder import AudioEncoder, AudioEncoderOptions

    torch.manual_seed(0)
    encoder = AudioEncoder(AudioEncoderOptions(channels=[4, 8, 8], dim=16)).eval()
    clips = [torch.randn(n) * 0.1 for n in (3_000, 5_123, 16_000, 9_871)]

    def embed(batch):
        waves = torch.zeros(len(batch), max(len(c) for c in batch))
        for row, clip in enumerate(batch):
            waves[row, :len(clip)] = clip
        with torch.no_grad():
            return encoder({"audio": waves, "lengths": torch.tensor([len(c) for c in batch])})

    alone = torch.cat([embed([clip]) for clip in clips])
    together = embed(clips)  # each padded to the longest, and the longest with no padding at all
    assert torch.allclose(alone, together, atol=1e-6)
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the clips are told apart
