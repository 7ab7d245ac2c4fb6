"""medical: de-identification, then ICD-10-CM condition mentions with negation, uncertainty and history.

Per sample, in this order, so that no identifier reaches the model, the logs or a checkpoint:

- ``text``: the text with PHI replaced (typed placeholders such as ``[NAME]``, or consistent surrogates);
- ``phi``: ``[{start, end, type}]``, offsets in the *original* text (the identifiers themselves are not kept);
- ``entities``: ``[{start, end, text, code, negated, uncertain, historical}]``, offsets in the new ``text``.

What does what, and why:

- PHI: phone and fax numbers with ``phonenumbers`` (Google's libphonenumber); names, dates, ages over 89,
  e-mail, URLs, IPs, record and account numbers, street addresses and ZIP codes with the patterns below, and first
  names from the US census lists the ``names`` package carries. presidio-analyzer was tried first: its URL
  recognizer downloads the public-suffix list at run time (which fails offline) and its name recognizer needs a
  spaCy model that is not on PyPI.
- Conditions: a spaCy ``PhraseMatcher`` over terms made from the ~98,000 ICD-10-CM descriptions that
  ``simple-icd-10-cm`` carries (", unspecified", "without complications" and the like removed) plus the common
  abbreviations and synonyms in ``SYNONYMS``.
- Context: negspacy's NegEx runs three times with three trigger sets (negation, uncertainty, history), which is
  ConText's design. medspacy (ConText's own home) pins spaCy < 3.8, built for NumPy 1; plait runs NumPy 2.

    plugins:
      medical: {replace: surrogate, codes_as_tokens: true}

Its length (over 600 lines) is deliberate: a built-in plugin is one module, and de-identification,
condition coding and their context rules share one pass over the text, which must stay in this order.
"""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from datetime import date, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field

from plait.core.config import Options
from plait.core.errors import DataError
from plait.core.hookspecs import hookimpl


class MedicalOptions(Options):
    deidentify: bool = Field(True, description="replace PHI before anything else reads the text")
    replace: Literal["placeholder", "surrogate"] = Field(
        "placeholder", description="placeholder: [NAME], [DATE]...; surrogate: the same name gives the same made-up "
        "name within a text, dates move by one shift per text, digits are scrambled consistently")
    entities: bool = Field(True, description="find ICD-10-CM condition mentions and their context")
    codes_as_tokens: bool = Field(False, description="append the affirmed conditions' codes to the text, "
                                  "e.g. ' [codes] E11.9 I10', so the text encoder sees them as tokens")
    synonyms: str | None = Field(None, description="a TSV file of extra 'term<TAB>ICD-10-CM code' lines")


# ---------------------------------------------------------------------------------------------- de-identification

MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?"
         r"|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
ORDINAL = r"\d{1,2}(?:st|nd|rd|th)?"
DATE_PATTERNS = [
    rf"\b{MONTH}\s+{ORDINAL}(?:,?\s+\d{{4}})?\b",                 # March 14, 2021 / Nov. 3 / June 18
    rf"\b(?:the\s+)?{ORDINAL}\s+(?:of\s+)?{MONTH}(?:,?\s+\d{{4}})?\b",  # 14 March 2021 / the 3rd of March 2020
    rf"\b{MONTH}\s+\d{{4}}\b",                                    # March 2020
    r"\b\d{4}-\d{1,2}-\d{1,2}\b",                                  # 2021-03-14
    r"(?<![\d.])\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}(?!\d|\.\d)",            # 03/14/2021, 14.03.2021, 09-17-2023
    r"(?<![\d/])\d{1,2}/\d{1,2}(?![\d/])",                         # 3/14
]
AGE_PATTERNS = [
    r"\b(?P<age>9\d|1[0-4]\d)(?=[- ](?:years?|yrs?|y)[- ]?(?:old|o\b|/o))",
    r"\b(?P<age>9\d|1[0-4]\d)\s*(?:y/o|yo|y\.o\.)\b",
    r"\b(?P<age>9\d|1[0-4]\d)\s+years?\s+of\s+age\b",
    (r"\b(?:age[sd]?|aged|turned|turns|was|is)\s*:?\s+(?P<age>9\d|1[0-4]\d)\b(?!\s*(?:%|mg|mcg|g\b|kg|lbs?|cm|mm|ml|"
    r"bpm|beats|units?|percent|degrees|°|/|\.\d|x\b|minutes|min\b|hours|days|weeks|months))"),
]
STREET = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Way|Terrace|Ter|"
          r"Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq)\b\.?")
ADDRESS_PATTERNS = [
    (rf"\b\d{{1,6}}\s+(?:[NSEW]\.?\s+|North\s+|South\s+|East\s+|West\s+)?(?:[A-Z][A-Za-z'-]*\s+){{1,3}}{STREET}"
    r"(?:,?\s+(?:Apt|Apartment|Unit|Suite|Ste|Room|Rm|#)\.?\s*#?[A-Za-z0-9-]+)?"),
    r"\bP\.?\s?O\.?\s+Box\s+\d+\b",
]
ZIP_PATTERNS = [r"(?<=\b[A-Z]{2}\s)\d{5}(?:-\d{4})?\b",  # after a state: "IL 62704"
                r"(?i:zip(?:\s*code)?|postal\s+code)\s*:?\s*(?P<zip>\d{5}(?:-\d{4})?)\b"]
