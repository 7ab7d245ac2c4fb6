"""Condition coding: ICD-10-CM mentions of a text with their negation, uncertainty and history."""
from __future__ import annotations

import functools
import re
from datetime import date
from pathlib import Path
from typing import Any, cast

from plait.core.errors import DataError

from .specificity import most_specific

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
    "ptsd": "F43.10", "adhd": "F90.9", "add": "F90.0", "ocd": "F42.9", "mdd": "F32.9", "depression": "F32.A",
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
# Clinical names, lay terms and abbreviations that ICD-10-CM's descriptions and inclusion terms lack, across
# specialties; a general one ("cancer", "stone", "abscess") is refined by its sentence (see specificity).
CLINICAL_TERMS = {
    # oncology: a cancer word alone is "malignant neoplasm, by site" (ICD-10-CM Index), the site in the sentence
    "cancer": "C80.1", "carcinoma": "C80.1", "adenocarcinoma": "C80.1", "malignancy": "C80.1",
    "malignant tumor": "C80.1", "malignant neoplasm": "C80.1", "metastases": "C79.9", "metastasis": "C79.9",
    "metastatic disease": "C79.9", "mets": "C79.9", "glioblastoma": "C71.9", "gbm": "C71.9", "glioma": "C71.9",
    "astrocytoma": "C71.9", "meningioma": "D32.9", "hcc": "C22.0", "renal cell carcinoma": "C64.9", "rcc": "C64.9",
    "squamous cell carcinoma": "C44.92", "scc": "C44.92", "basal cell carcinoma": "C44.91", "bcc": "C44.91",
    "nsclc": "C34.90", "sclc": "C34.90", "aml": "C92.00", "cll": "C91.10", "cml": "C92.10", "dlbcl": "C83.30",
    "non-hodgkin lymphoma": "C85.90", "nhl": "C85.90", "hodgkin lymphoma": "C81.90", "sarcoma": "C49.9",
    "osteosarcoma": "C41.9", "mesothelioma": "C45.9", "liver cancer": "C22.9", "kidney cancer": "C64.9",
    "thyroid cancer": "C73", "stomach cancer": "C16.9", "gastric cancer": "C16.9", "esophageal cancer": "C15.9",
    "endometrial cancer": "C54.1", "testicular cancer": "C62.90", "myeloma": "C90.00",
    # infections
    "gonorrhea": "A54.9", "chlamydia": "A74.9", "syphilis": "A53.9", "c. diff": "A04.72", "c diff": "A04.72",
    "cdiff": "A04.72", "c. difficile": "A04.72", "c. diff colitis": "A04.72", "clostridium difficile": "A04.72",
    "mrsa infection": "A49.02", "chronic hepatitis c": "B18.2", "chronic hepatitis b": "B18.1", "hep c": "B18.2",
    "hep b": "B18.1", "influenza a": "J10.1", "influenza b": "J10.1", "covid pneumonia": "J12.82", "pna": "J18.9",
    "septic arthritis": "M00.9", "abscess": "L02.91", "boil": "L02.92", "impetigo": "L01.00", "scabies": "B86",
    "ringworm": "B35.9", "athlete's foot": "B35.3", "yeast infection": "B37.9", "bacterial vaginosis": "N76.0",
    "mono": "B27.90", "lyme": "A69.20", "shingles": "B02.9",
    # heart and vessels
    "mitral regurgitation": "I34.0", "mitral stenosis": "I05.0", "aortic regurgitation": "I35.1",
    "tricuspid regurgitation": "I36.1", "heart block": "I45.9", "chb": "I44.2", "av block": "I44.30",
    "first degree av block": "I44.0", "lbbb": "I44.7", "rbbb": "I45.10", "wpw": "I45.6", "long qt": "I45.81",
    "pvcs": "I49.3", "cardiac arrest": "I46.9", "hocm": "I42.1", "pulmonary hypertension": "I27.20",
    "pah": "I27.20", "hypertensive urgency": "I16.0", "hypertensive emergency": "I16.1",
    "carotid stenosis": "I65.29", "raynaud's": "I73.00", "varicose veins": "I83.90", "vte": "I82.90",
    "blood clot": "I82.90",
    # glands and metabolism
    "hashimoto's": "E06.3", "hashimoto thyroiditis": "E06.3", "hashimoto's thyroiditis": "E06.3", "pcos": "E28.2",
    "polycystic ovary syndrome": "E28.2", "adrenal insufficiency": "E27.40", "addison's disease": "E27.1",
    "thyroid nodule": "E04.1", "goiter": "E04.9", "hyperparathyroidism": "E21.3", "prediabetes": "R73.03",
    "metabolic syndrome": "E88.810", "hypertriglyceridemia": "E78.1", "diabetes insipidus": "E23.2",
    "siadh": "E22.2", "overweight": "E66.3", "b12 deficiency": "E53.8", "diabetic foot ulcer": "E11.621",
    "diabetic peripheral neuropathy": "E11.42", "diabetic retinopathy": "E11.319",
    "diabetic kidney disease": "E11.22",
    # kidney and urinary tract
    "stone": "N20.9", "stones": "N20.9", "renal stone": "N20.0", "ureterolithiasis": "N20.1",
    "neurogenic bladder": "N31.9", "renal artery stenosis": "I70.1", "pkd": "Q61.3",
    "polycystic kidney disease": "Q61.3", "urinary incontinence": "R32", "erectile dysfunction": "N52.9",
    "prostatitis": "N41.9", "epididymitis": "N45.1", "end stage renal disease": "N18.6",
    # muscles, bones and joints
    "rotator cuff tear": "M75.100", "tennis elbow": "M77.10", "golfer's elbow": "M77.00",
    "psoriatic arthritis": "L40.50", "joint pain": "M25.50", "arthralgia": "M25.50", "knee pain": "M25.569",
    "shoulder pain": "M25.519", "hip pain": "M25.559", "muscle pain": "M79.10", "scoliosis": "M41.9",
    "generalized osteoarthritis": "M15.9", "polyarthritis": "M13.0", "bursitis": "M71.9", "tendinitis": "M77.9",
    "tendonitis": "M77.9", "carpal tunnel": "G56.00", "cts": "G56.00", "frozen shoulder": "M75.00",
    # mind
    "panic attack": "F41.0", "panic attacks": "F41.0", "eating disorder": "F50.9", "bulimia": "F50.20",
    "substance abuse": "F19.10", "cocaine use disorder": "F14.20", "cannabis use disorder": "F12.20",
    "schizoaffective disorder": "F25.9", "psychosis": "F29", "adjustment disorder": "F43.20",
    # gut and liver
    "diverticulosis": "K57.90", "barrett's esophagus": "K22.70", "hiatal hernia": "K44.9",
    "small bowel obstruction": "K56.609", "sbo": "K56.609", "colitis": "K52.9", "anal fissure": "K60.2",
    "nash": "K75.81", "celiac disease": "K90.0", "gastroparesis": "K31.84", "hepatic encephalopathy": "K76.82",
    # lungs
    "ild": "J84.9", "pulmonary fibrosis": "J84.10", "ipf": "J84.112", "pneumothorax": "J93.9",
    "bronchiectasis": "J47.9", "lung nodule": "R91.1", "pulmonary nodule": "R91.1",
    # nerves
    "trigeminal neuralgia": "G50.0", "restless legs": "G25.81", "essential tremor": "G25.0", "bppv": "H81.10",
    # blood
    "sickle cell disease": "D57.1", "thalassemia": "D56.9", "itp": "D69.3", "neutropenia": "D70.9",
    "leukocytosis": "D72.829", "pancytopenia": "D61.818",
    # skin, eyes, ears
    "acne": "L70.0", "rosacea": "L71.9", "hidradenitis": "L73.2", "macular degeneration": "H35.30",
    "amd": "H35.30", "tinnitus": "H93.19", "tonsillitis": "J03.90",
}
SUFFIXES = re.compile(r"(?:,\s*|\s+)(?:unspecified|not elsewhere classified|site not specified|without complications|"
                      r"without .*|with unspecified .*|unspecified .*|initial encounter.*|nos)$", re.IGNORECASE)


