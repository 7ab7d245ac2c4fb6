"""PHI test sentences the medical de-identifier was not written against: clinical templates filled
by Faker with names, dates, addresses, phone numbers, e-mail addresses and record numbers from 24
locales (Latin, Cyrillic, Greek, Arabic, Hebrew, Devanagari, Bengali, Thai, CJK and Hangul names).

    .venv/bin/python benchmarks/phi_faker.py [--per-locale 100] [--seed 0] [--out FILE]

Prints (or writes) the sentences in benchmarks/data/clinical_notes.txt's markup, [[text|TYPE]];
``generate`` gives them to benchmarks/domains.py parsed, with gold spans. Faker is a source of test
data here only: the plugin must not use it as its dictionary.
"""
from __future__ import annotations

import argparse
import random
from typing import Any

#: 24 locales, 13 scripts: where a clinic's patients, relatives and staff come from.
LOCALES = ["en_US", "en_GB", "es_MX", "pt_BR", "fr_FR", "de_DE", "it_IT", "nl_NL", "pl_PL", "tr_TR", "ru_RU",
           "uk_UA", "el_GR", "ar_AA", "fa_IR", "he_IL", "hi_IN", "bn_BD", "th_TH", "vi_VN", "zh_CN", "ja_JP",
           "ko_KR", "yo_NG"]

#: {name}: first and last name; {last}: a last name after a title; {relative}: another full name.
TEMPLATES = [
    "Patient {name} was admitted on {date} with chest pain.",
    "{name} is a {age}-year-old seen in clinic today for follow-up.",
    "Seen with her son, {relative}, who provides most of the history.",
    "Mr. {last} reports improvement since the last visit on {date}.",
    "Mrs. {last} denies fever or chills.",
    "Dr. {last} was consulted for the abnormal ECG.",
    "Discussed the plan with the patient's wife, {relative}, by phone at {phone}.",
    "MRN {mrn}: {name}, discharged home on {date}.",
    "{name} (MRN {mrn}) lives at {address}.",
    "The patient, {name}, can be reached at {email}.",
    "Referred by {relative} for evaluation of anemia.",
    "Emergency contact: {relative}, {phone}.",
    "{name} tolerated the procedure well.",
    "Follow-up with {name} scheduled for {date}.",
    "Ms. {last} was counselled on smoking cessation.",
    "Per {relative}, the patient fell at home on {date}.",
    "Home address on file: {address}; phone {phone}.",
    "{name} presented to the emergency department with shortness of breath.",
    "Spoke with the patient's daughter {relative} about code status.",
    "Prof. {last} reviewed the biopsy slides.",
    "Labs for {name} drawn on {date} were unremarkable.",
    "Nurse {relative} documented the vital signs.",
    "Interpreter present for {name} during the visit.",
    "Results sent to {email} at the patient's request.",
]
DATE_FORMATS = ["%m/%d/%Y", "%d.%m.%Y", "%Y-%m-%d", "%B %d, %Y", "%d %B %Y", "%d/%m/%Y"]


def _values(fake: Any, rng: random.Random) -> dict[str, tuple[str, str]]:
    """Each slot's surface text and PHI type."""
    return {
        "name": (f"{fake.first_name()} {fake.last_name()}", "NAME"),
        "relative": (f"{fake.first_name()} {fake.last_name()}", "NAME"),
        "last": (fake.last_name(), "NAME"),
        "date": (fake.date_between("-30y", "today").strftime(rng.choice(DATE_FORMATS)), "DATE"),
        "phone": (fake.phone_number(), "PHONE"),
        "email": (fake.email(), "EMAIL"),
        "address": (fake.street_address().replace("\n", ", "), "ADDRESS"),
        "mrn": (str(rng.randrange(10**6, 10**8)), "MRN"),
        "age": (str(rng.randrange(18, 89)), ""),  # not PHI under 90
    }


def generate(per_locale: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """Sentences with their gold PHI spans: {"text", "locale", "phi": [{"start", "end", "type"}], "entities": []}."""
    from faker import Faker

    rng = random.Random(seed)
    notes = []
    for index, locale in enumerate(LOCALES):
        fake = Faker(locale)
        fake.seed_instance(seed * 1000 + index)
        for _ in range(per_locale):
            template = rng.choice(TEMPLATES)
            values = _values(fake, rng)
            text, phi, cursor = [], [], 0
            for literal, slot in _pieces(template):
                text.append(literal)
                cursor += len(literal)
                if slot is None:
                    continue
                surface, phi_type = values[slot]
                if phi_type:
                    phi.append({"start": cursor, "end": cursor + len(surface), "type": phi_type})
                text.append(surface)
                cursor += len(surface)
            notes.append({"text": "".join(text), "locale": locale, "phi": phi, "entities": []})
    return notes


def _pieces(template: str) -> list[tuple[str, str | None]]:
    """(literal text, slot after it or None) of a template."""
    import string

    return [(literal, slot) for literal, slot, _, _ in string.Formatter().parse(template)]


def markup(note: dict[str, Any]) -> str:
    text, out, cursor = note["text"], [], 0
    for span in note["phi"]:
        out += [text[cursor:span["start"]], f"[[{text[span['start']:span['end']]}|{span['type']}]]"]
        cursor = span["end"]
    return "".join([*out, text[cursor:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-locale", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write here instead of stdout")
    args = parser.parse_args()
    lines = "\n".join(markup(n) for n in generate(args.per_locale, args.seed)) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(lines)
    else:
        print(lines, end="")


if __name__ == "__main__":
    main()
