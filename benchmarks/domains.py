"""The domain plugins measured on hand-annotated data: medical de-identification and entities, finance numbers on a
real market-data task, legal retrieval over the U.S. Constitution.

    .venv/bin/python benchmarks/domains.py [--only medical,finance,legal] [--runs-dir DIR] [--show-misses]

Last line: one JSON object with phi_recall, entity_f1, negation_accuracy, phi_recall_faker, name_recall_faker,
phi_recall_faker_seed1 (Faker's other draws), name_fp_rate, phi_false_spans_new, code_recall_new3,
code_recall_new_full, finance_acc_with, finance_acc_without, legal_recall_at_5, legal_mrr (and the figures behind
them).
The Faker set (benchmarks/phi_faker.py: 24 locales), benchmarks/data/not_names.txt and
benchmarks/data/clinical_notes_heldout.txt were written apart from the medical plugin's rules;
benchmarks/data/clinical_notes.txt was written while building them, and clinical_notes_dev.txt while building
the code specificity.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
MARK = re.compile(r"\[\[(?P<phi>[^|\]]+)\|(?P<type>[A-Z]+)\]\]"
                  r"|\{\{(?P<ent>[^|}]+)\|(?P<code>[^|}]+)(?:\|(?P<flags>[^}]*))?\}\}")


def parse_notes(path: Path) -> list[dict]:
    """The annotated sentences: plain text, gold PHI spans and gold condition spans (offsets in the plain text)."""
    notes = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        text, phi, entities, cursor = [], [], [], 0
        length = 0
        for match in MARK.finditer(line):
            before = line[cursor:match.start()]
            text.append(before)
            length += len(before)
            surface = match["phi"] or match["ent"]
            if match["phi"]:
                phi.append({"start": length, "end": length + len(surface), "type": match["type"]})
            else:
                flags = set((match["flags"] or "").split(",")) - {""}
                entities.append({"start": length, "end": length + len(surface), "code": match["code"],
                                 "negated": "neg" in flags, "uncertain": "unc" in flags, "historical": "hist" in flags})
            text.append(surface)
            length += len(surface)
            cursor = match.end()
        text.append(line[cursor:])
        notes.append({"text": "".join(text), "phi": phi, "entities": entities})
    return notes


def score_phi(notes: list[dict]) -> dict:
    """PHI recall of the medical de-identifier on ``notes``: a gold span counts as found when every
    character of it (whitespace aside) is inside a predicted span. Also by type, and the misses."""
    from plait.plugins import medical

    gold = found = typed = predicted = 0
    by_type: dict[str, list[int]] = {}
    misses: list[str] = []
    for note in notes:
        text = note["text"]
        spans = medical.find_phi(text)
        predicted += len(spans)
        covered = [False] * len(text)
        types: list[str | None] = [None] * len(text)
        for s in spans:
            for i in range(s.start, s.end):
                covered[i], types[i] = True, s.type
        for g in note["phi"]:
            gold += 1
            hit = all(covered[i] or text[i].isspace() for i in range(g["start"], g["end"]))
            counts = by_type.setdefault(g["type"], [0, 0])
            counts[0] += hit
            counts[1] += 1
            if hit:
                found += 1
                typed += types[g["start"]] == g["type"]
            else:
                misses.append(f"PHI missed {g['type']}: {text[g['start']:g['end']]!r} in {text!r}")
    return {"gold": gold, "found": found, "typed": typed, "predicted": predicted, "misses": misses,
            "by_type": {t: round(hit / total, 4) for t, (hit, total) in sorted(by_type.items())}}


def name_false_positives() -> tuple[float, list[str]]:
    """The share of benchmarks/data/not_names.txt's drug names, eponyms and anatomical terms of which
    the de-identifier takes any part for a NAME, each in a sentence of its section; and those terms."""
    from plait.plugins import medical

    template, flagged, total = "{}", [], 0
    for line in (DATA / "not_names.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("["):
            template = line.split("] ", 1)[1]
            continue
        text = template.format(line)
        start = text.index(line)
        total += 1
        if any(s.type == "NAME" and s.start < start + len(line) and start < s.end for s in medical.find_phi(text)):
            flagged.append(line)
    return len(flagged) / max(1, total), flagged


def measure_phi_faker(show_misses: bool) -> dict:
    """PHI recall on benchmarks/phi_faker.py's sentences (24 locales), and names' false positives."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from phi_faker import LOCALES, generate

    notes = generate()
    phi = score_phi(notes)
    fresh = score_phi(generate(seed=1))  # other draws than the seed-0 sentences the rules were checked on
    by_locale = {locale: score_phi([n for n in notes if n["locale"] == locale]) for locale in LOCALES}
    fp_rate, flagged = name_false_positives()
    if show_misses:
        print("\n".join(phi["misses"] + [f"taken for a name: {term!r}" for term in flagged]), file=sys.stderr)
    names = sum(1 for n in notes for g in n["phi"] if g["type"] == "NAME")
    result = {"phi_recall_faker": round(phi["found"] / phi["gold"], 4), "phi_gold_faker": phi["gold"],
              "name_recall_faker": phi["by_type"].get("NAME"), "names_faker": names,
              "phi_recall_faker_by_type": phi["by_type"], "faker_locales": len(LOCALES),
              "phi_recall_faker_by_locale": {k: round(v["found"] / v["gold"], 4) for k, v in by_locale.items()},
              "phi_recall_faker_seed1": round(fresh["found"] / fresh["gold"], 4),
              "name_recall_faker_seed1": fresh["by_type"].get("NAME"),
              "name_fp_rate": round(fp_rate, 4), "name_fp_terms": len(flagged)}
    worst = sorted(result["phi_recall_faker_by_locale"].items(), key=lambda item: item[1])[:3]
    print(f"medical, Faker: {len(notes)} sentences in {len(LOCALES)} locales, {phi['gold']} PHI spans "
          f"(recall {result['phi_recall_faker']:.3f}), {names} names (recall {result['name_recall_faker']:.3f}); "
          f"seed 1: recall {result['phi_recall_faker_seed1']:.3f}, names {result['name_recall_faker_seed1']:.3f}; "
          f"lowest locales {worst}; {len(flagged)} of the not-names taken for names "
          f"(rate {fp_rate:.3f})", flush=True)
    return result


