"""Many queries at once: batched encoding, the ``search --json`` payload, and a batching queue.

``search`` (:mod:`.search`) answers one query from a file. A server receives decoded images
from many clients at the same time; :func:`search_many` answers a list of :class:`Query` with
one image forward and one text forward for the whole list, then one FAISS search. Each query
is composed exactly as :func:`.search.encode_query` does (``encoder.encode_composed`` on the raw
features when both parts are given, else the normalised feature of the one given).

:class:`QueryQueue` puts the requests of an asyncio server in one first-in first-out queue that
a single worker thread drains: the model runs one forward at a time, requests waiting while it
runs are batched together (up to ``max_batch``), and none is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MoraError
from .index import IndexFolder
from .search import Hit, search_vectors

EMPTY_QUERY = "give a query: an image, a text, or both"


@dataclass(frozen=True)
class Query:
    """One query: a decoded RGB image (PIL) and/or a text, and how many hits to return.

    ``image_label`` is what the JSON shows as the query image (a path or an upload's name).
    """

    image: Any = None
    text: str | None = None
    k: int = 10
    image_label: str | None = None

    @property
    def mode(self) -> str:
        return query_mode(self.image is not None, self.text is not None)


def query_mode(has_image: bool, has_text: bool) -> str:
    """``composed``, ``image`` or ``text``."""
    if has_image and has_text:
        return "composed"
    return "image" if has_image else "text"


def search_payload(index: str, encoder: Any, hits: Sequence[Hit], *, image: str | None, text: str | None) -> dict[str, Any]:
    """The JSON object ``mora-ret search --json`` prints (and ``POST /api/search`` returns)."""
    return {
        "index": index,
        "mode": query_mode(image is not None, text is not None),
        "image": image,
        "text": text,
        "composed_with": "combiner" if encoder.combiner is not None else "sum",
        "results": [h.to_json() for h in hits],
    }


def text_is_truncated(tokenizer: Any, text: str) -> bool:
    """Whether ``tokenizer`` cuts ``text`` to its context length (open_clip truncates silently)."""
    context = getattr(tokenizer, "context_length", None)
    encode = getattr(tokenizer, "encode", None)
    if context is None or encode is None:
        return False
    return len(encode(text)) + 2 > int(context)  # + start and end tokens


def encode_queries(encoder: Any, queries: Sequence[Query]) -> np.ndarray:
    """The ``[len(queries), d]`` float32 query features, one batched forward per modality."""
    if not queries:
        raise MoraError("no queries to encode")
    for q in queries:
        if q.image is None and q.text is None:
            raise MoraError(EMPTY_QUERY)
    with_image = [i for i, q in enumerate(queries) if q.image is not None]
    with_text = [i for i, q in enumerate(queries) if q.text is not None]
    img_raw = txt_raw = None
    if with_image:
        batch = torch.stack([encoder.preprocess(queries[i].image) for i in with_image])
        img_raw = encoder.encode_images(batch, normalize=False)
    if with_text:
        txt_raw = encoder.encode_texts([queries[i].text for i in with_text], normalize=False)
    img_pos = {q: n for n, q in enumerate(with_image)}
    txt_pos = {q: n for n, q in enumerate(with_text)}
    out: list[Any] = [None] * len(queries)
    composed = [i for i in with_image if i in txt_pos]
    if composed:
        feats = encoder.encode_composed(img_raw[[img_pos[i] for i in composed]], txt_raw[[txt_pos[i] for i in composed]])
        for n, i in enumerate(composed):
            out[i] = feats[n]
    for i in range(len(queries)):
        if out[i] is None:
            raw = img_raw[img_pos[i]] if i in img_pos else txt_raw[txt_pos[i]]
            out[i] = F.normalize(raw, dim=-1)
    return torch.stack(out).float().cpu().numpy()


def search_many(folder: IndexFolder, encoder: Any, queries: Sequence[Query]) -> list[list[Hit]]:
    """The top ``q.k`` hits of every query (the caller checks the encoder against the index once)."""
    features = encode_queries(encoder, queries)
    scores, rows = search_vectors(folder, features, max(q.k for q in queries))
    return [
        [
            Hit(rank=r + 1, score=float(s), row=int(row), item=folder.items[int(row)])
            for r, (s, row) in enumerate(zip(scores[i][: q.k], rows[i][: q.k]))
            if row >= 0
        ]
        for i, q in enumerate(queries)
    ]


@dataclass
class _Pending:
    query: Query
    future: asyncio.Future


class QueryQueue:
    """Requests from an asyncio server, answered in batches by one worker thread.

    ``answer(queries) -> results`` runs in that thread, one call at a time. When a batch fails,
    its queries are retried one by one, so one bad query cannot fail the others. Use as an async
    context manager (``async with QueryQueue(...)``) in the server's lifespan.
    """

    def __init__(self, answer: Callable[[list[Query]], list[Any]], max_batch: int = 32) -> None:
        if max_batch < 1:
            raise MoraError(f"max_batch {max_batch}: expected at least 1")
        self.answer = answer
        self.max_batch = max_batch
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # batch size -> how many ran
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def __aenter__(self) -> "QueryQueue":
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mora-query")
        self._worker = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._worker = self._executor = self._queue = None

    @property
    def waiting(self) -> int:
        """Queries queued and not yet taken by the worker."""
        return 0 if self._queue is None else self._queue.qsize()

    async def submit(self, query: Query) -> Any:
        """Queue ``query`` and wait for its result (exceptions of ``answer`` are re-raised here)."""
        if self._queue is None:
            raise RuntimeError("QueryQueue is not running (use it as an async context manager)")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(query, future))
        return await future

    def _answer_each(self, batch: list[Query]) -> list[Any]:
        try:
            results = self.answer(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"answer() gave {len(results)} results for {len(batch)} queries")
            return results
        except Exception as exc:
            if len(batch) == 1:
                return [exc]
        out: list[Any] = []
        for query in batch:
            try:
                out.append(self.answer([query])[0])
            except Exception as exc:  # reported to the request that sent this query
                out.append(exc)
        return out

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self._queue.get()]
            while len(pending) < self.max_batch and not self._queue.empty():
                pending.append(self._queue.get_nowait())
            self.batch_sizes[len(pending)] += 1
            try:
                results = await loop.run_in_executor(self._executor, self._answer_each, [p.query for p in pending])
            except asyncio.CancelledError:
                for p in pending:
                    p.future.cancel()
                raise
            for p, result in zip(pending, results):
                if p.future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)
