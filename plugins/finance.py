"""finance: numbers in text, read as values, and shown to the text encoder in a form it can compare.

Per sample: ``numbers``, ``[{start, end, value, unit}]`` (offsets in the original text; ``value`` a float in base
units: "$3.2bn" is 3.2e9 USD, "25bp" is 25 bp, "(3,400)" is -3400, a date is days since 1970-01-01 with unit
``date``), and the text rewritten as ``numbers`` says:

- ``annotate``: the text unchanged;
- ``digits``: each number in one canonical form, digit by digit ("1.229,23 EUR" -> "1 2 2 9 . 2 3 EUR"), so every
  locale and format reads alike and a tokenizer cannot merge digits into arbitrary pieces;
- ``xval``: each number becomes one ``[NUM]`` token and its value goes into ``text_numbers``. A text encoder with
  ``numeric_channel: true`` scales that token's embedding by the value (xVal, Golkar et al. 2023).
  ``xval_scale: relative`` (the default) gives each number as its log-change in percent from the first number in
  the text within 25% of it (so "S&P 500" does not become the reference for 2,038.20). Prices then read as moves
  ("+0.4" and "-0.3"), not as 4,512.30 and 4,530.10, which a model cannot tell apart at one part in a thousand.
  ``log`` gives
  sign * log10(1 + |v|). Both are clipped to +-``xval_clip``.

Locales: "1,234.56" (en), "1.234,56" (de), "1 234,56" (fr), "1'234.56" (ch). A single separator followed by exactly
three digits ("1,234") is ambiguous; ``locale: auto`` decides it from the text's unambiguous numbers and words (Mio.,
Mrd., EUR after the number mean German), else English.

Hand-written: no library on PyPI parses finance numbers this way offline (price-parser and babel read one number in
one locale at a time, without scale words, basis points, accounting negatives, ranges or dates).

    plugins:
      finance: {numbers: xval}
      text_encoder: {numeric_channel: true}
"""
from __future__ import annotations

import bisect
import itertools
import math
import re
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Literal

from pydantic import Field

from plait.core.config import Options
from plait.core.hookspecs import hookimpl
from plait.modalities.text import NUM_TOKEN

EPOCH = date(1970, 1, 1)  # a date's value is its days since then
RELATIVE_RANGE = math.log(1.25)  # xval_scale relative: numbers within 25% of each other share a reference


class FinanceOptions(Options):
    numbers: Literal["annotate", "digits", "xval"] = Field(
        "digits", description="how numbers reach the model: unchanged, canonical digit by digit, or [NUM] + value")
    locale: Literal["auto", "en", "de", "fr"] = Field("auto", description="how to read '1,234' and '1.234'")
    xval_scale: Literal["relative", "log"] = "relative"
    xval_clip: float = Field(10.0, gt=0)


CURRENCY_SYMBOLS = {"$": "USD", "US$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY", "dollars": "USD", "dollar": "USD",
                    "euros": "EUR", "euro": "EUR", "pounds": "GBP", "yen": "JPY"}
ISO_CODES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "CNY", "INR", "HKD", "SEK", "NOK", "DKK")
SCALES = {"k": 1e3, "thousand": 1e3, "tsd": 1e3, "m": 1e6, "mn": 1e6, "mm": 1e6, "mio": 1e6, "million": 1e6,
          "millions": 1e6, "b": 1e9, "bn": 1e9, "billion": 1e9, "billions": 1e9, "mrd": 1e9, "milliarden": 1e9,
          "tn": 1e12, "trillion": 1e12, "bio": 1e12}
UNITS = {"%": "%", "percent": "%", "per cent": "%", "pct": "%", "prozent": "%", "bp": "bp", "bps": "bp",
         "basis points": "bp", "basis point": "bp", "points": "pts", "pts": "pts", "punkte": "pts", "pkt": "pts"}
MONTHS = {m: i for i, names in enumerate(
    (("jan", "january", "januar"), ("feb", "february", "februar"), ("mar", "march", "märz", "mär"), ("apr", "april"),
     ("may", "mai"), ("jun", "june", "juni"), ("jul", "july", "juli"), ("aug", "august"),
     ("sep", "sept", "september"), ("oct", "october", "okt", "oktober"), ("nov", "november"),
     ("dec", "december", "dez", "dezember")), start=1) for m in names}
