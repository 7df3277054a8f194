"""What a server adds to :mod:`.search`: the ``search --json`` payload, and a batching queue.

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

from .search import Hit, Query, query_mode

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
