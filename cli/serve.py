"""``mora-ret serve``: a search page and JSON API over an index folder (needs the ``serve`` extra)."""

from __future__ import annotations

from pathlib import Path

import typer

from .options import INDEX_OPTION, QUERY_COMBINER_HELP, EncoderOptions, make_console, model_options, with_options

SERVE_PACKAGES = ("starlette", "uvicorn", "multipart")
INSTALL_HINT = "mora-ret serve needs the serve extra: pip install 'mora-retrieval[serve]'"


def check_serve_extra() -> None:
    """Raise a one-line MoraError naming the install command when a server package is missing."""
    import importlib.util

    from mora_retrieval.errors import MoraError

    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise MoraError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")


@with_options(model_options(QUERY_COMBINER_HELP), "encoder", EncoderOptions)
def serve_cmd(
    index: Path = INDEX_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but localhost is reachable from other machines: a warning is printed."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: a free one)."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", help="Largest accepted search request (image upload), in MB."),
    max_batch: int = typer.Option(32, "--max-batch", help="Most queries encoded together when requests arrive at the same time."),
    encoder: EncoderOptions = None,
) -> None:
    """Serve a search page and a JSON API over an index; the model is reloaded from the manifest as in `search`."""
    from mora_retrieval.errors import MoraError

    check_serve_extra()
    from mora_retrieval.retrieval.index import load_index_folder
    from mora_retrieval.retrieval.serve import ServeConfig, create_app, is_loopback, open_socket, run_server, url_of

    console = make_console(stderr=True)
    if not 0 <= port <= 65535:
        raise MoraError(f"--port {port}: expected 0..65535")
    config = ServeConfig(max_upload_mb=max_upload_mb, max_batch=max_batch)
    folder = load_index_folder(index)
    app = create_app(folder, encoder.load(folder.manifest), index_label=str(index), config=config)
    sock = open_socket(host, port)
    if not is_loopback(host):
        console.print(f"[bold yellow]warning:[/] listening on {host}: the index, its images and the search API are "
                      "open to every machine that can reach this one (there is no authentication)")
    console.print(f"serving {index} ({folder.count} images, {folder.manifest.get('arch')}, "
                  f"{folder.manifest.get('index_type')}) at [bold]{url_of(sock)}[/] (Ctrl+C stops)")
    try:
        run_server(app, sock)
    except KeyboardInterrupt:  # uvicorn shuts down cleanly first, then re-raises Ctrl+C
        pass
    console.print("server stopped")


COMMANDS = {"serve": serve_cmd}
