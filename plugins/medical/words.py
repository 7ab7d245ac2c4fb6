"""The word lists the de-identifier reads: what is an ordinary word, what is a clinical one, which words are
names, and how streets are named in the languages a clinic's patients write their addresses in.

A capitalised word that is neither an English word nor a clinical one is most likely a name, whatever
country the name comes from; the lists here make that test possible without a list of every name:

- English words: the lower-case entries of Webster's Second International (``web2``, via ``english-words``)
  that are still in use: in pyspellchecker's English frequency list (OpenSubtitles). Webster's capitalised
  entries, the proper nouns, are left out, so "Smith" the trade is a word and "Aaron" is not; the frequency
  list leaves out its obsolete words, so "berend" and "ulu" are no longer words.
- Clinical words: the words of ICD-10-CM's ~98,000 descriptions (anatomy, and eponyms such as Parkinson,
  Crohn or Hashimoto) and the one-word drug names of ``drug-named-entity-recognition`` (DrugBank, MeSH and
  the NHS list, generic and brand names).
- Names: the US census first names (1990, 5,494) and last names (88,799) of the ``names`` package, for the
  English names that are also words ("Grace Brown").
- Streets: USPS Publication 28's street suffixes (Appendix C1, with the UK's own), and the street types of
  the European, Latin American and Vietnamese conventions, in the way libpostal's dictionaries list them.
"""
from __future__ import annotations

import bz2
import functools
import pickle
import re
from importlib.resources import files


@functools.lru_cache(maxsize=1)
def english_words() -> frozenset[str]:
    """Ordinary English words in use (~60,000): Webster's Second's lower-case entries that people still write."""
    from english_words import get_english_words_set
    from spellchecker import SpellChecker

    in_use = SpellChecker(language="en").word_frequency.dictionary
    return frozenset(w for w in get_english_words_set(["web2"], lower=False) if w[:1].islower() and w in in_use)


@functools.lru_cache(maxsize=1)
def clinical_words() -> frozenset[str]:
    """Lower-case words of ICD-10-CM's descriptions and one-word drug names, generic and brand."""
    import simple_icd_10_cm as icd

    found: set[str] = set()
    for code in icd.get_all_codes(True):
        found.update(re.findall(r"[a-z]+", icd.get_description(code).lower().replace("'s", "")))
    with bz2.open(str(files("drug_named_entity_recognition") / "drug_ner_dictionary.pkl.bz2"), "rb") as handle:
        drugs = pickle.load(handle)["drug_variant_to_canonical"]  # the package's own dictionary, read as it does
    found.update(name for name in drugs if name.isalpha())
    return frozenset(found)


@functools.lru_cache(maxsize=1)
def census_names() -> tuple[frozenset[str], frozenset[str]]:
    """(first names, last names) of the 1990 US census, lower case."""
    folder = files("names")

    def read(*names: str) -> frozenset[str]:
        return frozenset(line.split()[0].lower() for name in names
                         for line in (folder / name).read_text().splitlines() if line.strip())

    return read("dist.male.first", "dist.female.first"), read("dist.all.last")


#: USPS Publication 28, Appendix C1: the primary street suffixes and their standard abbreviations, with the
#: UK's own (Close, Crescent, Gate, Mews, Parade, Rise, Wharf, Yard). Capitalised in an address.
STREET_SUFFIXES = """
Alley Aly Anex Arcade Avenue Ave Bayou Beach Bend Bluff Bluffs Bottom Boulevard Blvd Branch Bridge Brook Brooks
Burg Burgs Bypass Camp Canyon Cape Causeway Center Centers Circle Cir Circles Cliff Cliffs Close Club Common
Commons Corner Corners Course Court Ct Courts Cove Coves Creek Crescent Cres Crest Crossing Crossroad Crossroads
Curve Dale Dam Divide Drive Dr Drives Estate Estates Expressway Expy Extension Extensions Fall Falls Ferry Field
Fields Flat Flats Ford Fords Forest Forge Forges Fork Forks Fort Freeway Fwy Garden Gardens Gate Gateway Glen Glens
Green Greens Grove Groves Harbor Harbors Haven Heights Highway Hwy Hill Hills Hollow Inlet Island Islands Isle
Junction Junctions Key Keys Knoll Knolls Lake Lakes Land Landing Lane Ln Light Lights Loaf Lock Locks Lodge Loop
Mall Manor Manors Meadow Meadows Mews Mill Mills Mission Motorway Mount Mountain Mountains Neck Orchard Oval
Overpass Parade Park Parks Parkway Pkwy Parkways Pass Passage Path Pike Pine Pines Place Pl Plain Plains Plaza
Point Points Port Ports Prairie Radial Ramp Ranch Rapid Rapids Rest Ridge Ridges Rise River Road Rd Roads Route
Row Rue Run Shoal Shoals Shore Shores Skyway Spring Springs Spur Spurs Square Sq Squares Station Stravenue Stream
Street St Streets Summit Terrace Ter Throughway Trace Track Trafficway Trail Trl Trailer Tunnel Turnpike
Underpass Union Unions Valley Valleys Viaduct View Views Village Villages Ville Vista Walk Walks Wall Way Ways Well
Wells Wharf Yard
""".split()

