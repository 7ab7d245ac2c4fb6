"""The domain plugins: medical de-identification and conditions, finance numbers, legal retrieval, the
`plait preprocess` command, and training runs with a domain plugin in the YAML plugin set."""
from __future__ import annotations

import json
import logging
import pickle
import re
from datetime import date
from pathlib import Path

import pytest
import torch
import yaml

from plait.launch.cli import main
from plait.plugins import finance, legal_rag, medical

NOTE = ("Patient John Whitaker (MRN 00482913) was seen on 03/14/2021 by Dr. Anil Patel. Call (617) 555-0123 or "
        "fax 617-555-0199, e-mail jw@example.com. He lives at 42 Maple Avenue, Springfield, IL 62704; portal "
        "https://portal.example.org/r/55 from 10.24.8.112. The 92-year-old has HTN and T2DM, denies chest pain, "
        "possible pneumonia, history of MI in 2015. John's daughter called on 03/20/2021.")
PHI = {"John Whitaker": "NAME", "00482913": "MRN", "03/14/2021": "DATE", "Anil Patel": "NAME",
       "(617) 555-0123": "PHONE", "617-555-0199": "FAX", "jw@example.com": "EMAIL", "42 Maple Avenue": "ADDRESS",
       "Springfield": "ADDRESS", "62704": "ZIP", "https://portal.example.org/r/55": "URL", "10.24.8.112": "IP",
       "92": "AGE", "John": "NAME", "03/20/2021": "DATE"}


# --------------------------------------------------------------------------------------------------- medical

def test_every_kind_of_phi_is_replaced_and_its_original_offsets_kept():
    out = medical.MedicalPreprocess(medical.MedicalOptions())({"text": NOTE, "id": "n1"})
    found = {NOTE[p["start"]:p["end"]]: p["type"] for p in out["phi"]}
    assert found == PHI
    for original in PHI:
        if original not in ("92", "John"):
            assert original not in out["text"]
    assert "[NAME]" in out["text"] and "[FAX]" in out["text"] and out["id"] == "n1"


def test_surrogates_are_consistent_within_a_text_and_dates_keep_their_spacing():
    text = "Mr. John Smith saw Dr. Lee on 03/14/2021. John Smith returned on 03/20/2021; Smith is better."
    new, spans = medical.deidentify(text, "surrogate")
    assert not re.search(r"\b(John|Smith|Lee)\b", new)
    first, again, alone = re.findall(r"Mr\. (\w+ \w+) saw|\. (\w+ \w+) returned|; (\w+) is better", new)
    assert first[0] == again[1] and alone[2] == first[0].split()[1]  # "Smith" alone is what "John Smith" became
    first, second = [s for s in spans if s.type == "DATE"]
    shifted = medical.phi.Surrogates(text)
    a, b = shifted(text[first.start:first.end], "DATE"), shifted(text[second.start:second.end], "DATE")
    as_date = lambda s: date(int(s[6:]), int(s[:2]), int(s[3:5]))  # noqa: E731
    assert (as_date(b) - as_date(a)).days == 6 and a != "03/14/2021"
    assert shifted("John Smith", "NAME") == shifted("John Smith", "NAME")  # same original, same surrogate
    assert medical.deidentify(text, "surrogate")[0] == new  # and the same for the same text


@pytest.mark.parametrize("text, name", [
    ("Chioma Okonkwo-Eze tolerated the infusion.", "Chioma Okonkwo-Eze"),  # no title, not a census name
    ("Labs for Łukasz Wiśniewski were sent.", "Łukasz Wiśniewski"),
    ("Her nephew, Kwabena Mensah, drove her in.", "Kwabena Mensah"),
    ("Seen with Maarten van den Broek today.", "Maarten van den Broek"),  # particles, known words
    ("Mr. Nguyễn Văn Thắng declined the scan.", "Nguyễn Văn Thắng"),
    ("Daughter Светлана Кузнецова signed the consent.", "Светлана Кузнецова"),
    ("Contact Ο Γιώργος Παπαδόπουλος if worse.", "Γιώργος Παπαδόπουλος"),
    ("The patient 陈静 was admitted overnight.", "陈静"),
    ("Per Fatima Al-Sayed, the fall happened at 6 am.", "Fatima Al-Sayed"),
    ("Prof. Okafor II read the slides.", "Okafor II"),
])
def test_names_from_many_countries_are_found_without_a_name_list(text, name):
    start = text.index(name)
    spans = [s for s in medical.find_phi(text) if s.type == "NAME"]
    assert any(s.start <= start and start + len(name) <= s.end for s in spans), (text, spans)
    assert name not in medical.deidentify(text)[0]


