"""Prompt baselines (DCP, MMP): towers against a hand-written forward, missing cases, files, merge refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mora_retrieval.adapters import (AdapterConfig, add_adapters, export_checkpoint, load_adapters, merge_adapters,
                                     missing_cases, prompt_module, save_adapters, trainable_share)
from mora_retrieval.adapters.merge import merge_adapter_folder
from mora_retrieval.errors import AdapterError

PROMPTS = ["dcp", "mmp"]
CASES = torch.tensor([0, 1, 2])


def _inputs(backbone, n=3):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    tokens = backbone.tokenizer(["a red square on grey", "", "two blue circles"][:n] + ["x"] * max(0, n - 3))
    return images, tokens


def _encode(model, images, tokens, cases=None):
    with torch.no_grad(), missing_cases(model, cases):
        return model.encode_image(images), model.encode_text(tokens)


def _perturb(model, scale=0.5):
    """Move the trainable tensors away from their initial values (so every part matters)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def _allowed_mask(prefix: int, length: int) -> torch.Tensor:
    """Additive mask written cell by cell: prompts see prompts; text sees prompts and earlier text."""
    size = prefix + length
    mask = torch.full((size, size), float("-inf"))
    for i in range(size):
        for j in range(size):
            if j < prefix or (i >= prefix and j <= i):
                mask[i, j] = 0.0
    return mask


def _reference_text(plain, tokens, insert, depth):
    """The text tower run block by block on a model without hooks; ``insert(layer, x)`` adds prompts."""
    x = plain.token_embedding(tokens) + plain.positional_embedding
    length, prefix = x.shape[1], 0
    for layer, block in enumerate(plain.transformer.resblocks):
        if layer < depth:
            x = insert(layer, x)
            prefix = x.shape[1] - length
        x = block(x, attn_mask=_allowed_mask(prefix, length))
    x = plain.ln_final(x[:, prefix:])
    return x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ plain.text_projection


def _reference_image(plain, images, insert, depth):
    visual = plain.visual
    x = visual._embeds(images)
    length, prefix = x.shape[1], 0
    for layer, block in enumerate(visual.transformer.resblocks):
        if layer < depth:
            x = insert(layer, x)
            prefix = x.shape[1] - length
        x = block(x)
    pooled, _ = visual._pool(x[:, prefix:])
    return pooled @ visual.proj


# ------------------------------------------------------------------------------ forward
def test_mmp_towers_match_a_hand_written_forward(tiny_model):
    plain = copy.deepcopy(tiny_model.model)
    assert plain.transformer.batch_first
    model = add_adapters(tiny_model.model, AdapterConfig(method="mmp", prompt_length=3, prompt_depth=2))
    _perturb(model)
    images, tokens = _inputs(tiny_model)
    got_image, got_text = _encode(model, images, tokens, CASES)
    tokens_of = prompt_module(model).tokens

    def insert(tower):
        return lambda layer, x: torch.cat([tokens_of[tower][CASES, layer], x], dim=1)

    with torch.no_grad():
        want_text = _reference_text(plain, tokens, insert("text"), 2)
        want_image = _reference_image(plain, images, insert("visual"), 2)
    torch.testing.assert_close(got_text, want_text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_image, want_image, rtol=1e-4, atol=1e-5)