@functools.lru_cache(maxsize=4)
def lexicon(extra: str | None = None) -> dict[str, str]:
    """Lower-case term -> ICD-10-CM code: the synonyms above, then short forms of ICD-10-CM's descriptions and
    inclusion terms ("Frozen shoulder" under M75.0), the most general code winning a term that several codes
    share: ``most_specific`` then picks the code the sentence supports."""
    import simple_icd_10_cm as icd

    terms: dict[str, str] = {}
    for code in icd.get_all_codes(True):
        if not icd.is_category_or_subcategory(code) and not icd.is_extended_subcategory(code):
            continue  # chapters and blocks
        if code[:1] in "VWXY" or (code[:1] in "ST" and len(code) > 3 and not code.endswith("A")):
            continue  # external causes ("contact with..."), and injuries other than their initial encounter
        # inclusion terms name a condition's other names; a Z code's ("Pregnancy NOS") name a state or an
        # encounter, which a note mentions far more often than it codes
        inclusion = [] if code.startswith("Z") else icd.get_inclusion_term(code)
        names = [icd.get_description(code), *(re.sub(r"\s+NOS$", "", t) for t in inclusion)]
        for term in {t for name in names for t in _description_terms(name)}:
            if 4 <= len(term) and len(term.split()) <= 6:
                known = terms.get(term)
                if known is None or (len(code), code) < (len(known), known):
                    terms[term] = code
    terms.update(SYNONYMS)
    terms.update(CLINICAL_TERMS)
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
        # spaCy splits "t2dm" but not "T2DM": short terms and terms with digits are added in upper case too;
        # and each term in the plural ("panic attacks"), hyphens read as spaces as in the text ("end-stage")
        variants = {_unhyphenated(t) for t in code_terms}
        variants |= {f"{t}s" for t in variants if not t.endswith("s") and t[-1:].isalpha() and len(t) > 3}
        variants |= {t.upper() for t in variants if len(t) <= 6 or any(c.isdigit() for c in t)}
        matcher.add(code, list(cast(Any, nlp.tokenizer).pipe(sorted(variants))))
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
    doc = nlp.make_doc(_unhyphenated(text))
    spans = [SpacySpan(doc, start, end, label=match_id) for match_id, start, end in matcher(doc)]
    doc.ents = filter_spans(spans)
    for _, component in nlp.pipeline:
        doc = component(doc)
    found = []
    for e in doc.ents:
        mention = text[e.start_char:e.end_char]
        if NOT_A_CONDITION.match(text, e.end_char) or (len(mention) == 2 and STATE_ZIP.match(text, e.end_char)):
            continue  # "the flu vaccine", "the pain clinic", "Burlington, VT 05401"
        code, unspecified = most_specific(e.label_, mention, _clause(text, e.start_char, e.end_char))
        found.append({"start": e.start_char, "end": e.end_char, "text": mention, "code": code,
                      "specificity": "unspecified" if unspecified else "specified", "negated": bool(e._.negated),
                      "uncertain": bool(e._.uncertain), "historical": bool(e._.historical)})
    return found