@pytest.mark.parametrize("text", [
    "Tinel sign was positive over the left wrist.",
    "She has Parkinson's disease and takes Sinemet with Lisinopril.",
    "Started a β-blocker; BiPAP at night, HbA1c 7.2%.",
    "Findings consistent with Hashimoto thyroiditis and a Baker's cyst.",
    "Pain over the Achilles tendon and the medial malleolus.",
    "Continue Eliquis 5 mg and Jardiance 10 mg daily.",
])
def test_eponyms_drugs_and_anatomy_are_no_names(text):
    assert [text[s.start:s.end] for s in medical.find_phi(text) if s.type == "NAME"] == []


@pytest.mark.parametrize("text, phi, phi_type", [
    ("She moved to Rua das Flores, 128 last year.", "Rua das Flores, 128", "ADDRESS"),
    ("Lives at Lindenstraße 12 with her son.", "Lindenstraße 12", "ADDRESS"),
    ("Address: 7 Kestrel Close, Leeds.", "7 Kestrel Close", "ADDRESS"),
    ("Address: via Garibaldi 3, Torino.", "via Garibaldi 3", "ADDRESS"),
    ("Address: ул. Ленина, д. 5 кв. 12.", "ул. Ленина, д. 5 кв. 12", "ADDRESS"),
    ("Call her mobile on 06 12 34 56 78.", "06 12 34 56 78", "PHONE"),
    ("Reached the daughter at +49 30 1234567.", "+49 30 1234567", "PHONE"),
])
def test_addresses_and_phone_numbers_of_other_countries_are_found(text, phi, phi_type):
    start = text.index(phi)
    assert any(s.start <= start and start + len(phi) <= s.end and s.type == phi_type
               for s in medical.find_phi(text)), medical.find_phi(text)


@pytest.mark.parametrize("text", ["Keep the drain in place 3 more days.", "Monitoring 24 hours a day.",
                                  "BP 128 76 72 18 on arrival.", "Given via PICC line 2 days ago."])
def test_clinical_numbers_and_words_are_no_address_or_phone(text):
    assert [s for s in medical.find_phi(text) if s.type in ("ADDRESS", "PHONE")] == []


def test_conditions_get_codes_and_their_context():
    text = ("History of MI in 2015. She has HTN and T2DM. She denies chest pain. Possible pneumonia. "
            "Sepsis was ruled out.")
    entities = {e["text"]: e for e in medical.find_conditions(text)}
    assert entities["MI"]["code"][:3] == "I21" and entities["MI"]["historical"]
    assert entities["HTN"]["code"] == "I10" and not any(entities["HTN"][f] for f in ("negated", "uncertain",
                                                                                  "historical"))
    assert entities["T2DM"]["code"] == "E11.9"
    assert entities["chest pain"]["negated"]
    assert entities["pneumonia"]["uncertain"] and not entities["pneumonia"]["negated"]
    assert entities["Sepsis"]["negated"]


@pytest.mark.parametrize("text, mention, code, specificity", [
    ("Osteoarthritis of the left elbow limits her.", "Osteoarthritis", "M19.022", "specified"),  # site, side
    ("OA of both knees.", "OA", "M17.0", "specified"),  # an abbreviation brings its code's words
    ("CKD stage 5 on dialysis.", "CKD", "N18.5", "specified"),
    ("Cellulitis of the left arm.", "Cellulitis", "L03.114", "specified"),
    ("Type 2 diabetes with hyperglycemia.", "Type 2 diabetes", "E11.65", "specified"),
    ("Lumbar spinal stenosis, no neurogenic claudication.", "spinal stenosis", "M48.061", "specified"),
    ("Carcinoma of the sigmoid colon.", "Carcinoma", "C18.7", "specified"),  # a cancer word, the site after it
    ("Hypothyroidism on levothyroxine.", "Hypothyroidism", "E03.9", "unspecified"),  # nothing more is said
    ("Seen for influenza.", "influenza", "J11.1", "specified"),  # the synonym's code, no weaker evidence
    ("AFib with rapid ventricular response.", "AFib", "I48.91", "unspecified"),  # never ventricular fibrillation
    ("h/o stroke without residual deficits.", "stroke", "I63.9", "unspecified"),  # no deficit to code
])
def test_each_condition_gets_the_most_specific_code_its_sentence_supports(text, mention, code, specificity):
    entity = next(e for e in medical.find_conditions(text) if e["text"] == mention)
    assert (entity["code"], entity["specificity"]) == (code, specificity), entity


