"""``mora-ret merge`` end to end: adapter folder in, plain open_clip checkpoint out."""

from __future__ import annotations

import open_clip
import torch
from typer.testing import CliRunner

from mora_retrieval.adapters import AdapterConfig, add_adapters, export_checkpoint, save_adapters
from mora_retrieval_cli.app import app


def _trained_adapter(model, method: str, folder, **extra):
    """Adapters on q and v moved away from their start and saved; an image batch and the adapted
    model's features of it, which every merged export must reproduce."""
    add_adapters(model, AdapterConfig(method=method, targets=("q", "v")))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    save_adapters(model, folder, arch="mora-tiny", extra=extra or None)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return image, model.encode_image(image)


def test_merge_command_writes_a_plain_checkpoint(tiny_model, tmp_path):
    base = export_checkpoint(tiny_model.model, tmp_path / "base.safetensors")
    image, want = _trained_adapter(tiny_model.model, "mora", tmp_path / "adapter")

    result = CliRunner().invoke(
        app, ["merge", "--adapter", str(tmp_path / "adapter"), "--pretrained", str(base), "-o", str(tmp_path / "m.safetensors")]
    )
    assert result.exit_code == 0, result.output
    merged = open_clip.create_model("mora-tiny", pretrained=str(tmp_path / "m.safetensors")).eval()
    with torch.no_grad():
        got = merged.encode_image(image)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_merge_onto_other_weights_fails_with_one_line(tiny_model, tmp_path):
    other = export_checkpoint(open_clip.create_model("mora-tiny"), tmp_path / "other.safetensors")
    add_adapters(tiny_model.model, AdapterConfig())
    save_adapters(tiny_model.model, tmp_path / "adapter", arch="mora-tiny")
    result = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "adapter"), "--pretrained", str(other),
                                      "-o", str(tmp_path / "m.pt")])
    assert result.exit_code != 0
    assert "adapter made for base weights" in str(result.exception)
    result = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "adapter"), "-o", str(tmp_path / "m.pt")])
    assert "records no base weights; pass --pretrained" in str(result.exception)
    assert not (tmp_path / "m.pt").exists()


def test_merge_into_a_folder_that_plain_open_clip_loads(tiny_model, tmp_path):
    """The recorded base weights are used, and the folder needs neither the toolkit nor --model."""
    import json
    import subprocess
    import sys

    from mora_retrieval.retrieval.encoder import load_encoder

    base = export_checkpoint(tiny_model.model, tmp_path / "base.safetensors")
    image, want = _trained_adapter(tiny_model.model, "lora", tmp_path / "adapter", pretrained=str(base))
    torch.save(image, tmp_path / "image.pt")
    result = CliRunner().invoke(app, ["merge", "--adapter", str(tmp_path / "adapter"), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "merged" / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 64
    code = ("import sys, torch, open_clip; model, _, _ = open_clip.create_model_and_transforms('local-dir:' + sys.argv[1]);"
            "x = torch.load(sys.argv[2]); print(model.eval().encode_image(x).flatten().tolist())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "merged"), str(tmp_path / "image.pt")],
                         capture_output=True, text=True, check=True).stdout  # a fresh process: nothing registered
    got = torch.tensor(json.loads(out)).view_as(want)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    encoder = load_encoder(None, checkpoint=tmp_path / "merged", device="cpu")  # --checkpoint DIR, no --model
    assert encoder.source["arch"].startswith("local-dir:")
    torch.testing.assert_close(encoder.model.encode_image(image), want, rtol=1e-4, atol=1e-5)
