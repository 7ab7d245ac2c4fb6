"""The most specific ICD-10-CM code the words around a condition support.

The matcher finds "osteoarthritis" and gives M19.90; the sentence says "of the right knee". ICD-10-CM's
Index would lead a coder from the main term through its subterms (site, laterality, acute or chronic, with or
without a complication) to M17.11. Without the Index, the descriptions serve. Every billable code near the
matched one (its ICD-10-CM block; any malignant neoplasm for a cancer) that keeps the matched code's main term
("atrial fibrillation", not "fibrillation") is scored: one point per description word the clause supports,
less one per word it asserts that the clause does not ("other" costs half, "specified" two). Words that only
state the default ("unspecified", "primary", "without complications", "initial encounter") cost nothing, so
with no other support the unspecified code wins, and is marked so. A matched leaf code is replaced only by a
code with more of the clause's own words behind it, and what the clause says is absent ("without residual
deficits") supports nothing.

The clause's words are normalised first: plurals, anatomy to ICD-10-CM's wording ("leg" is a lower limb,
"pancreatic" is the pancreas, "distal radius" the lower end of the radius), "right"/"left" to "unilateral",
"no" to "without", and an abbreviation to the words of its code ("CKD" to chronic kidney disease).
"""
from __future__ import annotations

import functools
import re

#: Words that state the default a code assumes: asserting them needs no support.
DEFAULTS = {
    "unspecified", "primary", "without", "complication", "complications", "uncomplicated", "initial", "encounter",
    "closed", "idiopathic", "essential", "not", "intractable", "having", "achieved", "remission", "nos", "site",
    "sites", "part", "organism", "elsewhere", "classified", "of", "the", "and", "or", "in", "to", "due", "by", "for",
    "at", "a", "an", "as", "on", "type", "cell", "female", "region", "with",
}
#: What asserting an unsupported word costs: one point, less for "other" (ICD-10-CM's home for a named kind that
#: has no code of its own), more for "specified" ("Other specified" needs the text to name the kind).
COST = {"other": 0.5, "specified": 2.0}
#: Words that earn a code nothing when the clause has them too: "with" counts through what it is with.
NO_CREDIT = {"of", "the", "and", "or", "in", "to", "due", "by", "for", "at", "a", "an", "as", "on", "with", "without",
             "not", "other", "unspecified", "type", "site", "sites", "part", "region"}
#: The parts of a description that assert nothing: "without coma", "unspecified whether with hypoxia or
#: hypercapnia", "not specified as traumatic", and what "and"/"or" adds to a site ("liver and intrahepatic bile
#: duct" is a code for the liver too).
UNASSERTED = re.compile(r"\([^)]*\)|\[[^]]*\]|\b(?:without|unspecified whether|not specified as)\b[^,]*"
                        r"|\b(?:and|or)\b(?:(?!\bof\b)[^,])*", re.IGNORECASE)
#: After a mention, what the clause says is absent.
ABSENT = re.compile(r"\b(?:without|no|denies|negative for)\b", re.IGNORECASE)
QUALIFIERS = {"unilateral", "bilateral", "right", "left", "acute", "chronic", "subacute", "primary", "unspecified"}
#: Paired organs named in the plural are both of them.
PAIRED = {"knees", "hips", "shoulders", "elbows", "wrists", "ankles", "feet", "hands", "eyes", "ears", "legs", "arms",
          "lungs", "kidneys", "breasts", "ovaries"}
#: Words of one group exclude each other: the clause's choice overrides the matched code's.
OPPOSITES = [{"acute", "chronic", "subacute"}, {"right", "left", "bilateral", "unilateral"},
             {"with", "without"}]
#: A clause's word -> the words ICD-10-CM uses for it.
ANATOMY = {
    "leg": "lower limb extremity leg", "legs": "lower limb extremity leg", "calf": "lower leg limb",
    "shin": "lower leg limb", "thigh": "lower limb thigh femur", "arm": "upper limb extremity arm",
    "forearm": "upper limb forearm", "wrist": "upper limb wrist", "elbow": "upper limb elbow",
    "hand": "hand upper limb", "finger": "finger hand", "thumb": "thumb hand", "toe": "toe foot ankle",
    "toes": "toe foot ankle", "heel": "foot ankle heel", "ankle": "ankle foot", "foot": "foot ankle",
    "neck": "neck cervical", "distal": "lower end distal", "proximal": "upper end proximal",
    "pancreatic": "pancreas", "pulmonary": "lung pulmonary", "renal": "kidney renal", "hepatic": "liver hepatic",
    "cardiac": "heart cardiac", "gastric": "stomach gastric", "cerebral": "brain cerebral", "ovarian": "ovary",
    "colonic": "colon", "rectal": "rectum", "prostatic": "prostate", "cutaneous": "skin", "ocular": "eye",
    "otic": "ear", "nasal": "nose", "esophageal": "esophagus", "duodenal": "duodenum", "ureteral": "ureter",
    "urethral": "urethra", "uterine": "uterus", "vesical": "bladder", "bony": "bone", "osseous": "bone",
    "both": "bilateral", "no": "without", "metastases": "secondary", "metastatic": "secondary",
    "metastasis": "secondary", "stone": "calculus", "sacrum": "sacral", "angina": "angina pectoris",
    "mrsa": "methicillin resistant staphylococcus aureus", "coli": "escherichia coli",
    "diff": "clostridium difficile", "difficile": "clostridium difficile", "luts": "lower urinary tract symptoms",
    "rll": "right lower lobe", "rul": "right upper lobe", "rml": "right middle lobe", "lll": "left lower lobe",
    "lul": "left upper lobe", "b/l": "bilateral", "ue": "upper limb", "le": "lower limb",
}
WORD = re.compile(r"[a-z0-9]+(?:/[a-z])?")


