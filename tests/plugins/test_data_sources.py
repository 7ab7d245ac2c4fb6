"""Data sources: Parquet manifests, WebDataset-style tar shards, and mixtures of sources drawn by weight."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import yaml
from PIL import Image

from plait.core.errors import ConfigError, DataError
from plait.plugins.manifest import Manifest, ManifestOptions


def png(colour: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (8, 8), colour).save(out, format="PNG")
    return out.getvalue()


def wav(seconds: float = 0.2) -> bytes:
    out = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(out, 0.5 * np.sin(2 * np.pi * 440 * t).astype("float32"), 16000, format="WAV")
    return out.getvalue()


def write_shard(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as archive:
        for key, members in samples.items():
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def test_tar_shards_read_their_members_by_key_and_decode_from_the_shard(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "a-000.tar", {"s0": {"png": png(0), "cls": b"dark", "txt": b"a dark square"},
                                       "s1": {"png": png(255), "cls": b"light"}})
    write_shard(shards / "a-001.tar", {"s2": {"wav": wav(), "cls": b"dark"}})
    data = Manifest(shards, ManifestOptions(image_size=4))
    assert len(data) == 3 and data.classes == ["dark", "light"] and set(data.modalities) == {"text", "image", "audio"}
    first, second, third = data[0], data[1], data[2]
    assert first["id"] == "s0" and first["text"] == "a dark square" and float(first["image"].max()) == 0.0
    assert second["label"] == 1 and float(second["image"].min()) == 1.0 and second["text"] is None
    assert third["image"] is None and third["audio"].shape[-1] > 1000  # read back from the second shard


def test_a_shard_that_is_not_a_tar_is_named(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "a-000.tar", {"s0": {"png": png(0), "cls": b"dark"}})
    (shards / "a-001.tar").write_bytes(b"this is no tar archive, only some text that says so" * 20)
    with pytest.raises(DataError, match=r"a-001\.tar: not a readable tar shard") as raised:
        Manifest(shards, ManifestOptions())
    assert "\n" not in str(raised.value)


def test_parquet_manifests_read_like_csv_and_a_file_without_the_columns_is_named(tmp_path):
    (tmp_path / "x.png").write_bytes(png(128))
    pq.write_table(pa.table({"image": ["x.png", None], "text": [None, "seven"], "label": ["a", "b"]}),
                   tmp_path / "m.parquet")
    data = Manifest(tmp_path / "m.parquet", ManifestOptions(image_size=4))
    assert data.classes == ["a", "b"] and data[0]["image"].shape == (1, 4, 4) and data[1]["text"] == "seven"
    pq.write_table(pa.table({"text": ["seven"]}), tmp_path / "nolabel.parquet")
    with pytest.raises(DataError, match=r"nolabel\.parquet: the Parquet file has no a 'label' column \(its "
                                         r"columns: text\)"):
        Manifest(tmp_path / "nolabel.parquet", ManifestOptions())


def mixture_config(tmp_path, sources, plugins=None, **run):
    config = {"run": {"name": "mix", "runs_dir": str(tmp_path / "runs"), "epochs": 1, "batch_size": 500,
                      "eval_batch_size": 500, "log_every": 5, **run},
              "data": {"sources": sources},
              "plugins": plugins or {"manifest": {"image_size": 8}, "text_encoder": {"hidden": 16, "layers": 1,
                                                                                     "heads": 2},
                                     "image_encoder": {"timm": "resnet10t", "timm_kwargs": {"channels": [4, 4, 4, 4]}},
                                     "fusion": {"dim": 16, "heads": 2}}}
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.timeout(600)
def test_a_mixture_draws_its_sources_by_weight_over_an_epoch_of_10000_rows(tmp_path):
    from sample_log import trained

    from plait.core.loop import fit
    from plait.core.runs import load

    # two sources with different modalities: 6,000 texts and 4,000 images, mixed 0.7 / 0.3
    (tmp_path / "text.csv").write_text("text,label\n" + "".join(f"word {i % 7},{i % 2}\n" for i in range(6000)))
    for colour in range(4):
        (tmp_path / f"{colour}.png").write_bytes(png(colour * 80))
    (tmp_path / "images.csv").write_text("image,label\n" + "".join(f"{i % 4}.png,{i % 2}\n" for i in range(4000)))
    log = tmp_path / "samples.jsonl"
    path = mixture_config(tmp_path, [{"manifest": str(tmp_path / "text.csv"), "weight": 0.7},
                                     {"manifest": str(tmp_path / "images.csv"), "weight": 0.3, "name": "images"}])
    config = yaml.safe_load(path.read_text())
    config["plugins"]["sample_log"] = {"path": str(log)}
    path.write_text(yaml.safe_dump(config))
    state = fit(*load(path))
    assert set(state.modalities) == {"text", "image"}
    ids = trained(log, 1)[0]
    assert len(ids) == 10_000
    text_share = sum(i < 6000 for i in ids) / len(ids)
    assert abs(text_share - 0.7) <= 0.03 and len({i for i in ids if i >= 6000}) == 3000  # no image twice
    rows = [json.loads(line) for line in (tmp_path / "runs" / "mix" / "metrics.jsonl").read_text().splitlines()]
    (shares,) = [row for row in rows if row["split"] == "sources"]
    assert shares["samples"] == {f"manifest:{tmp_path / 'text.csv'}": 7000, "images": 3000}
    assert shares["shares"]["images"] == pytest.approx(0.3)


@pytest.mark.parametrize(("weights", "expected"), [
    ([0, 0], "data.sources: .*weights sum to 0; they must sum to a positive number"),
    ([-1, 2], r"data.sources.0.weight: .*a source's weight is 0 or more"),
])
def test_weights_that_do_not_sum_to_a_positive_number_are_refused(tmp_path, weights, expected):
    from plait.core.runs import load

    (tmp_path / "a.csv").write_text("text,label\nseven,7\n")
    path = mixture_config(tmp_path, [{"manifest": "a.csv", "weight": w} for w in weights[:1]]
                          + [{"manifest": "a.csv", "weight": weights[1], "name": "again"}])
    with pytest.raises(ConfigError, match=expected) as raised:
        load(path)
    assert "\n" not in str(raised.value)


def test_a_source_with_no_rows_is_named(tmp_path):
    from plait.core.data import build_dataset
    from plait.core.runs import load

    (tmp_path / "a.csv").write_text("text,label\nseven,7\n")
    (tmp_path / "empty.csv").write_text("text,label\n")
    path = mixture_config(tmp_path, [{"manifest": str(tmp_path / "a.csv")}, {"manifest": str(tmp_path / "empty.csv")}])
    config, plugins = load(path)
    with pytest.raises(DataError, match=r"empty\.csv: the manifest has no rows"):
        build_dataset(plugins, config, "train")


def test_a_source_whose_plugin_is_not_loaded_is_named(tmp_path):
    from plait.core.runs import load

    path = mixture_config(tmp_path, [{"manifests": "a.csv"}])
    with pytest.raises(ConfigError, match=r"data.sources.0: plugin 'manifests' is not under plugins:.*'manifest'"):
        load(path)
