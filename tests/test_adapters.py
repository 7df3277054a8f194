"""Adapters: weights against an independent computation of docs/protocols.md §1, merging, file format."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from mora_retrieval.adapters import (
    AdapterConfig,
    AdapterMethod,
    add_adapters,
    export_checkpoint,
    get_method,
    has_adapters,
    list_methods,
    load_adapters,
    merge_adapters,
    save_adapters,
    trainable_share,
    unmerge_adapters,
)
from mora_retrieval.adapters.methods import register
from mora_retrieval.errors import AdapterError

LOW_RANK = ["mora", "no_gram", "learned_gram", "no_shared", "no_specific", "subtract_base", "lora", "dora"]
ALL_METHODS = LOW_RANK + ["bitfit", "full"]
ROWS = {"q": 0, "k": 1, "v": 2}


# ---------------------------------------------------------------- independent reference (docs/protocols.md §1)
def _col(x):
    return torch.linalg.vector_norm(x, dim=0).clamp(min=1e-5)


def _row(x):
    return torch.linalg.vector_norm(x, dim=1).clamp(min=1e-5)


def reference_weight(method, w0, t, s_own, s_other, gram, alpha, r):
    """W' written straight from the formulas, in float64."""
    w0 = w0.double()
    if method in ("lora", "dora"):
        w = w0 + (alpha / r) * (t["B"].double() @ t["A"].double())
        return w if method == "lora" else t["m"].double()[:, None] * w / _row(w)[:, None]
    s = s_own.double()
    if method == "no_gram":
        delta_s = s.T @ s
    elif method == "learned_gram":
        delta_s = s.T @ gram.double() @ s
    elif method == "no_shared":
        delta_s = s.T @ (s @ s.T) @ s
    else:
        o = s_other.double()
        delta_s = s.T @ (o @ o.T) @ s
    shared = w0 + alpha * delta_s
    out = t["m_shared"].double()[None, :] * shared / _col(shared)[None, :]
    if method != "no_specific":
        specific = w0 + alpha * (t["B"].double() @ t["A"].double())
        out = out + t["m_specific"].double()[None, :] * specific / _col(specific)[None, :]
    if method == "subtract_base":
        out = out - w0
    return out


def _randomise(model):
    """Give every trainable adapter tensor non-trivial values (B is zero at init)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.mora_adapter.named_parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen))
        for name, param in model.named_parameters():
            if param.requires_grad and ".parametrizations." in name:
                param.add_(0.3 * torch.randn(param.shape, generator=gen) * (param.abs().mean() + 0.1))


def _w0(state, tower, block, proj):
    prefix = "visual.transformer" if tower == "visual" else "transformer"
    if proj == "out":
        return state[f"{prefix}.resblocks.{block}.attn.out_proj.weight"]
    w = state[f"{prefix}.resblocks.{block}.attn.in_proj_weight"]
    d = w.shape[1]
    i = ROWS[proj]
    return w[i * d:(i + 1) * d]


def _tiny_custom_attention_model():
    """A tiny CLIP that uses open_clip's own ``Attention`` class (block_type 'custom')."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8, "block_type": "custom"},
        text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2, "block_type": "custom"},
    )
    return model.eval()


# ------------------------------------------------------------------------------- weight formulas
@pytest.mark.parametrize("method", LOW_RANK)
def test_adapted_weights_match_reference(tiny_model, tmp_path, method):
    model = tiny_model.model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = AdapterConfig(method=method, r=3, r_shared=2, alpha=0.7, targets=("q", "k", "v", "out"), layers=2)
    add_adapters(model, config)
    _randomise(model)
    save_adapters(model, tmp_path / "ad", arch="mora-tiny")
    tensors = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    merged = merge_adapters(model).state_dict()

    # Towers of different width (64 vs 48) and depth (4 vs 3) pair from the end:
    # slot 0 = (vision 2, text 1), slot 1 = (vision 3, text 2).
    slots = {"visual": {2: 0, 3: 1}, "text": {1: 0, 2: 1}}
    checked = 0
    for tower, depth in (("visual", 4), ("text", 3)):
        for block in range(depth):
            for proj in ("q", "k", "v", "out"):
                got = _w0(merged, tower, block, proj).double()
                w0 = _w0(base, tower, block, proj)
                if block not in slots[tower]:
                    assert torch.equal(got, w0.double()), f"{tower}.{block}.{proj} should be untouched"
                    continue
                slot = slots[tower][block]
                prefix = f"{tower}.{block}.{proj}"
                own = tensors.get(f"shared.{slot}.{'vision' if tower == 'visual' else 'text'}")
                other = tensors.get(f"shared.{slot}.{'text' if tower == 'visual' else 'vision'}")
                per_proj = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
                want = reference_weight(method, w0, per_proj, own, other, tensors.get(f"shared.{slot}.gram"), 0.7, 3)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
                checked += 1
    assert checked == 4 * 4


