"""t-SNE of embeddings (paper appendix Figure 10), with scikit-learn's ``TSNE``.

The embeddings are L2-normalised first, so t-SNE's Euclidean neighbourhoods follow the cosine
similarity CLIP is trained and scored with. The perplexity is ``min(30, (n − 1) / 3)``
(scikit-learn's default, capped for small sets: it must stay below the number of points);
initialisation is PCA and the seed is fixed, so a figure is reproducible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.manifold import TSNE

from .geometry import as_matrix, unit_rows

MIN_POINTS = 5


def default_perplexity(points: int) -> float:
    return float(max(1.0, min(30.0, (points - 1) / 3.0)))


def tsne_2d(embeddings: Any, seed: int = 0) -> np.ndarray:
    """2-D t-SNE coordinates ``[N, 2]`` of the L2-normalised ``embeddings`` ``[N, D]``."""
    x = unit_rows(as_matrix(embeddings, "embeddings")).numpy()
    if x.shape[0] < MIN_POINTS:
        raise ValueError(f"t-SNE needs at least {MIN_POINTS} points, got {x.shape[0]}")
    tsne = TSNE(n_components=2, perplexity=default_perplexity(x.shape[0]), init="pca", learning_rate="auto",
                random_state=seed)
    return tsne.fit_transform(x).astype(np.float64)
