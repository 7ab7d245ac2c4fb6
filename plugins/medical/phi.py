"""De-identification: every PHI span of a clinical text, and the text with each replaced."""
from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from datetime import date, timedelta
from importlib.resources import files

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

