"""``mora-ret models``: list the architectures and their pretrained tags."""

from __future__ import annotations

import typer

from .options import make_console


def models(pattern: str = typer.Argument("*", help="Glob over architecture names, e.g. 'ViT-B*'.")) -> None:
    """List open_clip architectures (the toolkit's tiny ones included) and their tags."""
    import fnmatch

    import open_clip
    from rich.table import Table

    from mora_retrieval.errors import MoraError
    from mora_retrieval.model.backbone import list_architectures, toolkit_architectures

    matched = [arch for arch in list_architectures() if fnmatch.fnmatch(arch, pattern)]
    if not matched:
        raise MoraError(f"no architecture matches {pattern!r} (try `mora-ret models` for the full list, "
                        f"or a pattern such as 'ViT-B*')")
    table = Table("architecture", "pretrained tags")
    own = set(toolkit_architectures())
    for arch in matched:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch))
        table.add_row(arch, tags or ("(toolkit; train with `mora-ret pretrain`)" if arch in own else "-"))
    make_console().print(table)


COMMANDS = {"models": models}