def test_tensor_names_and_shapes_follow_the_public_contract(tiny_model, tmp_path):
    model = tiny_model.model
    add_adapters(model, AdapterConfig(method="learned_gram", r=4, r_shared=2, targets=("q", "out"), layers=1))
    save_adapters(model, tmp_path / "ad", arch="mora-tiny")
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "ad" / "adapter.safetensors")).items()}
    assert shapes == {
        "shared.0.vision": (2, 64), "shared.0.text": (2, 48), "shared.0.gram": (2, 2),
        "visual.3.q.A": (4, 64), "visual.3.q.B": (64, 4), "visual.3.q.m_specific": (64,), "visual.3.q.m_shared": (64,),
        "visual.3.out.A": (4, 64), "visual.3.out.B": (64, 4), "visual.3.out.m_specific": (64,), "visual.3.out.m_shared": (64,),
        "text.2.q.A": (4, 48), "text.2.q.B": (48, 4), "text.2.q.m_specific": (48,), "text.2.q.m_shared": (48,),
        "text.2.out.A": (4, 48), "text.2.out.B": (48, 4), "text.2.out.m_specific": (48,), "text.2.out.m_shared": (48,),
    }
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["arch"] == "mora-tiny" and meta["adapter"]["method"] == "learned_gram"
    assert meta["tower_shapes"] == {"visual": [64, 4], "text": [48, 3]}


def test_initialisation_follows_the_spec(tiny_model):
    model = tiny_model.model
    w0 = model.visual.transformer.resblocks[3].attn.in_proj_weight.detach().clone()
    torch.manual_seed(3)
    add_adapters(model, AdapterConfig(method="mora", r=4, r_shared=4, layers=1))
    adapter = model.visual.transformer.resblocks[3].attn.parametrizations["in_proj_weight"][0].projections["q"]
    assert torch.count_nonzero(adapter.B) == 0
    torch.testing.assert_close(adapter.m_specific.detach(), w0[:64].norm(dim=0))
    torch.testing.assert_close(adapter.m_shared.detach(), w0[:64].norm(dim=0))
    # Variance of A is 1/r: over many draws the empirical variance is close.
    big = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith(".A")])
    assert abs(big.var().item() - 1 / 4) < 0.05


def test_alpha_small_starts_at_twice_the_base_weight(tiny_model):
    model = tiny_model.model
    w0 = model.transformer.resblocks[2].attn.in_proj_weight.detach().clone()
    add_adapters(model, AdapterConfig(method="mora", alpha=1e-7, targets=("v",), layers=1))
    w = model.transformer.resblocks[2].attn.in_proj_weight.detach()
    torch.testing.assert_close(w[96:], 2 * w0[96:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w[:96], w0[:96])


# ------------------------------------------------------------------------------- forward behaviour
def _outputs(model, tokens=None):
    torch.manual_seed(5)
    image = torch.randn(2, 3, 32, 32)
    text = tokens if tokens is not None else torch.randint(1, 90, (2, model.context_length))
    with torch.no_grad():
        return model.encode_image(image), model.encode_text(text)


@pytest.mark.parametrize("attention", ["nn.MultiheadAttention", "open_clip.Attention"])
@pytest.mark.parametrize("proj", ["q", "k", "v", "out"])
def test_each_projection_really_changes_the_output(tiny_model, attention, proj):
    model = tiny_model.model if attention == "nn.MultiheadAttention" else _tiny_custom_attention_model()
    before = _outputs(model)
    add_adapters(model, AdapterConfig(method="lora", r=2, alpha=2.0, targets=(proj,), layers=1))
    unchanged = _outputs(model)
    for a, b in zip(before, unchanged):  # B = 0: LoRA starts as the identity
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".B"):
                param.normal_(0, 0.5)
    after = _outputs(model)
    for a, b in zip(before, after):
        assert (a - b).abs().max() > 1e-3, f"adapter on {proj} did not reach the {attention} forward"