def _normal(word: str) -> str:
    """A word as descriptions and clauses are compared: lower case, singular."""
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is", "ies")):
        return word[:-1]
    return word


def words(text: str) -> set[str]:
    return {_normal(w) for w in WORD.findall(text.lower().replace("'s", "").replace("’s", ""))}


@functools.cache
def _description(code: str) -> tuple[frozenset[str], frozenset[str]]:
    """(the words a code's description credits: all but what it says is absent; the words it asserts: outside
    parentheses and "without ..." or "unspecified whether ..." phrases)."""
    import simple_icd_10_cm as icd

    text = icd.get_description(code)
    credited = re.sub(r"\b(?:without|unspecified whether|not specified as)\b[^,]*", " ", text, flags=re.IGNORECASE)
    return frozenset(words(credited) - NO_CREDIT), frozenset(words(UNASSERTED.sub(" ", text)) - DEFAULTS)


@functools.cache
def _pool(code: str) -> tuple[str, ...]:
    """The billable codes a mention coded ``code`` may become: its block's, or every malignant neoplasm's."""
    import simple_icd_10_cm as icd

    ancestors = icd.get_ancestors(code)
    if code.startswith("C"):
        roots = [c for c in icd.get_children(ancestors[-1]) if c[:1] == "C"]  # C00-C96, chapter 2
    else:
        roots = [ancestors[-2] if len(ancestors) >= 2 else code]
    leaves = [c for root in roots for c in [root, *icd.get_descendants(root)]
              if icd.is_leaf(c) and not icd.is_chapter_or_block(c)]
    return tuple(c for c in leaves if not (c[:1] in "ST" and len(c) == 8 and not c.endswith("A")))


@functools.cache
def _head(code: str) -> frozenset[str]:
    """The main term of a code's description, which any code that replaces it must keep: the words before
    its first "of", "with", "due to", "in" or comma, qualifiers aside ("atrial fibrillation" of I48.91, not
    "fibrillation": ventricular fibrillation is another disease)."""
    import simple_icd_10_cm as icd

    first = re.split(r",|\b(?:of|with|without|due to|in)\b", icd.get_description(code), maxsplit=1)[0]
    return frozenset(words(first) - NO_CREDIT - DEFAULTS - QUALIFIERS)


@functools.cache
def _lineage(code: str) -> frozenset[str]:
    """The words of a code's description and its parents' up to the category: R10.31 "Right lower quadrant
    pain" is abdominal pain through R10 "Abdominal and pelvic pain"."""
    import simple_icd_10_cm as icd

    found = set(_description(code)[0])
    for parent in icd.get_ancestors(code):
        if icd.is_chapter_or_block(parent):
            break
        found |= _description(parent)[0]
    return frozenset(found)


def _clause_words(clause: str) -> set[str]:
    """The clause's words, normalised as the module docstring says (its abbreviations aside)."""
    raw = set(WORD.findall(clause.lower()))
    found = words(clause)
    for word in list(found):
        if word in ANATOMY:
            found |= set(ANATOMY[word].split())
    if raw & PAIRED:
        found.add("bilateral")
    if found & {"right", "left"} and "bilateral" not in found:
        found.add("unilateral")
    return found


def most_specific(code: str, mention: str, clause: str) -> tuple[str, bool]:
    """(the code among ``code``'s neighbours that the clause supports best, whether it is an unspecified one).
    ``mention`` is the matched text: an abbreviation brings its code's words into the clause. Another code
    replaces a leaf ``code`` only with more words of the clause behind it, not merely fewer against it, so a
    bare "influenza" keeps the synonym table's J11.1."""
    import simple_icd_10_cm as icd

    if not icd.is_valid_item(code):
        return code, False
    credited, _ = _description(code)
    expansion = set() if words(mention) - NO_CREDIT <= credited else set(credited)
    at = clause.lower().find(mention.lower())
    absent = ABSENT.search(clause, at + len(mention)) if at >= 0 else None
    if absent:  # "stroke without residual deficits": no deficit to code
        clause = clause[:absent.start()]
    stated = _clause_words(clause)
    for group in OPPOSITES:  # the clause's "chronic" overrides the abbreviation's "acute"
        if stated & group:
            expansion -= group
    support = stated | expansion
    head = _head(code)

    def evidence(candidate: str) -> int:  # what the clause itself says, the abbreviation's words aside
        return len(_description(candidate)[0] & stated)

    def score(candidate: str) -> tuple[float, float, int, bool]:
        credited, asserted = _description(candidate)
        cost = sum(COST.get(w, 1.0) for w in asserted - support)
        return len(credited & support) - cost, -cost, evidence(candidate), candidate == code

    pool = [c for c in _pool(code) if head <= _lineage(c)] or [code]
    best = max(pool, key=score)
    if icd.is_leaf(code) and evidence(best) <= evidence(code):
        best = code
    return best, "unspecified" in words(icd.get_description(best))
