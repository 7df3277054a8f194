"""``mora-ret serve``: a search page and a JSON API over one index folder (Starlette + uvicorn).

Needs the ``serve`` extra (``pip install 'mora-retrieval[serve]'``). The index and its model are
loaded once by the caller and checked against each other; :func:`create_app` returns the ASGI
app:

* ``GET /``               the search page (``static/``: plain HTML, CSS and JavaScript);
* ``POST /api/search``    form fields ``image`` (file), ``row`` (an indexed image as the query
  image), ``text``, ``k``; answers the JSON ``mora-ret search --json`` prints;
* ``GET /api/info``       model, count, index type, dimension, category names, limits;
* ``GET /images/{row}``   a JPEG thumbnail of the indexed image of that row (only rows of the
  index are served; the client never names a file);
* ``GET /healthz``        ``{"status": "ok", "count", "waiting", "batch_sizes"}`` (how many
  batches of each size the model has run).

Bad input is answered with a 4xx status and ``{"error": "<one line>"}``. Queries go through a
:class:`QueryQueue`: one first-in first-out queue that a single worker thread drains, so the
model runs one forward at a time; requests waiting while it runs are batched together (up to
``max_batch``), and none is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import io
import ipaddress
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..data.images import decode_image_bytes, load_image
from ..errors import DataError, MoraError
from .gallery import THUMBNAIL, thumbnail_jpeg
from .index import IndexFolder
from .search import EMPTY_QUERY, Query, check_encoder, search_many, search_payload, text_is_truncated

MAX_K = 1000
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
TEXT_TRUNCATED_HEADER = "X-Mora-Text-Truncated"
_log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Limits and sizes of the server."""

    max_upload_mb: float = 10.0  # whole request body of POST /api/search
    max_text_kb: int = 64  # one form field (the text)
    max_image_pixels: int = 50_000_000  # uploads larger than this are refused before decoding
    max_batch: int = 32  # queries encoded together
    default_k: int = 10
    thumbnail_px: int = THUMBNAIL
    thumbnail_cache: int = 1024  # thumbnails kept in memory

    def __post_init__(self) -> None:
        if not self.max_upload_mb > 0:
            raise MoraError(f"--max-upload-mb {self.max_upload_mb}: expected a positive number")
        if self.max_batch < 1:
            raise MoraError(f"--max-batch {self.max_batch}: expected at least 1")
        if not 1 <= self.default_k <= MAX_K:
            raise MoraError(f"default k {self.default_k}: expected 1..{MAX_K}")