@pytest.mark.parametrize("attention", ["nn.MultiheadAttention", "open_clip.Attention"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_merge_is_exact_and_leaves_a_plain_model(tiny_model, attention, method):
    model = tiny_model.model if attention == "nn.MultiheadAttention" else _tiny_custom_attention_model()
    plain_keys = set(model.state_dict())
    plain_classes = [type(m) for m in model.modules()]
    add_adapters(model, AdapterConfig(method=method, targets=("q", "k", "v", "out"), layers=2, alpha=0.5))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    adapted = _outputs(model)
    merge_adapters(model)
    merged = _outputs(model)
    for a, b in zip(adapted, merged):
        assert ((a - b).norm() / a.norm()).item() < 1e-5
    assert set(model.state_dict()) == plain_keys
    assert [type(m) for m in model.modules()] == plain_classes
    assert not hasattr(model, "mora_adapter")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_exported_checkpoint_loads_in_plain_open_clip(tiny_model, tmp_path, suffix):
    model = tiny_model.model
    add_adapters(model, AdapterConfig(method="mora", targets=("q", "v")))
    _randomise(model)
    adapted = _outputs(model)
    path = export_checkpoint(merge_adapters(model), tmp_path / f"merged{suffix}")
    reloaded = open_clip.create_model("mora-tiny", pretrained=str(path)).eval()
    for a, b in zip(adapted, _outputs(reloaded)):
        assert ((a - b).norm() / a.norm()).item() < 1e-5


def test_export_refuses_an_unmerged_model(tiny_model, tmp_path):
    add_adapters(tiny_model.model, AdapterConfig())
    with pytest.raises(AdapterError, match="merge the adapters"):
        export_checkpoint(tiny_model.model, tmp_path / "x.safetensors")


def test_only_adapters_are_trainable_and_receive_gradients(tiny_model):
    model = tiny_model.model
    add_adapters(model, AdapterConfig(method="mora", targets=("q", "v"), layers=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all("mora_adapter" in n or (".parametrizations." in n and not n.endswith("original")) for n in trainable)
    out = model.encode_image(torch.randn(2, 3, 32, 32)).sum() + model.encode_text(torch.randint(1, 90, (2, 32))).sum()
    out.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name


# ------------------------------------------------------------------------------- layer selection
def test_explicit_layers_pair_in_order(tiny_model, tmp_path):
    model = tiny_model.model
    add_adapters(model, AdapterConfig(method="mora", targets=("q",), vision_layers=(0, 2), text_layers=(1, 2)))
    assert model.mora_adapter.slot_blocks == [(0, 1), (2, 2)]
    save_adapters(model, tmp_path / "ad")
    names = sorted(load_file(str(tmp_path / "ad" / "adapter.safetensors")))
    assert "visual.0.q.A" in names and "text.1.q.A" in names and "visual.1.q.A" not in names


def test_one_tower_slot_cannot_take_the_shared_part(tiny_model):
    with pytest.raises(AdapterError, match="equal length"):
        add_adapters(tiny_model.model, AdapterConfig(method="mora", vision_layers=(3,), text_layers=()))
    # LoRA has no shared part: one tower alone is fine.
    add_adapters(tiny_model.model, AdapterConfig(method="lora", vision_layers=(3,), text_layers=()))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "loha"}, "unknown adapter method"),
        ({"targets": ("q", "x")}, "subset of q, k, v, out"),
        ({"r": 0}, "ranks must be"),
        ({"r": "4"}, r"adapter config: r must be int, got '4'$"),
        ({"alpha": "x"}, r"alpha must be float \| None, got 'x'"),
        ({"vision_layers": [1, "a"], "text_layers": [1, 2]}, r"vision_layers must be tuple\[int, \.\.\.\] \| None"),
        ({"prompt_length": True}, r"prompt_length must be int \| None, got True"),
    ],
)
def test_bad_configs_are_rejected(kwargs, message):
    with pytest.raises(AdapterError, match=message):
        AdapterConfig(**kwargs)


def test_out_of_range_block_is_rejected(tiny_model):
    with pytest.raises(AdapterError, match="text block 7 does not exist"):
        add_adapters(tiny_model.model, AdapterConfig(method="lora", vision_layers=(1,), text_layers=(7,)))


