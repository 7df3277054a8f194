"""Analysis of an adapted model's embedding space against its original backbone (paper §4.4–4.5, app. E).

Pure measures over embeddings and weights (:mod:`.geometry`: inter-modal distance, drift, modality
gap; :mod:`.spectra`, :mod:`.tsne`), each tested against an independent numpy computation, and
:func:`analyze_run` (:mod:`.run`, behind ``mora-ret analyze``), which applies them to a finished run.
"""

from .geometry import Drift, InterModalDistance, embedding_drift, inter_modal_distance, modality_gap
from .run import AnalysisResult, AnalyzeConfig, analyze_run
from .spectra import gram_spectrum, read_shared_factors, singular_spectrum

__all__ = [
    "AnalysisResult", "AnalyzeConfig", "Drift", "InterModalDistance", "analyze_run", "embedding_drift",
    "gram_spectrum", "inter_modal_distance", "modality_gap", "read_shared_factors", "singular_spectrum",
]