def score_conditions(notes: list[dict]) -> dict:
    """Condition matching on ``notes``: a gold condition is found when a predicted one overlaps it with
    the same category (the code's first three characters); ``exact`` counts found ones whose full code
    agrees. Negation, uncertainty and history are scored on the found ones. Also the misses."""
    from plait.plugins import medical

    true_pos = false_pos = false_neg = exact = 0
    flag_right = {"negated": 0, "uncertain": 0, "historical": 0}
    misses: list[str] = []
    for note in notes:
        text = note["text"]
        # conditions are scored on the original text, so that gold offsets hold
        predicted = medical.find_conditions(text)
        used = set()
        for g in note["entities"]:
            match = next((i for i, p in enumerate(predicted) if i not in used and p["start"] < g["end"]
                          and g["start"] < p["end"] and p["code"][:3] == g["code"][:3]), None)
            if match is None:
                false_neg += 1
                got = [(p["text"], p["code"]) for p in predicted if p["start"] < g["end"] and g["start"] < p["end"]]
                misses.append(f"entity missed {text[g['start']:g['end']]!r} {g['code']} (found {got}) in {text!r}")
                continue
            used.add(match)
            true_pos += 1
            p = predicted[match]
            exact += p["code"] == g["code"]
            if p["code"] != g["code"]:
                misses.append(f"code {p['code']} for {p['text']!r}, wanted {g['code']}, in {text!r}")
            for flag in flag_right:
                flag_right[flag] += p[flag] == g[flag]
                if p[flag] != g[flag]:
                    misses.append(f"{flag} wrong ({p[flag]}) for {p['text']!r} in {text!r}")
        for i, p in enumerate(predicted):
            if i not in used:
                false_pos += 1
                misses.append(f"entity extra {p['text']!r} {p['code']} in {text!r}")
    gold = true_pos + false_neg
    return {"true_pos": true_pos, "false_pos": false_pos, "gold": gold, "exact": exact, "misses": misses,
            **{flag: round(right / max(1, true_pos), 4) for flag, right in flag_right.items()}}


