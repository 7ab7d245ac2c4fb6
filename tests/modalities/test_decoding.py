"""Every common image and audio file decodes to what it holds, or fails with one error naming
the file (and, through a manifest, the row). Each file is made here with Pillow or soundfile,
and each test compares pixels or samples with what was written."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from plait.core.errors import DataError
from plait.modalities.audio import SAMPLE_RATE, load_audio
from plait.modalities.batch import collate
from plait.modalities.image import load_image, match_channels
from plait.plugins.audio_encoder import AudioEncoder, AudioEncoderOptions
from plait.plugins.image_encoder import ImageEncoder, ImageEncoderOptions
from plait.plugins.manifest import Manifest, ManifestOptions


def pixels(tensor: torch.Tensor) -> np.ndarray:
    """A loaded image [C, H, W] in [0, 1] as uint8 [H, W, C], for comparing with what was written."""
    return np.rint(tensor.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def digit_mask(size: int = 16) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[3:13, 5:7] = True  # a "1"
    mask[3:5, 3:7] = True
    return mask


# ---------------------------------------------------------------------------- images
def test_transparent_grayscale_png_is_composited_over_white(tmp_path):
    mask = digit_mask()
    alpha = np.where(mask, 255, 0).astype(np.uint8)
    alpha[0, 0] = 128  # one half-transparent black pixel: halfway to the background
    Image.fromarray(np.stack([np.zeros_like(alpha), alpha], axis=-1), mode="LA").save(tmp_path / "la.png")
    loaded = pixels(load_image(tmp_path / "la.png", (16, 16), 1))[..., 0]
    assert (loaded[mask] == 0).all(), "the digit stays black"
    assert (loaded[~mask & (alpha == 0)] == 255).all(), "transparency becomes the white background"
    assert abs(int(loaded[0, 0]) - 127) <= 1
    on_black = pixels(load_image(tmp_path / "la.png", (16, 16), 1, background=(0, 0, 0)))[..., 0]
    assert (on_black == 0).all()


def test_rgba_png_over_a_chosen_background(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4] = (200, 10, 10, 255)  # opaque red top half, transparent bottom half
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    loaded = pixels(load_image(tmp_path / "rgba.png", (8, 8), 3, background=(0, 0, 255)))
    assert (loaded[:4] == (200, 10, 10)).all() and (loaded[4:] == (0, 0, 255)).all()


def test_palette_png_with_a_transparent_index(tmp_path):
    indices = np.where(digit_mask(), 1, 0).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 255, 0, 20, 20, 20] + [0] * 762)  # 0: green (transparent), 1: dark gray
    image.save(tmp_path / "p.png", transparency=0)
    loaded = pixels(load_image(tmp_path / "p.png", (16, 16), 3))
    assert (loaded[digit_mask()] == (20, 20, 20)).all()
    assert (loaded[~digit_mask()] == (255, 255, 255)).all(), "the transparent index shows the background"


@pytest.mark.parametrize(("mode", "key"), [("L", 7), ("RGB", (1, 2, 3))])
def test_colour_key_transparency_in_png(tmp_path, mode, key):
    values = np.full((4, 4) if mode == "L" else (4, 4, 3), 10, dtype=np.uint8)
    values[0, 0] = key
    Image.fromarray(values, mode=mode).save(tmp_path / "key.png", transparency=key)
    loaded = pixels(load_image(tmp_path / "key.png", (4, 4), 3))
    assert (loaded[0, 0] == 255).all() and (loaded[1:] == 10).all()


def test_16_bit_png_is_scaled_from_its_own_range(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    loaded = load_image(tmp_path / "deep.png", (16, 16), 1)[0].numpy()
    assert np.abs(loaded - ramp / 65535).max() <= 1 / 255, "not clipped to white above 255"


def test_cmyk_jpeg_loads_as_its_rgb_colours(tmp_path):
    cmyk = np.zeros((16, 16, 4), dtype=np.uint8)
    cmyk[:8] = (0, 255, 255, 0)  # red
    cmyk[8:] = (255, 0, 0, 0)  # cyan
    original = Image.fromarray(cmyk, mode="CMYK")
    original.save(tmp_path / "cmyk.jpg", quality=100)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    loaded = pixels(load_image(tmp_path / "cmyk.jpg", (16, 16), 3)).astype(int)
    expected = np.asarray(original.convert("RGB")).astype(int)
    assert np.abs(loaded - expected).max() <= 8  # JPEG's rounding
    assert loaded[2, 2, 0] > 240 and loaded[2, 2, 1] < 16 and loaded[12, 12, 0] < 16


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((4, 8), dtype=np.uint8)
    array[0, 0] = 255  # one marked corner, to see where it goes
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: the camera was turned; show rotated 90 degrees clockwise
    image.save(tmp_path / "turned.png", exif=exif)
    loaded = pixels(load_image(tmp_path / "turned.png", (8, 4), 1))[..., 0]
    assert loaded.shape == (8, 4)
    np.testing.assert_array_equal(loaded, np.rot90(array, k=-1))


def test_animated_gif_loads_its_first_frame(tmp_path):
    first = Image.fromarray(np.where(digit_mask(), 255, 0).astype(np.uint8)).convert("P")
    second = Image.fromarray(np.full((16, 16), 128, dtype=np.uint8)).convert("P")
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    loaded = pixels(load_image(tmp_path / "anim.gif", (16, 16), 1))[..., 0]
    np.testing.assert_array_equal(loaded, np.where(digit_mask(), 255, 0))


def test_rgb_file_as_grayscale_or_rgb_and_the_encoder_takes_either(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    colour = load_image(tmp_path / "rgb.png", (8, 8), 3)
    gray = load_image(tmp_path / "rgb.png", (8, 8), 1)
    np.testing.assert_array_equal(pixels(colour), rgb)
    luma = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
    assert abs(float(gray[0, 0, 0]) * 255 - luma) <= 1
    batch = colour.unsqueeze(0)
    assert torch.allclose(match_channels(batch, 1), gray.unsqueeze(0), atol=1 / 255)
    assert torch.equal(match_channels(gray.unsqueeze(0), 3)[0, 2], gray[0])
    for in_chans, image in ((1, colour), (3, gray)):
        encoder = ImageEncoder(ImageEncoderOptions(timm="resnet10t", in_chans=in_chans)).eval()
        assert encoder({"image": image.unsqueeze(0)}).shape == (1, encoder.out_dim)
    with pytest.raises(DataError, match="1 .grayscale. or 3 .RGB."):
        load_image(tmp_path / "rgb.png", (8, 8), 2)


def test_manifest_image_background_option_and_a_bad_colour(tmp_path):
    Image.fromarray(np.zeros((4, 4, 2), dtype=np.uint8), mode="LA").save(tmp_path / "clear.png")
    (tmp_path / "m.csv").write_text("image,label\nclear.png,a\n")
    options = ManifestOptions(train=str(tmp_path / "m.csv"), image_size=4, image_background="#808080")
    assert torch.allclose(Manifest(tmp_path / "m.csv", options)[0]["image"], torch.full((1, 4, 4), 128 / 255))
    with pytest.raises(ValueError, match="not a colour: 'grey-ish'"):
        ManifestOptions(image_background="grey-ish")


# ----------------------------------------------------------------------------- audio
def sine(seconds: float, rate: int = SAMPLE_RATE, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


@pytest.mark.parametrize(("subtype", "tolerance"), [("PCM_U8", 1 / 100), ("PCM_16", 1e-4), ("PCM_24", 1e-6),
                                                     ("PCM_32", 1e-6), ("FLOAT", 0.0), ("DOUBLE", 1e-7)])
def test_wav_sample_formats_load_as_the_samples_written(tmp_path, subtype, tolerance):
    wave = sine(0.5)
    soundfile.write(tmp_path / "a.wav", wave, SAMPLE_RATE, subtype=subtype)
    assert soundfile.info(str(tmp_path / "a.wav")).subtype == subtype
    loaded = load_audio(tmp_path / "a.wav").numpy()
    assert loaded.shape == wave.shape  # a constant tone: no silence to trim
    assert np.abs(loaded - wave).max() <= tolerance


def test_multichannel_audio_is_the_mean_of_its_channels(tmp_path):
    channels = np.stack([sine(0.5, freq=f, amplitude=0.2) for f in (300, 500, 700, 900)], axis=1)
    soundfile.write(tmp_path / "quad.wav", channels, SAMPLE_RATE, subtype="FLOAT")
    loaded = load_audio(tmp_path / "quad.wav").numpy()
    np.testing.assert_allclose(loaded, channels.mean(axis=1), atol=1e-6)


def test_a_clip_shorter_than_one_frame_loads_and_encodes(tmp_path):
    soundfile.write(tmp_path / "blip.wav", sine(0.001), SAMPLE_RATE, subtype="FLOAT")  # 16 samples
    blip = load_audio(tmp_path / "blip.wav")
    assert blip.shape == (16,)
    batch = collate([{"id": "x", "label": 0, "audio": blip}, {"id": "y", "label": 1, "audio": blip[:1]}])
    encoder = AudioEncoder(AudioEncoderOptions()).eval()
    features = encoder(batch["inputs"]["audio"])
    assert features.shape == (2, encoder.out_dim) and torch.isfinite(features).all()


def test_a_long_file_loads_whole_and_one_over_the_limit_is_refused(tmp_path):
    soundfile.write(tmp_path / "long.wav", sine(90.0), SAMPLE_RATE)
    assert load_audio(tmp_path / "long.wav").shape == (90 * SAMPLE_RATE,)
    with pytest.raises(DataError, match=r"long.wav: audio is 90.0 s long, over the 60 s allowed"):
        load_audio(tmp_path / "long.wav", max_seconds=60)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_samples_are_one_error_naming_file_and_row(tmp_path, bad):
    wave = sine(0.5)
    wave[4000] = bad
    soundfile.write(tmp_path / "bad.wav", wave, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(DataError, match=r"bad.wav: audio holds NaN or infinite samples \(the first at 0.250 s\)"):
        load_audio(tmp_path / "bad.wav")
    (tmp_path / "m.csv").write_text("audio,label\nbad.wav,a\n")
    manifest = Manifest(tmp_path / "m.csv", ManifestOptions(train=str(tmp_path / "m.csv")))
    with pytest.raises(DataError, match=r"m.csv:2: .*bad.wav: audio holds NaN"):
        manifest[0]


def test_manifest_names_the_row_of_an_audio_file_over_its_limit(tmp_path):
    soundfile.write(tmp_path / "speech.wav", sine(3.0), SAMPLE_RATE)
    (tmp_path / "m.csv").write_text("audio,label\nspeech.wav,a\n")
    options = ManifestOptions(train=str(tmp_path / "m.csv"), audio_max_seconds=2)
    with pytest.raises(DataError, match=r"m.csv:2: .*speech.wav: audio is 3.0 s long, over the 2 s allowed "
                                        r"\(plugins.manifest.audio_max_seconds\)"):
        Manifest(tmp_path / "m.csv", options)[0]