#: What follows a condition's name when the text is about a service or a prevention, not the condition.
NOT_A_CONDITION = re.compile(r"\s+(?:vaccines?|vaccinations?|shots?|clinics?|team|service|educator|screening)\b",
                             re.IGNORECASE)
#: A state's two letters before a ZIP code.
STATE_ZIP = re.compile(r"\s+\d{5}(?:-\d{4})?\b")


#: Where a mention's qualifiers end: a stop, semicolon or comma, or a word that starts another clause.
CLAUSE_CUTS = re.compile(r"[.;,\n]\s|\b(?:and|but|however|versus|vs|who|which)\b")


def _unhyphenated(text: str) -> str:
    """``text`` with a hyphen between letters read as a space: the same length, so offsets hold."""
    return re.sub(r"(?<=[^\W\d])-(?=[^\W\d])", " ", text)


def _clause(text: str, start: int, end: int) -> str:
    """The words that qualify a mention: from the last stop, semicolon, comma or "and" before it to the next
    one after it ("CKD stage 4" in "COPD, CHF and CKD stage 4")."""
    before = [m.end() for m in CLAUSE_CUTS.finditer(text, 0, start)]
    after = CLAUSE_CUTS.search(text, end)
    return text[before[-1] if before else 0:after.start() if after else len(text)]
