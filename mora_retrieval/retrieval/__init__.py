"""Image retrieval over FAISS indexes: encode, index, search and evaluate.

Submodules (imported on demand; this package imports nothing heavy):

* :mod:`.encoder`  – :func:`load_encoder`: a (merged) open_clip model behind one interface
  for image, text and composed queries, with the fingerprint of its final weights.
* :mod:`.items`    – the collections to index (COCO gallery, image folder) as items.
* :mod:`.embed`    – the batched, resumable embedding pipeline.
* :mod:`.build`    – items → index folder, in one process or in shards, and the merge.
* :mod:`.index`    – index folders: FAISS index, items table, float16 embeddings, manifest.
* :mod:`.search`   – query encoding and k-NN search against an index folder, the JSON answer.
* :mod:`.evaluate` – Recall@K, the COCO image-to-image protocol (docs/protocols.md §5).
* :mod:`.gallery`  – a self-contained HTML page of a query and its results.
* :mod:`.serve`    – ``mora-ret serve``: a search page and JSON API, with its batching query queue.
"""
