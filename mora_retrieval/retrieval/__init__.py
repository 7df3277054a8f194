"""Image retrieval over FAISS indexes: encode (:mod:`.encoder`, :mod:`.embed`), build and store
index folders (:mod:`.build`, :mod:`.index`, :mod:`.items`), query them (:mod:`.search`,
:mod:`.gallery`, :mod:`.serve`) and evaluate Recall@K (:mod:`.evaluate`).

Submodules are imported on demand; this package imports nothing heavy.
"""
