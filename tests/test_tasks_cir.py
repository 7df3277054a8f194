"""CLIP4CIR + adapters: CIRR metrics against brute force, the stage losses, and a tiny full run."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from mora_retrieval.errors import MoraError, TrainingError
from mora_retrieval.tasks.cir.metrics import cirr_rankings, cirr_recalls, submission_files


# ------------------------------------------------------------------ metrics
def _brute_force(sim, names, refs, targets, members):
    """Recall@K and Recall_subset@K by sorting Python lists, straight from docs/protocols.md §4."""
    out = {}
    full_hits = {k: 0 for k in (1, 5, 10, 50)}
    subset_hits = {k: 0 for k in (1, 2, 3)}
    for i in range(len(refs)):
        ranking = sorted(((sim[i][j], names[j]) for j in range(len(names)) if names[j] != refs[i]), reverse=True)
        ranked = [n for _, n in ranking]
        for k in full_hits:
            full_hits[k] += targets[i] in ranked[:k]
        subset = [n for n in ranked if n in members[i]]
        assert len(subset) == 5
        for k in subset_hits:
            subset_hits[k] += targets[i] in subset[:k]
    q = len(refs)
    out.update({f"recall@{k}": 100 * v / q for k, v in full_hits.items()})
    out.update({f"recall_subset@{k}": 100 * v / q for k, v in subset_hits.items()})
    return out


def _random_problem(seed=0, gallery=80, queries=60):
    rng = random.Random(seed)
    names = [f"img{i}" for i in range(gallery)]
    refs, targets, members = [], [], []
    for _ in range(queries):
        group = rng.sample(names, 6)
        refs.append(group[0])
        targets.append(rng.choice(group[1:]))
        rng.shuffle(group)
        members.append(group)
    torch.manual_seed(seed)
    sim = torch.randn(queries, gallery)
    return sim, names, refs, targets, members


def test_cirr_recalls_match_brute_force():
    sim, names, refs, targets, members = _random_problem()
    got = cirr_recalls(sim, names, refs, targets, members)
    want = _brute_force(sim.tolist(), names, refs, targets, members)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-4), key
    assert got["avg"] == pytest.approx((want["recall@5"] + want["recall_subset@1"]) / 2, abs=1e-4)


def test_reference_is_removed_from_the_ranking():
    names = ["a", "b", "c", "d", "e", "f", "g"]
    sim = torch.tensor([[9.0, 5.0, 1.0, 0.0, 0.0, 0.0, 0.0]])  # the reference "a" scores highest
    got = cirr_recalls(sim, names, ["a"], ["b"], [["a", "b", "c", "d", "e", "f"]])
    assert got["recall@1"] == 100.0 and got["recall_subset@1"] == 100.0


def test_ties_rank_the_other_image_first_as_clip4cir_counts():
    """Written from CLIP4Cir's definition: sort the gallery by score, drop the reference, and
    look for the target among the first K; a tied image listed earlier in the gallery comes first."""
    names = ["a", "b", "c", "d"]
    sim = torch.tensor([[1.0, 0.5, 0.5, 0.1]])  # reference a; target c tied with b, which comes first
    got = cirr_recalls(sim, names, ["a"], ["c"], [["a", "b", "c"]])
    assert got["recall@1"] == 0.0 and got["recall@5"] == 100.0
    assert got["recall_subset@1"] == 0.0 and got["recall_subset@2"] == 100.0
    full, subset = cirr_rankings(sim, names, ["a"], [["a", "c", "b"]])
    assert full == [["b", "c", "d"]] and subset == [["b", "c"]]
    # Listed before its tied rival, the target comes first.
    got = cirr_recalls(sim, names, ["a"], ["b"], [["a", "b", "c"]])
    assert got["recall@1"] == 100.0 and got["recall_subset@1"] == 100.0


def test_recalls_equal_the_recall_of_the_exported_rankings_under_ties():
    sim, names, refs, targets, members = _random_problem(seed=2, gallery=40, queries=50)
    sim = torch.randint(0, 4, sim.shape).float()  # mostly ties
    got = cirr_recalls(sim, names, refs, targets, members)
    full, subset = cirr_rankings(sim, names, refs, members, top=len(names), subset_top=6)
    for k in (1, 5, 10, 50):
        want = 100 * sum(t in ranked[:k] for t, ranked in zip(targets, full)) / len(refs)
        assert got[f"recall@{k}"] == pytest.approx(want, abs=1e-4), k
    for k in (1, 2, 3):
        want = 100 * sum(t in ranked[:k] for t, ranked in zip(targets, subset)) / len(refs)
        assert got[f"recall_subset@{k}"] == pytest.approx(want, abs=1e-4), k
    assert all(len(ranked) == len(names) - 1 and r not in ranked for r, ranked in zip(refs, full))


def test_rankings_and_submission_format():
    sim, names, refs, targets, members = _random_problem(seed=1, gallery=70, queries=5)
    full, subset = cirr_rankings(sim, names, refs, members)
    for i in range(5):
        assert len(full[i]) == 50 and refs[i] not in full[i]
        scores = [float(sim[i, names.index(n)]) for n in full[i]]
        assert scores == sorted(scores, reverse=True)
        assert len(subset[i]) == 3 and refs[i] not in subset[i] and set(subset[i]) <= set(members[i])
    recall, recall_subset = submission_files([10, 11, 12, 13, 14], full, subset)
    assert recall["version"] == "rc2" and recall["metric"] == "recall" and recall["12"] == full[2]
    assert recall_subset["metric"] == "recall_subset" and recall_subset["14"] == subset[4]


# ------------------------------------------------------------------ losses
def test_stage1_loss_is_the_clip4cir_objective(tiny_model):
    from mora_retrieval.tasks.cir.stages import CIRStage1

    model, _, tokenizer = tiny_model
    module = CIRStage1(model, tokenizer, validation=None)
    torch.manual_seed(0)
    batch = {"reference": torch.randn(4, 3, 32, 32), "target": torch.randn(4, 3, 32, 32),
             "tokens": tokenizer(["add a red circle", "make it blue", "remove the square", "a"])}
    with torch.no_grad():
        loss = module(batch)
        query = F.normalize(model.encode_image(batch["reference"]) + model.encode_text(batch["tokens"]), dim=-1)
        target = F.normalize(model.encode_image(batch["target"]), dim=-1)
        logits = 100 * query @ target.T
        want = -torch.log_softmax(logits, dim=1).diagonal().mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


def test_stage2_loss_uses_the_combiner():
    from mora_retrieval.tasks.cir.stages import CIRStage2
    from mora_retrieval.model.combiner import Combiner

    torch.manual_seed(0)
    combiner = Combiner(8).eval()
    reference, text, target = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    loss = CIRStage2(combiner)([reference, text, target])
    logits = 100 * combiner(reference, text) @ F.normalize(target, dim=-1).T
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.arange(5)).item(), rel=1e-5)


# ------------------------------------------------------------------ settings
def test_settings_precedence_defaults_file_cli(tmp_path):
    from mora_retrieval.tasks.cir import CIRSettings, build_settings

    (tmp_path / "cfg.toml").write_text('arch = "mora-tiny"\n[stage1]\nlr = 0.5\nepochs = 3\n[adapter]\nr = 8\n')
    s = build_settings("root", str(tmp_path / "run"), "mora", tmp_path / "cfg.toml", {"stage1": {"epochs": 7}})
    assert s.arch == "mora-tiny" and s.stage1.lr == 0.5 and s.stage1.epochs == 7 and s.adapter.r == 8
    assert s.adapter.alpha == 0.01 and s.adapter.targets == ("q", "v") and s.stage1.batch_size == 256
    full = build_settings("root", str(tmp_path / "run"), "full")
    assert full.stage1.lr == 2e-6 and full.stage1.batch_size == 128 and full.adapter.method == "full"
    assert build_settings("root", "r", "mora", overrides={"no_combiner": True}).stage2 is None
    (tmp_path / "flat.json").write_text('{"stage1": 5}')
    with pytest.raises(MoraError, match=r"flat\.json: setting 'stage1' is a group of settings, not 5$"):
        build_settings("root", str(tmp_path / "run"), "mora", tmp_path / "flat.json")
    with pytest.raises(MoraError, match=r"command line: setting 'stage2' is a group of settings, not 3"):
        build_settings("root", str(tmp_path / "run"), "mora", overrides={"stage2": 3})
    with pytest.raises(TypeError, match="stage1 must be given as TrainConfig or a dict, not 5"):
        CIRSettings(data_root="root", run_dir="run", stage1=5)
    (tmp_path / "typed.toml").write_text('[stage1]\nlr = 1\n')  # a float setting takes an int
    assert build_settings("root", str(tmp_path / "run"), "mora", tmp_path / "typed.toml").stage1.lr == 1
    (tmp_path / "typo.json").write_text('{"stage1": {"epochs": "x"}, "adapter": {"r": 4}}')
    with pytest.raises(MoraError, match=r"typo\.json: setting 'stage1\.epochs' takes int values \(like 20\), not 'x'$"):
        build_settings("root", str(tmp_path / "run"), "mora", tmp_path / "typo.json")
    with pytest.raises(MoraError, match=r"command line: setting 'skip_bad_images' takes bool values"):
        build_settings("root", str(tmp_path / "run"), "mora", overrides={"skip_bad_images": 1})
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "config.json").write_text('{"task": "cir", "data_root": "x", "stage1": {"epochs": "x"}}')
    with pytest.raises(TrainingError, match=r"edited/config\.json: not a valid CIR run config \(train config: epochs "
                                            r"must be int, got 'x'\)$"):
        build_settings("root", str(tmp_path / "edited"), "mora", resume=True)


# ------------------------------------------------------------------ end to end
def _settings(world, run_dir, **kw):
    from mora_retrieval.engine import TrainConfig
    from mora_retrieval.tasks.cir import CIRSettings

    s = CIRSettings.with_defaults(str(world["cirr"]), str(run_dir), "mora", arch="mora-tiny", pretrained=None)
    s.stage1 = TrainConfig(epochs=2, batch_size=8, lr=1e-2, log_every=1, **{"device": "cpu", **kw})
    s.stage2 = TrainConfig(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0, device="cpu")
    return s


def test_train_cirr_end_to_end(world, tmp_path):
    import open_clip

    from mora_retrieval.tasks.cir import evaluate_cirr_run, train_cirr

    torch.manual_seed(0)
    run = tmp_path / "run"
    results = train_cirr(_settings(world, run), quiet=True)
    for name in ("config.json", "adapter/adapter_config.json", "adapter/adapter.safetensors", "merged.safetensors",
                 "combiner.safetensors", "results.json", "stage1/metrics.jsonl", "stage1/curves.png",
                 "stage2/metrics.jsonl"):
        assert (run / name).is_file(), name
    # The merged model reproduces the best stage-1 epoch's validation metrics.
    history = [json.loads(line) for line in (run / "stage1" / "metrics.jsonl").read_text().splitlines()]
    best = history[results["stage1_best_epoch"] - 1]["val"]
    for key, value in best.items():
        assert results["val_stage1"][key] == pytest.approx(value, abs=1e-3), key
    # A plain open_clip loads the merged checkpoint; eval from the run folder agrees.
    open_clip.create_model("mora-tiny", pretrained=str(run / "merged.safetensors"))
    again = evaluate_cirr_run(run, use_combiner=False, device="cpu")
    assert again["avg"] == pytest.approx(results["val_stage1"]["avg"], abs=1e-3)
    exported = evaluate_cirr_run(run, split="test1", out_dir=tmp_path / "sub", device="cpu")
    submission = json.loads((tmp_path / "sub" / "recall_submission.json").read_text())
    assert submission["version"] == "rc2" and len(submission) - 2 == exported["queries"]
    # A second run into the same folder must not clobber it.
    with pytest.raises(TrainingError, match="already holds a run"):
        train_cirr(_settings(world, run), quiet=True)


@pytest.mark.slow
def test_train_cirr_under_torchrun_with_two_gloo_processes(world, tmp_path, tiny_model):
    """Both stages under DDP: the run folder is complete and written once, every rank agrees."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mora_retrieval.adapters import export_checkpoint, load_adapters
    from mora_retrieval.model.backbone import load_backbone
    from mora_retrieval.fileio import load_tensors

    base = export_checkpoint(tiny_model.model, tmp_path / "base.safetensors")
    (tmp_path / "out").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = Path(__file__).resolve().parent / "cir_ddp_script.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(world["cirr"]), str(tmp_path / "run"), str(tmp_path / "out"), str(base)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    saved = json.loads((run / "stage1" / "config.json").read_text())
    assert saved["resolved"]["world_size"] == 2 and saved["resolved"]["effective_batch_size"] == 8
    for name in ("adapter/adapter.safetensors", "merged.safetensors", "combiner.safetensors", "results.json"):
        assert (run / name).is_file(), name
    ranks = [load_tensors(tmp_path / "out" / f"rank{r}.safetensors")["avg"] for r in (0, 1)]
    assert torch.equal(ranks[0], ranks[1])
    # The saved adapter reproduces the merged checkpoint written by rank 0.
    model = load_adapters(load_backbone("mora-tiny", str(base)).model, run / "adapter")
    from mora_retrieval.adapters import merge_adapters
    from mora_retrieval.model.backbone import weights_fingerprint

    merged = load_backbone("mora-tiny", str(run / "merged.safetensors")).model
    assert weights_fingerprint(merge_adapters(model)) == weights_fingerprint(merged)


