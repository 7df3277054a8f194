"""Analysis of an adapted model's embedding space against its original backbone (paper §4.4–4.5, app. E).

Pure measures over embeddings and weights, each in its own module and each tested against an
independent numpy computation:

* :mod:`.intermodal` – inter-modal distance per category (Table 2);
* :mod:`.drift` – modality-specific drift from the original embeddings (Table 3);
* :mod:`.gap` – the modality gap of Liang et al. (2022);
* :mod:`.spectra` – Gram spectra of the shared factors beside the pretrained weights (Figure 4);
* :mod:`.tsne` – t-SNE coordinates (Figure 10).

Around them: :mod:`.samples` (image–text samples and their embeddings under several models),
:mod:`.runs` (finished runs: settings, adapted and original model, samples), :mod:`.figures`
(PNGs), :mod:`.section` (tables and the HTML section) and :mod:`.run` (:func:`analyze_run`,
behind ``mora-ret analyze``).
"""

from .drift import Drift, embedding_drift
from .gap import modality_gap
from .intermodal import InterModalDistance, inter_modal_distance
from .run import AnalysisResult, AnalyzeConfig, analyze_run
from .spectra import gram_spectrum, read_shared_factors, singular_spectrum

__all__ = [
    "AnalysisResult", "AnalyzeConfig", "Drift", "InterModalDistance", "analyze_run", "embedding_drift",
    "gram_spectrum", "inter_modal_distance", "modality_gap", "read_shared_factors", "singular_spectrum",
]