def test_a_service_or_a_state_is_no_condition():
    text = "Declined the flu vaccine; seen at the pain clinic in Burlington, VT 05401."
    assert medical.find_conditions(text) == []


def test_codes_as_tokens_and_an_extra_synonym_file(tmp_path):
    synonyms = tmp_path / "syn.tsv"
    synonyms.write_text("# mine\nsugar disease\tE11.9\n")
    options = medical.MedicalOptions(codes_as_tokens=True, synonyms=str(synonyms))
    out = medical.MedicalPreprocess(options)({"text": "Known sugar disease and HTN, no fever."})
    assert out["text"].endswith("[codes] E11.9 I10")  # the negated fever's code is not added
    synonyms.write_text("sugar disease\tNOT-A-CODE\n")
    with pytest.raises(Exception, match="syn.tsv:1: expected 'term<TAB>ICD-10-CM code'"):
        medical.read_synonyms(synonyms)


def test_medical_transform_pickles_and_handles_empty_text():
    transform = pickle.loads(pickle.dumps(medical.MedicalPreprocess(medical.MedicalOptions())))
    assert transform({"text": ""}) == {"text": "", "phi": [], "entities": []}
    assert transform({"text": None})["entities"] == []


def test_a_long_text_is_read_in_sentence_windows_with_the_right_offsets():
    sentence = "Patient denies chest pain. HTN is stable. "
    text = sentence * 300  # 12,600 characters, four windows
    entities = medical.find_conditions(text)
    assert len(entities) == 600
    assert all(text[e["start"]:e["end"]] == e["text"] for e in entities)
    assert all(e["negated"] == (e["text"] == "chest pain") for e in entities)


# --------------------------------------------------------------------------------------------------- finance

@pytest.mark.parametrize("text, expected", [
    ("$3.2bn", [(3.2e9, "USD")]),
    ("USD 2,950m", [(2.95e9, "USD")]),
    ("EUR 1.234,56", [(1234.56, "EUR")]),
    ("1.234,56 Mio. EUR", [(1.23456e9, "EUR")]),
    ("3,5 Mrd. €", [(3.5e9, "EUR")]),
    ("1 229,23 points", [(1229.23, "pts")]),
    ("CHF 1'234.50", [(1234.5, "CHF")]),
    ("a loss of (3,400)", [(-3400, None)]),
    ("margin 12.5% (+25bp)", [(12.5, "%"), (25, "bp")]),
    ("cut by 50 basis points", [(50, "bp")]),
    ("guidance of $3-4bn", [(3e9, "USD"), (4e9, "USD")]),
    ("5 to 7 million", [(5e6, None), (7e6, None)]),
    ("2–3%", [(2, "%"), (3, "%")]),
    ("EPS -0.45 vs. +0.12", [(-0.45, None), (0.12, None)]),
    ("£1.2 billion", [(1.2e9, "GBP")]),
    ("Umsatz 1.234 Mio. EUR", [(1.234e9, "EUR")]),   # German context: '1.234' is one thousand two hundred...
    ("sales of 1,234 units", [(1234, None)]),         # ...and in English, '1,234' is too
    ("4 January 1999 / 1999-01-04 / 01/04/1999 / 04.01.1999", [(10595, "date")] * 4),
])
def test_numbers_are_read_as_values_in_base_units(text, expected):
    found = [(n.value, n.unit) for n in finance.find_numbers(text)]
    assert [u for _, u in found] == [u for _, u in expected]
    assert [v for v, _ in found] == pytest.approx([v for v, _ in expected])


