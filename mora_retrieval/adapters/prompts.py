"""Prompt baselines of the paper's Tables 1 and 4 and Figure 6: DCP and MMP on open_clip CLIP.

Both methods add learnable tokens (*prompts*) to the hidden sequence of the first
``prompt_depth`` blocks of both towers, chosen by each sample's **missing case** (0 complete,
1 text missing, 2 image missing: the codes of ``data/missing.py``). The backbone stays frozen.

* ``mmp``, missing-aware prompts (Lee et al., CVPR 2023, input-level prompts, here on CLIP):
  block ``i < N`` prepends its own ``P`` tokens (drawn from ``N(0, 0.02²)``) for the sample's
  case; the tokens added by earlier blocks stay, so from block ``N - 1`` on the sequence carries
  ``N·P`` prompt tokens (tensor names and shapes: ``io.py``).
* ``dcp``, deep correlated prompts (Hu et al., NeurIPS 2024): ``P`` tokens in three parts of
  ``k = P/3``:

  - *correlated*: the prompts of block ``i`` of tower ``m`` are
    ``g_m^i(LN_m^i([c_v^{i-1} | c_t^{i-1}]))``, a two-layer MLP over the previous block's prompts
    of **both** towers; block 0 starts from initial prompts chosen by the case (an image prompt
    for "image present" / "image missing", a text prompt for "text present" / "text missing");
  - *dynamic*: per-case query tokens that attend (one head) to the tower's input sequence at
    block 0, so they depend on the input;
  - *modal*: per-case tokens in the text width, projected into each tower by an MLP.

  Block 0 prepends ``[correlated | modal | dynamic]``; blocks ``1 … N-1`` replace the
  correlated part by their own, keeping the rest as the previous block computed it.

Prompts stay in the sequence up to the tower's last block and are cut from its output, so the
tower's pooling (the class token; the text's end-of-text position, found from the token ids)
reads the same positions as without prompts. In the text tower the causal mask is extended: text
tokens see every prompt, prompts see each other and never the text. The per-sample cases reach
the hooks through :func:`missing_cases`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import AdapterError
from .inject import ROOT_ATTR
from .methods import AdapterMethod, register

NUM_CASES = 3  # complete, text missing, image missing (the codes of data/missing.py)
PROMPT_INIT_STD = 0.02
DCP_REDUCTION = 16  # hidden width of DCP's MLPs: input width // 16, as in the reference code


@dataclass
class _TowerRun:
    """What the hooks of one tower keep during one forward."""

    cases: torch.Tensor
    prepared: Any
    length: int  # sequence length without prompts
    batch_first: bool
    prefix: int = 0  # prompt tokens currently in front of the sequence
    masks: dict = field(default_factory=dict)


class PromptModule(nn.Module):
    """Base class: inserts prompts into the towers through forward hooks, one set per missing case.

    Subclasses give :meth:`prepare` (per-forward values, e.g. generated prompts) and
    :meth:`insert` (the block's input with its prompts in front). The hooks are bound methods of
    this module, so ``copy.deepcopy`` of the model gives a copy whose hooks use the copied prompts.
    """

    def __init__(self, depth: int, depths: dict[str, int]) -> None:
        super().__init__()
        if depth > min(depths.values()):
            raise AdapterError(f"prompt_depth={depth} exceeds the shallower tower (vision {depths['visual']}, "
                               f"text {depths['text']} blocks)")
        self.depth = int(depth)
        self.cases: torch.Tensor | None = None  # set by missing_cases() for one forward
        self._runs: dict[str, _TowerRun] = {}

    def prepare(self, tower: str, cases: torch.Tensor) -> Any:
        return None

    def insert(self, tower: str, layer: int, x: torch.Tensor, prepared: Any,
               cases: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``x`` ``[N, prefix + L, D]`` → the input of block ``layer`` with its prompts in front."""
        raise NotImplementedError

    def attach(self, towers: dict[str, nn.Module]) -> None:
        """Hook every block of both towers (to grow the attention mask) and the towers themselves."""
        for tower, transformer in towers.items():
            transformer.register_forward_pre_hook(partial(self._start, tower), with_kwargs=True)
            transformer.register_forward_hook(partial(self._finish, tower))
            for index, block in enumerate(transformer.resblocks):
                block.register_forward_pre_hook(partial(self._enter_block, tower, index), with_kwargs=True)

    def _start(self, tower: str, transformer: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]  # open_clip's Transformer takes and returns [N, L, D]
        n = x.shape[0]
        if self.cases is None:
            cases = torch.zeros(n, dtype=torch.long, device=x.device)
        elif tuple(self.cases.shape) != (n,):
            raise AdapterError(f"the missing cases name {tuple(self.cases.shape)} samples but the batch has {n}")
        else:
            cases = self.cases.to(device=x.device, dtype=torch.long, non_blocking=True)
        self._runs[tower] = _TowerRun(cases, self.prepare(tower, cases), x.shape[1],
                                      getattr(transformer, "batch_first", True))

    def _enter_block(self, tower: str, layer: int, block: nn.Module, args: tuple, kwargs: dict):
        run = self._runs.get(tower)
        if run is None:
            raise AdapterError(f"{tower} block {layer} ran outside its tower's forward; prompt adapters need the "
                               "tower's own forward (encode_image / encode_text)")
        x, rest = args[0], list(args[1:])
        if layer < self.depth:
            nld = x if run.batch_first else x.transpose(0, 1)
            nld = self.insert(tower, layer, nld, run.prepared, run.cases)
            run.prefix = nld.shape[1] - run.length
            x = nld if run.batch_first else nld.transpose(0, 1)
        if run.prefix:
            if kwargs.get("attn_mask") is not None:
                kwargs["attn_mask"] = self._mask(run, kwargs["attn_mask"])
            elif len(rest) >= 3 and rest[2] is not None:  # gradient checkpointing passes (x, None, None, mask)
                rest[2] = self._mask(run, rest[2])
        return (x, *rest), kwargs

    @staticmethod
    def _mask(run: _TowerRun, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` ``[L, L]`` grown to ``[P + L, P + L]`` for the ``P`` prompts in front (module docstring), once
        per forward; float masks are additive (``-inf`` blocks), boolean masks block where True."""
        key = (run.prefix, mask.data_ptr(), mask.dtype, mask.device)
        if key not in run.masks:
            if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
                raise AdapterError(f"prompt adapters support a square 2-D attention mask (open_clip's causal text "
                                   f"mask), got shape {tuple(mask.shape)}")
            total = run.prefix + mask.shape[0]
            out = torch.zeros(total, total, dtype=mask.dtype, device=mask.device)
            out[:run.prefix, run.prefix:] = True if mask.dtype == torch.bool else float("-inf")
            out[run.prefix:, run.prefix:] = mask
            run.masks[key] = out
        return run.masks[key]

    def _finish(self, tower: str, transformer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        run = self._runs.pop(tower, None)
        return output if run is None or not run.prefix else output[:, run.prefix:]


def _normal(*shape: int, dtype=None, device=None) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, dtype=dtype, device=device) * PROMPT_INIT_STD)


class MissingAwarePrompts(PromptModule):
    """MMP: independent prompts per case and block, prepended and accumulated (module docstring)."""

    def __init__(self, length: int, depth: int, widths: dict[str, int], depths: dict[str, int],
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(depth, depths)
        self.tokens = nn.ParameterDict({tower: _normal(NUM_CASES, depth, length, width, dtype=dtype, device=device)
                                        for tower, width in widths.items()})

    def insert(self, tower, layer, x, prepared, cases):
        return torch.cat([self.tokens[tower][:, layer][cases].to(x.dtype), x], dim=1)


def _mlp(d_in: int, d_out: int, dtype=None, device=None) -> nn.Sequential:
    hidden = max(d_in // DCP_REDUCTION, 1)
    return nn.Sequential(nn.Linear(d_in, hidden, dtype=dtype, device=device), nn.GELU(),
                         nn.Linear(hidden, d_out, dtype=dtype, device=device))


class CorrelatedPrompts(PromptModule):
    """DCP: correlated, dynamic and modal prompts (module docstring)."""

    # For each case (complete, text missing, image missing): is the image / the text missing?
    IMAGE_INITIAL = (0, 0, 1)
    TEXT_INITIAL = (0, 1, 0)

    def __init__(self, length: int, depth: int, widths: dict[str, int], depths: dict[str, int],
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        if length % 3:
            raise AdapterError(f"dcp needs prompt_length divisible by 3 (correlated, modal and dynamic parts), "
                               f"got {length}")
        super().__init__(depth, depths)
        k, d_v, d_t = length // 3, widths["visual"], widths["text"]
        joint, kw = d_v + d_t, {"dtype": dtype, "device": device}
        self.part = k
        self.initial = nn.ParameterDict({"visual": _normal(2, k, d_v, **kw), "text": _normal(2, k, d_t, **kw)})
        self.norms = nn.ModuleDict({tower: nn.ModuleList([nn.LayerNorm(joint, **kw) for _ in range(depth)])
                                    for tower in widths})
        self.generators = nn.ModuleDict({tower: nn.ModuleList([_mlp(joint, width, **kw) for _ in range(depth)])
                                         for tower, width in widths.items()})
        self.modal = _normal(NUM_CASES, k, d_t, **kw)
        self.modal_proj = nn.ModuleDict({tower: _mlp(d_t, width, **kw) for tower, width in widths.items()})
        self.queries = nn.ParameterDict({tower: _normal(NUM_CASES, k, width, **kw) for tower, width in widths.items()})
        self.query_attn = nn.ModuleDict({tower: nn.MultiheadAttention(width, 1, batch_first=True, **kw)
                                         for tower, width in widths.items()})

    def correlated(self) -> dict[str, list[torch.Tensor]]:
        """The correlated prompts of every block for the three cases: ``{tower: [[3, k, d]] * depth}``."""
        index = {"visual": self.IMAGE_INITIAL, "text": self.TEXT_INITIAL}
        previous = {tower: self.initial[tower][list(index[tower])] for tower in ("visual", "text")}
        out: dict[str, list[torch.Tensor]] = {"visual": [], "text": []}
        for layer in range(self.depth):
            joint = torch.cat([previous["visual"], previous["text"]], dim=-1)
            for tower in out:
                previous[tower] = self.generators[tower][layer](self.norms[tower][layer](joint))
                out[tower].append(previous[tower])
        return out

    def prepare(self, tower, cases):
        return self.correlated()[tower], self.modal_proj[tower](self.modal)

    def insert(self, tower, layer, x, prepared, cases):
        correlated, modal = prepared
        own = correlated[layer][cases].to(x.dtype)
        if layer > 0:
            return torch.cat([own, x[:, self.part:]], dim=1)
        attn = self.query_attn[tower]
        dtype = x.dtype if torch.is_autocast_enabled(x.device.type) else attn.in_proj_weight.dtype
        keys = x.to(dtype)
        dynamic = attn(self.queries[tower][cases].to(dtype), keys, keys, need_weights=False)[0]
        return torch.cat([own, modal[cases].to(x.dtype), dynamic.to(x.dtype), x], dim=1)


def prompt_module(model: nn.Module) -> PromptModule | None:
    """The prompt module of an adapted model, or None (no adapters, or a weight-based method)."""
    return getattr(getattr(model, ROOT_ATTR, None), "prompts", None)


@contextlib.contextmanager
def missing_cases(model: nn.Module, cases: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the prompts of ``model`` follow ``cases`` (one code per sample of the batch; set
    on the model for the forwards inside). A no-op for models without prompts and for ``cases=None``
    (every sample complete)."""
    module = prompt_module(model)
    if module is None or cases is None:
        yield
        return
    cases = torch.as_tensor(cases)
    if cases.dim() != 1 or cases.dtype.is_floating_point or cases.dtype == torch.bool:
        raise AdapterError(f"missing cases must be a 1-D integer tensor (0 complete, 1 text missing, 2 image missing), "
                           f"got {cases.dtype} of shape {tuple(cases.shape)}")
    if cases.numel() and (int(cases.min()) < 0 or int(cases.max()) >= NUM_CASES):
        raise AdapterError(f"missing cases must be 0 (complete), 1 (text missing) or 2 (image missing), "
                           f"got values in [{int(cases.min())}, {int(cases.max())}]")
    previous, module.cases = module.cases, cases
    try:
        yield
    finally:
        module.cases = previous


register(AdapterMethod("dcp", prompt_defaults=(36, 6), mergeable=False,
                       make_prompts=lambda c, *shape, **kw: CorrelatedPrompts(*c.resolved_prompts(), *shape, **kw)))
register(AdapterMethod("mmp", prompt_defaults=(16, 6), mergeable=False,
                       make_prompts=lambda c, *shape, **kw: MissingAwarePrompts(*c.resolved_prompts(), *shape, **kw)))