def test_resume_finishes_an_interrupted_run_and_refuses_other_settings(world, tmp_path, monkeypatch, tiny_model):
    """Interrupt stage 1 mid-way (Ctrl-C), resume: the same adapter as an uninterrupted run."""
    from mora_retrieval.adapters import export_checkpoint
    from mora_retrieval.engine import TrainingInterrupted
    from mora_retrieval.fileio import load_tensors
    from mora_retrieval.tasks.cir import stages as cir
    from mora_retrieval.tasks.cir import train_cirr

    base = str(export_checkpoint(tiny_model.model, tmp_path / "base.safetensors"))

    def settings(run):
        s = _settings(world, tmp_path / run)
        s.pretrained = base
        return s

    straight = train_cirr(settings("straight"), quiet=True)
    calls = {"n": 0}
    original = cir.CIRStage1.forward

    def interrupt_at_step_3(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(cir.CIRStage1, "forward", interrupt_at_step_3)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train_cirr(settings("run"), quiet=True)
    monkeypatch.setattr(cir.CIRStage1, "forward", original)
    changed = settings("run")
    changed.adapter.r = 8
    with pytest.raises(TrainingError, match="cannot resume.*adapter"):
        train_cirr(changed, resume=True, quiet=True)
    resumed = train_cirr(settings("run"), resume=True, quiet=True)
    want = load_tensors(tmp_path / "straight" / "adapter" / "adapter.safetensors")
    got = load_tensors(tmp_path / "run" / "adapter" / "adapter.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert resumed["val_stage1"] == pytest.approx(straight["val_stage1"])


def _grads(module, batch):
    module.zero_grad(set_to_none=True)
    loss = module(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def test_frozen_prefix_cache_gives_the_same_loss_and_gradients(tiny_model):
    from mora_retrieval.adapters import AdapterConfig, add_adapters
    from mora_retrieval.tasks.cir.stages import CIRStage1

    model, _, tokenizer = tiny_model
    add_adapters(model, AdapterConfig(method="mora", targets=("q", "v"), layers=1))
    module = CIRStage1(model, tokenizer, validation=None).train()
    torch.manual_seed(0)
    captions = ["add a red circle", "make it blue", "remove the square"]
    images = torch.randn(5, 3, 32, 32)  # a b c d e; "a" is a reference and a target, as in CIRR
    batch = {"reference": images[[0, 1, 2]], "target": images[[3, 0, 4]],
             "tokens": tokenizer(captions), "caption": captions, "index": torch.arange(3),
             "reference_name": ["a", "b", "c"], "target_name": ["d", "a", "e"]}
    want_loss, want = _grads(module, batch)
    assert module.enable_prefix_cache("cpu", image_rows=5, text_rows=3, image_names=list("abcde"))
    image_cache, text_cache = module.prefix_caches
    assert (image_cache.depth, text_cache.depth) == (3, 2)  # 4 and 3 blocks, the last one adapted
    for expected_misses in (6, 6):  # first pass fills the cache, the second only reads it
        loss, got = _grads(module, batch)
        assert image_cache.misses == expected_misses and text_cache.misses == 3
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)
    assert image_cache.hits == 6 and text_cache.hits == 3
    assert image_cache.placement == "cpu" and image_cache.states.dtype == torch.float32
    assert image_cache.states.shape[0] == 5 and bool(image_cache.filled.all())
    # The tower is intact afterwards: all 4 blocks are back.
    assert len(model.visual.transformer.resblocks) == 4


def test_no_prefix_to_cache_for_full_fine_tuning(tiny_model):
    from mora_retrieval.adapters import AdapterConfig, add_adapters
    from mora_retrieval.tasks.cir.stages import CIRStage1

    model, _, tokenizer = tiny_model
    add_adapters(model, AdapterConfig(method="full"))
    assert not CIRStage1(model, tokenizer, validation=None).enable_prefix_cache()


@pytest.mark.parametrize("record", [{"stage1": {"epochs": 1}}, {"data_root": "d", "stage1": 5}])
def test_a_hand_edited_run_record_is_one_line_error_before_any_weights_load(tmp_path, record):
    from mora_retrieval.analysis.runs import read_run
    from mora_retrieval.tasks.cir import evaluate_cirr_run

    (tmp_path / "config.json").write_text(json.dumps({"task": "cir", "arch": "mora-tiny", **record}))
    for read in (lambda: evaluate_cirr_run(tmp_path, device="cpu"), lambda: read_run(tmp_path)):
        with pytest.raises(TrainingError, match=r"config\.json: not a valid CIR run config \("):
            read()