MONTH = r"(?P<month>" + "|".join(sorted(map(re.escape, MONTHS), key=len, reverse=True)) + r")\.?"
DATES = [
    re.compile(r"\b(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})\b"),
    re.compile(r"\b(?P<a>\d{1,2})/(?P<b>\d{1,2})/(?P<y>\d{4})\b"),
    re.compile(r"\b(?P<d>\d{1,2})\.(?P<m>\d{1,2})\.(?P<y>\d{4})\b"),
    re.compile(rf"\b{MONTH}\s+(?P<d>\d{{1,2}})(?:st|nd|rd|th)?,?\s+(?P<y>\d{{4}})\b", re.IGNORECASE),
    re.compile(rf"\b(?P<d>\d{{1,2}})(?:st|nd|rd|th)?\.?\s+{MONTH}\s+(?P<y>\d{{4}})\b", re.IGNORECASE),
]
CURRENCY_BEFORE = r"(?P<cur_pre>US\$|[$€£¥]|(?:" + "|".join(ISO_CODES) + r")\s?)"
NUMBER = re.compile(
    r"(?P<open>\(\s*)?(?P<sign>(?<![\w.,])[-−–+](?=[$€£¥\d]))?" + CURRENCY_BEFORE + r"?"
    r"(?P<sign2>(?<![\w.,])[-−+](?=\d))?"
    r"(?P<digits>\d{1,3}(?:[,.'\u00a0\u202f ]\d{3})+(?:[.,]\d+)?(?![\d])|\d+(?:[.,]\d+)?|[.,]\d+)"
    r"(?:\s?(?P<scale>thousand|millions?|billions?|trillion|milliarden|mio\.?|mrd\.?|tsd\.?|bio\.?|mn|mm|bn|tn|k|m|b)"
    r"(?![A-Za-z]))?"
    r"(?:\s?(?P<unit>%|per cent|percent|pct|prozent|basis points?|bps?|points|pts|punkte|pkt\.?|"
    + "|".join(ISO_CODES) + r"|dollars?|euros?|pounds|yen|[$€£¥])(?![A-Za-z]))?"
    r"(?P<close>\s*\))?",
    re.IGNORECASE,
)
RANGE_BETWEEN = re.compile(r"\s*(?:-|–|—|to|bis)\s*", re.IGNORECASE)
GERMAN_WORDS = re.compile(r"\b(?:Mio|Mrd|Tsd|Punkte|Prozent|Eröffnung|Schluss|Umsatz)\b|\d\s?EUR\b", re.IGNORECASE)
EN_EVIDENCE = re.compile(r"\d,\d{3}\.\d|(?<![\d.,])\d+\.\d{1,2}(?![\d.,])")
DE_EVIDENCE = re.compile(r"\d\.\d{3},\d|(?<![\d.,])\d+,\d{1,2}(?![\d.,])")


@dataclass
class Number:
    start: int
    end: int
    value: float
    unit: str | None
    scale: float = 1.0  # the scale word's factor ("bn": 1e9), which a range's first number may lack

    def as_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "value": self.value, "unit": self.unit}


def guess_locale(text: str) -> str:
    """'de' when the text's unambiguous numbers or words say so, else 'en'."""
    german = len(DE_EVIDENCE.findall(text)) + 2 * len(GERMAN_WORDS.findall(text))
    return "de" if german > len(EN_EVIDENCE.findall(text)) else "en"


def parse_digits(digits: str, locale: str) -> float:
    """'1.234,56' -> 1234.56 under the separators' own evidence, ``locale`` deciding only '1,234' / '1.234'."""
    digits = re.sub(r"[\u00a0\u202f' ]", "", digits)
    marks = [c for c in digits if c in ",."]
    if not marks:
        return float(digits)
    if "," in marks and "." in marks:
        decimal = marks[-1]
    elif len(marks) > 1:
        decimal = None  # "1,234,567": thousands only
    else:
        after = len(digits) - digits.index(marks[0]) - 1
        if after != 3 or digits.startswith(marks[0]):
            decimal = marks[0]
        else:
            decimal = "," if locale in ("de", "fr") else "."
    thousands = {",", "."} - {decimal}
    cleaned = "".join(c for c in digits if c not in thousands)
    return float(cleaned.replace(",", ".") if decimal == "," else cleaned)


def find_dates(text: str) -> list[Number]:
    found = []
    for pattern in DATES:
        for match in pattern.finditer(text):
            groups = match.groupdict()
            try:
                year = int(groups["y"])
                if groups.get("month"):
                    month, day = MONTHS[groups["month"].lower().rstrip(".")], int(groups["d"])
                elif groups.get("a"):  # a/b/yyyy: US order unless the first cannot be a month
                    a, b = int(groups["a"]), int(groups["b"])
                    month, day = (b, a) if a > 12 else (a, b)
                else:
                    month, day = int(groups["m"]), int(groups["d"])
                days = (date(year, month, day) - EPOCH).days
            except (ValueError, KeyError):
                continue
            found.append(Number(match.start(), match.end(), float(days), "date"))
    return found


