"""The analysis as report pieces: Table 2 and Table 3 rows, and the HTML section (``report.Section``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..report import Section

INTERMODAL_HEADER = ["model", "L2 dist.", "angle (°)", "L2 (unit)", "angle (unit, °)", "modality gap"]
GAP_HEADER = ["model", "modality gap"]
DRIFT_HEADER = ["method", "vision L2", "vision angle (°)", "text L2", "text angle (°)", "vision L2 (unit)",
                "text L2 (unit)"]


def intermodal_table(data: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Table 2: header and one row per model (original, adapted); the modality gap alone without categories."""
    rows = []
    for model in ("original", "adapted"):
        label = f"{data['arch']} (orig.)" if model == "original" else f"{data['method']} (adapted)"
        gap = data["modality_gap"][model]
        if data["inter_modal"] is None:
            rows.append([label, gap])
            continue
        raw, unit = data["inter_modal"][model]["raw"], data["inter_modal"][model]["normalized"]
        rows.append([label, raw["l2"], raw["angle"], unit["l2"], unit["angle"], gap])
    return (GAP_HEADER if data["inter_modal"] is None else INTERMODAL_HEADER), rows


def drift_rows(data: dict[str, Any]) -> list[list[Any]]:
    """Table 3: the run's method, drift of each tower from the original embeddings."""
    v, t = data["drift"]["vision"], data["drift"]["text"]
    return [[data["method"], v["l2"], v["angle"], t["l2"], t["angle"], v["l2_normalized"], t["l2_normalized"]]]


def analysis_section(data: dict[str, Any], out_dir: str | Path) -> Section:
    """The HTML section: both tables, the notes, and the figures of ``out_dir``."""
    samples = data["samples"]
    categories = f", {samples['categories']} categories" if samples["categories"] else ""
    section = Section(
        f"Embedding analysis: {data['method']} on {data['dataset']} ({data['split']} split)",
        notes=[f"{samples['pairs']} complete samples ({samples['images']} images{categories}) of "
               f"{samples['available']}, embedded by the adapted model and by the original {data['arch']} "
               f"({data['pretrained'] or 'random weights of the run seed'}). L2 on raw embeddings; "
               "'unit' columns on L2-normalised ones; the modality gap is the distance between the centroids of "
               "the normalised image and text embeddings.", *data["notes"]],
    )
    header, rows = intermodal_table(data)
    caption = ("Inter-modal distance (paper Table 2): mean over categories of the distance and angle between the mean "
               "image and mean text embedding" if data["inter_modal"] is not None else
               "Modality gap (no categories: no per-category inter-modal distance)")
    section.table(caption, header, rows)
    section.table("Modality-specific drift (paper Table 3): mean distance and angle between each sample's adapted "
                  "and original embedding", DRIFT_HEADER, drift_rows(data))
    figures = data.get("figures", {})
    if "spectra" in figures:
        section.images.append(("Gram spectra (paper Figure 4): normalised eigenvalues of G_v, G_t (solid) and "
                               "normalised top singular values of the pretrained weights (dashed)",
                               Path(out_dir) / figures["spectra"]))
    if "tsne" in figures:
        section.images.append((f"t-SNE (paper Figure 10), coloured by {data['tsne']['colour']}",
                               Path(out_dir) / figures["tsne"]))
    return section
