"""A synthetic chest-radiograph corpus with known truth, for demos, tests and a learning benchmark.

Real pretraining data (MIMIC-CXR) is credentialed; this corpus stands in for it
and for MS-CXR: radiograph-like images with findings drawn at stated places,
free-text reports that name them, and exact boxes in the MS-CXR CSV layout.
"""

from afloc_cli.synth.corpus import (
    GROUND_TRUTH_CSV,
    LABELS_CSV,
    MANIFEST_CSV,
    SYNTH_JSON,
    CorpusSummary,
    SynthCase,
    SynthConfig,
    generate_case,
    generate_corpus,
)
from afloc_cli.synth.kinds import DEFAULT_HOLDOUT, KINDS, Kind, resolve_kind

__all__ = [
    "DEFAULT_HOLDOUT",
    "GROUND_TRUTH_CSV",
    "KINDS",
    "LABELS_CSV",
    "MANIFEST_CSV",
    "SYNTH_JSON",
    "CorpusSummary",
    "Kind",
    "SynthCase",
    "SynthConfig",
    "generate_case",
    "generate_corpus",
    "resolve_kind",
]
