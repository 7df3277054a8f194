"""Embedding pipeline, resume, shards, search and COCO evaluation with mora-tiny."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from retrieval_fixtures import write_tiny_checkpoint, write_tiny_coco

from mora_retrieval.data.images import load_image
from mora_retrieval.errors import DataError, IndexFolderError
from mora_retrieval.retrieval.build import BuildConfig, build_index, merge_parts, parse_shard
from mora_retrieval.retrieval.embed import EmbedConfig, embed_paths
from mora_retrieval.retrieval.encoder import load_encoder
from mora_retrieval.retrieval.evaluate import RelevanceRule, evaluate_coco, recall_at_k
from mora_retrieval.retrieval.index import load_index_folder
from mora_retrieval.retrieval.items import coco_items, folder_items
from mora_retrieval.retrieval.search import check_encoder, search


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_tiny_coco(root / "coco")
    ckpt = write_tiny_checkpoint(root / "tiny.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = load_encoder("mora-tiny", str(ckpt), device="cpu")
    items = coco_items(root / "coco")
    full = build_index(encoder, items, root / "full", BuildConfig(embed=EmbedConfig(batch_size=4, workers=0)))
    return {"root": root, "ckpt": ckpt, "encoder": encoder, "items": items, "full": full.folder}


def _cfg(**kw):
    return BuildConfig(embed=EmbedConfig(**{"batch_size": 2, "chunk_size": 3, "workers": 0, **kw}))


def _reference_features(encoder, paths):
    batch = torch.stack([encoder.preprocess(load_image(p)) for p in paths])
    with torch.no_grad():
        return F.normalize(encoder.model.encode_image(batch).float(), dim=-1).numpy()


def test_gallery_is_annotated_images_in_id_order(world):
    items = world["items"]
    assert [it.image_id for it in items] == [1, 2, 3, 4, 5, 7, 8, 9, 10]  # image 6 has no annotation
    assert items[1].categories == (1, 2) and items[1].primary_category == 2
    assert items[7].primary_category == 1  # tie on area goes to the smaller id


def test_embeddings_equal_direct_encoding(world):
    folder = world["full"]
    want = _reference_features(world["encoder"], [it.path for it in world["items"]])
    assert folder.embeddings.shape == (9, 64)
    assert np.allclose(np.asarray(folder.embeddings, np.float32), want, atol=2e-3)
    # workers do not change the result (same batches: the same bits)
    paths = [it.path for it in world["items"]]
    res = embed_paths(world["encoder"], paths, EmbedConfig(batch_size=4, workers=2))
    assert np.array_equal(res.features, np.asarray(folder.embeddings))
    # other batch boundaries may move the float16 rounding of a value by one step, no more
    other = embed_paths(world["encoder"], paths, EmbedConfig(batch_size=5, workers=2))
    assert np.allclose(other.features.astype(np.float32), np.asarray(folder.embeddings, np.float32), atol=1e-3)


def test_fast_jpeg_decodes_at_reduced_scale(world, tmp_path):
    from PIL import Image

    from mora_retrieval.data.images import load_image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (400, 300), (200, 30, 60)).save(big)
    small = load_image(str(big), draft=32)
    assert small.size == (50, 38)  # 1/8 scale: the smallest whose sides still cover 32 px
    assert load_image(str(big), draft=200).size == (400, 300)  # 1/2 would give 150 < 200
    paths = [it.path for it in world["items"]]  # fixture images are too small to be reduced
    fast = embed_paths(world["encoder"], paths, EmbedConfig(batch_size=4, workers=0, fast_jpeg=True))
    assert np.array_equal(fast.features, np.asarray(world["full"].embeddings))


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_with_same_result(world, tmp_path):
    enc, items = world["encoder"], world["items"]

    def stop_after_second(chunk):
        if chunk == 1:
            raise _Stop

    with pytest.raises(_Stop):
        build_index(enc, items, tmp_path / "idx", _cfg(), on_chunk=stop_after_second)
    assert sorted(p.name for p in (tmp_path / "idx" / "shards").glob("part-*.npy")) == ["part-00000.npy", "part-00001.npy"]
    assert not (tmp_path / "idx" / "manifest.json").exists()
    result = build_index(enc, items, tmp_path / "idx", _cfg())
    assert result.encoded == len(items) - 6  # chunks 0 and 1 (3 images each) were reused
    resumed = load_index_folder(tmp_path / "idx")
    straight = build_index(enc, items, tmp_path / "straight", _cfg()).folder  # same batches, never interrupted
    assert np.array_equal(resumed.embeddings, straight.embeddings)
    assert resumed.items == straight.items == world["full"].items
    assert not (tmp_path / "idx" / "shards").exists()


def test_resume_ignores_chunks_of_another_model(world, tmp_path):
    enc, items = world["encoder"], world["items"]
    with pytest.raises(_Stop):
        build_index(enc, items, tmp_path / "idx", _cfg(), on_chunk=lambda c: (_ for _ in ()).throw(_Stop()))
    progress = tmp_path / "idx" / "shards" / "progress.json"
    progress.write_text(progress.read_text().replace(enc.fingerprint, "0" * 16))
    assert build_index(enc, items, tmp_path / "idx", _cfg()).encoded == len(items)


def test_two_shards_merge_to_the_single_run(world, tmp_path):
    enc, items = world["encoder"], world["items"]
    first = build_index(enc, items, tmp_path / "idx", BuildConfig(shard=(1, 2), embed=EmbedConfig(batch_size=3, workers=0)))
    assert first.folder is None and (first.part_dir / "part.json").is_file()
    with pytest.raises(IndexFolderError, match="0-of-2 are missing"):
        merge_parts(tmp_path / "idx")
    second = build_index(enc, items, tmp_path / "idx", BuildConfig(shard=(0, 2), embed=EmbedConfig(batch_size=3, workers=0)))
    assert first.encoded + second.encoded == len(items)
    merged = load_index_folder(tmp_path / "idx")
    full = world["full"]
    assert merged.items == full.items
    # other batch boundaries may move the float16 rounding of a value by one step, no more
    assert np.allclose(np.asarray(merged.embeddings, np.float32), np.asarray(full.embeddings, np.float32), atol=1e-3)
    q = np.asarray(full.embeddings, np.float32)
    assert np.array_equal(merged.index.search(q, 5)[1], full.index.search(q, 5)[1])
    again = merge_parts(tmp_path / "idx", "HNSW8")  # parts are kept: merge again with another type
    assert again.manifest["index_type"] == "HNSW8" and again.count == len(items)


def test_manifest_records_decoding_and_dtype_and_cir_eval_decodes_alike(world, tmp_path, monkeypatch):
    import mora_retrieval.retrieval.evaluate as evaluate

    enc, items = world["encoder"], world["items"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = load_encoder("mora-tiny", str(world["ckpt"]), device="cpu", dtype=torch.bfloat16)
    folders = {"pil": world["full"],
               "pil-draft": build_index(enc, items, tmp_path / "fast", _cfg(fast_jpeg=True)).folder,
               "tensor-jpeg": build_index(enc, items, tmp_path / "tensor", _cfg(gpu_decode=True)).folder}
    bf16 = build_index(half, items, tmp_path / "bf16", _cfg()).folder
    assert {name: f.manifest["preprocess"]["decode"] for name, f in folders.items()} == {n: n for n in folders}
    assert folders["pil-draft"].manifest["preprocess"]["fast_jpeg"] is True
    assert world["full"].manifest["encoder_dtype"] == "float32" and bf16.manifest["encoder_dtype"] == "bfloat16"
    assert bf16.manifest["fingerprint"] == world["full"].manifest["fingerprint"]
    seen = []
    real = evaluate.embed_paths
    monkeypatch.setattr(evaluate, "embed_paths", lambda *args, **kw: seen.append(args[2]) or real(*args, **kw))
    embed = EmbedConfig(batch_size=4, workers=0)
    for folder in folders.values():
        evaluate.cir_queries(folder, enc, embed)
    assert [(c.gpu_decode, c.fast_jpeg) for c in seen] == [(False, False), (False, True), (True, False)]


def test_manifests_without_decode_and_dtype_still_load_search_and_evaluate(world, tmp_path, monkeypatch):
    import json
    import shutil

    import mora_retrieval.retrieval.evaluate as evaluate
    from mora_retrieval.retrieval.index import rebuild_index

    shutil.copytree(world["full"].path, tmp_path / "old")
    manifest_path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["encoder_dtype"], manifest["preprocess"]["decode"]
    manifest["preprocess"]["fast_jpeg"] = True  # what an older --fast-jpeg index recorded
    manifest_path.write_text(json.dumps(manifest))
    old = load_index_folder(tmp_path / "old")
    assert search(old, world["encoder"], text="a red square", k=2)[0].rank == 1
    seen = []
    real = evaluate.embed_paths
    monkeypatch.setattr(evaluate, "embed_paths", lambda *args, **kw: seen.append(args[2]) or real(*args, **kw))
    result = evaluate.evaluate_coco(old, RelevanceRule.parse("any"), "any", ["image", "cir"], encoder=world["encoder"],
                                    embed=EmbedConfig(batch_size=4, workers=0))
    assert result.results["cir"].evaluated == 8 and seen[0].fast_jpeg is True and seen[0].gpu_decode is None
    rebuilt = rebuild_index(tmp_path / "old", "HNSW8").manifest
    assert "encoder_dtype" not in rebuilt and "decode" not in rebuilt["preprocess"]  # nothing is made up


def test_merge_refuses_parts_decoded_differently(world, tmp_path):
    enc, items = world["encoder"], world["items"]
    build_index(enc, items, tmp_path / "idx", BuildConfig(shard=(0, 2), embed=EmbedConfig(workers=0, fast_jpeg=True)))
    with pytest.raises(IndexFolderError, match=r"1-of-2/part.json: embedded with decode pil, dtype float32, "
                                               r"part 0-of-2 with decode pil-draft"):
        build_index(enc, items, tmp_path / "idx", BuildConfig(shard=(1, 2), embed=EmbedConfig(workers=0)))
    assert not (tmp_path / "idx" / "manifest.json").exists()


def test_shard_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert parse_shard(None) == (2, 4)
    assert parse_shard("1/3") == (1, 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse_shard(None) is None


def test_bad_image_stops_or_is_skipped(world, tmp_path):
    import shutil

    folder = tmp_path / "imgs"
    shutil.copytree(world["root"] / "coco" / "val2017", folder)
    (folder / "000000000004.jpg").write_bytes(b"not a jpeg")
    items = folder_items(folder)
    with pytest.raises(DataError) as err:
        build_index(world["encoder"], items, tmp_path / "idx", _cfg())
    assert "000000000004.jpg" in str(err.value) and "\n" not in str(err.value)
    result = build_index(world["encoder"], items, tmp_path / "idx", _cfg(skip_bad_images=True))
    assert result.folder.count == len(items) - 1
    assert [p.endswith("000000000004.jpg") for p in result.folder.manifest["skipped"]] == [True]
    assert all(not it.path.endswith("000000000004.jpg") for it in result.folder.items)


def test_search_modes_equal_brute_force(world):
    folder, enc = world["full"], world["encoder"]
    stored = np.asarray(folder.embeddings, np.float32)
    query = world["items"][2].path
    image = torch.stack([enc.preprocess(load_image(query))])
    with torch.no_grad():
        img_raw = enc.model.encode_image(image).float()
        txt_raw = enc.model.encode_text(enc.tokenizer(["a red square"])).float()
    for kwargs, q in [
        ({"image": query}, F.normalize(img_raw, dim=-1)),
        ({"text": "a red square"}, F.normalize(txt_raw, dim=-1)),
        ({"image": query, "text": "a red square"}, F.normalize(img_raw + txt_raw, dim=-1)),
    ]:
        hits = search(folder, enc, k=4, **kwargs)
        ref = np.argsort(-(q.numpy() @ stored.T)[0], kind="stable")[:4]
        assert [h.row for h in hits] == ref.tolist(), kwargs
        assert [h.rank for h in hits] == [1, 2, 3, 4]
    assert search(folder, enc, image=query, k=1)[0].item.path == query


def test_wrong_model_and_corrupt_query_are_refused(world, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "other.safetensors", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc2 = load_encoder("mora-tiny", str(other), device="cpu")
    with pytest.raises(IndexFolderError, match="built with weights") as err:
        check_encoder(world["full"], enc2)
    assert "manifest.json" in str(err.value) and "\n" not in str(err.value)
    bad = tmp_path / "q.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="q.jpg"):
        search(world["full"], world["encoder"], image=bad)
    with pytest.raises(IndexFolderError, match="k must be at least 1, got 0"):
        search(world["full"], world["encoder"], text="a red circle", k=0)


def test_evaluate_coco_image_and_cir_modes(world):
    folder, enc = world["full"], world["encoder"]
    rule = RelevanceRule.parse("any")
    result = evaluate_coco(folder, rule, "any", ["image", "cir"], encoder=enc, embed=EmbedConfig(batch_size=4, workers=0))
    stored = np.asarray(folder.embeddings, np.float32)
    cats = [set(it.categories) for it in folder.items]
    relevance = np.array([[bool(a & b) for b in cats] for a in cats])
    rows = np.arange(folder.count)
    ref_image = recall_at_k(stored @ stored.T, relevance, (1, 5, 10), query_rows=rows)
    assert result.results["image"].hits == ref_image.hits
    assert result.results["image"].evaluated == 8 and result.results["image"].no_relevant == 1  # image 8: category 4 alone
    # cir: normalize(image_raw + text_raw("")) as queries
    paths = [it.path for it in folder.items]
    with torch.no_grad():
        img_raw = enc.model.encode_image(torch.stack([enc.preprocess(load_image(p)) for p in paths])).float()
        txt_raw = enc.model.encode_text(enc.tokenizer([""])).float()
    cir = F.normalize(img_raw + txt_raw, dim=-1).numpy()
    ref_cir = recall_at_k(cir @ stored.T, relevance, (1, 5, 10), query_rows=rows)
    assert result.results["cir"].recall == pytest.approx(ref_cir.recall)


def test_gallery_page_is_self_contained(world, tmp_path):
    from mora_retrieval.retrieval.gallery import write_gallery

    hits = search(world["full"], world["encoder"], image=world["items"][0].path, k=3)
    write_gallery(tmp_path / "g.html", hits, image=world["items"][0].path, text="<b>x</b>")
    page = (tmp_path / "g.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 4  # query + 3 results
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_jpeg_decoding_matches_cpu_pipeline(world):
    enc = load_encoder("mora-tiny", str(world["ckpt"]), device="cuda")
    paths = [it.path for it in world["items"]]
    gpu = embed_paths(enc, paths, EmbedConfig(batch_size=4, workers=0, gpu_decode=True))
    cpu = embed_paths(enc, paths, EmbedConfig(batch_size=4, workers=0, gpu_decode=False))
    cos = (gpu.features.astype(np.float32) * cpu.features.astype(np.float32)).sum(1)
    assert cos.min() > 0.98  # decoders and resize kernels differ slightly; bf16 on both
