"""LoRA and DoRA against Hugging Face PEFT, the field's reference implementation (float64).

The same A, B, (m), r and α go into PEFT (``lora.Linear``, ``use_dora=True`` for DoRA) and into
the toolkit; merged weights, outputs and gradients must agree to rounding. PEFT is a test
dependency (the ``test`` extra); it is imported only here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from mora_retrieval.adapters import AdapterConfig, add_adapters, iter_projection_adapters, merge_adapters
from mora_retrieval.adapters.lora import DoRAAdapter, LoRAAdapter

EXACT = {"rtol": 0.0, "atol": 1e-12}


def _peft_linears(weights: dict[str, torch.Tensor], biases: dict[str, torch.Tensor], r: int, alpha: float, dora: bool):
    """PEFT's ``lora.Linear`` around one plain ``nn.Linear`` per named weight (float64)."""
    net = nn.Module()
    for name, weight in weights.items():
        linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(biases[name])
        net.add_module(name, linear)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(weights), use_dora=dora)
    return get_peft_model(net, config).base_model.model


def _load_into_peft(layer: nn.Module, adapter: LoRAAdapter) -> None:
    """Copy the toolkit adapter's tensors into a PEFT ``lora.Linear``."""
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(adapter.A)
        layer.lora_B["default"].weight.copy_(adapter.B)
        if isinstance(adapter, DoRAAdapter):
            layer.lora_magnitude_vector["default"].weight.copy_(adapter.m)
    assert layer.lora_A["default"].weight.dtype == torch.float64


def _perturb(adapter: LoRAAdapter, gen: torch.Generator) -> None:
    """B is zero and m = row(W0) at initialisation; move both so every term matters."""
    with torch.no_grad():
        adapter.B.normal_(0.0, 0.2, generator=gen)
        if isinstance(adapter, DoRAAdapter):
            adapter.m.mul_(1 + 0.3 * torch.rand(adapter.m.shape, generator=gen, dtype=adapter.m.dtype))


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("shape", [(6, 10), (8, 8)])
def test_linear_projection_matches_peft(method, shape):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    bias = torch.randn(shape[0], generator=gen, dtype=torch.float64)
    r, alpha = 3, 5.0  # scale α/r ≠ 1
    torch.manual_seed(1)
    adapter = (DoRAAdapter if method == "dora" else LoRAAdapter)(w0, r, alpha)
    _perturb(adapter, gen)
    peft_model = _peft_linears({"lin": w0}, {"lin": bias}, r, alpha, dora=method == "dora")
    _load_into_peft(peft_model.lin, adapter)

    x = torch.randn(4, shape[1], generator=gen, dtype=torch.float64)
    probe = torch.randn(4, shape[0], generator=gen, dtype=torch.float64)
    ours = F.linear(x, adapter(w0), bias)
    theirs = peft_model.lin(x)
    torch.testing.assert_close(ours, theirs, **EXACT)

    # Gradients: DoRA's norm is a constant for backprop in both (DoRA paper §4.3).
    (ours * probe).sum().backward()
    (theirs * probe).sum().backward()
    torch.testing.assert_close(adapter.A.grad, peft_model.lin.lora_A["default"].weight.grad, **EXACT)
    torch.testing.assert_close(adapter.B.grad, peft_model.lin.lora_B["default"].weight.grad, **EXACT)
    if method == "dora":
        torch.testing.assert_close(adapter.m.grad, peft_model.lin.lora_magnitude_vector["default"].weight.grad, **EXACT)

    with torch.no_grad():
        peft_model.lin.merge(safe_merge=True)
        torch.testing.assert_close(adapter(w0), peft_model.lin.get_base_layer().weight, **EXACT)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("tower, block", [("visual", 3), ("text", 2)])
def test_fused_in_proj_row_blocks_and_out_proj_match_peft(tiny_model, method, tower, block):
    """q, k, v adapt the row blocks of ``nn.MultiheadAttention.in_proj_weight``; the reference
    is PEFT on four separate ``nn.Linear`` with the same weights, fed into the same attention.

    PEFT's own ``lora.MultiheadAttention`` is not used as the reference: it adds the out_proj
    delta twice (huggingface/peft PR #3774; seen with peft 0.21), and it puts one A, B pair on
    the whole fused weight rather than one per q/k/v block.
    """
    model = tiny_model.model.double()
    r, alpha = 2, 3.0
    add_adapters(model, AdapterConfig(method=method, r=r, alpha=alpha, targets=("q", "k", "v", "out"), layers=1))
    attn = (model.visual.transformer if tower == "visual" else model.transformer).resblocks[block].attn
    w_in = attn.parametrizations["in_proj_weight"].original.detach()
    w_out = attn.out_proj.parametrizations["weight"].original.detach()
    d = w_out.shape[0]
    weights = {"q": w_in[:d], "k": w_in[d:2 * d], "v": w_in[2 * d:], "out": w_out}
    b_in = attn.in_proj_bias.detach()
    biases = {"q": b_in[:d], "k": b_in[d:2 * d], "v": b_in[2 * d:], "out": attn.out_proj.bias.detach()}
    peft_model = _peft_linears(weights, biases, r, alpha, dora=method == "dora")
    gen = torch.Generator().manual_seed(2)
    adapters = {name.rsplit(".", 1)[1]: a for name, a in iter_projection_adapters(model) if name.startswith(f"{tower}.{block}.")}
    assert sorted(adapters) == ["k", "out", "q", "v"]
    for name, adapter in adapters.items():
        _perturb(adapter, gen)
        _load_into_peft(getattr(peft_model, name), adapter)

    x = torch.randn(3, 5, d, generator=gen, dtype=torch.float64)  # open_clip's attention is batch-first
    with torch.no_grad():
        ours = attn(x, x, x, need_weights=False)[0]
        heads = [getattr(peft_model, p)(x).unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for p in "qkv"]
        mixed = F.scaled_dot_product_attention(*heads).transpose(1, 2).flatten(2)
        theirs = peft_model.out(mixed)
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=1e-10)

    merged = merge_adapters(copy.deepcopy(model))
    merged_attn = (merged.visual.transformer if tower == "visual" else merged.transformer).resblocks[block].attn
    with torch.no_grad():
        for name in ("q", "k", "v", "out"):
            getattr(peft_model, name).merge(safe_merge=True)
        peft_in = torch.cat([getattr(peft_model, p).get_base_layer().weight for p in "qkv"])
        torch.testing.assert_close(merged_attn.in_proj_weight, peft_in, **EXACT)
        torch.testing.assert_close(merged_attn.out_proj.weight, peft_model.out.get_base_layer().weight, **EXACT)