#: Street types written before the street's name (French, Spanish, Portuguese, Italian, Polish, Vietnamese, and
#: the German and Dutch ones written apart); an address needs a number as well when the type is capitalised,
#: unless the type is no English word.
STREET_TYPES = """
rue avenue av. boulevard bd allée allee chemin impasse place quai route cours passage square voie sentier
calle avenida av pasaje corredor callejón callejon privada cerrada circuito prolongación prolongacion retorno
diagonal andador periférico periferico viaducto calzada carretera camino paseo glorieta circunvalación
continuación eje peatonal
rua travessa alameda praça praca largo quadra parque colônia colonia conjunto rodovia vila sítio sitio chácara
chacara residencial fazenda feira condomínio condominio núcleo nucleo trecho vereda setor estrada lote ladeira
distrito morro esplanada estação jardim lago lagoa loteamento passarela pátio recanto trevo vale viela viaduto
aeroporto área campo favela
via viale piazza piazzale corso vicolo strada contrada borgo canale stretto rotonda incrocio lungomare
lungotevere galleria salita piazzetta rione traversa
ul. ulica al. aleja pl. plac os. osiedle rondo skwer
đường phố ngõ ngách hẻm khóm ấp thôn xóm khu số
""".split()

#: Compound street names that end in their type ("Wellerallee 4", "Leahsteeg 529"): German, Dutch, Scandinavian.
STREET_ENDINGS = """
straße strasse str. allee platz weg gasse ring damm ufer chaussee steig pfad markt stieg steeg dreef straat
laan plein gracht kade singel hof dijk gade vej väg vägen gatan gata veien gate boulevard
""".split()

#: What follows a house number in an address: apartment, floor, building.
UNIT_WORDS = """
Apt Apartment Unit Suite Ste Room Rm Flat Studio Floor Fl Building Bldg # Piano Scala Interno Int Interior Edif
Edificio Depto Departamento Piso Local Mz Lt Bloco Casa Andar Sala Apto Lok Lokal Bus Boîte Etage Étage Whg
""".split()

#: Lower-case words inside names ("van der Berg", "da Silva", "bin Abdullah").
PARTICLES = {"van", "von", "der", "den", "de", "del", "della", "degli", "da", "das", "do", "dos", "du", "di", "la",
             "le", "lo", "ter", "ten", "bin", "binti", "bint", "ibn", "al", "el", "y", "zu", "af", "mac", "st."}

#: Nouns an eponym names ("Tinel sign", "Baker's cyst", "Foley catheter"): a capitalised word before one of
#: them is a disease, a sign or a device, not a person.
EPONYM_HEADS = {
    "disease", "diseases", "syndrome", "syndromes", "sign", "signs", "test", "tests", "maneuver", "manoeuvre",
    "reflex", "phenomenon", "palsy", "tear", "cyst", "ulcer", "ulcers", "fracture", "lymphoma", "sarcoma", "tumor",
    "tumour", "catheter", "tube", "drain", "stain", "scale", "score", "criteria", "classification", "procedure",
    "operation", "repair", "position", "triad", "node", "nodes", "esophagus", "oesophagus", "contracture",
    "deformity", "thyroiditis", "encephalopathy", "anomaly", "malformation", "disorder", "pouch", "line", "lines",
    "incision", "fixation", "splint", "cast", "technique", "protocol", "formula", "law", "equation", "maneuvre",
    "point", "space", "ligament", "duct", "canal", "gland", "glands", "bodies", "body", "cells", "cell", "ring",
    "granuloma", "nodule", "nodules", "arthritis", "dystrophy", "ataxia", "chorea", "neuralgia", "neuroma", "hernia",
    "diverticulum", "lesion", "lesions", "spots", "rash", "stage", "staging", "type", "lens", "valve", "shunt",
    "clamp", "forceps", "retractor", "needle", "mask", "device", "pump", "stocking", "stockings", "view",
}
