"""load_backbone: tiny architectures, local checkpoints, and one-line errors (no network needed)."""

from __future__ import annotations

import open_clip
import pytest
import torch

from mora_retrieval.adapters import export_checkpoint
from mora_retrieval.model.backbone import load_backbone, toolkit_architectures, weights_fingerprint
from mora_retrieval.errors import BackboneError


def test_toolkit_architectures_are_registered_with_open_clip(tiny_model):
    assert {"mora-tiny", "mora-small"} <= set(toolkit_architectures())
    assert "mora-tiny" in open_clip.list_models()
    model, preprocess, tokenizer = tiny_model
    assert (model.visual.transformer.width, model.transformer.width) == (64, 48)
    assert tokenizer(["a red circle"]).shape == (1, 32)
    assert preprocess.transforms[0].size == 32


def test_local_checkpoint_round_trip(tiny_model, tmp_path):
    for suffix in (".safetensors", ".pt"):
        path = export_checkpoint(tiny_model.model, tmp_path / f"w{suffix}")
        loaded = load_backbone("mora-tiny", str(path))
        assert weights_fingerprint(loaded.model) == weights_fingerprint(tiny_model.model)
        assert loaded.pretrained == str(path)


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="randomly initialised"):
        load_backbone("mora-tiny", None)


@pytest.mark.parametrize(
    "arch, pretrained, message",
    [
        ("no-such-arch", None, "unknown architecture 'no-such-arch'"),
        ("mora-tiny", "/nope/weights.safetensors", "weights.safetensors: checkpoint file not found"),
        ("mora-tiny", "laion2b", "neither a local checkpoint file nor a pretrained tag of mora-tiny"),
    ],
)
def test_bad_inputs_give_one_line(arch, pretrained, message):
    with pytest.raises(BackboneError, match=message) as info:
        load_backbone(arch, pretrained)
    assert "\n" not in str(info.value)


def test_corrupt_and_foreign_checkpoints(tmp_path, tiny_model):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(BackboneError, match="bad.safetensors: unreadable checkpoint"):
        load_backbone("mora-tiny", str(bad))
    other = export_checkpoint(open_clip.create_model("mora-small"), tmp_path / "small.safetensors")
    with pytest.raises(BackboneError, match="small.safetensors: not a checkpoint of mora-tiny"):
        load_backbone("mora-tiny", str(other))


class _Payload:
    """Unpickling this runs code: a weights-only load must refuse it, and say so in whole sentences."""

    def __reduce__(self):
        return (print, ("the payload ran",))


def test_pickled_objects_are_refused_with_a_whole_message(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _Payload()}, evil)
    with pytest.raises(BackboneError) as info:
        load_backbone("mora-tiny", str(evil))
    message = str(info.value)
    assert message.startswith(f"{evil}: refused to load: the file holds pickled Python objects")
    assert message.endswith("re-save its state dict with safetensors") and "\n" not in message
    assert "the payload ran" not in capsys.readouterr().out


def test_long_errors_are_cut_after_a_sentence():
    from mora_retrieval.model.backbone import _first_sentence

    long = "First sentence here. " + "x" * 400 + ". Tail."
    assert _first_sentence(long) == "First sentence here."
    assert _first_sentence("short\nsecond line") == "short"
    assert _first_sentence("y" * 500).endswith(" …")


def test_offline_tag_names_the_local_file_alternative(monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': connection error")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(BackboneError, match=r"offline\?\).*--pretrained /path/to/open_clip_pytorch_model.bin"):
        load_backbone("ViT-B-16", "openai")


def test_fingerprint_tracks_values_not_devices(tiny_model):
    model = tiny_model.model
    before = weights_fingerprint(model)
    assert weights_fingerprint(model.state_dict()) == before
    with torch.no_grad():
        model.visual.proj.add_(1e-3)
    assert weights_fingerprint(model) != before
