"""Built-in plugins one by one: the manifest, the encoders, fusion and its losses."""
import math

import pytest
import torch

from plait.plugins.fusion import MAX_LOGIT_SCALE, Fusion, FusionOptions, contrastive_loss, info_nce
from plait.plugins.manifest import Manifest, ManifestOptions
from plait.plugins.text_encoder import TextEncoder, TextEncoderOptions


def test_manifest_reads_jsonl_with_text_files_and_empty_modalities(tmp_path):
    (tmp_path / "note.txt").write_text("seven\n")
    (tmp_path / "m.jsonl").write_text('{"text": "note.txt", "label": "7"}\n\n{"text": "three", "label": 3}\n')
    data = Manifest(tmp_path / "m.jsonl", ManifestOptions())
    assert data.classes == ["3", "7"] and data.modalities == ("text",)
    assert data[0]["text"] == "seven" and data[0]["label"] == 1 and data[0]["audio"] is None
    assert data[1]["text"] == "three" and data[1]["label"] == 0


def test_manifest_rejects_unknown_columns_with_a_suggestion(tmp_path):
    from plait.core.errors import DataError

    (tmp_path / "m.csv").write_text("txt,label\nseven,7\n")
    with pytest.raises(DataError, match="unknown column 'txt'.*did you mean 'text'"):
        Manifest(tmp_path / "m.csv", ManifestOptions())


def test_text_encoder_loads_minilm_offline():
    encoder = TextEncoder(TextEncoderOptions(pretrained="minilm"))
    assert encoder.out_dim == 384
    with torch.no_grad():
        vectors = encoder({"text": ["seven", "sieben", "a cat"]})
    assert vectors.shape == (3, 384)
    same = torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=0)
    other = torch.nn.functional.cosine_similarity(vectors[0], vectors[2], dim=0)
    assert same > other  # real pretrained weights: "seven" is closer to "sieben" than to "a cat"


@pytest.mark.parametrize("kind", ["attention", "concat"])
def test_fusion_uses_a_learned_embedding_for_missing_modalities(kind):
    torch.manual_seed(0)
    fusion = Fusion(FusionOptions(kind=kind, dim=16, heads=2, modality_dropout=0.0), {"text": 8, "audio": 4})
    fusion.eval()
    embeddings = {"text": torch.randn(3, 8), "audio": torch.randn(3, 4)}
    present = {"text": torch.tensor([True, True, False]), "audio": torch.tensor([True, False, True])}
    out = fusion(embeddings, present)["fused"]
    assert out.shape == (3, 16)
    # what an absent modality's encoder produced must not matter
    changed = {"text": embeddings["text"].clone(), "audio": embeddings["audio"].clone()}
    changed["audio"][1] += 100.0
    assert torch.allclose(fusion(changed, present)["fused"][1], out[1])
    changed["audio"][0] += 100.0  # ...and a present one does
    assert not torch.allclose(fusion(changed, present)["fused"][0], out[0])


def test_modality_dropout_never_hides_all_of_a_sample():
    torch.manual_seed(0)
    fusion = Fusion(FusionOptions(dim=8, heads=2, modality_dropout=0.9), {"text": 4, "image": 4, "audio": 4})
    present = {m: torch.rand(500) < 0.7 for m in ("text", "image", "audio")}
    present["text"][~(present["image"] | present["audio"])] = True
    kept = fusion._drop_modalities(present)
    stacked = torch.stack(list(kept.values()), dim=1)
    assert stacked.any(dim=1).all()
    assert all((kept[m] <= present[m]).all() for m in kept)  # only hides, never invents
    assert stacked.sum() < torch.stack(list(present.values()), dim=1).sum() * 0.5


def test_info_nce_prefers_aligned_pairs_and_the_temperature_is_clamped():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    scale = torch.tensor(10.0)
    assert info_nce(a, a, scale) < info_nce(a, torch.randn(8, 16), scale)
    fusion = Fusion(FusionOptions(dim=8, heads=2), {"text": 4, "audio": 4})
    with torch.no_grad():
        fusion.logit_scale.fill_(50.0)
    out = fusion({"text": torch.randn(4, 4), "audio": torch.randn(4, 4)},
                 {"text": torch.ones(4, dtype=torch.bool), "audio": torch.ones(4, dtype=torch.bool)})
    assert math.isclose(out["logit_scale"].item(), math.exp(MAX_LOGIT_SCALE), rel_tol=1e-5)
    assert contrastive_loss(out).ndim == 0
    out["present"]["audio"][:] = False  # no pair: no term
    assert contrastive_loss(out) is None
