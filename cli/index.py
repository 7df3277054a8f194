"""``mora-ret index coco|images|merge|rebuild``: build FAISS index folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .options import EncoderOptions, make_console, model_options, option, with_options

DEFAULT_INDEX_ROOT = Path("indexes")


def _build(items_fn: Any, collection: dict, default_name: str, encoder_options: EncoderOptions, opts: dict) -> None:
    import time
    from rich.table import Table

    from mora_retrieval.progress import ProgressBar
    from mora_retrieval.retrieval.build import BuildConfig, build_index, parse_shard
    from mora_retrieval.retrieval.embed import EmbedConfig

    console = make_console(stderr=True)
    shard = parse_shard(opts["shard"])
    items = items_fn()  # before the model: a wrong data path fails at once
    encoder = encoder_options.load()
    if not any(encoder.source.get(k) for k in ("pretrained", "checkpoint", "adapter", "run")):
        console.print("[yellow]note:[/] random weights: `search` and `eval --mode cir` will not be able to reload "
                      "this model (use --pretrained FILE or --checkpoint FILE)")
    out = opts["out"] or DEFAULT_INDEX_ROOT / (opts["name"] or default_name)
    embed = EmbedConfig(batch_size=opts["batch_size"], chunk_size=opts["chunk_size"],
                        skip_bad_images=opts["skip_bad_images"], fast_jpeg=opts["fast_jpeg"])
    if opts["workers"] is not None:
        embed.workers = opts["workers"]
    config = BuildConfig(index_type=opts["index_type"], search_params=opts["search_params"], shard=shard, embed=embed,
                         overwrite=opts["overwrite"])
    start = time.perf_counter()
    label = f"embedding {len(items)} images" if shard is None else f"embedding shard {shard[0]}/{shard[1]}"
    try:
        with ProgressBar(console, label, "img/s") as reporter:
            result = build_index(encoder, items, out, config, collection=collection, reporter=reporter)
    except KeyboardInterrupt:
        console.print(f"interrupted: the finished chunks are kept under {out}; run the same command again to "
                      f"resume from them (work already embedded is not redone)")
        raise typer.Exit(130) from None
    seconds = time.perf_counter() - start
    for path in result.skipped:
        console.print(f"[yellow]skipped bad image:[/] {path}")
    if result.folder is None:
        console.print(f"part written to {result.part_dir}; the index is merged when every part is done "
                      f"(or run `mora-ret index merge {out}`)")
        return
    m = result.folder.manifest
    params = f" ({m['search_params']})" if m["search_params"] else ""
    table = Table("index folder", "images", "type", "dim", "encoded now", "skipped", "seconds", title="index")
    table.add_row(str(out), str(m["count"]), m["index_type"] + params,
                  str(m["dim"]), str(result.encoded), str(len(result.skipped)), f"{seconds:.1f}")
    make_console().print(table)



TypeOpt = typer.Option("auto", "--index-type",
                       help="auto, or a FAISS factory string: Flat, IVF1024,Flat, HNSW32, IVF4096,PQ64, ...")
ParamsOpt = typer.Option(None, "--search-params",
                         help="FAISS search parameters stored in the manifest, e.g. nprobe=64.")
#: The options of `index coco` and `index images` after the model options.
BUILD_OPTIONS = [
    option("name", Optional[str], typer.Option(None, "--name", help="Index name: the folder is indexes/<name>.")),
    option("out", Optional[Path], typer.Option(None, "--out", help="Index folder (overrides --name).")),
    option("index_type", str, TypeOpt),
    option("search_params", Optional[str], ParamsOpt),
    option("batch_size", int, typer.Option(256, "--batch-size", help="Images per batch.")),
    option("workers", Optional[int],
           typer.Option(None, "--workers", help="DataLoader workers (default: one per core, at most 8).")),
    option("chunk_size", int, typer.Option(8192, "--chunk-size", help="Images per resumable chunk file.")),
    option("shard", Optional[str], typer.Option(
        None, "--shard", help="i/n: embed the i-th of n blocks (default: from torchrun RANK/WORLD_SIZE).")),
    option("skip_bad_images", bool, typer.Option(
        False, "--skip-bad-images", help="Leave unreadable images out (listed in the manifest) instead of stopping.")),
    option("fast_jpeg", bool, typer.Option(False, "--fast-jpeg", help="Decode JPEGs at a reduced DCT scale (faster on "
                                                                     "CPU, slightly different features).")),
    option("overwrite", bool, typer.Option(
        False, "--overwrite", help="Replace a finished index of another model in the output folder.")),
]


def build_command(command: Any) -> Any:
    """Give an index-building command the model options (``encoder``) and :data:`BUILD_OPTIONS` (``opts``)."""
    return with_options(BUILD_OPTIONS, "opts")(with_options(model_options(), "encoder", EncoderOptions)(command))


@build_command
def index_coco(
    data_root: Path = typer.Option(..., "--data-root",
                                   help="COCO root: annotations/instances_<split>.json and <split>/."),
    split: str = typer.Option("val2017", "--split"),
    encoder: EncoderOptions = None, opts: dict = None,
) -> None:
    """Index the COCO gallery of a split (images with at least one instance annotation)."""
    from mora_retrieval.retrieval.items import coco_items

    collection = {"kind": "coco", "root": str(data_root.resolve()), "split": split}
    arch = encoder.model or (encoder.run.name if encoder.run else "model")
    _build(lambda: coco_items(data_root, split), collection, f"coco-{split}-{arch}", encoder, opts)


@build_command
def index_images(
    folder: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    encoder: EncoderOptions = None, opts: dict = None,
) -> None:
    """Index every image under a folder (jpg, png, webp, bmp, gif, tif)."""
    from mora_retrieval.retrieval.items import folder_items

    collection = {"kind": "folder", "root": str(folder.resolve())}
    _build(lambda: folder_items(folder), collection, folder.resolve().name, encoder, opts)


def index_merge(
    out: Path = typer.Argument(..., help="Index folder whose parts/ hold the shard outputs."),
    index_type: str = TypeOpt, search_params: Optional[str] = ParamsOpt,
) -> None:
    """Combine the parts written by `index ... --shard i/n` into one index."""

    from mora_retrieval.retrieval.build import merge_parts

    folder = merge_parts(out, index_type, search_params)
    make_console().print(f"merged {folder.count} images into {out} ({folder.manifest['index_type']})")


def index_rebuild(
    out: Path = typer.Argument(..., help="Index folder."),
    index_type: str = TypeOpt, search_params: Optional[str] = ParamsOpt,
) -> None:
    """Rebuild index.faiss from the stored embeddings with another index type (no re-encoding)."""

    from mora_retrieval.retrieval.index import rebuild_index

    folder = rebuild_index(out, index_type, search_params)
    make_console().print(f"rebuilt {out}: {folder.count} images, {folder.manifest['index_type']}")


COMMANDS = {"index coco": index_coco, "index images": index_images, "index merge": index_merge,
            "index rebuild": index_rebuild}