def test_dcp_text_tower_matches_a_hand_written_forward(tiny_model):
    plain = copy.deepcopy(tiny_model.model)
    model = add_adapters(tiny_model.model, AdapterConfig(method="dcp", prompt_length=6, prompt_depth=2))
    _perturb(model, 0.2)
    images, tokens = _inputs(tiny_model)
    _, got = _encode(model, images, tokens, CASES)
    dcp = prompt_module(model)
    k = 2
    with torch.no_grad():
        # correlated prompts, per sample: image prompt "missing" only for case 2, text prompt only for case 1
        v = dcp.initial["visual"][(CASES == 2).long()]
        t = dcp.initial["text"][(CASES == 1).long()]
        chain = []
        for layer in range(2):
            joint = torch.cat([v, t], dim=-1)
            v = dcp.generators["visual"][layer](dcp.norms["visual"][layer](joint))
            t = dcp.generators["text"][layer](dcp.norms["text"][layer](joint))
            chain.append(t)

        def insert(layer, x):
            if layer == 0:
                dynamic = dcp.query_attn["text"](dcp.queries["text"][CASES], x, x)[0]
                return torch.cat([chain[0], dcp.modal_proj["text"](dcp.modal[CASES]), dynamic, x], dim=1)
            return torch.cat([chain[layer], x[:, k:]], dim=1)

        want = _reference_text(plain, tokens, insert, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", PROMPTS)
def test_prompts_change_the_output_and_the_backbone_stays_frozen(tiny_model, method):
    images, tokens = _inputs(tiny_model)
    plain_image, plain_text = _encode(tiny_model.model, images, tokens)
    model = add_adapters(tiny_model.model, AdapterConfig(method=method, prompt_depth=2, prompt_length=6))
    image, text = _encode(model, images, tokens, CASES)
    assert (image - plain_image).abs().max() > 1e-3 and (text - plain_text).abs().max() > 1e-3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mora_adapter.prompts.") for n in trainable)
    assert trainable_share(model)[0] == sum(p.numel() for p in prompt_module(model).parameters())


def test_mmp_keeps_the_text_tower_causal(tiny_model):
    """Prompts never see the text, so what follows the end-of-text token cannot reach it."""
    model = add_adapters(tiny_model.model, AdapterConfig(method="mmp", prompt_length=4, prompt_depth=2))
    _perturb(model)
    images, tokens = _inputs(tiny_model)
    changed = tokens.clone()
    eot = tokens.argmax(dim=-1)
    for row, position in enumerate(eot.tolist()):
        changed[row, position + 1:] = 400 + row  # padding replaced by ordinary tokens (smaller ids than EOT)
    assert torch.equal(changed.argmax(dim=-1), eot)
    torch.testing.assert_close(_encode(model, images, changed, CASES)[1], _encode(model, images, tokens, CASES)[1])


# ------------------------------------------------------------------------------ missing cases
@pytest.mark.parametrize("method", PROMPTS)
def test_each_sample_uses_the_prompts_of_its_missing_case(tiny_model, method, monkeypatch):
    model = add_adapters(tiny_model.model, AdapterConfig(method=method, prompt_depth=2, prompt_length=6))
    _perturb(model)
    module = prompt_module(model)
    images, tokens = _inputs(tiny_model)
    seen = []
    original = type(module).insert  # every per-case lookup uses the cases insert is given

    def spy(self, tower, layer, x, prepared, cases):
        seen.append(cases.tolist())
        return original(self, tower, layer, x, prepared, cases)

    monkeypatch.setattr(type(module), "insert", spy)
    cases = torch.tensor([2, 0, 1])
    batch = _encode(model, images, tokens, cases)
    assert seen and all(s == [2, 0, 1] for s in seen)
    # a mixed batch gives each sample what it gets alone with its own case
    for i in range(3):
        alone = _encode(model, images[i:i + 1], tokens[i:i + 1], cases[i:i + 1])
        for got, want in zip(batch, alone):
            torch.testing.assert_close(got[i:i + 1], want, rtol=1e-4, atol=1e-5)
    # the case matters, and no cases means every sample complete
    other = _encode(model, images, tokens, torch.tensor([0, 2, 1]))
    assert (other[0] - batch[0]).abs().max() > 1e-4
    for got, want in zip(_encode(model, images, tokens), _encode(model, images, tokens, torch.zeros(3, dtype=torch.long))):
        torch.testing.assert_close(got, want)


def _case_tables(method, module):
    """Per-case parameter rows: {(tensor name, row): the case that must be the only one to use it}."""
    if method == "mmp":
        return {(f"tokens.{t}", c): {c} for t in ("visual", "text") for c in range(3)}
    rows = {("modal", c): {c} for c in range(3)}
    rows.update({(f"queries.{t}", c): {c} for t in ("visual", "text") for c in range(3)})
    rows.update({("initial.visual", 0): {0, 1}, ("initial.visual", 1): {2},
                 ("initial.text", 0): {0, 2}, ("initial.text", 1): {1}})
    return rows


@pytest.mark.parametrize("method", PROMPTS)
@pytest.mark.parametrize("case", [0, 1, 2])
def test_a_missing_case_trains_only_its_own_prompts(tiny_model, method, case):
    model = add_adapters(tiny_model.model, AdapterConfig(method=method, prompt_depth=2, prompt_length=6))
    module = prompt_module(model)
    images, tokens = _inputs(tiny_model)
    with missing_cases(model, torch.full((3,), case)):
        loss = model.encode_image(images).square().sum() + model.encode_text(tokens).square().sum()
    loss.backward()
    params = dict(module.named_parameters())
    # every prompt tensor takes part in every forward (DDP runs with find_unused_parameters=False)
    assert all(p.grad is not None for p in params.values())
    for (name, row), users in _case_tables(method, module).items():
        grad = params[name].grad[row]
        assert (grad.abs().sum() > 0) == (case in users), (name, row, case)


def test_bad_missing_cases_fail_with_one_line(tiny_model):
    model = add_adapters(tiny_model.model, AdapterConfig(method="mmp", prompt_depth=1))
    images, tokens = _inputs(tiny_model)
    with pytest.raises(AdapterError, match="batch has 3"):
        _encode(model, images, tokens, torch.tensor([0, 1]))
    with pytest.raises(AdapterError, match="got values in \\[0, 3\\]"):
        _encode(model, images, tokens, torch.tensor([0, 1, 3]))
    with pytest.raises(AdapterError, match="1-D integer tensor"):
        _encode(model, images, tokens, torch.tensor([0.0, 1.0, 2.0]))


def test_config_errors_are_one_line(tiny_model):
    with pytest.raises(AdapterError, match="divisible by 3"):
        add_adapters(tiny_model.model, AdapterConfig(method="dcp", prompt_length=5, prompt_depth=1))
    with pytest.raises(AdapterError, match="prompt_depth=4 exceeds the shallower tower \\(vision 4, text 3"):
        add_adapters(tiny_model.model, AdapterConfig(method="mmp", prompt_depth=4))
    with pytest.raises(AdapterError, match="prompt_length must be a whole number >= 1"):
        AdapterConfig(method="mmp", prompt_length=0)
    assert AdapterConfig(method="dcp").resolved_prompts() == (36, 6)
    assert AdapterConfig(method="mmp", prompt_depth=3).resolved_prompts() == (16, 3)


def test_a_copy_runs_on_its_own_prompts(tiny_model):
    model = add_adapters(tiny_model.model, AdapterConfig(method="mmp", prompt_depth=2, prompt_length=2))
    images, tokens = _inputs(tiny_model)
    before = _encode(model, images, tokens, CASES)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(_encode(twin, images, tokens, CASES)[0], before[0])
    with torch.no_grad():
        prompt_module(twin).tokens["visual"].add_(torch.randn_like(prompt_module(twin).tokens["visual"]))
    assert (_encode(twin, images, tokens, CASES)[0] - before[0]).abs().max() > 1e-3
    torch.testing.assert_close(_encode(model, images, tokens, CASES)[0], before[0])


# ------------------------------------------------------------------------------ files
@pytest.mark.parametrize("method", PROMPTS)
def test_save_and_load_round_trip_to_identical_outputs(tiny_model, method, tmp_path):
    plain = copy.deepcopy(tiny_model.model)
    model = add_adapters(tiny_model.model, AdapterConfig(method=method, prompt_depth=2, prompt_length=6))
    _perturb(model)
    images, tokens = _inputs(tiny_model)
    want = _encode(model, images, tokens, CASES)
    save_adapters(model, tmp_path / "adapter", arch="mora-tiny")
    names = set(load_file(tmp_path / "adapter" / "adapter.safetensors"))
    assert names and all(n.startswith("prompts.") for n in names)
    if method == "mmp":
        assert names == {"prompts.tokens.visual", "prompts.tokens.text"}
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["adapter"]["method"] == method and meta["adapter"]["prompt_depth"] == 2

    loaded = load_adapters(copy.deepcopy(plain), tmp_path / "adapter", arch="mora-tiny").eval()
    for got, ref in zip(_encode(loaded, images, tokens, CASES), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_loading_checks_prompt_tensors(tiny_model, tmp_path):
    plain = copy.deepcopy(tiny_model.model)
    model = add_adapters(tiny_model.model, AdapterConfig(method="mmp", prompt_depth=2, prompt_length=4))
    folder = save_adapters(model, tmp_path / "adapter", arch="mora-tiny")
    weights = folder / "adapter.safetensors"
    tensors = load_file(weights)
    bad = dict(tensors, **{"prompts.tokens.text": torch.full_like(tensors["prompts.tokens.text"], float("nan"))})
    save_file(bad, weights)
    with pytest.raises(AdapterError, match="prompts.tokens.text holds NaN"):
        load_adapters(copy.deepcopy(plain), folder)
    save_file(tensors, weights)
    config = folder / "adapter_config.json"
    meta = json.loads(config.read_text())
    meta["adapter"]["prompt_length"] = 5
    config.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="tensor prompts.tokens.(text|visual) has shape \\(3, 2, 4, (48|64)\\), expected \\(3, 2, 5, (48|64)\\)"):
        load_adapters(copy.deepcopy(plain), folder)
    other = copy.deepcopy(plain)
    with torch.no_grad():
        other.visual.proj.add_(1.0)
    meta["adapter"]["prompt_length"] = 4
    config.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="adapter made for base weights"):
        load_adapters(other, folder)


