"""``plait preprocess NAME --ray``: the medical de-identifier over 5,000 lines (some of them bad) on a real local
Ray cluster, in parts whose concatenation is the one-process output byte for byte; Parquet and folder input;
bad input."""
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from plait.launch.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAMES = ["Ada Byron", "Omar Haddad", "Lena Kowalski", "Raj Menon", "John Whitaker", "Maria Gonzalez"]
FINDINGS = ["has HTN", "denies chest pain", "has a history of type 2 diabetes", "may have COPD"]
BAD = {7: b"not json", 13: b"", 99: b'{"text": "bad \xff byte, Dr. Lee"}', 1234: b"[1, 2]", 4999: b'{"no": "text"}'}


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # "local": a new instance even where an earlier test left a cluster address in /tmp/ray.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield
    ray.shutdown()


def clinical_lines(count: int) -> list[bytes]:
    lines = []
    for i in range(count):
        text = (f"Mr. {NAMES[i % len(NAMES)]} (MRN {4471200 + i}) {FINDINGS[i % len(FINDINGS)]}; "
                f"seen on 03/{i % 28 + 1:02d}/2021.")
        lines.append(BAD.get(i, json.dumps({"id": i, "text": text}).encode()))
    return lines


def test_ray_parts_concatenate_to_the_one_process_output(tmp_path, capsys):
    source = tmp_path / "notes.jsonl"
    source.write_bytes(b"\n".join(clinical_lines(5_000)) + b"\n")
    one, parts = tmp_path / "one.jsonl", tmp_path / "parts"
    assert main(["preprocess", "medical", "--input", str(source), "--output", str(one)]) == 1
    alone = capsys.readouterr().err
    assert main(["preprocess", "medical", "--input", str(source), "--output", str(parts), "--ray",
                 "--rows-per-part", "700"]) == 1
    on_ray = capsys.readouterr().err
    files = sorted(parts.iterdir())
    assert [f.name for f in files] == [f"part-{i:05d}.jsonl" for i in range(8)]  # 5,000 rows, 700 a part
    assert b"".join(f.read_bytes() for f in files) == one.read_bytes()
    records = [json.loads(line) for line in one.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 5_000
    assert [r["line"] for r in records if "error" in r] == [8, 14, 1235, 5000]  # 1-based; line 100 is repaired
    assert all("Byron" not in r["text"] and "4471200" not in r["text"] for r in records if "text" in r)
    for said in (alone, on_ray):
        assert "1 not UTF-8" in said and "4 line(s) could not be used (lines 8, 14, 1235, 5000;" in said
        assert "5000 line(s)" in said and "rows/s" in said


def test_parquet_and_folder_input_keep_the_order_and_name_the_file(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    lines = clinical_lines(300)
    (folder / "a.jsonl").write_bytes(b"\n".join(lines[:150]))  # no final newline: the last line still counts
    rows = [json.loads(line) for line in lines[150:] if line.startswith(b"{") and b"\xff" not in line]
    pq.write_table(pa.Table.from_pylist(rows), folder / "b.parquet", row_group_size=64)
    one, parts = tmp_path / "one.jsonl", tmp_path / "parts"
    assert main(["preprocess", "medical", "--input", str(folder), "--output", str(one)]) == 1
    assert main(["preprocess", "medical", "--input", str(folder), "--output", str(parts), "--ray", "--cpus", "2",
                 "--rows-per-part", "50"]) == 1
    assert b"".join(f.read_bytes() for f in sorted(parts.iterdir())) == one.read_bytes()
    records = [json.loads(line) for line in one.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 150 + len(rows)
    assert next(r for r in records if "error" in r) == {"file": "a.jsonl", "line": 8, "error": records[7]["error"]}
    assert [r["id"] for r in records[150:]] == [r["id"] for r in rows]
    assert "lines a.jsonl:8, a.jsonl:14" in capsys.readouterr().err


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "x"}\n')
    parts = tmp_path / "parts"
    parts.mkdir()
    assert main(["preprocess", "medical", "--input", str(source), "--output", str(parts), "--ray"]) == 2
    assert "parts exists; remove it" in capsys.readouterr().err
    assert main(["preprocess", "medical", "--input", str(source), "--ray"]) == 2
    assert "give --output FOLDER" in capsys.readouterr().err
    pq.write_table(pa.Table.from_pylist([{"note": "x"}]), tmp_path / "no_text.parquet")
    assert main(["preprocess", "medical", "--input", str(tmp_path / "no_text.parquet")]) == 2
    assert "no_text.parquet: no 'text' column (columns: note)" in capsys.readouterr().err
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    assert main(["preprocess", "medical", "--input", str(tmp_path / "broken.parquet")]) == 2
    assert "broken.parquet: not a readable Parquet file" in capsys.readouterr().err
    assert main(["preprocess", "medical", "--input", str(source), "--output", str(tmp_path / "p2"), "--ray",
                 "--cpus", "64"]) == 2
    assert "more than the cluster's 2 CPU(s)" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists() and not list(tmp_path.glob(".p2*"))