def find_numbers(text: str, locale: str = "auto") -> list[Number]:
    """Every number in ``text`` with its value in base units, in order."""
    locale = guess_locale(text) if locale == "auto" else locale
    dates = sorted(find_dates(text), key=lambda d: d.start)
    date_starts = [d.start for d in dates]
    numbers: list[Number] = []
    for match in NUMBER.finditer(text):
        start, end = match.span()
        before = bisect.bisect_left(date_starts, end) - 1  # the last date starting before this number ends
        if not match["digits"] or (before >= 0 and dates[before].end > start):
            continue
        scale = SCALES.get((match["scale"] or "").lower().rstrip("."), 1.0)
        value = parse_digits(match["digits"], locale) * scale
        unit_word = (match["unit"] or "").lower().rstrip(".")
        unit = UNITS.get(unit_word) or CURRENCY_SYMBOLS.get(unit_word) or (unit_word.upper() if unit_word else None)
        if match["cur_pre"]:
            pre = match["cur_pre"].strip()
            unit = CURRENCY_SYMBOLS.get(pre, pre.upper())
        sign = match["sign"] or match["sign2"]
        negative = sign in ("-", "−", "–")
        if match["open"] and match["close"] and not sign:
            negative = True  # accounting: (3,400)
        else:  # parentheses around a signed number, or only one of them: not part of the number
            start += len(match["open"] or "")
            end -= len(match["close"] or "")
        numbers.append(Number(start, end, -value if negative else value, unit, scale))
    _share_range_units(text, numbers)
    return sorted(numbers + dates, key=lambda n: n.start)


def _share_range_units(text: str, numbers: list[Number]) -> None:
    """"$3-4bn", "5 to 7 million", "2–3%": the first number takes the second's scale and unit."""
    for first, second in itertools.pairwise(numbers):
        between = text[first.end:second.start]
        if not RANGE_BETWEEN.fullmatch(between) or first.unit == "date":
            continue
        if first.scale == 1.0 and second.scale != 1.0:
            first.value, first.scale = first.value * second.scale, second.scale
        first.unit = first.unit or second.unit
        second.unit = second.unit or first.unit


def canonical(value: float) -> str:
    """A value as plain digits: no exponent, no thousands separators, at most 6 decimals."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def xval_values(numbers: list[Number], scale: str, clip: float) -> list[float]:
    """One value per number for the [NUM] tokens (see the module docstring)."""
    out = []
    references: list[float] = []
    for number in numbers:
        v = number.value
        if number.unit == "date":
            out.append(0.0)
            continue
        if scale == "log":
            out.append(math.copysign(math.log10(1 + abs(v)), v))
        elif number.unit in ("%", "bp") or v <= 0:
            out.append(v / 100 if number.unit == "bp" else v)
        else:
            reference = next((r for r in references if abs(math.log(v / r)) < RELATIVE_RANGE), None)
            if reference is None:
                references.append(v)
                reference = v
            out.append(100 * math.log(v / reference))
        out[-1] = max(-clip, min(clip, out[-1]))
    return out


class FinancePreprocess:
    """Picklable: options only."""

    def __init__(self, options: FinanceOptions) -> None:
        self.options = options

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        text = sample.get("text") or ""
        numbers = find_numbers(text, self.options.locale)
        sample["numbers"] = [n.as_dict() for n in numbers]
        mode = self.options.numbers
        if mode == "annotate" or not numbers:
            if mode == "xval":
                sample["text_numbers"] = []
            return sample
        pieces, cursor = [], 0
        for number in numbers:
            pieces.append(text[cursor:number.start])
            if mode == "xval":
                shown = NUM_TOKEN
            elif number.unit == "date":
                shown = " ".join((EPOCH + timedelta(days=int(number.value))).isoformat())
            else:
                shown = " ".join(canonical(number.value))
            if number.unit and number.unit != "date":
                shown += f" {number.unit}"
            pieces.append(shown)
            cursor = number.end
        pieces.append(text[cursor:])
        sample["text"] = "".join(pieces)
        if mode == "xval":
            sample["text_numbers"] = xval_values(numbers, self.options.xval_scale, self.options.xval_clip)
        return sample


@hookimpl
def plait_config_schema():
    return FinanceOptions


@hookimpl
def plait_sample_transforms(config, split):
    return [FinancePreprocess(config.options(FinanceOptions))]
