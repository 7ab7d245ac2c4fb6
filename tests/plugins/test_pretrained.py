"""Pretrained towers from local folders, as a user loads a downloaded one: each folder is made here with
``save_pretrained`` (or timm's files), loaded by plait's encoder, compared with the library's own forward,
written back by the encoder's ``plait_save_native`` and reloaded outside plait."""
import json
import re

import pytest
import timm
import torch
from conftest import bert_folder
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoTokenizer,
    ViTConfig,
    ViTModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from plait.core.errors import ConfigError
from plait.modalities.text import masked_mean
from plait.plugins.audio_encoder import HFAudioEncoder
from plait.plugins.image_encoder import HFImageEncoder, ImageEncoder, ImageEncoderOptions
from plait.plugins.text_encoder import TextEncoder, TextEncoderOptions

pytestmark = pytest.mark.timeout(120)
TEXTS = ["chest pain on exertion", "fracture of the left radius", "a"]


def hf_text_embeddings(folder, texts):
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
    return masked_mean(hidden, encoded["attention_mask"])


def test_a_text_model_folder_loads_and_exports_to_the_same_embeddings(tmp_path):
    folder = bert_folder(tmp_path / "bert")
    encoder = TextEncoder(TextEncoderOptions(pretrained=str(folder), dropout=0.0)).eval()
    with torch.no_grad():
        ours = encoder({"text": TEXTS})
    torch.testing.assert_close(ours, hf_text_embeddings(folder, TEXTS), atol=1e-6, rtol=0)
    out = tmp_path / "exported"
    out.mkdir()
    encoder.plait_save_native(out)
    torch.testing.assert_close(hf_text_embeddings(out, TEXTS), ours, atol=1e-6, rtol=0)


def test_a_timm_weights_file_loads_and_exports_in_timms_layout(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=10, in_chans=3).eval()
    save_file(source.state_dict(), str(tmp_path / "resnet10t.safetensors"))
    options = ImageEncoderOptions(timm="resnet10t", in_chans=3, timm_file=str(tmp_path / "resnet10t.safetensors"))
    encoder = ImageEncoder(options).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ours = encoder({"image": images})
        torch.testing.assert_close(ours, source.forward_head(source.forward_features(images), pre_logits=True))
    out = tmp_path / "exported"
    out.mkdir()
    encoder.plait_save_native(out)
    assert json.loads((out / "config.json").read_text())["architecture"] == "resnet10t"
    reloaded = timm.create_model("resnet10t", pretrained=True, num_classes=0, in_chans=3,
                                 pretrained_cfg_overlay={"file": str(out / "model.safetensors")}).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), ours)


def test_a_vision_transformer_folder_loads_and_exports(tmp_path):
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.6],
                                                                            "image_std": [0.2, 0.25, 0.3]}))
    encoder = HFImageEncoder(str(tmp_path / "vit")).eval()
    assert encoder.out_dim == 32 and len(encoder.plait_blocks()) == 1
    gray = torch.rand(2, 1, 28, 28)  # the digits' size and channels: resized, repeated into RGB, normalised
    with torch.no_grad():
        ours = encoder({"image": gray})
        pixels = torch.nn.functional.interpolate(gray.expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear")
        mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
        pixels = (pixels - mean) / std
        reference = AutoModel.from_pretrained(tmp_path / "vit").eval()
        torch.testing.assert_close(ours, reference(pixel_values=pixels).last_hidden_state[:, 0])
    encoder.plait_save_native(tmp_path / "exported")
    with torch.no_grad():
        again = AutoModel.from_pretrained(tmp_path / "exported").eval()(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(again, ours)


def waves_and_lengths():
    torch.manual_seed(1)
    waves = torch.randn(2, 8000) * 0.1
    lengths = torch.tensor([8000, 5000])
    waves[1, 5000:] = 0
    return waves, lengths


def test_a_wav2vec2_folder_runs_on_the_waveform_pooled_over_real_frames(tmp_path):
    torch.manual_seed(0)
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True)
    Wav2Vec2Model(config).save_pretrained(tmp_path / "w2v")
    encoder = HFAudioEncoder(str(tmp_path / "w2v")).eval()
    waves, lengths = waves_and_lengths()
    with torch.no_grad():
        ours = encoder({"audio": waves, "lengths": lengths})
        reference = AutoModel.from_pretrained(tmp_path / "w2v").eval()
        for row in range(2):  # each clip alone, unpadded, normalised as Wav2Vec2FeatureExtractor does
            clip = waves[row, : lengths[row]]
            clip = (clip - clip.mean()) / torch.sqrt(clip.var(unbiased=False) + 1e-7)
            alone = reference(input_values=clip[None]).last_hidden_state.mean(dim=1)[0]
            torch.testing.assert_close(ours[row], alone, atol=1e-5, rtol=1e-4)
    encoder.plait_save_native(tmp_path / "exported")
    assert AutoModel.from_pretrained(tmp_path / "exported").config.hidden_size == 32


def test_a_whisper_folder_runs_its_encoder_on_its_features(tmp_path):
    torch.manual_seed(0)
    config = WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, decoder_layers=1,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                           max_source_positions=50, vocab_size=100, max_target_positions=16, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperModel(config).save_pretrained(tmp_path / "whisper")
    WhisperFeatureExtractor(feature_size=80, chunk_length=1).save_pretrained(tmp_path / "whisper")
    encoder = HFAudioEncoder(str(tmp_path / "whisper")).eval()
    assert encoder.out_dim == 32
    waves, lengths = waves_and_lengths()
    with torch.no_grad():
        ours = encoder({"audio": waves, "lengths": lengths})
        features = WhisperFeatureExtractor.from_pretrained(tmp_path / "whisper")(
            [waves[0].numpy()], sampling_rate=16000, return_tensors="pt").input_features
        hidden = WhisperModel.from_pretrained(tmp_path / "whisper").get_encoder().eval()(features).last_hidden_state
    assert hidden.shape[1] == 50  # the folder's 1 s window; the clip fills half of it: 25 frames are audio
    torch.testing.assert_close(ours[0], hidden[0, :25].mean(dim=0), atol=1e-5, rtol=1e-4)


def test_a_folder_that_does_not_fit_is_one_line_naming_the_file(tmp_path):
    def refused(folder) -> str:
        with pytest.raises(ConfigError) as err:
            TextEncoder(TextEncoderOptions(pretrained=str(folder)))
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "model folder" in refused(tmp_path / "nowhere") and "not found" in refused(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refused(empty).startswith(f"{empty / 'config.json'}: missing")
    folder = bert_folder(tmp_path / "bert")
    (folder / "model.safetensors").rename(tmp_path / "aside.safetensors")
    assert refused(folder).startswith(f"{folder}: no weights beside config.json")
    (tmp_path / "aside.safetensors").rename(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    message = refused(folder)
    assert message.startswith(f"{folder / 'model.safetensors'}: 'encoder.layer.0.")
    assert re.search(r"' has shape \[(64|64, 32|32, 64)\] but .*config.json makes it \[", message), message
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    assert refused(folder).startswith(f"{folder / 'config.json'}: transformers cannot read this config")
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(tmp_path / "resnet18.safetensors"))
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'resnet18.safetensors'}: does not fit timm's 'resnet10t'"):
        ImageEncoder(ImageEncoderOptions(timm="resnet10t", in_chans=3,
                                         timm_file=str(tmp_path / "resnet18.safetensors")))
