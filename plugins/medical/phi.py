"""De-identification: every PHI span of a clinical text, and the text with each replaced."""
from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from datetime import date, timedelta

import regex as re  # Unicode letter classes and scripts, which the re module lacks

from .words import (
    EPONYM_HEADS,
    PARTICLES,
    STREET_ENDINGS,
    STREET_SUFFIXES,
    STREET_TYPES,
    UNIT_WORDS,
    census_names,
    clinical_words,
    english_words,
)

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


def _alternatives(words: list[str] | set[str]) -> str:
    """A regex alternation of ``words``, longest first, each matched as written."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


#: A word in a script other than Latin (Cyrillic, Greek, Arabic, Hebrew, Devanagari, Bengali, Thai, CJK, Hangul...),
#: digits and joiners inside it included ("봉은사820길").
NON_LATIN_WORD = r"[\p{L}\p{M}\p{N}\u200c\u200d]*[^\P{L}\p{Latin}][\p{L}\p{M}\p{N}\u200c\u200d]*"
#: A capitalised word in a cased script: Zeynep, Łukasz, Jean-Pierre, McDonald, Иванов.
UPPER_WORD = r"\p{Lu}[\p{Ll}\p{M}]+(?:\p{Lu}[\p{Ll}\p{M}]+)?(?:[-'’]\p{Lu}?[\p{Ll}\p{M}]+)*"
PARTICLE = _alternatives(PARTICLES - {"st."})
TITLES = (r"(?:Mr|Mrs|Ms|Mx|Miss|Mister|Madam|Dr|Prof|Professor|Doctor|Nurse|NP|RN|PA|Pt|Patient|Sister|Brother|"
          r"Attending|Resident|Fellow|Rev|Sr|Sra|Mme|Mlle|Herr|Frau)\.?")
NAME_TOKEN = rf"(?:{UPPER_WORD}|\p{{Lu}}\.|\p{{Lu}}\p{{Ll}}?['’]\p{{Lu}}[\p{{Ll}}\p{{M}}]+|{NON_LATIN_WORD})"
GENERATION = r"(?:,?\s+(?:Jr\.?|Sr\.?|II|III|IV)(?![\p{L}]))"
NAME_SEQUENCE = (rf"(?:(?:{PARTICLE})\s+)*{NAME_TOKEN}(?:\s+(?:(?:{PARTICLE})\s+)*{NAME_TOKEN}){{0,4}}"
                 rf"{GENERATION}?")
NAME_AFTER_TITLE = rf"\b{TITLES}\s+(?P<name>{NAME_SEQUENCE})"
NAME_AFTER_LABEL = (r"(?i:\b(?:name|patient|attending|physician|provider|signed\s+by|reviewed\s+by|seen\s+by|"
                    r"referred\s+by|accompanied\s+by|dictated\s+by|consent\s+signed\s+by|next\s+of\s+kin|guardian|"
                    r"proxy|spoke\s+with|discussed\s+with|per|contact|informant|caregiver|carer|spouse|husband|wife|"
                    r"son|daughter|mother|father|sister|brother|grandson|granddaughter|grandmother|grandfather|"
                    r"stepson|stepdaughter|niece|nephew|aunt|uncle|cousin|partner|fianc[eé]e?|friend|neighbou?r|"
                    r"interpreter|translator|witness)\b)"
                    rf"\s*[:,]?\s+(?P<name>{NAME_SEQUENCE})")
NAME_PAIR = rf"(?<![\p{{L}}\p{{M}}])(?P<name>{NAME_TOKEN}(?:\s+{NAME_TOKEN}){{1,3}})"
NAME_TOKEN_RE = re.compile(NAME_TOKEN)
WORD = re.compile(r"[\p{L}\p{M}][\p{L}\p{M}\p{N}\u200c\u200d]*(?:['’-][\p{L}\p{M}\p{N}\u200c\u200d]+)*")
NON_LATIN_LETTER = re.compile(r"[^\P{L}\p{Latin}]")
#: two capitals together, or one at the end: "BiPAP", "HFrEF", "MRI" are no names; "McDonald" is one
ABBREVIATION = re.compile(r"\p{Lu}\p{Lu}|\p{Lu}$|^.$")
IDEOGRAPH = re.compile(r"[\p{Han}\p{Hangul}\p{Hiragana}\p{Katakana}]")
LATIN_LETTER = re.compile(r"\p{Latin}")
SENTENCE_END = re.compile(r"(?:^|[.!?:;•\n]\s*|^\s*[-*]\s*)$")

# Addresses: a house number, the street's name and a suffix (USPS, and the many languages that write
# theirs the same way); a street type before the name (rue, calle, via, ul., đường); a compound ending in
# its type (Wellerallee 4); and, in an English text, a run of words in another script with its numbers.
HOUSE = r"\d{1,6}[A-Za-z]?(?:[-/]\d{1,5}[A-Za-z]?)?"
ADDRESS_WORD = rf"(?:{UPPER_WORD}|{NON_LATIN_WORD}|\d{{1,3}}(?:st|nd|rd|th))"
UNIT = rf"(?:{_alternatives(UNIT_WORDS)})\.?\s*#?\s*[\p{{L}}\p{{N}}-]*\d[\p{{L}}\p{{N}}-]*"
SUFFIX = rf"(?:{_alternatives(STREET_SUFFIXES)})(?![\p{{L}}\p{{N}}])\.?"
DIRECTION = r"(?:[NSEW]\.?|North|South|East|West|Norte|Sur|Oriente|Poniente|Nord|Süd|Ost)"
ADDRESS_PATTERNS = [
    # 1534 Ryan Knolls, 29389 Akdeniz Throughway Apt. 606, 844 佐藤 Street
    rf"(?<![\w/.-]){HOUSE},?\s+(?:{DIRECTION}\s+)?(?:{ADDRESS_WORD}\s+){{1,3}}{SUFFIX}(?:,?\s+{UNIT})*",
    # Studio 37, Rosie Loaf; Flat 2, 14 Mill Lane
    rf"(?<![\w/.-]){UNIT},?\s+(?:{HOUSE}\s+)?(?:{ADDRESS_WORD}\s+){{1,3}}{SUFFIX}",
    r"\bP\.?\s?O\.?\s+Box\s+\d+\b",
    # the city before a state and a ZIP code: "Springfield, IL 62704"
    rf"(?<![\p{{L}}]){UPPER_WORD}(?:\s+{UPPER_WORD}){{0,2}}(?=,?\s+[A-Z]{{2}}\s+\d{{5}}\b)",
]
STREET_TYPE = rf"(?P<type>(?i:{_alternatives(STREET_TYPES)}))(?![\p{{L}}])"
ADDRESS_PART = (rf"(?:{UNIT}|{ADDRESS_WORD}|{HOUSE}|(?:{PARTICLE})|d['’]|(?i:số)|{DIRECTION}|"
                rf"(?i:{_alternatives(STREET_TYPES)}))(?![\p{{L}}\p{{N}}])")
#: 91, avenue Auger; Calle Yucatán 384 Interior 098; pl. Daszyńskiego 98/30; Số 24/783 đường 30 Tháng 4
TYPED_ADDRESS = re.compile(rf"(?<![\w/.-])(?:{HOUSE},?\s+)?{STREET_TYPE}(?:[\s,]+{ADDRESS_PART}){{1,7}}")
#: Wellerallee 4, Janin-Hande-Straße 3/7, Leahsteeg 529, Berliner Straße 12
COMPOUND_ADDRESS = re.compile(
    rf"(?<![\w-])(?P<street>(?:{UPPER_WORD}[-\s])*\p{{Lu}}[\p{{L}}\p{{M}}-]*?(?i:{_alternatives(STREET_ENDINGS)}))"
    rf"\s+{HOUSE}(?![\w/])")
FOREIGN_NUMBER = r"\d+(?:[-/.]\d+)*"
FOREIGN_WORD = rf"\(?{NON_LATIN_WORD}['׳״\"]?\)?"
#: words in another script, and the numbers written with them (Bengali digits are \d too)
FOREIGN_RUN = re.compile(rf"(?:{FOREIGN_NUMBER}[\s.]+)?{FOREIGN_WORD}"
                         rf"(?:[\s.,'׳-]+{FOREIGN_WORD}|[\s.]+{FOREIGN_NUMBER}(?![\p{{L}}\p{{N}}]))*")

PHONE_CANDIDATE = re.compile(r"(?<![\w+/.-])\+?\s?(?:\(\d{1,5}\)|\d{1,12})(?:(?:[.-]|\s)?(?:\(\d{1,5}\)|\d{1,12}))*"
                             r"(?:\s?(?:x|ext\.?)\s?\d{1,6})?(?![\w/]|[.,]\d)")
PHONE_CUE = re.compile(r"(?i)\b(?:phone|ph|tel|telephone|call(?:ed)?|cell|mobile|mob|contact|fax|reach(?:ed)?|"
                       r"number|pager|beeper|whatsapp|text(?:ed)?|landline|hotline)\b")
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
    "however", "also", "then", "prefers", "brought", "declined", "arrived", "lives", "turned", "remains", "acct",
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
    """libphonenumber's US matches, and any other number of 7 to 15 digits in a phone's shape that a
    phone's form (+, an area code in brackets, an extension) or a word before it ("phone", "call",
    "contact") marks as one: the numbering plans of every country in one pattern."""
    import phonenumbers

    out = [Span(m.start, m.end, "PHONE")
           for m in phonenumbers.PhoneNumberMatcher(text, "US", leniency=phonenumbers.Leniency.POSSIBLE)]
    out += _spans(LOCAL_PHONE, text, "PHONE")
    for match in PHONE_CANDIDATE.finditer(text):
        number = match.group()
        digits = sum(c.isdigit() for c in re.split(r"\s?(?:x|ext\.?)\s?\d", number)[0])
        if not 7 <= digits <= 15:
            continue
        clause = re.split(r"[.!?;]\s", _before(text, match.start(), 60))[-1]
        if number.lstrip().startswith(("+", "(")) or "(" in number or "x" in number or PHONE_CUE.search(clause):
            out.append(Span(match.start() + len(number) - len(number.lstrip()), match.end(), "PHONE"))
    return [Span(s.start, s.end, "FAX" if FAX_CONTEXT.search(_before(text, s.start, 24)) else "PHONE")
            for s in out if not ID_BEFORE.search(_before(text, s.start, 24))]  # "MRN 4471200" is no phone


def _addresses(text: str) -> list[Span]:
    out = []
    for pattern in ADDRESS_PATTERNS:
        out += _spans(pattern, text, "ADDRESS")
    for match in TYPED_ADDRESS.finditer(text):
        span = _typed_address(text, match)
        if span:
            out.append(span)
    for match in COMPOUND_ADDRESS.finditer(text):
        if not _is_known(match["street"].split()[-1]):  # "Wellerallee 4", not "Monitoring 24"
            out.append(Span(*match.span(), "ADDRESS"))
    for match in FOREIGN_RUN.finditer(text):
        start, end = match.span()
        if text[start] == "(" and ")" not in match.group():
            start += 1
        if _foreign(match.group()):
            out.append(Span(start, end, "ADDRESS" if any(c.isdigit() for c in match.group()) else "NAME"))
    return out


def _typed_address(text: str, match: re.Match[str]) -> Span | None:
    """A street written type first, trimmed to its last name or number; None where it is none: a type
    that is an English word needs a name, and a number too when capitalised ("avenue Auger",
    "Via Roma 12", not "place 3" or "Via Foley"); any other type a name or a number ("ul. Sokola 19")."""
    parts = list(re.finditer(rf"{ADDRESS_PART}", text[match.end("type"):match.end()]))
    offset = match.end("type")
    while parts and not re.search(rf"^(?:{UNIT}|{ADDRESS_WORD}|{HOUSE})$", parts[-1].group()):
        parts.pop()  # a particle or another type at the end belongs to what follows
    if not parts:
        return None
    named = any(re.fullmatch(ADDRESS_WORD, p.group()) and not re.fullmatch(r"\d.*", p.group()) for p in parts)
    numbered = any(c.isdigit() for c in text[match.start():offset + parts[-1].end()])
    street_type = match["type"]
    english = street_type.lower().rstrip(".") in english_words()
    if english:
        ok = named and (numbered or street_type[0].islower())
    else:
        ok = named or numbered
    return Span(match.start(), offset + parts[-1].end(), "ADDRESS") if ok else None


def _foreign(word: str) -> bool:
    """A word in another script than Latin: the plugin reads English, where such a word is a name or a place.
    One Greek letter is not one ("β-blocker", "μg"); one ideograph may be ("王")."""
    return len(NON_LATIN_LETTER.findall(word)) >= 2 or bool(IDEOGRAPH.search(word))


def _key(word: str) -> str:
    """A word as the word lists hold it: lower case, without a possessive."""
    return re.sub(r"['’]s?$", "", word.lower())


def _is_known(word: str) -> bool:
    """An English or clinical word, every part of it ("Mallory-Weiss" is two names)."""
    english, clinical = english_words(), clinical_words()
    parts = [p for p in re.split(r"[-'’]", _key(word)) if p]
    return bool(parts) and all(p in english or p in clinical or p in NOT_NAMES for p in parts)


def _name_runs(text: str) -> list[Span]:
    """Names by their words: runs of two or more capitalised words of which one is no English or clinical
    word, or with a particle between them ("van der"), unless an eponym's noun follows ("Tinel Sign");
    and words in another script. A lone unknown word is left to the cues and to the mentions of names
    found: alone, it is as often a brand of drug that no dictionary holds (Sinemet, Norco)."""
    first, last = census_names()
    out: list[Span] = []
    run: list[tuple[re.Match[str], bool]] = []  # (word, whether it is unknown) of the run so far
    cursor = 0  # where the run's last word or particle ends
    particle = False  # whether the run has one ("Jade van der Horst": a name even of known words)

    def close() -> None:
        nonlocal particle
        if run:
            start, end = run[0][0].start(), run[-1][0].end()
            after = re.match(r"['’]?s?\s+([\p{L}]+)", text[end:end + 40])
            head = after.group(1).lower() if after else ""
            foreign = any(_foreign(w.group()) for w, _ in run)
            evidence = particle or any(u for _, u in run)
            if foreign or (len(run) >= 2 and evidence and head not in EPONYM_HEADS):
                out.append(Span(start, end, "NAME"))
        run.clear()
        particle = False

    for word in WORD.finditer(text):
        surface = word.group()
        if run and text[cursor:word.start()] not in (" ", "\u00a0"):
            close()
        if _foreign(surface):
            run.append((word, True))
        elif surface[0].isupper() and not ABBREVIATION.search(surface) and (key := _key(surface)) not in NOT_NAMES:
            unknown = not _is_known(surface)
            if run or unknown or key in first or key in last:
                run.append((word, unknown))  # a known word may go on a name ("Adèle Bigot"), not start one
            else:
                close()
        elif run and surface in PARTICLES:  # "van" in "Maria van Dijk" goes on if a name follows
            particle = True
        else:
            close()
            continue
        cursor = word.end()
    close()
    return out


def _names(text: str) -> list[Span]:
    first, _ = census_names()
    out = []
    for pattern in (NAME_AFTER_TITLE, NAME_AFTER_LABEL):
        for match in re.finditer(pattern, text):
            keep = []
            for token in NAME_TOKEN_RE.finditer(match.group("name")):  # up to the first word that is not a name
                if token.group().lower().rstrip(".") in NOT_NAMES:
                    break
                keep.append(token)
            if keep and not (len(keep) == 1 and keep[0].group().endswith(".")):
                end = match.start("name") + keep[-1].end()
                suffix = re.match(GENERATION, text[end:]) if len(keep) == len(NAME_TOKEN_RE.findall(
                    match.group("name"))) else None
                out.append(Span(match.start("name"), end + (suffix.end() if suffix else 0), "NAME"))
    for match in re.finditer(NAME_PAIR, text):  # "Grace Thompson": a census first name and a capitalised word
        tokens = match.group("name").split()
        head = tokens[0].lower()
        if head in first and head not in NOT_NAMES and tokens[1].lower() not in NOT_NAMES:
            out.append(Span(match.start("name"), match.end("name"), "NAME"))
    for match in re.finditer(rf"(?<![.!?:]\s)(?<!^)\b{UPPER_WORD}\b", text):  # a lone first name mid-sentence
        word = match.group().lower()
        if word in first and word not in AMBIGUOUS_FIRST and word not in NOT_NAMES and len(word) > 2:
            out.append(Span(match.start(), match.end(), "NAME"))
    out += _name_runs(text)
    # every other mention of a name found above ("Smith's labs", "Mr. John Smith ... John")
    words = {w for s in out for w in NAME_TOKEN_RE.findall(text[s.start:s.end])
             if len(w) > 2 and w.lower() not in NOT_NAMES and not w.endswith(".")}
    if words:
        pattern = r"(?<![\p{L}\p{M}])(?:" + _alternatives(words) + r")(?![\p{L}\p{M}])"
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
    found += _addresses(text)
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