def test_digits_and_xval_modes_rewrite_the_text():
    text = "On 2016-01-05 the index opened at 2,013.78 and closed at 2.01671 thousand (S&P 500)."
    digits = finance.FinancePreprocess(finance.FinanceOptions(numbers="digits"))({"text": text})
    assert "2 0 1 3 . 7 8" in digits["text"] and "2 0 1 6 . 7 1" in digits["text"]
    xval = finance.FinancePreprocess(finance.FinanceOptions(numbers="xval"))({"text": text})
    assert xval["text"].count("[NUM]") == len(xval["text_numbers"]) == 4
    values = dict(zip(["date", "open", "close", "name"], xval["text_numbers"], strict=True))
    assert values["open"] == 0 and values["close"] == pytest.approx(
        100 * torch.log(torch.tensor(2016.71 / 2013.78)).item(), abs=1e-3)
    assert values["name"] == 0  # "500" is not within 25% of the prices: its own reference
    assert finance.FinancePreprocess(finance.FinanceOptions())({"text": ""})["numbers"] == []


def test_the_numeric_channel_carries_each_value_to_the_text_encoder():
    from plait.modalities.batch import collate
    from plait.plugins.text_encoder import TextEncoder, TextEncoderOptions, number_scale

    encoder = TextEncoder(TextEncoderOptions(hidden=32, layers=1, numeric_channel=True)).eval()
    num_id = encoder.num_id
    ids = torch.tensor([[5, num_id, 7, num_id], [num_id, 3, 0, 0]])
    scale = number_scale(ids, num_id, [[0.5, -2.0], []], torch.float32)
    assert scale.tolist() == [[1, 0.5, 1, -2.0], [1, 1, 1, 1]]
    samples = [{"label": 0, "text": "open [NUM] close [NUM]", "text_numbers": [0.0, v]} for v in (1.0, -1.0)]
    with torch.no_grad():
        up, down = encoder(collate(samples)["inputs"]["text"])
    assert not torch.allclose(up, down)  # the same words; only the numbers differ


# ----------------------------------------------------------------------------------------------------- legal

@pytest.fixture(scope="module")
def legal_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("legal-cache")


def test_citations_are_parsed_into_fields():
    found = legal_rag.parse_citations("See U.S. Const. art. I, § 8, cl. 3; the Fourteenth Amendment; 17 U.S.C. § 107; "
                                      "Roe v. Wade, 410 U.S. 113 (1973).")
    fields = [{k: v for k, v in c.items() if k not in ("start", "end", "text")} for c in found]
    assert fields[0] == {"kind": "constitution", "article": 1, "section": 8, "clause": 3}
    assert fields[1] == {"kind": "constitution", "amendment": 14, "section": None, "clause": None}
    assert fields[2] == {"kind": "statute", "title": "17", "reporter": "U.S.C.", "section": "107"}
    assert fields[3] == {"kind": "case", "volume": "410", "reporter": "U.S.", "page": "113"}


def test_chunks_follow_sections_and_never_split_a_citation():
    sentence = "Fair use under 17 U.S.C. § 107 is weighed against U.S. Const. art. I, § 8, cl. 8. "
    text = ("TITLE 17 COPYRIGHTS\n\nSection 107. Fair use\n\n" + sentence * 40
            + "\n\nSection 108. Copies\n\nLibraries may copy.\n")
    chunks = legal_rag.chunk_document("usc17.txt", text, chunk_words=60)
    # the one title above every section names the document, not a section
    assert {c.section for c in chunks} == {"Section 107. Fair use", "Section 108. Copies"}
    fair_use = [c for c in chunks if "107" in c.section]
    assert len(fair_use) > 1 and all(len(c.text.split()) <= 60 for c in fair_use)
    assert all(c.text.count("17 U.S.C. § 107") == c.text.count("cl. 8.") for c in fair_use)
    assert fair_use[0].keys == ["sec:107"]


def test_a_question_and_a_citation_retrieve_their_section(legal_cache):
    index = legal_rag.open_index(legal_rag.LegalRagOptions(cache_dir=str(legal_cache)))
    assert len(index.chunks) > 80 and {c.source for c in index.chunks} == {"constitution.md", "amendments.md"}
    top = index.search("Which amendment gave women the right to vote?", 5)
    assert top[0]["section"] == "Amendment XIX" and len({p["section"] for p in top}) == 5
    cited = index.search("What does U.S. Const. art. I, § 9 say?", 5, "bm25")
    assert cited[0]["section"] == "Article I, Section 9"