EMAIL = r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
URL = r"\b(?:https?://|www\.)[^\s<>\"']+"
IPV4 = r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)"
IPV6 = r"(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}(?![:\w])"
LOCAL_PHONE = r"(?<![\d-])\d{3}[-.]\d{4}(?![\d-])"
ID_KEYWORD = (r"(?i:\b(?:mrn|medical\s+record(?:\s+(?:number|no\.?|#))?|record\s+(?:number|no\.?|#)|patient\s+id|"
              r"id|accession|acct|account(?:\s+(?:number|no\.?|#))?|member\s+id)\b)\s*(?:#|no\.?|number)?\s*:?\s*"
              r"(?P<id>[A-Za-z0-9][A-Za-z0-9-]{3,})")
ID_TOKEN = (r"(?<![\w-])(?=(?:[A-Za-z-]*\d){5})"  # an ID-shaped token with at least five digits
            r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*(?![\w-])")
ACCOUNT_CONTEXT = re.compile(r"(?i)\b(?:acct|account|billing|guarantor|member|insurance|invoice)\b")
FAX_CONTEXT = re.compile(r"(?i)\bfax\b")
ID_BEFORE = re.compile(r"(?i)\b(?:mrn|record|acct|account|id|accession)\b(?:\s*(?:#|no\.?|number|:))*\s*$")
TITLES = (r"(?:Mr|Mrs|Ms|Mx|Miss|Dr|Prof|Doctor|Nurse|NP|RN|PA|Pt|Patient|Sister|Brother|Attending|Resident|"
          r"Fellow)\.?")
NAME_TOKEN = r"(?:[A-Z][a-z]+(?:[-'’][A-Z]?[a-z]+)*|[A-Z]\.|[A-Z][a-z]?[’'][A-Z][a-z]+)"
NAME_AFTER_TITLE = rf"\b{TITLES}\s+(?P<name>{NAME_TOKEN}(?:\s+{NAME_TOKEN}){{0,3}})"
NAME_AFTER_LABEL = (r"(?i:\b(?:name|patient|attending|physician|provider|signed\s+by|reviewed\s+by|seen\s+by|"
                    r"consent\s+signed\s+by|next\s+of\s+kin|guardian|proxy|spoke\s+with|discussed\s+with|"
                    r"husband|wife|son|daughter|mother|father|sister|brother|grandson|granddaughter|partner)\b)"
                    rf"\s*[:,]?\s+(?P<name>{NAME_TOKEN}(?:\s+{NAME_TOKEN}){{0,3}})")
NAME_PAIR = rf"\b(?P<name>{NAME_TOKEN}(?:\s+{NAME_TOKEN}){{1,3}})"
NAME_TOKEN_RE = re.compile(NAME_TOKEN)
NOT_NAMES = {  # capitalised words the name patterns meet that are not names
    "md", "do", "rn", "np", "pa", "phd", "mph", "dds", "patient", "pt", "the", "a", "an", "on", "at", "in", "for",
    "with", "and", "or", "of", "to", "he", "she", "his", "her", "they", "their", "is", "was", "has", "had", "who",
    "call", "called", "seen", "admitted", "discharged", "denies", "reports", "presents", "presented", "no", "not",
    "mild", "acute", "chronic", "history", "exam", "labs", "plan", "assessment", "follow", "followed", "reviewed",
    "signed", "date", "dob", "mrn", "id", "age", "aged", "fax", "phone", "home", "work", "cell", "email", "portal",
    "address", "name", "hospital", "clinic", "center", "medical", "health", "department", "unit", "street", "avenue",
    "road", "suite", "apt", "box", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
    "january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november",
    "december", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "today",
    "tomorrow", "yesterday", "emergency", "icu", "er", "ed", "cardiology", "neurology",
    "oncology", "radiology", "psychiatry", "nephrology", "surgery", "interpreter", "family", "mr", "mrs", "ms", "dr",
    "however", "also", "then", "prefers", "brought", "declined", "arrived", "lives", "turned", "remains",
}
# First names that are also common English words: a name only next to another name or after a title.
AMBIGUOUS_FIRST = {"may", "june", "april", "august", "will", "mark", "bill", "grace", "hope", "faith", "joy", "rose",
                   "iris", "dawn", "summer", "autumn", "page", "case", "major", "king", "hunter", "chase", "frank",
                   "rich", "guy", "art", "don", "pat", "sue", "dean", "clay", "gene", "lee", "ray", "rod", "sunny",
                   "chance", "long", "young", "price", "christian", "see", "an", "so", "in", "my", "lane", "miles",
                   "wade", "carol", "sterling", "precious", "merry", "ivy", "lily", "ruby", "pearl", "amber", "crystal",
                   "angel", "misty", "jean", "mo", "ed", "al", "della", "neil", "else", "do", "sol", "tad", "val",
                   "ward", "earl", "norman", "noble", "royal", "stormy", "storm", "love", "harmony", "liberty",
                   "star", "sky", "river", "nurse", "patient", "sister", "son", "daughter", "ct", "st"}


@functools.lru_cache(maxsize=1)
def first_names() -> frozenset[str]:
    """The US census first-name lists (1990; 5,494 names) the ``names`` package carries, lower case."""
    folder = files("names")
    found: set[str] = set()
    for name in ("dist.male.first", "dist.female.first"):
        found.update(line.split()[0].lower() for line in (folder / name).read_text().splitlines() if line.strip())
    return frozenset(found)


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    type: str


def _spans(pattern: str, text: str, phi_type: str, group: str | None = None, flags: int = 0) -> list[Span]:
    out = []
    for match in re.finditer(pattern, text, flags):
        start, end = match.span(group) if group and match.group(group) is not None else match.span()
        out.append(Span(start, end, phi_type))
    return out


def _before(text: str, start: int, width: int) -> str:
    """The ``width`` characters before ``start``: where "fax", "MRN" or "account" says what a number is."""
    return text[max(0, start - width):start]


def _phones(text: str) -> list[Span]:
    import phonenumbers

    out = []
    matcher = phonenumbers.PhoneNumberMatcher(text, "US", leniency=phonenumbers.Leniency.POSSIBLE)
    for match in matcher:
        out.append(Span(match.start, match.end, "PHONE"))
    out += _spans(LOCAL_PHONE, text, "PHONE")
    return [Span(s.start, s.end, "FAX" if FAX_CONTEXT.search(_before(text, s.start, 24)) else "PHONE")
            for s in out if not ID_BEFORE.search(_before(text, s.start, 24))]  # "MRN 4471200" is no phone


def _names(text: str) -> list[Span]:
    known = first_names()
    out = []
    for pattern in (NAME_AFTER_TITLE, NAME_AFTER_LABEL):
        for match in re.finditer(pattern, text):
            keep = []
            for token in NAME_TOKEN_RE.finditer(match.group("name")):  # up to the first word that is not a name
                if token.group().lower().rstrip(".") in NOT_NAMES:
                    break
                keep.append(token)
            if keep and not (len(keep) == 1 and keep[0].group().endswith(".")):
                out.append(Span(match.start("name"), match.start("name") + keep[-1].end(), "NAME"))
    for match in re.finditer(NAME_PAIR, text):  # "Grace Thompson": a census first name and a capitalised word
        tokens = match.group("name").split()
        first = tokens[0].lower()
        if first in known and first not in NOT_NAMES and tokens[1].lower() not in NOT_NAMES:
            out.append(Span(match.start("name"), match.end("name"), "NAME"))
    for match in re.finditer(rf"(?<![.!?:]\s)(?<!^)\b{NAME_TOKEN}\b", text):  # a lone first name mid-sentence
        word = match.group().lower()
        if word in known and word not in AMBIGUOUS_FIRST and word not in NOT_NAMES and len(word) > 2:
            out.append(Span(match.start(), match.end(), "NAME"))
    # every other mention of a name found above ("Smith's labs", "Mr. John Smith ... John")
    words = {w for s in out for w in NAME_TOKEN_RE.findall(text[s.start:s.end])
             if len(w) > 2 and w.lower() not in NOT_NAMES and not w.endswith(".")}
    if words:
        pattern = r"\b(?:" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b"
        out += _spans(pattern, text, "NAME")
    return out


def _ips(text: str) -> list[Span]:
    out = []
    for pattern in (IPV4, IPV6):
        for match in re.finditer(pattern, text):
            try:
                ipaddress.ip_address(match.group())
            except ValueError:
                continue
            out.append(Span(*match.span(), "IP"))
    return out


def _ids(text: str) -> list[Span]:
    spans = _spans(ID_KEYWORD, text, "MRN", group="id") + _spans(ID_TOKEN, text, "MRN")
    return [Span(s.start, s.end, "ACCOUNT" if ACCOUNT_CONTEXT.search(_before(text, s.start, 32)) else "MRN")
            for s in spans if any(c.isdigit() for c in text[s.start:s.end])]


def find_phi(text: str) -> list[Span]:
    """Every PHI span of ``text``, in order, overlaps merged (see ``merge_spans``)."""
    found: list[Span] = []
    found += _spans(EMAIL, text, "EMAIL")
    found += [Span(s.start, s.start + len(text[s.start:s.end].rstrip(".,;:)]")), "URL")  # not the full stop after it
              for s in _spans(URL, text, "URL")]
    found += _ips(text)
    for pattern in DATE_PATTERNS:  # month names are case-sensitive: "may have" is no date
        found += _spans(pattern, text, "DATE")
    for pattern in AGE_PATTERNS:
        found += _spans(pattern, text, "AGE", group="age", flags=re.IGNORECASE)
    for pattern in ADDRESS_PATTERNS:
        found += _spans(pattern, text, "ADDRESS")
    found += _spans(ZIP_PATTERNS[0], text, "ZIP") + _spans(ZIP_PATTERNS[1], text, "ZIP", group="zip")
    found += _phones(text)
    found += _ids(text)
    found += _names(text)
    return merge_spans(found)


PRIORITY = {t: i for i, t in enumerate(("EMAIL", "URL", "IP", "ADDRESS", "DATE", "FAX", "PHONE", "ZIP", "AGE",
                                        "ACCOUNT", "MRN", "NAME"))}


def merge_spans(spans: list[Span]) -> list[Span]:
    """Overlapping spans become one: its extent is their union, its type the most specific one's."""
    merged: list[Span] = []
    for span in sorted(spans, key=lambda s: (s.start, -s.end, PRIORITY[s.type])):
        if merged and span.start < merged[-1].end:
            last = merged[-1]
            kind = last.type if PRIORITY[last.type] <= PRIORITY[span.type] else span.type
            merged[-1] = Span(last.start, max(last.end, span.end), kind)
        else:
            merged.append(span)
    return merged


class Surrogates:
    """Consistent made-up values for one text: the same original gives the same surrogate."""

    FIRST = ("Alex", "Jordan", "Taylor", "Morgan", "Casey", "Riley", "Jamie", "Avery", "Quinn", "Rowan")
    LAST = ("Smith", "Garcia", "Johnson", "Lee", "Brown", "Martin", "Clark", "Lopez", "Walker", "Young")

    def __init__(self, text: str) -> None:
        self.seed = hashlib.sha256(text.encode("utf-8", "replace")).digest()
        self.date_shift = timedelta(days=int.from_bytes(self.seed[:2], "big") % 730 - 365)
        self.names: dict[str, str] = {}  # per word, so "Smith" later in the text is what "John Smith" became

    def _hash(self, value: str) -> int:
        return int.from_bytes(hashlib.sha256(self.seed + value.encode("utf-8", "replace")).digest()[:8], "big")

    def __call__(self, original: str, phi_type: str) -> str:
        h = self._hash(original.lower())
        if phi_type == "NAME":
            words = original.split()
            out = []
            for i, word in enumerate(words):
                if word not in self.names:
                    if word.endswith(".") and len(word) == 2:  # an initial
                        self.names[word] = f"{'ABCDEFGHJKLMNPRSTW'[self._hash(word) % 18]}."
                    else:
                        pool = self.FIRST if i == 0 and len(words) > 1 else self.LAST
                        self.names[word] = pool[self._hash(word.lower()) % len(pool)]
                out.append(self.names[word])
            return " ".join(out)
        if phi_type == "DATE":
            return self._shift_date(original) or "[DATE]"
        if phi_type == "AGE":
            return "90+"
        if phi_type == "EMAIL":
            return f"person{h % 1000}@example.org"
        if phi_type == "URL":
            return f"https://example.org/{h % 100000}"
        if phi_type == "ADDRESS":
            return f"{h % 900 + 100} Main Street"
        digits = iter(str(h).rjust(20, "7"))
        return "".join(next(digits) if c.isdigit() else c for c in original)  # same shape, other digits

    def _shift_date(self, original: str) -> str | None:
        numbers = re.fullmatch(r"(\d{1,2})[/.-](\d{1,2})[/.-](\d{4})", original)
        iso = re.fullmatch(r"(\d{4})-(\d{1,2})-(\d{1,2})", original)
        try:
            if iso:
                shifted = date(int(iso[1]), int(iso[2]), int(iso[3])) + self.date_shift
                return shifted.isoformat()
            if numbers:
                shifted = date(int(numbers[3]), int(numbers[1]), int(numbers[2])) + self.date_shift
                return f"{shifted.month:02d}/{shifted.day:02d}/{shifted.year}"
        except ValueError:
            return None
        return None


def deidentify(text: str, replace: str = "placeholder") -> tuple[str, list[Span]]:
    """The text with every PHI span replaced, and the spans (offsets in ``text``)."""
    spans = find_phi(text)
    surrogate = Surrogates(text) if replace == "surrogate" else None
    pieces, cursor = [], 0
    for span in spans:
        pieces.append(text[cursor:span.start])
        pieces.append(surrogate(text[span.start:span.end], span.type) if surrogate else f"[{span.type}]")
        cursor = span.end
    pieces.append(text[cursor:])
    return "".join(pieces), spans


# ------------------------------------------------------------------------------------------------ conditions

# Abbreviations and everyday names that ICD-10-CM's own descriptions do not contain.
SYNONYMS = {
    "htn": "I10", "hypertension": "I10", "high blood pressure": "I10", "t2dm": "E11.9", "dm2": "E11.9",
    "dm ii": "E11.9", "niddm": "E11.9", "type 2 diabetes": "E11.9", "type ii diabetes": "E11.9", "diabetes": "E11.9",
    "diabetes mellitus": "E11.9", "t1dm": "E10.9", "dm1": "E10.9", "iddm": "E10.9", "type 1 diabetes": "E10.9",
    "dka": "E11.10", "diabetic ketoacidosis": "E11.10", "diabetic nephropathy": "E11.21",
    "diabetic neuropathy": "E11.40", "mi": "I21.9", "ami": "I21.9", "stemi": "I21.3", "nstemi": "I21.4",
    "heart attack": "I21.9", "myocardial infarction": "I21.9", "chf": "I50.9", "hf": "I50.9", "hfref": "I50.20",
    "hfpef": "I50.30", "heart failure": "I50.9", "congestive heart failure": "I50.9", "af": "I48.91",
    "afib": "I48.91", "a-fib": "I48.91", "a fib": "I48.91", "atrial fibrillation": "I48.91", "aflutter": "I48.92",
    "copd": "J44.9", "emphysema": "J43.9", "asthma": "J45.909", "ckd": "N18.9", "chronic kidney disease": "N18.9",
    "esrd": "N18.6", "aki": "N17.9", "acute kidney injury": "N17.9", "arf": "N17.9", "dvt": "I82.409",
    "deep vein thrombosis": "I82.409", "deep venous thrombosis": "I82.409", "pe": "I26.99",
    "pulmonary embolism": "I26.99", "pulmonary embolus": "I26.99", "cva": "I63.9", "stroke": "I63.9",
    "tia": "G45.9", "transient ischemic attack": "G45.9", "cad": "I25.10", "coronary artery disease": "I25.10",
    "ischemic heart disease": "I25.9", "hld": "E78.5", "hyperlipidemia": "E78.5", "dyslipidemia": "E78.5",
    "high cholesterol": "E78.00", "hypercholesterolemia": "E78.00", "gerd": "K21.9", "acid reflux": "K21.9",
    "reflux": "K21.9", "osa": "G47.33", "sleep apnea": "G47.33", "obstructive sleep apnea": "G47.33",
    "uti": "N39.0", "urinary tract infection": "N39.0", "bph": "N40.0", "enlarged prostate": "N40.0",
    "benign prostatic hyperplasia": "N40.0", "ra": "M06.9", "rheumatoid arthritis": "M06.9", "oa": "M19.90",
    "osteoarthritis": "M19.90", "degenerative joint disease": "M19.90", "djd": "M19.90", "pad": "I73.9",
    "pvd": "I73.9", "peripheral artery disease": "I73.9", "peripheral arterial disease": "I73.9",
    "peripheral vascular disease": "I73.9", "claudication": "I73.9", "sob": "R06.02", "shortness of breath": "R06.02",
    "dyspnea": "R06.00", "dyspnoea": "R06.00", "doe": "R06.09", "cp": "R07.9", "chest pain": "R07.9",
    "angina": "I20.9", "svt": "I47.1", "supraventricular tachycardia": "I47.1", "vt": "I47.20",
    "ptsd": "F43.10", "adhd": "F90.9", "add": "F90.0", "ocd": "F42.9", "mdd": "F32.9", "depression": "F32.9",
    "major depression": "F32.9", "anxiety": "F41.9", "gad": "F41.1", "anxiety disorder": "F41.9",
    "bipolar disorder": "F31.9", "bipolar": "F31.9", "schizophrenia": "F20.9", "autism": "F84.0", "asd": "F84.0",
    "dementia": "F03.90", "alzheimer disease": "G30.9", "alzheimer's disease": "G30.9", "alzheimer's": "G30.9",
    "alzheimers": "G30.9", "parkinson disease": "G20", "parkinson's disease": "G20", "parkinson's": "G20",
    "parkinsonism": "G20", "ms": "G35", "multiple sclerosis": "G35", "als": "G12.21",
    "amyotrophic lateral sclerosis": "G12.21", "lupus": "M32.9", "sle": "M32.9", "fibromyalgia": "M79.7",
    "sciatica": "M54.30", "low back pain": "M54.50", "back pain": "M54.9", "lbp": "M54.50", "neck pain": "M54.2",
    "chronic pain": "G89.29", "migraine": "G43.909", "migraines": "G43.909", "headache": "R51.9",
    "headaches": "R51.9", "seizure": "R56.9", "seizures": "R56.9", "epilepsy": "G40.909",
    "seizure disorder": "G40.909", "syncope": "R55", "syncopal episode": "R55", "fainting": "R55",
    "dizziness": "R42", "vertigo": "R42", "fatigue": "R53.83", "tiredness": "R53.83", "weakness": "R53.1",
    "fever": "R50.9", "fevers": "R50.9", "cough": "R05.9", "wheezing": "R06.2", "stridor": "R06.1",
    "nausea": "R11.0", "vomiting": "R11.10", "nausea and vomiting": "R11.2", "abdominal pain": "R10.9",
    "diarrhea": "R19.7", "diarrhoea": "R19.7", "constipation": "K59.00", "edema": "R60.9", "oedema": "R60.9",
    "pedal edema": "R60.0", "leg swelling": "R60.0", "palpitations": "R00.2", "tachycardia": "R00.0",
    "bradycardia": "R00.1", "murmur": "R01.1", "heart murmur": "R01.1", "hypotension": "I95.9",
    "orthostatic hypotension": "I95.1", "hematuria": "R31.9", "jaundice": "R17", "ascites": "R18.8",
    "confusion": "R41.0", "altered mental status": "R41.82", "ams": "R41.82", "delirium": "R41.0",
    "loss of consciousness": "R40.20", "loc": "R40.20", "weight loss": "R63.4", "anorexia": "R63.0",
    "rash": "R21", "hives": "L50.9", "urticaria": "L50.9", "epistaxis": "R04.0", "nosebleed": "R04.0",
    "hypoxemia": "R09.02", "hypoxia": "R09.02", "lymphadenopathy": "R59.9", "splenomegaly": "R16.1",
    "hepatomegaly": "R16.0", "suicidal ideation": "R45.851", "si": "R45.851", "insomnia": "G47.00",
    "pneumonia": "J18.9", "cap": "J18.9", "community-acquired pneumonia": "J18.9", "infiltrate": "J18.9",
    "lung infiltrate": "J18.9", "copd exacerbation": "J44.1", "influenza": "J11.1", "flu": "J11.1",
    "covid-19": "U07.1", "covid": "U07.1", "covid19": "U07.1", "sars-cov-2": "U07.1", "sepsis": "A41.9",
    "cellulitis": "L03.90", "infection": "B99.9", "uri": "J06.9", "upper respiratory infection": "J06.9",
    "common cold": "J00", "sore throat": "J02.9", "pharyngitis": "J02.9", "strep throat": "J02.0",
    "bronchitis": "J20.9", "acute bronchitis": "J20.9", "sinusitis": "J32.9", "acute sinusitis": "J01.90",
    "otitis media": "H66.90", "ear infection": "H66.90", "conjunctivitis": "H10.9", "pink eye": "H10.9",
    "glaucoma": "H40.9", "cataract": "H26.9", "cataracts": "H26.9", "hearing loss": "H91.90",
    "allergic rhinitis": "J30.9", "hay fever": "J30.1", "shingles": "B02.9", "herpes zoster": "B02.9",
    "hiv": "B20", "aids": "B20", "hepatitis c": "B18.2", "hcv": "B18.2", "hepatitis b": "B18.1", "hbv": "B18.1",
    "cirrhosis": "K74.60", "liver cirrhosis": "K74.60", "fatty liver": "K76.0", "nafld": "K76.0",
    "gi bleed": "K92.2", "gib": "K92.2", "gastrointestinal bleeding": "K92.2", "melena": "K92.1",
    "hematemesis": "K92.0", "peptic ulcer disease": "K27.9", "pud": "K27.9", "peptic ulcer": "K27.9",
    "gastritis": "K29.70", "gastroenteritis": "K52.9", "viral gastroenteritis": "A08.4", "ibs": "K58.9",
    "irritable bowel syndrome": "K58.9", "crohn's disease": "K50.90", "crohn disease": "K50.90",
    "crohn's": "K50.90", "ulcerative colitis": "K51.90", "uc": "K51.90", "ibd": "K52.9",
    "diverticulitis": "K57.92", "appendicitis": "K37", "acute appendicitis": "K35.80", "cholecystitis": "K81.9",
    "gallstones": "K80.20", "cholelithiasis": "K80.20", "pancreatitis": "K85.90", "hemorrhoids": "K64.9",
    "kidney stone": "N20.0", "kidney stones": "N20.0", "nephrolithiasis": "N20.0", "renal colic": "N23",
    "pyelonephritis": "N10", "cystitis": "N30.00", "urinary retention": "R33.9", "incontinence": "R32",
    "anemia": "D64.9", "anaemia": "D64.9", "iron deficiency anemia": "D50.9", "thrombocytopenia": "D69.6",
    "hypokalemia": "E87.6", "hyperkalemia": "E87.5", "hyponatremia": "E87.1", "hypernatremia": "E87.0",
    "dehydration": "E86.0", "hypoglycemia": "E16.2", "hyperglycemia": "R73.9", "hypothyroidism": "E03.9",
    "hyperthyroidism": "E05.90", "obesity": "E66.9", "morbid obesity": "E66.01", "vitamin d deficiency": "E55.9",
    "osteoporosis": "M81.0", "gout": "M10.9", "psoriasis": "L40.9", "eczema": "L20.9",
    "atopic dermatitis": "L20.9", "pressure ulcer": "L89.90", "pressure injury": "L89.90", "bedsore": "L89.90",
    "hip fracture": "S72.009A", "fracture": "T14.8XXA", "concussion": "S06.0X0A", "fall": "W19.XXXA",
    "peripheral neuropathy": "G62.9", "neuropathy": "G62.9", "cardiomyopathy": "I42.9",
    "aortic stenosis": "I35.0", "endocarditis": "I33.0", "pericarditis": "I31.9", "acute pericarditis": "I30.9",
    "aaa": "I71.40", "abdominal aortic aneurysm": "I71.40", "meningitis": "G03.9",
    "intracranial hemorrhage": "I62.9", "ich": "I62.9", "subarachnoid hemorrhage": "I60.9",
    "respiratory failure": "J96.90", "acute respiratory failure": "J96.00", "ards": "J80", "pleural effusion": "J90",
    "pulmonary edema": "J81.0", "tuberculosis": "A15.9", "tb": "A15.9", "lyme disease": "A69.20",
    "candidiasis": "B37.9", "thrush": "B37.0", "alcohol use disorder": "F10.20", "alcoholism": "F10.20",
    "alcohol abuse": "F10.10", "opioid use disorder": "F11.20", "oud": "F11.20", "substance use disorder": "F19.20",
    "nicotine dependence": "F17.210", "tobacco use": "Z72.0", "smoker": "F17.210", "preeclampsia": "O14.90",
    "gestational diabetes": "O24.419", "gdm": "O24.419", "breast cancer": "C50.919", "lung cancer": "C34.90",
    "colon cancer": "C18.9", "colorectal cancer": "C18.9", "prostate cancer": "C61",
    "adenocarcinoma of the prostate": "C61", "prostate adenocarcinoma": "C61", "melanoma": "C43.9",
    "lymphoma": "C85.90", "leukemia": "C95.90", "pancreatic cancer": "C25.9", "bladder cancer": "C67.9",
    "ovarian cancer": "C56.9", "cervical cancer": "C53.9", "skin cancer": "C44.90", "brain tumor": "D49.6",
}
SUFFIXES = re.compile(r"(?:,\s*|\s+)(?:unspecified|not elsewhere classified|site not specified|without complications|"
                      r"without .*|with unspecified .*|unspecified .*|initial encounter.*|nos)$", re.IGNORECASE)


@functools.lru_cache(maxsize=4)
def lexicon(extra: str | None = None) -> dict[str, str]:
    """Lower-case term -> ICD-10-CM code: the synonyms above, then short forms of ICD-10-CM's descriptions
    (the most general code wins a term that several codes share)."""
    import simple_icd_10_cm as icd

    terms: dict[str, str] = {}
    for code in icd.get_all_codes(False):
        if code[:1] in "VWXY" or (code[:1] in "ST" and len(code) > 3 and not code.endswith("A")):
            continue  # external causes ("contact with..."), and injuries other than their initial encounter
        description = icd.get_description(code)
        for term in _description_terms(description):
            if 4 <= len(term) and len(term.split()) <= 6:
                known = terms.get(term)
                if known is None or (len(code), code) < (len(known), known):
                    terms[term] = code
    terms.update(SYNONYMS)
    if extra:
        terms.update(read_synonyms(Path(extra)))
    return terms


def _description_terms(description: str) -> set[str]:
    text = description.lower().replace("’", "'")
    without_parens = re.sub(r"\s*\([^)]*\)", "", text).strip()
    with_parens = re.sub(r"[()]", "", text).strip()
    out = set()
    for variant in {without_parens, with_parens}:
        variant = re.sub(r"^unspecified\s+", "", variant)
        previous = None
        while previous != variant:
            previous, variant = variant, SUFFIXES.sub("", variant).strip(" ,")
        out.add(variant)
    return {t for t in out if t and not t.startswith(("other ", "encounter ")) and t.split()[-1] not in DANGLING}


DANGLING = {"of", "with", "in", "on", "to", "and", "or", "for", "the", "a", "an", "by", "due", "from", "at"}


def read_synonyms(path: Path) -> dict[str, str]:
    import simple_icd_10_cm as icd

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"plugins.medical.synonyms: cannot read {path}: {exc}") from None
    out = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not icd.is_valid_item(parts[1].strip()):
            raise DataError(f"{path}:{number}: expected 'term<TAB>ICD-10-CM code', got {line[:80]!r}")
        out[parts[0].strip().lower()] = parts[1].strip()
    return out


