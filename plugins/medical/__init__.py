"""medical: de-identification, then ICD-10-CM condition mentions with negation, uncertainty and history.

Per sample, in this order, so that no identifier reaches the model, the logs or a checkpoint:

- ``text``: the text with PHI replaced (typed placeholders such as ``[NAME]``, or consistent surrogates);
- ``phi``: ``[{start, end, type}]``, offsets in the *original* text (the identifiers themselves are not kept);
- ``entities``: ``[{start, end, text, code, specificity, negated, uncertain, historical}]``, offsets in the new
  ``text``; ``specificity`` is ``unspecified`` when the sentence supports no more than an unspecified code.

What does what, and why:

- PHI: dates, ages over 89, e-mail, URLs, IPs, record and account numbers and ZIP codes with patterns; phone
  numbers with ``phonenumbers`` (Google's libphonenumber) and, for every other country's numbering plan, any
  7 to 15 digits in a phone's shape that a "+", brackets or a word such as "phone" or "contact" marks.
  Names by cue (titles, roles and kin: "Dr.", "wife of", "per"), by form (two or more capitalised words of which
  one is no English or clinical word, particles such as "van der" between; any word in a non-Latin script),
  and by the US census lists for the English names that are also words. No list of the world's names is
  needed: ``words`` says what counts as a word. Street addresses in the forms of many countries: a house
  number, a name and a USPS suffix; a street type first (rue, calle, via, ul., đường); a compound ending in its
  type (Wellerallee 4); a run of words in another script with its numbers. presidio-analyzer was tried first:
  its URL recognizer downloads the public-suffix list at run time (which fails offline) and its name
  recognizer needs a spaCy model, and no spaCy model is on PyPI.
- Conditions: a spaCy ``PhraseMatcher`` over terms made from the ~98,000 ICD-10-CM descriptions and their
  inclusion terms that ``simple-icd-10-cm`` carries (", unspecified", "without complications" and the like
  removed), plus the abbreviations, synonyms and lay terms in ``SYNONYMS`` and ``CLINICAL_TERMS``, plurals and
  hyphens read as the text writes them. Each match then gets the most specific code its clause supports:
  site, laterality, stage, acute or chronic, with or without a complication (``specificity``).
- Context: negspacy's NegEx runs three times with three trigger sets (negation, uncertainty, history), which is
  ConText's design. medspacy (ConText's own home) pins spaCy < 3.8, built for NumPy 1; plait runs NumPy 2.

    plugins:
      medical: {replace: surrogate, codes_as_tokens: true}

Modules: ``phi`` (de-identification) with ``words`` (its word lists), ``conditions`` (ICD-10-CM coding and
context) with ``specificity`` (the most specific code a sentence supports); this module holds the
options, the transform and the hooks. The transform runs them in that order, so no identifier reaches the
condition matcher.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from plait.core.config import Options
from plait.core.hookspecs import hookimpl

from .conditions import find_conditions, read_synonyms
from .phi import Span, deidentify, find_phi

__all__ = ["MedicalOptions", "MedicalPreprocess", "deidentify", "find_conditions", "find_phi", "read_synonyms"]


class MedicalOptions(Options):
    deidentify: bool = Field(True, description="replace PHI before anything else reads the text")
    replace: Literal["placeholder", "surrogate"] = Field(
        "placeholder", description="placeholder: [NAME], [DATE]...; surrogate: the same name gives the same made-up "
        "name within a text, dates move by one shift per text, digits are scrambled consistently")
    entities: bool = Field(True, description="find ICD-10-CM condition mentions and their context")
    codes_as_tokens: bool = Field(False, description="append the affirmed conditions' codes to the text, "
                                  "e.g. ' [codes] E11.9 I10', so the text encoder sees them as tokens")
    synonyms: str | None = Field(None, description="a TSV file of extra 'term<TAB>ICD-10-CM code' lines")


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