# ------------------------------------------------------------------------------ merging refused
@pytest.mark.parametrize("method", PROMPTS)
def test_merging_prompts_is_refused_with_one_line(tiny_model, method, tmp_path):
    from mora_retrieval_cli.app import app

    base = export_checkpoint(copy.deepcopy(tiny_model.model), tmp_path / "base.safetensors")
    model = add_adapters(tiny_model.model, AdapterConfig(method=method, prompt_depth=1, prompt_length=3))
    images, tokens = _inputs(tiny_model)
    before = _encode(model, images, tokens, CASES)
    with pytest.raises(AdapterError, match=f"^{method} adapters cannot be merged: their prompts are extra tokens") as info:
        merge_adapters(model)
    assert "\n" not in str(info.value)
    torch.testing.assert_close(_encode(model, images, tokens, CASES)[0], before[0])  # left as it was
    folder = save_adapters(model, tmp_path / "adapter", arch="mora-tiny", extra={"pretrained": str(base)})
    with pytest.raises(AdapterError, match="cannot be merged"):
        merge_adapter_folder(folder, tmp_path / "merged.safetensors")
    result = CliRunner().invoke(app, ["merge", "--adapter", str(folder), "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code != 0 and "cannot be merged" in str(result.exception)
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "merged.safetensors").exists()