NEGATION = {  # negspacy's en_clinical set, with "rule out" moved to uncertainty (ConText's reading)
    "remove_preceding": ["rule out", "r/o", "rule the patient out", "rule him out", "rule her out", "rules out"],
    "add_preceding": ["negative", "no history of", "without any", "excluded"],
    "add_pseudo": ["cannot rule out", "can not rule out", "cannot exclude", "can not exclude", "cannot be excluded",
                   "cannot be ruled out", "not excluded"],
    "add_following": ["was excluded", "were excluded", "was negative", "were negative", "is negative", "absent",
                      "is unlikely", "has been ruled out", "ruled out"],
}
UNCERTAINTY = {
    "pseudo_negations": ["no evidence", "not likely", "without concern"],
    "preceding_negations": [
        "possible", "possibly", "probable", "probably", "likely", "suspected", "suspect", "suspicion for",
        "suspicious for", "concern for", "concerning for", "worrisome for", "questionable", "question of", "?",
        "rule out", "r/o", "cannot rule out", "can not rule out", "cannot exclude", "can not exclude",
        "differential includes", "differential diagnosis", "ddx", "may have", "might have", "may represent",
        "might represent", "could be", "could represent", "suggestive of", "evaluate for", "evaluation for",
        "unlikely", "considered", "consider", "presumed", "presumptive", "versus", "vs", "vs.", "cannot be excluded"],
    "following_negations": ["is possible", "possible", "is suspected", "suspected", "is likely", "likely",
                            "considered", "was considered", "is considered", "is questioned", "?", "not excluded",
                            "cannot be excluded", "cannot be ruled out", "versus", "vs"],
    "termination": ["but", "however", "although", "though", "which", "aside from", "except", "apart from",
                    "secondary to", "due to", "because", "confirmed", ";"],
}
HISTORY = {
    "pseudo_negations": ["no history of", "no prior", "no previous", "no past", "family history", "no h/o"],
    "preceding_negations": [
        "history of", "hx of", "h/o", "past medical history", "pmh", "pmhx", "past history", "remote history",
        "prior", "previous", "previously", "former", "formerly", "past", "in the past", "status post", "s/p",
        "history significant for", "medical history"],
    "following_negations": ["in the past", "years ago", "year ago", "months ago", "last year", "last spring",
                            "last summer", "last fall", "last winter", "in childhood", "as a child", "in her previous",
                            "in his previous", "in a previous", "resected", "in the past year",
                            *(f"in {year}" for year in range(1940, date.today().year))],
    "termination": ["but", "however", "now", "currently", "presents", "presented", "today", "on exam", "admitted",
                    "with", "and now", ";"],
}