def test_a_corrupted_index_cache_is_rebuilt_with_a_warning(legal_cache, caplog):
    options = legal_rag.LegalRagOptions(cache_dir=str(legal_cache), retriever="bm25")
    _, folder = legal_rag.index_folder(options)
    legal_rag.open_index(options)
    built = (folder / "complete.json").stat().st_mtime_ns
    legal_rag.open_index(options)
    assert (folder / "complete.json").stat().st_mtime_ns == built  # the second open reuses the cache
    (folder / "chunks.json").write_text("[{\"source\": ")  # truncated
    with caplog.at_level(logging.WARNING, logger="plait.legal_rag"):
        index = legal_rag.open_index(options)
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text
    assert index.search("freedom of speech", 1, "bm25")[0]["section"] == "Amendment I"
    for name in ("bm25/params.index.json", "bm25/vocab.index.json"):
        (folder / name).write_bytes(b"\x00garbage")
        assert legal_rag.open_index(options).search("freedom of speech", 1, "bm25")[0]["section"] == "Amendment I"


def test_the_transform_adds_passages_within_the_budget_and_pickles(legal_cache):
    options = legal_rag.LegalRagOptions(cache_dir=str(legal_cache), k=2)
    transform = pickle.loads(pickle.dumps(legal_rag.LegalRetrieve(options, budget_words=40)))
    out = transform({"text": "Can the president pardon people? See U.S. Const. art. II, § 2.", "label": 1})
    assert out["passages"][0]["section"] == "Article II, Section 2" and out["label"] == 1
    assert out["citations"][0]["article"] == 2 and len(out["text"].split()) <= 40
    assert "[SEP] Article II, Section 2 (constitution.md):" in out["text"]
    assert transform({"text": ""})["passages"] == []


# ----------------------------------------------------------------------------------------- plait preprocess

def test_preprocess_legal_query_prints_ranked_passages_of_any_folder(tmp_path, capsys):
    corpus = tmp_path / "my corpus"
    (corpus / "title17").mkdir(parents=True)
    (corpus / "title17" / "copyright.txt").write_text(
        "Section 106. Exclusive rights\n\nThe owner may reproduce the work.\n\n"
        "Section 107. Fair use\n\nFair use for criticism, comment, news reporting, teaching is not infringement.\n")
    (corpus / "notes.md").write_text("# Notes\n\n## Parking\n\nNo parking on the lawn.\n")
    code = main(["preprocess", "legal", "--corpus", str(corpus), "--query", "is teaching fair use? 17 U.S.C. § 107",
                 "--k", "2", "--json", f"cache_dir={tmp_path / 'cache'}", "retriever=bm25"])
    assert code == 0
    passages = json.loads(capsys.readouterr().out)
    assert [set(p) for p in passages] == [{"source", "section", "score", "text", "citations"}] * 2
    assert passages[0]["source"] == "title17/copyright.txt" and passages[0]["section"] == "Section 107. Fair use"
    assert passages[0]["score"] >= passages[1]["score"]


def test_preprocess_writes_one_line_per_input_line_whatever_the_line(tmp_path, capsys):
    lines = [b'{"text": "Mr. John Smith has HTN.", "id": 1}', b"", b'{"text": "bad \xff byte, Dr. Lee"}', b"not json",
             b"[1, 2]", b'{"no": "text"}', b'{"text": ""}',
             json.dumps({"text": "Dr. Ada Byron saw him. " * 45_000}).encode()]  # a line over 1 MB
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    assert len(lines[-1]) > 1_000_000
    out = tmp_path / "out.jsonl"
    assert main(["preprocess", "medical", "--input", str(source), "--output", str(out)]) == 1
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(lines)
    assert records[0]["text"] == "Mr. [NAME] has HTN." and records[0]["entities"][0]["code"] == "I10"
    assert records[1] == {"line": 2, "error": "empty line"}
    assert records[3]["error"].startswith("not JSON:") and records[3]["line"] == 4
    assert records[4] == {"line": 5, "error": "expected a JSON object, got list"}
    assert records[5] == {"line": 6, "error": "no 'text' field holding a string"}
    assert records[2]["text"].startswith("bad \ufffd byte") and "not UTF-8" in records[2]["warnings"][0]
    assert records[6] == {"text": "", "phi": [], "entities": []}
    assert "Byron" not in records[7]["text"] and len(records[7]["phi"]) == 45_000  # one per "Ada Byron"
    assert "4 line(s) could not be used (lines 2, 4, 5, 6" in capsys.readouterr().err


