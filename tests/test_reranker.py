"""The contrastive reranker: its model (unit, in-process, no Ray), its export, and one run of the
real job (Ray Train workers, a DeepSpeed engine, the prepared-shard pipeline) on a tiny dataset."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tessera.config import ConfigError, load_config
from tessera.models.reranker import NAMED_SHAPES, Reranker, RerankerShape, retrieval_accuracy, same_caption

TINY = replace(NAMED_SHAPES["debug"], text_vocab=50, text_len=8, embed_dim=32, text_dim=32, text_depth=1,
               text_heads=2, image_width=8)


def captions(n: int, *, seed: int = 0, text_len: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """n distinct random captions: ids (n, T) with 0 under padding, mask (n, T) left-aligned."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, text_len + 1, (n,), generator=g)
    mask = torch.arange(text_len)[None, :] < lengths[:, None]
    ids = torch.randint(1, TINY.text_vocab, (n, text_len), generator=g) * mask
    return ids, mask


def test_embeddings_are_unit_vectors_and_any_image_size_is_accepted():
    torch.manual_seed(0)
    model = Reranker(TINY).eval()
    ids, mask = captions(5)
    t = model.encode_text(ids, mask)
    assert t.shape == (5, TINY.embed_dim)
    for size in (32, 64, 20):  # the model's size, larger (area-shrunk), smaller (upsampled)
        i = model.encode_image(torch.rand(5, 3, size, size))
        assert i.shape == (5, TINY.embed_dim)
        torch.testing.assert_close(i.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(5))
    with pytest.raises(ValueError, match="text_len=8"):
        model.encode_text(torch.ones(2, 9, dtype=torch.long), torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.encode_image(torch.rand(2, 32, 32, 3))


def test_padding_is_invisible_to_the_text_tower():
    torch.manual_seed(0)
    model = Reranker(TINY).eval()
    ids, mask = captions(6)
    with torch.no_grad():
        ref = model.encode_text(ids, mask)
        # other ids under padding
        garbage = torch.where(mask, ids, torch.randint(1, TINY.text_vocab, ids.shape))
        assert torch.allclose(model.encode_text(garbage, mask), ref, atol=1e-6)
        # Each caption alone (its batch no longer padded to the longest caption) embeds the same.
        for k in range(len(ids)):
            n = int(mask[k].sum())
            assert torch.allclose(model.encode_text(ids[k:k + 1, :n], mask[k:k + 1, :n]), ref[k:k + 1],
                                  atol=1e-5)
        empty = model.encode_text(ids[:1], torch.zeros_like(mask[:1]))
    assert torch.isfinite(empty).all()


def test_score_is_the_diagonal_of_the_similarity_matrix():
    torch.manual_seed(0)
    model = Reranker(TINY).eval()
    ids, mask = captions(7)
    images = torch.rand(7, 3, 32, 32)
    with torch.no_grad():
        sim = model.encode_text(ids, mask) @ model.encode_image(images).T
        s = model.score(ids, mask, images)
    assert s.shape == (7,)
    torch.testing.assert_close(s, sim.diagonal())
    assert (s.abs() <= 1 + 1e-5).all()


def test_loss_falls_and_pairs_are_found_after_a_few_steps():
    torch.manual_seed(0)
    model = Reranker(TINY)
    ids, mask = captions(16)
    images = torch.rand(16, 3, 32, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(ids, mask, images)
    assert first["loss"].ndim == 0 and 0 <= float(first["accuracy"]) <= 1 and first["loss"].requires_grad
    for _ in range(30):
        out = model(ids, mask, images)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert model.logit_scale.grad is not None  # the temperature is learned
    last = model(ids, mask, images)
    assert float(last["loss"].detach()) < 0.5 * float(first["loss"].detach())
    assert float(last["accuracy"]) == 1.0


def test_identical_captions_are_all_positives():
    ids, mask = captions(4)
    ids[3], mask[3] = ids[1], mask[1]
    pos = same_caption(ids, mask)
    assert pos.tolist() == [[True, False, False, False], [False, True, False, True],
                            [False, False, True, False], [False, True, False, True]]
    # The same ids, one caption a token longer (a real id 0 where the other has padding): different.
    ids = torch.tensor([[5, 6, 0, 0], [5, 6, 0, 0]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    assert same_caption(ids, mask).tolist() == [[True, False], [False, True]]


def test_retrieval_accuracy_counts_instances_and_captions():
    # 4 pairs; captions 1 and 3 are identical. Text 1 retrieves image 3 (same caption, other image).
    e = torch.eye(4)
    image = e.clone()
    text = e[[0, 3, 2, 3]]
    positive = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    r = retrieval_accuracy(text, image, positive)
    assert r["pairs"] == 4 and r["chance"] == 0.25
    assert r["t2i_top1"] == 0.75 and r["t2i_top1_caption"] == 1.0
    assert r["chance_caption"] == pytest.approx((1 + 2 + 1 + 2) / 16)
    # Image 1 matches no text: its tie at 0 falls to text 0 (wrong caption). Image 3 ties between
    # texts 1 and 3 and gets text 1: wrong instance, right caption.
    assert r["i2t_top1"] == 0.5 and r["i2t_top1_caption"] == 0.75


def _checkpoint_with(model: Reranker, path: Path, *, step: int, retrieval: dict | None = None) -> str:
    """A checkpoint folder as the loop writes one when it keeps a parameter EMA (no DeepSpeed
    shards needed)."""
    from safetensors.torch import save_file

    from tessera.training.checkpoint import EMA_FILE, STATE_FILE

    path.mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps({"step": step, "shape": model.shape.to_dict(),
                                                "export": {"retrieval": retrieval} if retrieval else {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / EMA_FILE))
    return str(path)


def test_export_and_load_give_identical_scores(tmp_path):
    from tessera import artifacts
    from tessera.training.checkpoint import export_checkpoint

    torch.manual_seed(0)
    model = Reranker(TINY).eval()
    ckpt = _checkpoint_with(model, tmp_path / "ckpt", step=7,
                            retrieval={"val_pairs": 16, "val_t2i_top1": 0.5})
    meta = export_checkpoint("reranker", ckpt, str(tmp_path / "export"))
    assert meta["kind"] == artifacts.PARTS["reranker"].kind and meta["step"] == 7 and meta["weights"] == "ema"
    assert meta["retrieval"]["val_t2i_top1"] == 0.5
    assert meta["num_parameters"] == sum(p.numel() for p in model.parameters())
    loaded = artifacts.load("reranker", str(tmp_path / "export"))
    assert loaded.shape == TINY and not loaded.training
    ids, mask = captions(5)
    images = torch.rand(5, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(loaded.score(ids, mask, images), model.score(ids, mask, images))


def test_load_refuses_another_kind_of_export(tmp_path):
    from tessera import artifacts
    from tessera.training.checkpoint import export_checkpoint

    export_checkpoint("reranker", _checkpoint_with(Reranker(TINY), tmp_path / "ckpt", step=1),
                      str(tmp_path / "export"))
    meta_path = tmp_path / "export" / artifacts.PARTS["reranker"].meta
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"kind": "tessera.prior"}))
    with pytest.raises(ValueError, match="not a tessera reranker export.*tessera.prior"):
        artifacts.load("reranker", str(tmp_path / "export"))


def test_shape_and_config_errors_name_their_field(tmp_path):
    from tessera.training.reranker_loop import reranker_shape

    with pytest.raises(ValueError, match="image_width"):
        RerankerShape(image_width=12)
    manifest = {"tokenizer": {"vocab_size": 300}}
    cfg = load_config("debug", [f"run.root_uri={tmp_path}"])
    shape = reranker_shape(cfg, manifest)
    # the debug dVAE's size
    assert (shape.text_vocab, shape.text_len, shape.image_size) == (300, cfg.loader.text_len, 32)
    assert cfg.paths.reranker == f"{tmp_path}/reranker"
    with pytest.raises(ValueError, match="reranker.image_size=36"):
        reranker_shape(load_config("debug", ["reranker.image_size=36"]), manifest)
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        reranker_shape(cfg, {})
    with pytest.raises(ConfigError, match="reranker: .*precision: fp16 needs use_gpu"):
        load_config("debug", ["reranker.precision=fp16"])
    with pytest.raises(ConfigError, match="reranker.size"):
        load_config("debug", ["reranker.size=paper"])


@pytest.mark.integration
def test_train_reranker_job_through_ray_train_checkpoints_and_exports(ray_cluster, tmp_path):
    """The real job on a tiny prepared dataset: Ray Data reads the shards, two Train workers run
    DeepSpeed (ZeRO-1 on gloo), checkpoint twice, measure retrieval, and the export loads
    without DeepSpeed or Ray."""
    from tessera.data.prepare import run_prepare
    from tessera.training.ray_io import fit

    cfg = load_config("debug", [f"run.root_uri={tmp_path}", "data.source.shapes.num_samples=240",
                                "data.source.shapes.num_heldout=0", "data.source.shapes.image_size=32",
                                "data.resolution=32", "data.samples_per_shard=60", "data.val_fraction=0.1",
                                "ray.data_cpu_limit=1", "loader.local_shuffle_buffer=32",
                                "reranker.steps=4", "reranker.micro_batch=8", "reranker.warmup_steps=1",
                                "reranker.report_every=2", "reranker.checkpoint_every=2",
                                "reranker.eval_every=4", "reranker.val_pairs=16"])
    manifest = run_prepare(cfg)
    result = fit(cfg, "reranker")
    m = result.metrics
    assert m["step"] == 4 and m["val_step"] == 4 and m["val_pairs"] == 16 and m["val_chance"] == 1 / 16
    for key in ("val_t2i_top1", "val_i2t_top1", "val_t2i_top1_caption", "val_i2t_top1_caption"):
        assert 0 <= m[key] <= 1, key
    assert m["val_t2i_top1_caption"] >= m["val_t2i_top1"]
    assert m["loss"] > 0 and m["samples_per_s"] > 0

    export = Path(cfg.paths.reranker) / "export"
    meta = json.loads((export / "reranker.json").read_text())
    assert meta["step"] == 4 and meta["weights"] == "trained" and meta["retrieval"]["val_pairs"] == 16
    assert meta["shape"]["text_vocab"] == manifest["tokenizer"]["vocab_size"]
    assert meta["data"]["tokenizer"]["sha256"] == manifest["tokenizer"]["sha256"]
    code = (
        "import sys, torch\n"
        "from tessera import artifacts\n"
        f"m = artifacts.load('reranker', {str(export)!r})\n"
        "ids = torch.randint(1, m.shape.text_vocab, (3, m.shape.text_len))\n"
        "s = m.score(ids, torch.ones_like(ids, dtype=torch.bool), torch.rand(3, 3, 32, 32))\n"
        "assert s.shape == (3,) and bool(torch.isfinite(s).all())\n"
        "assert not {'deepspeed', 'ray'} & set(sys.modules), sorted(sys.modules)\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) == meta["num_parameters"]
