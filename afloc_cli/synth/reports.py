"""Free-text reports and short phrases for synthetic findings.

The wording varies (synonyms for kinds and places, several sentence shapes,
normal sentences in random order) so that a model has to read the text rather
than match a template. Every mention of a finding contains one of its kind's
keywords (kinds.py) and, for a sided finding, the word "left" or "right"; the
tests rely on that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from afloc_cli.synth.kinds import KIND_BY_KEY, KINDS
from afloc_cli.synth.render import Finding

# (noun, countable) per kind; a countable noun takes "a"/"an".
NOUNS: dict[str, tuple[tuple[str, bool], ...]] = {
    "lung_opacity": (
        ("opacity", True), ("airspace opacity", True), ("airspace disease", False),
        ("opacification", False), ("hazy opacity", True),
    ),
    "consolidation": (("consolidation", False), ("focal consolidation", False), ("airspace consolidation", False)),
    "nodule": (("nodule", True), ("pulmonary nodule", True), ("nodular density", True), ("solid nodule", True)),
    "atelectasis": (("atelectasis", False), ("atelectatic change", False), ("subsegmental atelectasis", False)),
    "pleural_effusion": (("pleural effusion", True), ("effusion", True), ("layering pleural effusion", True)),
    "pneumothorax": (("pneumothorax", True),),
}  # fmt: skip
ADJECTIVES: dict[str, tuple[str, ...]] = {
    "lung_opacity": ("", "patchy", "ill-defined", "faint", "new"),
    "consolidation": ("", "dense", "lobar", "new"),
    "nodule": ("", "rounded", "well-circumscribed", "solitary", "large"),
    "atelectasis": ("", "plate-like", "linear", "streaky"),
}
# Prepositional places per zone ({s} = left/right) and the adjective forms for phrases.
PLACES: dict[str, tuple[str, ...]] = {
    "upper": (
        "in the {s} upper zone", "at the {s} apex", "in the upper {s} lung", "in the {s} upper lobe",
        "in the {s} apical region", "in the {s} upper lung field",
    ),
    "middle": (
        "in the {s} mid zone", "in the {s} mid lung", "in the middle {s} lung zone", "in the {s} perihilar region",
        "in the {s} mid lung field",
    ),
    "lower": (
        "in the {s} lower zone", "at the {s} base", "in the lower {s} lung", "at the {s} lung base",
        "in the {s} lower lobe", "in the {s} basilar region",
    ),
}  # fmt: skip
PLACE_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "upper": ("{s} upper zone", "{s} apical", "{s} upper lobe", "{s} upper lung"),
    "middle": ("{s} mid zone", "{s} mid lung", "{s} perihilar"),
    "lower": ("{s} lower zone", "{s} basilar", "{s} base", "{s} lower lobe", "{s} lower lung"),
}

# Normal sentences that deny one kind; never used when that kind is present.
NEGATIVES: dict[str, tuple[str, ...]] = {
    "lung_opacity": ("No focal airspace opacity.", "No airspace disease is seen.", "There is no focal opacity."),
    "consolidation": ("No focal consolidation.", "There is no consolidation.", "No consolidation is seen."),
    "nodule": ("No pulmonary nodules are seen.", "No nodule or mass.", "There is no suspicious nodule."),
    "atelectasis": ("No atelectasis.", "There is no atelectasis."),
    "pleural_effusion": ("No pleural effusion.", "There is no pleural effusion.", "No effusion is seen."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."),
    "cardiomegaly": (
        "The heart size is normal.", "Heart size is within normal limits.",
        "The cardiac silhouette is normal in size.", "Normal cardiomediastinal silhouette.",
    ),
}  # fmt: skip
NEUTRAL: tuple[str, ...] = (
    "The mediastinal contours are unremarkable.",
    "The osseous structures are intact.",
    "No acute osseous abnormality.",
    "The hila are normal.",
    "The trachea is midline.",
    "Frontal view of the chest was obtained.",
    "The visualized upper abdomen is unremarkable.",
)
ALL_CLEAR: tuple[str, ...] = ("The lungs are clear.", "The lungs are well expanded and clear.", "Clear lungs.")
NORMAL_IMPRESSION: tuple[str, ...] = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "Normal chest radiograph.",
)
# Kinds whose denials would contradict one another (an opacity is not "no airspace disease").
RELATED: dict[str, tuple[str, ...]] = {"lung_opacity": ("consolidation",), "consolidation": ("lung_opacity",)}


@dataclass(frozen=True)
class Wording:
    """How one finding is named: the same words in its report sentence and its phrase."""

    noun: str
    countable: bool
    adjective: str


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def wording(rng: np.random.Generator, f: Finding) -> Wording:
    if f.kind == "cardiomegaly":
        return Wording("cardiomegaly", False, f.severity)
    noun, countable = NOUNS[f.kind][int(rng.integers(len(NOUNS[f.kind])))]
    adjective = f.severity if f.severity else _pick(rng, ADJECTIVES[f.kind])
    return Wording(noun, countable, adjective)


def _noun_phrase(wd: Wording, article: bool) -> str:
    text = f"{wd.adjective} {wd.noun}".strip()
    return f"{_article(text)} {text}" if article and wd.countable else text


def finding_sentence(rng: np.random.Generator, f: Finding, wd: Wording) -> str:
    """One report sentence naming the finding's kind and place."""
    if f.kind == "cardiomegaly":
        adverb = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}[f.severity]
        return _pick(
            rng,
            (
                f"The heart is {adverb} enlarged.",
                f"{_cap(f.severity)} cardiomegaly.",
                f"There is {f.severity} cardiomegaly.",
                f"The cardiac silhouette is {adverb} enlarged.",
                f"{_cap(f.severity)} cardiomegaly is present.",
            ),
        )
    side = f.side or ""
    if f.kind == "pleural_effusion":
        np_a = _noun_phrase(wd, article=True)
        return _pick(
            rng,
            (
                f"There is {np_a} on the {side}.",
                f"{_cap(f.severity)} {side} {wd.noun}.",
                f"{_cap(np_a)} is present at the {side} base.",
                f"Blunting of the {side} costophrenic angle is consistent with {np_a}.",
                f"{_cap(f.severity)} {side}-sided {wd.noun} is noted.",
            ),
        )
    if f.kind == "pneumothorax":
        return _pick(
            rng,
            (
                f"There is a {f.severity} {side} apical pneumothorax.",
                f"{_cap(f.severity)} {side} pneumothorax.",
                f"A {f.severity} pneumothorax is seen at the {side} apex.",
                f"A {side} pleural line is visible with a {f.severity} pneumothorax.",
                f"{_cap(f.severity)} {side}-sided pneumothorax is present.",
            ),
        )
    place = _pick(rng, PLACES[f.zone or "middle"]).format(s=side)
    np_a = _noun_phrase(wd, article=True)
    np_bare = _noun_phrase(wd, article=False)
    return _pick(
        rng,
        (
            f"There is {np_a} {place}.",
            f"{_cap(np_a)} is seen {place}.",
            f"{_cap(place)}, there is {np_a}.",
            f"{_cap(np_bare)} {place}.",
            f"Findings are concerning for {np_a} {place}.",
            f"{_cap(np_a)} is noted {place}.",
        ),
    )