def test_blocks_without_fused_attention_are_rejected(tiny_model):
    model = tiny_model.model
    model.transformer.resblocks[2].attn = torch.nn.Identity()
    with pytest.raises(AdapterError, match="text block 2: expected attention with a fused in_proj_weight and "
                                           "out_proj, found Identity"):
        add_adapters(model, AdapterConfig(method="lora", layers=2))
    # checked before any block is touched: the earlier blocks of both towers are left as they were
    assert not any(parametrize.is_parametrized(m) for m in model.modules()) and not has_adapters(model)


# ------------------------------------------------------------------------------- adapter files
@pytest.mark.parametrize("method", ALL_METHODS)
def test_save_load_round_trip(tiny_model, tmp_path, method):
    fresh = copy.deepcopy(tiny_model.model)
    model = tiny_model.model
    add_adapters(model, AdapterConfig(method=method, targets=("k", "v"), layers=2))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    want = _outputs(model)
    save_adapters(model, tmp_path / "ad", arch="mora-tiny")
    # bitfit/full changed the base tensors; the fingerprint refers to the weights they started from.
    loaded = load_adapters(fresh, tmp_path / "ad", arch="mora-tiny")
    for a, b in zip(want, _outputs(loaded)):
        torch.testing.assert_close(a, b)


@pytest.fixture
def saved(tiny_model, tmp_path):
    fresh = copy.deepcopy(tiny_model.model)
    add_adapters(tiny_model.model, AdapterConfig(method="mora"))
    folder = save_adapters(tiny_model.model, tmp_path / "ad", arch="mora-tiny")
    return fresh, Path(folder)


def test_load_rejects_other_base_weights(saved):
    fresh, folder = saved
    with torch.no_grad():
        fresh.visual.conv1.weight.add_(1.0)
    with pytest.raises(AdapterError, match="adapter made for base weights"):
        load_adapters(fresh, folder)


def test_load_rejects_other_architecture(saved):
    _, folder = saved
    other = _tiny_custom_attention_model()
    with pytest.raises(AdapterError, match="adapter made for towers"):
        load_adapters(other, folder)
    with pytest.raises(AdapterError, match="adapter made for mora-tiny, but the model is ViT-B-16"):
        load_adapters(other, folder, arch="ViT-B-16")


def test_load_rejects_missing_extra_misshapen_and_corrupt_tensors(saved):
    fresh, folder = saved
    weights = folder / "adapter.safetensors"
    original = load_file(str(weights))

    def attempt(tensors, message):
        save_file(tensors, str(weights))
        with pytest.raises(AdapterError, match=message):
            load_adapters(copy.deepcopy(fresh), folder)

    attempt({k: v for k, v in original.items() if k != "visual.3.q.A"}, "missing 1: visual.3.q.A")
    attempt({**original, "visual.0.q.A": torch.zeros(4, 64)}, "unexpected 1: visual.0.q.A")
    attempt({**original, "text.2.v.B": torch.zeros(48, 5)}, r"text.2.v.B has shape \(48, 5\), expected \(48, 4\)")
    weights.write_bytes(b"\x00\x01garbage")
    with pytest.raises(AdapterError, match="corrupted or unreadable adapter weights"):
        load_adapters(copy.deepcopy(fresh), folder)


def test_dora_records_its_row_magnitudes_and_refuses_column_ones(tiny_model, tmp_path):
    fresh = copy.deepcopy(tiny_model.model)
    add_adapters(tiny_model.model, AdapterConfig(method="dora", targets=("q",), layers=1))
    folder = save_adapters(tiny_model.model, tmp_path / "ad", arch="mora-tiny")
    config = folder / "adapter_config.json"
    meta = json.loads(config.read_text())
    assert meta["dora_magnitude"] == "row"
    del meta["dora_magnitude"]  # as written before DoRA followed PEFT
    config.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="older toolkit.*not one per input column"):
        load_adapters(fresh, folder)


