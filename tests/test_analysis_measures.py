"""The analysis measures against independent numpy computations and hand-built cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mora_retrieval.analysis import (embedding_drift, gram_spectrum, inter_modal_distance, modality_gap,
                                     read_shared_factors, singular_spectrum)
from mora_retrieval.analysis.geometry import category_members
from mora_retrieval.analysis.samples import PairedSamples, spread_indices
from mora_retrieval.analysis.spectra import projection_weight, slot_spectra
from mora_retrieval.analysis.tsne import default_perplexity, tsne_2d
from mora_retrieval.errors import AdapterError


def _np_angle(a, b):
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _np_unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------ inter-modal distance (Table 2)
@pytest.mark.parametrize("normalize", [False, True])
def test_inter_modal_distance_matches_a_per_category_numpy_loop(normalize):
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(50, 8)) * 3, rng.normal(size=(50, 8)) + 0.5
    labels = rng.integers(0, 6, size=50)
    labels[labels == 4] = 5  # category 4 has no sample: it must not count
    x, y = (_np_unit(image), _np_unit(text)) if normalize else (image, text)
    distances, angles, counts = [], [], []
    for c in range(6):
        rows = labels == c
        if not rows.any():
            continue
        mv, mt = x[rows].mean(axis=0), y[rows].mean(axis=0)
        distances.append(np.linalg.norm(mv - mt))
        angles.append(_np_angle(mv, mt))
        counts.append(int(rows.sum()))
    got = inter_modal_distance(torch.tensor(image, dtype=torch.float32), text, labels, normalize=normalize)
    assert got.categories == 5 and got.category_ids == [0, 1, 2, 3, 5] and got.per_category_count == counts
    assert got.l2 == pytest.approx(np.mean(distances), rel=1e-5)
    assert got.angle == pytest.approx(np.mean(angles), rel=1e-5)
    np.testing.assert_allclose(got.per_category_angle, angles, rtol=1e-5)


def test_inter_modal_distance_hand_built_cases():
    e1, e2 = np.eye(2)
    # category 0: image mean e1, text mean 3·e2 (orthogonal: 90°, distance √10);
    # category 1: image 2·e1, text 5·e1 (parallel: 0°, distance 3)
    image = np.array([e1 + e2, e1 - e2, 2 * e1, 2 * e1])
    text = np.array([3 * e2, 3 * e2, 4 * e1, 6 * e1])
    got = inter_modal_distance(image, text, [0, 0, 1, 1])
    assert got.per_category_angle == pytest.approx([90.0, 0.0], abs=1e-6)
    assert got.per_category_l2 == pytest.approx([math.sqrt(10), 3.0])
    assert got.angle == pytest.approx(45.0) and got.l2 == pytest.approx((math.sqrt(10) + 3) / 2)
    # unit vectors at 72.44° are 1.18 apart, as in the paper's original-CLIP row
    theta = math.radians(72.44)
    unit = inter_modal_distance([[1.0, 0.0]], [[math.cos(theta), math.sin(theta)]], [0])
    assert unit.l2 == pytest.approx(1.18, abs=5e-3) and unit.angle == pytest.approx(72.44)


def test_a_multilabel_sample_counts_for_every_category_it_carries():
    image = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    multi_hot = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    got = inter_modal_distance(image, text, multi_hot)
    # category 0 = samples 0 and 2, category 1 = samples 1 and 2
    expect = [np.linalg.norm(image[[0, 2]].mean(0) - text[[0, 2]].mean(0)),
              np.linalg.norm(image[[1, 2]].mean(0) - text[[1, 2]].mean(0))]
    assert got.per_category_l2 == pytest.approx(expect) and got.per_category_count == [2, 2]


def test_inter_modal_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="paired"):
        inter_modal_distance(np.ones((3, 2)), np.ones((4, 2)), [0, 0, 0])
    with pytest.raises(ValueError, match="labels"):
        inter_modal_distance(np.ones((3, 2)), np.ones((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        inter_modal_distance(np.full((1, 2), np.nan), np.ones((1, 2)), [0])
    with pytest.raises(ValueError, match="zero vector"):
        inter_modal_distance(np.zeros((1, 2)), np.ones((1, 2)), [0])
    with pytest.raises(ValueError, match=">= 0"):
        category_members(torch.tensor([0, -1]))


# ------------------------------------------------------------------ drift (Table 3)
def test_embedding_drift_matches_numpy_and_is_zero_for_identical_embeddings():
    rng = np.random.default_rng(1)
    adapted, original = rng.normal(size=(30, 5)), rng.normal(size=(30, 5))
    got = embedding_drift(adapted, original)
    assert got.samples == 30
    assert got.l2 == pytest.approx(np.mean(np.linalg.norm(adapted - original, axis=1)), rel=1e-6)
    assert got.angle == pytest.approx(np.mean([_np_angle(a, o) for a, o in zip(adapted, original)]), rel=1e-6)
    assert got.l2_normalized == pytest.approx(
        np.mean(np.linalg.norm(_np_unit(adapted) - _np_unit(original), axis=1)), rel=1e-6)
    same = embedding_drift(original, original.copy())
    assert same.l2 == 0.0 and same.l2_normalized == 0.0 and same.angle == pytest.approx(0.0, abs=1e-5)


def test_embedding_drift_hand_built():
    # a quarter turn of every vector and a doubling: 90°, |(−y, x)·2 − (x, y)|
    original = np.array([[1.0, 0.0], [0.0, 3.0]])
    adapted = np.array([[0.0, 2.0], [-6.0, 0.0]])
    got = embedding_drift(adapted, original)
    assert got.angle == pytest.approx(90.0)
    assert got.l2 == pytest.approx((math.sqrt(5) + math.sqrt(45)) / 2)
    assert got.l2_normalized == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="must match"):
        embedding_drift(np.ones((2, 2)), np.ones((3, 2)))


# ------------------------------------------------------------------ modality gap
def test_modality_gap_matches_numpy_and_hand_built_cases():
    rng = np.random.default_rng(2)
    image, text = rng.normal(size=(40, 6)) + 1, rng.normal(size=(25, 6)) - 1  # unpaired, other sizes
    expect = np.linalg.norm(_np_unit(image).mean(0) - _np_unit(text).mean(0))
    assert modality_gap(image, text) == pytest.approx(expect, rel=1e-6)
    assert modality_gap(image, image) == 0.0
    # every image along e1 (any length), every text along e2: centroids e1 and e2
    assert modality_gap([[1.0, 0.0], [5.0, 0.0]], [[0.0, 2.0]]) == pytest.approx(math.sqrt(2))
    assert modality_gap([[1.0, 0.0]], [[-3.0, 0.0]]) == pytest.approx(2.0)  # the maximum
    with pytest.raises(ValueError, match="width"):
        modality_gap(np.ones((2, 3)), np.ones((2, 4)))


# ------------------------------------------------------------------ spectra (Figure 4)
def test_gram_spectrum_is_the_normalised_squared_singular_values_of_s():
    s = np.random.default_rng(3).normal(size=(4, 20))
    expect = np.linalg.svd(s, compute_uv=False) ** 2
    got = gram_spectrum(torch.tensor(s)).numpy()
    np.testing.assert_allclose(got, expect / expect.sum(), rtol=1e-10)
    assert np.all(np.diff(got) <= 0) and got.sum() == pytest.approx(1.0)
    # an S with orthogonal rows of lengths 2, 1, 1, 0: Gram diag(4, 1, 1, 0)
    hand = np.zeros((4, 6))
    hand[0, 0], hand[1, 1], hand[2, 2] = 2.0, 1.0, -1.0
    assert gram_spectrum(hand).tolist() == pytest.approx([4 / 6, 1 / 6, 1 / 6, 0.0])
    with pytest.raises(ValueError, match="zero"):
        gram_spectrum(np.zeros((2, 3)))


def test_singular_spectrum_keeps_the_top_values_as_a_share_of_all():
    w = np.random.default_rng(4).normal(size=(12, 12))
    values = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(singular_spectrum(w, 4).numpy(), values[:4] / values.sum(), rtol=1e-10)
    assert singular_spectrum(np.diag([1.0, 4.0, 3.0, 2.0]), 2).tolist() == pytest.approx([0.4, 0.3])


def test_read_shared_factors_reads_only_the_public_shared_names(tmp_path):
    from mora_retrieval.fileio import save_tensors

    tensors = {"shared.1.vision": torch.ones(2, 6), "shared.1.text": torch.zeros(2, 4),
               "shared.0.vision": torch.full((2, 6), 2.0), "shared.0.text": torch.full((2, 4), 3.0),
               "shared.0.gram": torch.eye(2), "visual.3.q.A": torch.ones(2, 6)}
    save_tensors(tmp_path / "adapter.safetensors", tensors)
    factors = read_shared_factors(tmp_path)
    assert list(factors) == ["0", "1"]
    assert torch.equal(factors["0"][0], tensors["shared.0.vision"]) and torch.equal(factors["1"][1], tensors["shared.1.text"])
    save_tensors(tmp_path / "adapter.safetensors", {"visual.3.q.A": torch.ones(2, 6)})
    assert read_shared_factors(tmp_path) == {}
    save_tensors(tmp_path / "adapter.safetensors", {"shared.0.vision": torch.ones(2, 6)})
    with pytest.raises(AdapterError, match="slot 0 lacks"):
        read_shared_factors(tmp_path)
    with pytest.raises(AdapterError, match="not found"):
        read_shared_factors(tmp_path / "nowhere")


def test_slot_spectra_of_a_saved_mora_adapter(tiny_model, tmp_path):
    from mora_retrieval.adapters import AdapterConfig, add_adapters, save_adapters
    from mora_retrieval.adapters.io import read_adapter_config

    model = tiny_model.model
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    d_v = model.visual.transformer.width
    block = model.visual.transformer.resblocks[3].attn
    assert torch.equal(projection_weight(model, "visual", 3, "k"), block.in_proj_weight[d_v:2 * d_v])
    assert torch.equal(projection_weight(model, "visual", 3, "out"), block.out_proj.weight)

    add_adapters(model, AdapterConfig(method="mora", r=2, r_shared=3, targets=("q", "out"), layers=2))
    save_adapters(model, tmp_path / "adapter", arch="mora-tiny")
    slot_blocks = read_adapter_config(tmp_path / "adapter")["slots"]
    assert slot_blocks == [[2, 1], [3, 2]]
    factors = read_shared_factors(tmp_path / "adapter")
    slots = model.mora_adapter.slots
    assert torch.equal(factors["1"][0], slots["1"].vision.detach()) and torch.equal(factors["1"][1], slots["1"].text.detach())

    import open_clip

    plain = open_clip.create_model("mora-tiny")
    plain.load_state_dict(original)
    spectra = slot_spectra(factors, plain, ("q", "out"), slot_blocks)
    assert [(s.slot, s.vision_block, s.text_block) for s in spectra] == [("0", 2, 1), ("1", 3, 2)]
    second = spectra[1]
    assert sorted(second.pretrained) == ["text.out", "text.q", "visual.out", "visual.q"]
    d_t = plain.transformer.width
    w_q = original["transformer.resblocks.2.attn.in_proj_weight"][:d_t].double().numpy()
    values = np.linalg.svd(w_q, compute_uv=False)
    assert second.pretrained["text.q"] == pytest.approx((values[:3] / values.sum()).tolist(), rel=1e-6)
    g = slots["1"].vision.detach().double().numpy()
    eig = np.sort(np.linalg.eigvalsh(g @ g.T))[::-1]
    assert second.gram_vision == pytest.approx((eig / eig.sum()).tolist(), rel=1e-6)


# ------------------------------------------------------------------ t-SNE (Figure 10), samples
def test_tsne_keeps_separated_clusters_apart_and_is_reproducible():
    rng = np.random.default_rng(5)
    centres = np.eye(3, 16) * 10
    x = np.concatenate([c + rng.normal(scale=0.3, size=(15, 16)) for c in centres])
    groups = np.repeat(np.arange(3), 15)
    points = tsne_2d(x, seed=0)
    assert points.shape == (45, 2)
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert np.all(groups[distances.argmin(axis=1)] == groups)  # every nearest neighbour is of the same cluster
    np.testing.assert_array_equal(points, tsne_2d(x, seed=0))
    assert default_perplexity(45) == 14.666666666666666 and default_perplexity(1000) == 30.0
    with pytest.raises(ValueError, match="at least 5"):
        tsne_2d(x[:4])


def test_paired_samples_select_and_spread_indices():
    samples = PairedSamples(image_paths=["a", "b", "c"], texts=["t0", "t1", "t2", "t3"], pair_image=[2, 0, 2, 1],
                            labels=torch.tensor([0, 1, 2, 3]))
    chosen = samples.select([0, 2, 3])
    assert chosen.image_paths == ["b", "c"] and chosen.pair_image == [1, 1, 0]
    assert chosen.texts == ["t0", "t2", "t3"] and chosen.labels.tolist() == [0, 2, 3]
    assert spread_indices(10, None).tolist() == list(range(10)) and spread_indices(3, 8).tolist() == [0, 1, 2]
    assert spread_indices(10, 4).tolist() == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="not in the sample set"):
        PairedSamples(image_paths=["a"], texts=["t"], pair_image=[1])


def test_tsne_colours_a_multilabel_sample_by_its_first_label(tmp_path):
    from mora_retrieval.analysis.figures import ScatterPanel, plot_scatter_grid, plot_spectra
    from mora_retrieval.analysis.run import tsne_groups
    from mora_retrieval.analysis.spectra import SlotSpectra

    multi = PairedSamples(image_paths=["a", "b", "c"], texts=["x", "y", "z"], pair_image=[0, 1, 2],
                          labels=torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.float32))
    assert tsne_groups(multi).tolist() == [1, -1, 0]
    single = PairedSamples(image_paths=["a", "b"], texts=["x", "y"], pair_image=[0, 1], labels=torch.tensor([2, 0]))
    assert tsne_groups(single).tolist() == [2, 0]
    # the figures are PNG files, whatever the number of panels
    panel = ScatterPanel("p", np.random.default_rng(0).normal(size=(3, 2)), tsne_groups(multi), ["g0", "g1", "g2"])
    assert plot_scatter_grid([[panel, panel]], tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    slots = [SlotSpectra(str(i), i, i, [0.5, 0.5], [0.7, 0.3], {"visual.q": [0.1, 0.05]}) for i in range(6)]
    assert plot_spectra(slots, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