def test_preprocess_errors_are_one_line(tmp_path, capsys):
    assert main(["preprocess", "legal", "--corpus", str(tmp_path / "missing"), "--query", "x"]) == 2
    assert "plugins.legal_rag.corpus: folder" in capsys.readouterr().err
    assert main(["preprocess", "finance", "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: cannot read" in capsys.readouterr().err
    assert main(["preprocess", "finance", "--query", "1", "--numbers", "roman"]) == 2
    assert "plugins.finance.numbers" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- training runs

@pytest.mark.slow
def test_the_text_model_reads_market_numbers_through_the_finance_plugin(tmp_path):
    config = yaml.safe_load((Path(__file__).parents[2] / "examples/domains/finance.yaml").read_text())
    config["run"].update(runs_dir=str(tmp_path), epochs=2)
    path = tmp_path / "finance.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    metrics = json.loads((tmp_path / "market-finance" / "metrics.json").read_text())
    assert metrics["test"]["fused"]["accuracy"] > 0.8  # chance (the larger class) is 0.54


@pytest.mark.slow
def test_a_manifest_run_with_the_medical_plugin_keeps_phi_out_of_the_run_folder(tmp_path, write_config):
    rows = []
    names = [("Ada", "Byron"), ("Omar", "Haddad"), ("Lena", "Kowalski"), ("Raj", "Menon")]
    for i, (first, last) in enumerate(names * 6):
        negated = i % 2
        rows.append({"text": f"Mr. {first} {last} (MRN {4471200 + i}) {'denies' if negated else 'has'} chest pain.",
                     "label": "absent" if negated else "present"})
    for split, chosen in (("train", rows[:16]), ("val", rows[16:20]), ("test", rows[20:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    config = write_config({
        "manifest": {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "val", "test")},
        "medical": {"codes_as_tokens": True},
        "text_encoder": {"tokenizer": "bytes", "hidden": 32, "layers": 1, "max_length": 96},
        "fusion": {},
    }, epochs=1, batch_size=4, loader_workers=1)  # the transform runs in a DataLoader worker process
    assert main(["train", str(config), "scaling.num_workers=0"]) == 0
    run_folder = next(p for p in tmp_path.rglob("metrics.json")).parent
    written = b"".join(f.read_bytes() for f in run_folder.rglob("*") if f.is_file())
    for name in (b"Byron", b"Haddad", b"Kowalski", b"Menon", b"4471200"):
        assert name not in written
    from plait.core.data import build_dataset
    from plait.core.runs import load

    loaded, plugins = load(str(config), [])
    sample = build_dataset(plugins, loaded, "train")[0]  # what the model was given
    assert sample["text"].startswith("Mr. [NAME] (MRN [MRN]) has chest pain.") and sample["text"].endswith("R07.9")


@pytest.mark.slow
@pytest.mark.parametrize("plugin", ["finance", "legal"])
def test_a_one_megabyte_line_is_processed_not_dropped(plugin, tmp_path):
    text = "Revenue of $3.2bn (+12%) on 03/14/2021 under U.S. Const. art. I, § 8; costs (3,400). " * 12_500
    source = tmp_path / "big.jsonl"
    source.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "short"}) + "\n")
    out = tmp_path / "out.jsonl"
    options = [f"cache_dir={tmp_path / 'cache'}"] if plugin == "legal" else []
    assert main(["preprocess", plugin, "--input", str(source), "--output", str(out), *options]) == 0
    big, short = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    if plugin == "finance":
        assert len(big["numbers"]) == 5 * 12_500 and short["numbers"] == []
    else:
        assert len(big["citations"]) == 12_500 and big["passages"][0]["section"] == "Article I, Section 8"


def test_a_corpus_file_that_is_not_utf8_is_read_with_a_warning(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "old.txt").write_bytes(b"Section 1. Rents\n\nThe tenant pays rent monthly \xff\xfe in advance.\n")
    options = legal_rag.LegalRagOptions(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), retriever="bm25")
    with caplog.at_level(logging.WARNING, logger="plait.legal_rag"):
        index = legal_rag.open_index(options)
    assert "old.txt: not UTF-8" in caplog.text
    assert index.search("when is rent paid", 1, "bm25")[0]["section"] == "Section 1. Rents"
    (corpus / "old.txt").unlink()
    with pytest.raises(Exception, match="no .md or .txt files under"):
        legal_rag.open_index(options)
