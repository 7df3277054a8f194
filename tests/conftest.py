"""Shared fixtures: tiny open_clip models with deterministic random weights."""

from __future__ import annotations

import os
import warnings

# Tiny models on a 2-core machine: one intra-op thread per process avoids OpenMP
# oversubscription (DataLoader workers, torchrun ranks), which can slow steps by 10-100x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch


torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _quiet_random_weights_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The smallest shapes world, ``{part: root}``, made once per test module (tests may copy it)."""
    from mora_retrieval.data.shapes import generate_shapes_world

    return generate_shapes_world(tmp_path_factory.mktemp("world"), size="tiny")


@pytest.fixture
def tiny_model():
    """``mora-tiny`` (vision 64 wide x 4 blocks, text 48 wide x 3 blocks) with seeded weights."""
    from mora_retrieval.model.backbone import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone("mora-tiny")
    backbone.model.eval()
    return backbone