def measure_medical(show_misses: bool) -> dict:
    notes = parse_notes(DATA / "clinical_notes.txt")
    started = time.perf_counter()
    phi = score_phi(notes)
    conditions = score_conditions(notes)
    seconds = time.perf_counter() - started
    if show_misses:
        print("\n".join(phi["misses"] + conditions["misses"]), file=sys.stderr)
    true_pos, gold = conditions["true_pos"], conditions["gold"]
    precision = true_pos / max(1, true_pos + conditions["false_pos"])
    recall = true_pos / max(1, gold)
    result = {
        "phi_recall": round(phi["found"] / phi["gold"], 4),
        "phi_type_accuracy": round(phi["typed"] / max(1, phi["found"]), 4),
        "phi_gold": phi["gold"], "phi_predicted": phi["predicted"],
        "entity_f1": round(2 * precision * recall / max(1e-9, precision + recall), 4),
        "entity_precision": round(precision, 4), "entity_recall": round(recall, 4),
        "entity_code_exact": round(conditions["exact"] / max(1, true_pos), 4),
        "entities_gold": gold,
        "negation_accuracy": conditions["negated"],
        "uncertainty_accuracy": conditions["uncertain"],
        "history_accuracy": conditions["historical"],
        "clinical_sentences": len(notes), "medical_seconds": round(seconds, 1),
    }
    print(f"medical: {len(notes)} sentences, {phi['gold']} PHI spans (recall {result['phi_recall']:.3f}), "
          f"{gold} conditions (F1 {result['entity_f1']:.3f}, "
          f"negation {result['negation_accuracy']:.3f}, "
          f"uncertainty {result['uncertainty_accuracy']:.3f}, history {result['history_accuracy']:.3f})", flush=True)
    return result


def measure_heldout_conditions(show_misses: bool) -> dict:
    """Code recall on benchmarks/data/clinical_notes_heldout.txt, the sentences the rules were not tuned on:
    by category (3 characters) and by full code, with negation, uncertainty and history."""
    import simple_icd_10_cm as icd

    notes = parse_notes(DATA / "clinical_notes_heldout.txt")
    unknown = sorted({e["code"] for n in notes for e in n["entities"] if not icd.is_valid_item(e["code"])})
    if unknown:
        raise SystemExit(f"clinical_notes_heldout.txt: not ICD-10-CM codes: {', '.join(unknown)}")
    conditions = score_conditions(notes)
    from plait.plugins import medical

    # the set holds no PHI: every span the de-identifier takes out of it is a false positive
    false_phi = [(n["text"], s) for n in notes for s in medical.find_phi(n["text"])]
    if show_misses:
        print("\n".join(conditions["misses"] + [f"PHI extra {s.type}: {t[s.start:s.end]!r} in {t!r}"
                                                for t, s in false_phi]), file=sys.stderr)
    gold = conditions["gold"]
    result = {"code_recall_new3": round(conditions["true_pos"] / max(1, gold), 4),
              "code_recall_new_full": round(conditions["exact"] / max(1, gold), 4), "conditions_new": gold,
              "negation_accuracy_new": conditions["negated"], "uncertainty_accuracy_new": conditions["uncertain"],
              "history_accuracy_new": conditions["historical"], "clinical_sentences_new": len(notes),
              "phi_false_spans_new": len(false_phi)}
    print(f"medical, held-out: {len(notes)} sentences, {gold} conditions (code recall {result['code_recall_new3']:.3f}"
          f" by category, {result['code_recall_new_full']:.3f} by full code; negation "
          f"{result['negation_accuracy_new']:.3f}, uncertainty {result['uncertainty_accuracy_new']:.3f}, history "
          f"{result['history_accuracy_new']:.3f}); {len(false_phi)} spans taken for PHI in it, which has none",
          flush=True)
    return result