def finding_phrase(rng: np.random.Generator, f: Finding, wd: Wording) -> str:
    """A short phrase for the box (MS-CXR's label_text), always two words or more."""
    if f.kind == "cardiomegaly":
        return _pick(rng, (f"{f.severity} cardiomegaly", "enlarged cardiac silhouette", "enlarged heart"))
    side = f.side or ""
    if f.kind == "pleural_effusion":
        return _pick(rng, (f"{f.severity} {side} pleural effusion", f"{side} pleural effusion", f"{side} effusion"))
    if f.kind == "pneumothorax":
        return _pick(rng, (f"{f.severity} {side} pneumothorax", f"{side} apical pneumothorax", f"{side} pneumothorax"))
    place = _pick(rng, PLACE_ADJECTIVES[f.zone or "middle"]).format(s=side)
    return f"{wd.adjective} {place} {wd.noun}".strip()


def compose_report(
    rng: np.random.Generator, findings: list[Finding], wordings: list[Wording], hidden: str | None
) -> str:
    """Finding sentences plus normal ones, shuffled. `hidden`: a kind never to be named (held out)."""
    present = {f.kind for f in findings}
    blocked = set(present)
    for kind in present:
        blocked.update(RELATED.get(kind, ()))
    if hidden is not None:
        blocked.add(hidden)
    sentences = [finding_sentence(rng, f, wd) for f, wd in zip(findings, wordings, strict=True)]
    denials = [k for k in NEGATIVES if k not in blocked]
    n_neg = int(rng.integers(1, 4)) if findings else int(rng.integers(2, 5))
    for idx in rng.permutation(len(denials))[:n_neg]:
        sentences.append(_pick(rng, NEGATIVES[denials[int(idx)]]))
    for idx in rng.permutation(len(NEUTRAL))[: int(rng.integers(0, 3))]:
        sentences.append(NEUTRAL[int(idx)])
    lung_findings = any(KIND_BY_KEY[k].sided for k in present)
    if not lung_findings and rng.random() < 0.7:
        sentences.append(_pick(rng, ALL_CLEAR))
    if not findings and rng.random() < 0.6:
        sentences.append(_pick(rng, NORMAL_IMPRESSION))
    order = rng.permutation(len(sentences))
    return " ".join(sentences[int(i)] for i in order)


def class_prompts() -> dict[str, list[str]]:
    """Each kind's positive prompts for zero-shot scoring, one per way the reports name it (by category name).

    The reference scores a class with the mean of several positive prompts' report embeddings, written
    in the class's own radiology vocabulary; these are that list for the synthetic corpus, without
    places or sides (a presence score, not a location).
    """
    out: dict[str, list[str]] = {}
    for kind in KINDS:
        if kind.key == "cardiomegaly":
            out[kind.category] = ["There is cardiomegaly.", "The heart is enlarged.",
                                  "The cardiac silhouette is enlarged."]
            continue
        out[kind.category] = [f"There is {_article(noun) + ' ' if countable else ''}{noun}."
                              for noun, countable in NOUNS[kind.key]]
    return out