@functools.lru_cache(maxsize=4)
def clinical_pipeline(extra_synonyms: str | None = None):
    """A blank English spaCy pipeline: sentences, the condition matcher, then NegEx three times (negation,
    uncertainty, history); built once per process."""
    import spacy
    from negspacy.negation import Negex  # noqa: F401 - registers the "negex" factory
    from negspacy.termsets import termset
    from spacy.matcher import PhraseMatcher

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    terms = lexicon(extra_synonyms)
    matcher = PhraseMatcher(nlp.vocab, attr="LOWER")
    codes: dict[str, list[str]] = {}
    for term, code in terms.items():
        codes.setdefault(code, []).append(term)
    for code, code_terms in codes.items():
        # spaCy splits "t2dm" but not "T2DM": short terms and terms with digits are added in upper case too
        variants = code_terms + [t.upper() for t in code_terms if len(t) <= 6 or any(c.isdigit() for c in t)]
        matcher.add(code, list(cast(Any, nlp.tokenizer).pipe(variants)))
    negation = termset("en_clinical")
    negation.remove_patterns({"preceding_negations": NEGATION["remove_preceding"]})
    negation.add_patterns({"pseudo_negations": NEGATION["add_pseudo"], "preceding_negations": NEGATION["add_preceding"],
                           "following_negations": NEGATION["add_following"]})
    nlp.add_pipe("negex", name="negation", config={"neg_termset": negation.get_patterns(), "extension_name": "negated"})
    nlp.add_pipe("negex", name="uncertainty", config={"neg_termset": UNCERTAINTY, "extension_name": "uncertain"})
    nlp.add_pipe("negex", name="history", config={"neg_termset": HISTORY, "extension_name": "historical"})
    return nlp, matcher