class RequestError(HTTPException):
    """A client error: HTTP status and a one-line message (``detail``)."""


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def category_names(manifest: dict[str, Any], max_bytes: int = 64 << 20) -> dict[int, str]:
    """COCO category names of the indexed collection, or ``{}`` where they cannot be read cheaply
    (annotation files over ``max_bytes``, as COCO train2017's: the page then shows category ids)."""
    collection = manifest.get("collection") or {}
    if "coco" not in (collection.get("kind"), collection.get("dataset")) or not collection.get("root"):
        return {}
    path = Path(collection["root"]) / "annotations" / f"instances_{collection.get('split', 'val2017')}.json"
    try:
        if path.stat().st_size > max_bytes:
            return {}
        with open(path, encoding="utf-8") as handle:
            return {int(c["id"]): str(c["name"]) for c in json.load(handle).get("categories", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _static(name: str) -> str:
    return (resources.files("mora_retrieval.retrieval") / "static" / name).read_text(encoding="utf-8")


def _parse_int(value: Any, what: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise RequestError(400, f"{what} {str(value)[:40]!r}: expected a whole number") from None


def _decode_upload(data: bytes, name: str, max_pixels: int) -> Any:
    origin = f"upload {name!r}"
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Exception:
        raise DataError(f"{origin}: not an image file PIL can read (PNG, JPEG, WebP, ...)") from None
    if width * height > max_pixels:
        raise DataError(f"{origin}: {width}x{height} pixels is over the limit of {max_pixels:,}")
    return decode_image_bytes(data, origin)


class QueryQueue:
    """The queue of the module docstring, for ``answer(queries) -> results``; a failed batch is retried
    query by query, so one bad query cannot fail the others. An async context manager (the lifespan)."""

    def __init__(self, answer: Callable[[list[Query]], list[Any]], max_batch: int = 32) -> None:
        if max_batch < 1:
            raise MoraError(f"max_batch {max_batch}: expected at least 1")
        self.answer = answer
        self.max_batch = max_batch
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # batch size -> how many ran
        self._queue: asyncio.Queue[tuple[Query, asyncio.Future]] | None = None
        self._worker: asyncio.Task | None = None

    async def __aenter__(self) -> "QueryQueue":
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mora-query")
        self._worker = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._executor.shutdown(wait=True)
        self._worker = self._queue = None

    @property
    def waiting(self) -> int:
        """Queries queued and not yet taken by the worker."""
        return 0 if self._queue is None else self._queue.qsize()

    async def submit(self, query: Query) -> Any:
        """Queue ``query`` and wait for its result (exceptions of ``answer`` are re-raised here)."""
        if self._queue is None:
            raise RuntimeError("QueryQueue is not running (use it as an async context manager)")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((query, future))
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
                results = await loop.run_in_executor(self._executor, self._answer_each, [q for q, _ in pending])
            except asyncio.CancelledError:
                for _, future in pending:
                    future.cancel()
                raise
            for (_, future), result in zip(pending, results):
                if future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class _App:
    """The request handlers, bound to one index, encoder and configuration."""

    def __init__(self, folder: IndexFolder, encoder: Any, index_label: str, config: ServeConfig) -> None:
        self.folder, self.encoder, self.label, self.config = folder, encoder, index_label, config
        self.queue: QueryQueue | None = None
        self.names = category_names(folder.manifest)
        self.page = _static("index.html")
        self.assets = {name: _static(name) for name in STATIC_FILES}
        self.thumbnail = functools.lru_cache(maxsize=config.thumbnail_cache)(
            lambda row: thumbnail_jpeg(folder.items[row].path, config.thumbnail_px))

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        answer = functools.partial(search_many, self.folder, self.encoder)
        async with QueryQueue(answer, max_batch=self.config.max_batch) as queue:
            self.queue = queue
            yield
        self.queue = None

    async def _read_form(self, request: Request) -> Any:
        limit = int(self.config.max_upload_mb * (1 << 20))
        too_big = f"request over the upload limit of {self.config.max_upload_mb:g} MB (--max-upload-mb)"
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise RequestError(413, too_big)

        async def limited() -> AsyncIterator[bytes]:
            total = 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise RequestError(413, too_big)
                yield chunk

        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            parser: Any = MultiPartParser(request.headers, limited(), max_files=1, max_fields=8,
                                          max_part_size=self.config.max_text_kb * 1024)
        elif ctype.startswith("application/x-www-form-urlencoded"):
            parser = FormParser(request.headers, limited())
        else:
            raise RequestError(415, f"content type {ctype.split(';')[0] or 'none'!r}: expected multipart/form-data "
                                    "with fields image, row, text, k")
        try:
            return await parser.parse()
        except MultiPartException as exc:
            raise RequestError(400, f"bad form data ({exc})") from None

    async def _query(self, form: Any) -> Query:
        unknown = sorted(set(form.keys()) - {"image", "row", "text", "k"})
        if unknown:
            raise RequestError(400, f"unknown field {unknown[0]!r}: expected image, row, text, k")
        k = self.config.default_k if form.get("k") in (None, "") else _parse_int(form.get("k"), "k")
        if not 1 <= k <= MAX_K:
            raise RequestError(400, f"k {k}: expected 1..{MAX_K}")
        text = form.get("text")
        if text is not None and not isinstance(text, str):
            raise RequestError(400, "text: expected a form field, not a file")
        text = text if text and text.strip() else None
        upload, row = form.get("image"), form.get("row")
        if isinstance(upload, str):
            raise RequestError(400, "image: expected a file upload")
        data = b"" if upload is None else await upload.read()  # empty without a filename: a file input left empty
        if upload is not None and not data and upload.filename:
            raise RequestError(400, f"upload {upload.filename!r}: empty file")
        image = label = None
        if data:
            if row not in (None, ""):
                raise RequestError(400, "give an image upload or a row, not both")
            label = upload.filename or "upload"
            try:
                image = await run_in_threadpool(_decode_upload, data, label, self.config.max_image_pixels)
            except DataError as exc:
                raise RequestError(400, str(exc)) from None
        elif row not in (None, ""):
            index = _parse_int(row, "row")
            if not 0 <= index < self.folder.count:
                raise RequestError(400, f"row {index}: not in the index (rows 0..{self.folder.count - 1})")

            label = self.folder.items[index].path
            try:
                image = await run_in_threadpool(load_image, label)
            except DataError as exc:
                raise RequestError(404, str(exc)) from None
        if image is None and text is None:
            raise RequestError(400, EMPTY_QUERY)
        return Query(image=image, text=text, k=k, image_label=label)

    async def search(self, request: Request) -> Response:
        form = await self._read_form(request)
        try:
            query = await self._query(form)
        finally:
            await form.close()
        if self.queue is None:
            raise RuntimeError("the query queue is not running (the app was started without its lifespan)")
        headers = {}
        if query.text is not None and await run_in_threadpool(text_is_truncated, self.encoder.tokenizer, query.text):
            headers[TEXT_TRUNCATED_HEADER] = str(getattr(self.encoder.tokenizer, "context_length", ""))
        try:
            hits = await self.queue.submit(query)
        except MoraError as exc:
            raise RequestError(400, str(exc)) from None
        return JSONResponse(search_payload(self.label, self.encoder, hits, image=query.image_label, text=query.text),
                            headers=headers)

    async def image(self, request: Request) -> Response:
        text = request.path_params["row"]
        if not text.isdigit() or not int(text) < self.folder.count:
            raise RequestError(404, f"row {text[:40]!r}: not in the index (rows 0..{self.folder.count - 1})")
        try:
            data = await run_in_threadpool(self.thumbnail, int(text))
        except DataError as exc:
            raise RequestError(404, str(exc)) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def info(self, request: Request) -> Response:
        m = self.folder.manifest
        return JSONResponse({
            "index": self.label, "model": m.get("arch"), "fingerprint": m.get("fingerprint"), "source": m.get("source"),
            "count": self.folder.count, "index_type": m.get("index_type"), "dim": self.folder.dim,
            "metric": m.get("metric"), "created": m.get("created"), "collection": m.get("collection", {}),
            "composed_with": "combiner" if self.encoder.combiner is not None else "sum",
            "device": str(self.encoder.device),
            "categories": {str(k): v for k, v in sorted(self.names.items())},
            "limits": {"k": [1, MAX_K], "default_k": self.config.default_k, "max_upload_mb": self.config.max_upload_mb},
        })

    async def healthz(self, request: Request) -> Response:
        queue = self.queue
        return JSONResponse({"status": "ok", "count": self.folder.count,
                             "waiting": None if queue is None else queue.waiting,
                             "batch_sizes": {} if queue is None else {str(k): v for k, v in sorted(queue.batch_sizes.items())}})

    async def index_page(self, request: Request) -> Response:
        return HTMLResponse(self.page)

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            raise RequestError(404, f"/static/{name[:40]}: no such file")
        return Response(self.assets[name], media_type=STATIC_FILES[name])


async def _http_error(request: Request, exc: Exception) -> Response:
    """Our :class:`RequestError` messages as they are; Starlette's routing errors in words."""
    assert isinstance(exc, HTTPException)
    routing = {404: f"{request.url.path}: not found", 405: f"{request.method} {request.url.path}: method not allowed"}
    message = exc.detail if isinstance(exc, RequestError) else routing.get(exc.status_code, str(exc.detail))
    return _error(exc.status_code, message, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    _log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, f"internal error ({exc.__class__.__name__}); see the server log")


def create_app(folder: IndexFolder, encoder: Any, *, index_label: str | None = None,
               config: ServeConfig | None = None) -> Starlette:
    """The ASGI app serving ``folder`` with ``encoder`` (checked to be the index's model)."""
    check_encoder(folder, encoder)
    handlers = _App(folder, encoder, index_label or str(folder.path), config or ServeConfig())
    routes = [
        Route("/", handlers.index_page, methods=["GET"]),
        Route("/static/{name}", handlers.asset, methods=["GET"]),
        Route("/api/search", handlers.search, methods=["POST"]),
        Route("/api/info", handlers.info, methods=["GET"]),
        Route("/images/{row}", handlers.image, methods=["GET"]),
        Route("/healthz", handlers.healthz, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=handlers.lifespan,
                     exception_handlers={HTTPException: _http_error, Exception: _server_error})


def open_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: a free one); errors are one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise MoraError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise MoraError(f"{host}:{port}: cannot listen there ({exc.strerror}); choose another --port or --host") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port/`` of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run_server(app: Starlette, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])


@contextlib.contextmanager
def background_server(app: Starlette, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` from a thread (tests, notebooks); yields the base URL, stops on exit."""
    import uvicorn

    sock = open_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="mora-serve")
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