def test_load_rejects_missing_folder_and_bad_config(tmp_path, tiny_model):
    with pytest.raises(AdapterError, match="adapter folder not found"):
        load_adapters(tiny_model.model, tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not a valid adapter config"):
        load_adapters(tiny_model.model, tmp_path / "bad")


# ------------------------------------------------------------------------------- parameter budget
def test_trainable_share_matches_the_paper_for_vit_b16():
    """ViT-B-16, MoRA r = r_s = 4 on q and v of the last 2 blocks, 101-class head: about 0.11%."""
    with torch.device("meta"):
        model = open_clip.CLIP(**open_clip.get_model_config("ViT-B-16"))
    add_adapters(model, AdapterConfig(method="mora", r=4, r_shared=4, targets=("q", "v"), layers=2))
    head = torch.nn.Linear(1024, 101, device="meta")
    trainable, total, percent = trainable_share(model, head)
    per_projection = {768: 4 * 768 * 2 + 2 * 768, 512: 4 * 512 * 2 + 2 * 512}
    expected = 2 * 2 * (per_projection[768] + per_projection[512]) + 2 * 4 * (768 + 512) + 1024 * 101 + 101
    assert trainable == expected
    assert round(percent, 2) == 0.11


def test_merging_a_copy_leaves_the_original_working(tiny_model):
    """deepcopy shares parametrized classes; merging the copy must not break the original."""
    model = add_adapters(tiny_model.model, AdapterConfig(method="mora"))
    before = _outputs(model)
    merge_adapters(copy.deepcopy(model))
    for a, b in zip(before, _outputs(model)):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------- registry
def test_registry_names_every_method_once_and_refuses_unknown_or_repeated_ones():
    assert list_methods() == tuple(ALL_METHODS) + ("dcp", "mmp")
    with pytest.raises(AdapterError, match="unknown adapter method 'loha' \\(choose from mora, no_gram, .*, full, dcp, mmp\\)"):
        get_method("loha")
    with pytest.raises(ValueError, match="registered twice"):
        register(AdapterMethod("mora"))
    assert get_method("lora").alpha(None, 8) == 8.0 and get_method("mora").alpha(None, 8) == 0.01
    assert get_method("dora").alpha(0.5, 8) == 0.5


# ------------------------------------------------------------------------------- safe merge, unmerge
def _poison(model, suffix):
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith(suffix)).fill_(float("nan"))


@pytest.mark.parametrize("method, suffix, culprit", [
    ("dora", "projections.q.B", "visual.transformer.resblocks.3.attn.in_proj_weight"),
    ("bitfit", "resblocks.3.attn.out_proj.bias", "visual.transformer.resblocks.3.attn.out_proj.bias"),
])
def test_non_finite_merge_fails_naming_the_weight_and_leaves_the_model_adapted(tiny_model, method, suffix, culprit):
    model = add_adapters(tiny_model.model, AdapterConfig(method=method, targets=("q",), layers=1))
    _poison(model, suffix)
    keys = set(model.state_dict())
    with pytest.raises(AdapterError, match=f"NaN or inf in {culprit}"):
        merge_adapters(model)
    assert has_adapters(model) and set(model.state_dict()) == keys


def test_load_refuses_non_finite_tensors_before_touching_the_model(saved):
    fresh, folder = saved
    tensors = load_file(str(folder / "adapter.safetensors"))
    tensors["text.2.v.m_shared"][3] = float("inf")
    save_file(tensors, str(folder / "adapter.safetensors"))
    with pytest.raises(AdapterError, match="adapter.safetensors: tensor text.2.v.m_shared holds NaN or inf"):
        load_adapters(fresh, folder)
    assert not has_adapters(fresh)


@pytest.mark.parametrize("method", ["mora", "learned_gram", "dora", "bitfit"])
def test_unmerge_restores_the_adapted_model_without_reloading(tiny_model, tmp_path, method):
    model = add_adapters(tiny_model.model, AdapterConfig(method=method, targets=("q", "out"), layers=2))
    _randomise(model)
    adapted = _outputs(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {k: v.clone() for k, v in load_file(str(save_adapters(model, tmp_path / "a") / "adapter.safetensors")).items()}
    plain_keys = set(merge_adapters(copy.deepcopy(model)).state_dict())

    merge_adapters(model, reversible=True)
    assert not has_adapters(model) and set(model.state_dict()) == plain_keys
    for a, b in zip(adapted, _outputs(model)):
        assert ((a - b).norm() / a.norm()).item() < 1e-5
    unmerge_adapters(model)
    for a, b in zip(adapted, _outputs(model)):
        torch.testing.assert_close(a, b)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    after = load_file(str(save_adapters(model, tmp_path / "b") / "adapter.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(AdapterError, match="no reversibly merged adapters"):
        unmerge_adapters(model)