def find_conditions(text: str, extra_synonyms: str | None = None) -> list[dict]:
    """ICD-10-CM condition mentions of ``text`` with their context flags (longest match wins). Long texts go
    through in pieces cut at sentence ends: NegEx's cost grows with sentences times triggers."""
    found = []
    for offset, piece in sentence_windows(text, WINDOW_CHARS):
        for entity in _conditions(piece, extra_synonyms):
            entity["start"] += offset
            entity["end"] += offset
            found.append(entity)
    return found


WINDOW_CHARS = 4000


def sentence_windows(text: str, size: int) -> list[tuple[int, str]]:
    """(offset, piece) pairs covering ``text``, each at most ``size`` characters where a sentence end allows."""
    if len(text) <= size:
        return [(0, text)]
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = max(text.rfind(mark, start, end) for mark in (". ", "\n", "; ", "? ", "! "))
            end = cut + 1 if cut > start else end
        pieces.append((start, text[start:end]))
        start = end
    return pieces


def _conditions(text: str, extra_synonyms: str | None) -> list[dict]:
    from spacy.tokens import Span as SpacySpan
    from spacy.util import filter_spans

    nlp, matcher = clinical_pipeline(extra_synonyms)
    doc = nlp.make_doc(text)
    spans = [SpacySpan(doc, start, end, label=match_id) for match_id, start, end in matcher(doc)]
    doc.ents = filter_spans(spans)
    for _, component in nlp.pipeline:
        doc = component(doc)
    return [{"start": e.start_char, "end": e.end_char, "text": e.text, "code": e.label_,
             "negated": bool(e._.negated), "uncertain": bool(e._.uncertain), "historical": bool(e._.historical)}
            for e in doc.ents]


# ------------------------------------------------------------------------------------------------- the transform

class MedicalPreprocess:
    """Picklable: holds only options; the spaCy pipeline is built on first use in each process."""

    def __init__(self, options: MedicalOptions) -> None:
        self.options = options

    def __call__(self, sample: dict) -> dict:
        sample = dict(sample)
        text = sample.get("text") or ""
        phi: list[Span] = []
        if self.options.deidentify and text:
            text, phi = deidentify(text, self.options.replace)
        entities = find_conditions(text, self.options.synonyms) if self.options.entities and text else []
        if self.options.codes_as_tokens and entities:
            codes = [e["code"] for e in entities if not (e["negated"] or e["uncertain"] or e["historical"])]
            if codes:
                text = f"{text} [codes] {' '.join(dict.fromkeys(codes))}"
        sample.update(text=text, phi=[{"start": s.start, "end": s.end, "type": s.type} for s in phi],
                      entities=entities)
        return sample


@hookimpl
def plait_config_schema():
    return MedicalOptions


@hookimpl
def plait_sample_transforms(config, split):
    options = config.options(MedicalOptions)
    if options.synonyms:
        read_synonyms(Path(options.synonyms))  # a bad file fails here, once, not in every worker
    return [MedicalPreprocess(options)]
