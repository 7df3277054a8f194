"""``mora-ret merge`` end to end: adapter folder in, plain open_clip checkpoint out."""

from __future__ import annotations

import open_clip
import torch
from typer.testing import CliRunner

from mora_retrieval.adapters import AdapterConfig, add_adapters, export_checkpoint, save_adapters
from mora_retrieval_cli.app import app


def test_merge_command_writes_a_plain_checkpoint(tiny_model, tmp_path):
    base = export_checkpoint(tiny_model.model, tmp_path / "base.safetensors")
    model = tiny_model.model
    add_adapters(model, AdapterConfig(method="mora", targets=("q", "v")))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    save_adapters(model, tmp_path / "adapter", arch="mora-tiny")
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.encode_image(image)

    result = CliRunner().invoke(
        app, ["merge", "--adapter", str(tmp_path / "adapter"), "--pretrained", str(base), "-o", str(tmp_path / "m.safetensors")]
    )
    assert result.exit_code == 0, result.output
    merged = open_clip.create_model("mora-tiny", pretrained=str(tmp_path / "m.safetensors")).eval()
    with torch.no_grad():
        got = merged.encode_image(image)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_merge_onto_other_weights_fails_with_one_line(tiny_model, tmp_path):
    add_adapters(tiny_model.model, AdapterConfig())
    save_adapters(tiny_model.model, tmp_path / "adapter", arch="mora-tiny")
    result = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "adapter"), "-o", str(tmp_path / "m.pt")])
    assert result.exit_code != 0
    assert "adapter made for base weights" in str(result.exception)