def measure_dev_conditions(show_misses: bool) -> dict:
    """Code recall on benchmarks/data/clinical_notes_dev.txt, the sentences the specificity rules were checked
    against (the held-out set's figures above are the ones to trust)."""
    conditions = score_conditions(parse_notes(DATA / "clinical_notes_dev.txt"))
    if show_misses:
        print("\n".join(conditions["misses"]), file=sys.stderr)
    gold = conditions["gold"]
    result = {"code_recall_dev3": round(conditions["true_pos"] / max(1, gold), 4),
              "code_recall_dev_full": round(conditions["exact"] / max(1, gold), 4), "conditions_dev": gold}
    print(f"medical, development: {gold} conditions (code recall {result['code_recall_dev3']:.3f} by category, "
          f"{result['code_recall_dev_full']:.3f} by full code)", flush=True)
    return result


def train_finance(runs_dir: Path, name: str, overrides: list[str]) -> float:
    """Train examples/domains/finance.yaml in its own process; its test accuracy."""
    command = [sys.executable, "-m", "plait.launch.cli", "train", str(ROOT / "examples/domains/finance.yaml"),
               f"run.runs_dir={runs_dir}", f"run.name={name}", *overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((runs_dir / name / "metrics.json").read_text())
    accuracy = metrics["test"]["fused"]["accuracy"]
    print(f"finance {name}: test accuracy {accuracy:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return accuracy


def measure_finance(runs_dir: Path) -> dict:
    """The same text model on the same sentences: numbers as [NUM] + value (finance, xval), digit by digit
    (finance, digits), and as written (finance only annotating, so the text is unchanged). Digits and raw numbers
    take more tokens: those two runs read up to 128 tokens (the xval sentences fit in 64), so no close price is
    cut off."""
    plain = ["plugins.text_encoder.numeric_channel=false", "plugins.text_encoder.max_length=128"]
    with_xval = train_finance(runs_dir, "with-xval", [])
    with_digits = train_finance(runs_dir, "with-digits", ["plugins.finance.numbers=digits", *plain])
    without = train_finance(runs_dir, "without", ["plugins.finance.numbers=annotate", *plain])
    return {"finance_acc_with": round(with_xval, 4), "finance_acc_without": round(without, 4),
            "finance_acc_digits": round(with_digits, 4)}


def read_questions(path: Path) -> list[tuple[str, str]]:
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]
    return [(q.strip(), s.strip()) for q, s in rows]


def measure_legal(cache_dir: Path, show_misses: bool) -> dict:
    from plait.plugins.legal_rag import LegalRagOptions, open_index

    questions = read_questions(DATA / "legal_questions.tsv")
    index = open_index(LegalRagOptions(cache_dir=str(cache_dir), retriever="hybrid"))
    result = {"legal_questions": len(questions), "legal_chunks": len(index.chunks)}
    for retriever in ("hybrid", "bm25", "dense"):
        found, reciprocal = 0, 0.0
        for question, section in questions:
            ranked = [p["section"] for p in index.search(question, 10, retriever)]
            rank = ranked.index(section) + 1 if section in ranked else None
            found += rank is not None and rank <= 5
            reciprocal += 1 / rank if rank else 0.0
            if show_misses and retriever == "hybrid" and (rank is None or rank > 1):
                print(f"legal: rank {rank} for {question!r} ({section}); top {ranked[:3]}", file=sys.stderr)
        suffix = "" if retriever == "hybrid" else f"_{retriever}"
        result[f"legal_recall_at_5{suffix}"] = round(found / len(questions), 4)
        result[f"legal_mrr{suffix}"] = round(reciprocal / len(questions), 4)
        print(f"legal {retriever}: recall@5 {found / len(questions):.3f}, MRR {reciprocal / len(questions):.3f} "
              f"over {len(questions)} questions", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="medical,finance,legal")
    parser.add_argument("--runs-dir", default=None, help="where the finance runs go (default: a temporary folder)")
    parser.add_argument("--show-misses", action="store_true", help="print every miss to stderr")
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="plait-domains-") as scratch:
        if "medical" in wanted:
            result.update(measure_medical(args.show_misses))
            result.update(measure_phi_faker(args.show_misses))
            result.update(measure_dev_conditions(args.show_misses))
            result.update(measure_heldout_conditions(args.show_misses))
        if "legal" in wanted:
            result.update(measure_legal(Path(scratch) / "legal-cache", args.show_misses))
        if "finance" in wanted:
            result.update(measure_finance(Path(args.runs_dir) if args.runs_dir else Path(scratch) / "runs"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
