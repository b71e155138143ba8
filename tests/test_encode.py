"""The encode job on a real local Ray (actor pool) writing token shards to a real S3-compatible
server: counts match the manifest, bad samples are counted and never written, and the tokens are
exactly the dVAE's argmax codes, so decode(tokens) reproduces the round-trip PSNR it reports."""

import io

import numpy as np
import pytest

from tessera.config import load_config

pytestmark = pytest.mark.integration


def _damage_one_shard(cfg, manifest) -> set[str]:
    """Rewrite the first train shard with one undecodable image and one non-UTF-8 caption."""
    from tessera import storage
    from tessera.data.tar import TarReadResult, iter_tar_samples, write_tar

    uri = storage.join(cfg.paths.data, manifest["splits"]["train"]["shards"][0]["path"])
    samples = [(s.key, dict(s.files))
               for s in iter_tar_samples(io.BytesIO(storage.read_bytes(uri)), TarReadResult())]
    samples[3][1]["png"] = b"\x89PNG but not really"
    samples[7][1]["txt"] = b"\xff\xfe caption"
    storage.write_bytes(uri, write_tar(samples))
    return {samples[3][0], samples[7][0]}


@pytest.fixture(scope="module")
def encoded(ray_cluster, tmp_path_factory, s3_client_module):
    import torch

    from tessera import artifacts
    from tessera.data.prepare import run_prepare
    from tessera.inference.encode import run_encode
    from tessera.models.dvae import DVAE, NAMED_SHAPES

    root = tmp_path_factory.mktemp("encode")
    bucket = s3_client_module
    cfg = load_config("debug", [f"run.root_uri={root}", "data.source.shapes.num_samples=300",
                                "data.source.shapes.num_heldout=40", "data.source.shapes.image_size=32",
                                "data.resolution=32", "data.samples_per_shard=100", "data.val_fraction=0.1",
                                "ray.data_cpu_limit=1", f"encode.output_uri=s3://{bucket}/tokens",
                                "encode.actors.batch_size=64", "encode.actors.cpus_per_actor=0.5"])
    prepared = run_prepare(cfg)
    bad_keys = _damage_one_shard(cfg, prepared)
    torch.manual_seed(0)
    model = DVAE(NAMED_SHAPES["debug"]).eval()
    artifacts.export("dvae", model.state_dict(), model.shape, cfg.paths.encode_dvae, step=0)
    return cfg, prepared, run_encode(cfg), bad_keys, model


@pytest.fixture(scope="module")
def s3_client_module(s3_server):
    import uuid

    import boto3

    name = f"tessera-encode-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def _shards(cfg, manifest, split):
    from tessera import storage
    from tessera.inference.encode import read_token_shard

    return [(e, read_token_shard(storage.join(cfg.paths.tokens, e["path"])))
            for e in manifest["splits"][split]["shards"]]


def test_token_shards_match_manifest_and_skip_bad_samples(encoded):
    cfg, prepared, manifest, bad_keys, _ = encoded
    assert manifest["kind"] == "tessera.token_dataset" and manifest["grid_size"] == 8
    assert set(manifest["splits"]) == set(prepared["splits"])
    for split, info in manifest["splits"].items():
        shards = _shards(cfg, manifest, split)
        # One token shard per image shard, each holding exactly the rows its manifest entry says.
        assert len(shards) == len(prepared["splits"][split]["shards"])
        for entry, table in shards:
            assert table.num_rows == entry["num_samples"]
            assert set(table.column("split").to_pylist()) == {split}
        assert info["num_samples"] == sum(t.num_rows for _, t in shards)
        expected = prepared["splits"][split]["num_samples"] - (len(bad_keys) if split == "train" else 0)
        assert info["num_samples"] == expected
    assert manifest["skipped"]["undecodable_image"] == 1 and manifest["skipped"]["bad_caption"] == 1
    keys = {k for _, t in _shards(cfg, manifest, "train") for k in t.column("key").to_pylist()}
    assert not keys & bad_keys
    assert manifest["num_samples"] == sum(s["num_samples"] for s in prepared["splits"].values()) - 2


def test_tokens_are_the_dvae_codes_and_roundtrip_psnr_is_what_decode_gives(encoded):
    import torch
    from PIL import Image

    from tessera import storage
    from tessera.data.tar import TarReadResult, iter_tar_samples
    from tessera.data.tokenizer import CaptionTokenizer
    from tessera.models.dvae import psnr

    cfg, prepared, manifest, _, model = encoded
    (entry, table), = _shards(cfg, manifest, "val")
    src = storage.join(cfg.paths.data, prepared["splits"]["val"]["shards"][0]["path"])
    samples = {s.key: s.files for s in iter_tar_samples(io.BytesIO(storage.read_bytes(src)), TarReadResult())}
    keys = table.column("key").to_pylist()
    assert keys == list(samples)  # order kept, nothing lost
    images = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(samples[k]["png"])).convert("RGB"))
                                        for k in keys]))
    x = images.permute(0, 3, 1, 2).float() / 255
    grid = np.array(table.column("image_tokens").to_pylist(), dtype=np.int64).reshape(-1, 8, 8)
    assert table.schema.field("image_tokens").type.value_type == "int16"
    assert np.array_equal(grid, model.encode(x).numpy())
    decoded = model.decode(torch.from_numpy(grid))
    per_image = [float(psnr(decoded[i:i + 1], x[i:i + 1])) for i in range(len(keys))]
    assert manifest["roundtrip_psnr"]["val"] == pytest.approx(np.mean(per_image), abs=0.01)
    assert "train" not in manifest["roundtrip_psnr"]

    # Caption ids decode back to the caption, and the tokenizer travels with the shards.
    assert manifest["tokenizer"]["path"] == f"{manifest['generation']}/tokenizer.json"
    tok = CaptionTokenizer.from_json(
        storage.read_bytes(storage.join(cfg.paths.tokens, manifest["tokenizer"]["path"])).decode())
    for key, caption, ids in zip(keys, table.column("caption").to_pylist(),
                                 table.column("text_ids").to_pylist(), strict=True):
        assert caption == samples[key]["txt"].decode()
        assert tok.decode(np.array([ids]))[0] == caption

def test_rerun_keeps_published_tokens_unless_overwrite(encoded):
    from tessera import storage
    from tessera.inference.encode import run_encode

    cfg, _, manifest, _, _ = encoded
    assert run_encode(cfg)["generation"] == manifest["generation"]  # published: left alone
    redo = run_encode(cfg.model_copy(update={"encode": cfg.encode.model_copy(update={"overwrite": True})}))
    assert redo["generation"] != manifest["generation"]
    assert redo["splits"] == {s: {**v, "shards": [{**e, "path": e["path"].replace(manifest["generation"],
                                                                                  redo["generation"])}
                                                  for e in v["shards"]]}
                              for s, v in manifest["splits"].items()}
    # The superseded generation stays until the next publish, for jobs still reading it.
    assert redo["previous_generation"] == manifest["generation"]
    for path in (manifest["splits"]["val"]["shards"][0]["path"], manifest["tokenizer"]["path"]):
        assert storage.exists(storage.join(cfg.paths.tokens, path))


def _train_images(cfg, prepared, shard: int, keys: list[str]):
    from PIL import Image

    from tessera import storage
    from tessera.data.tar import TarReadResult, iter_tar_samples

    src = storage.join(cfg.paths.data, prepared["splits"]["train"]["shards"][shard]["path"])
    samples = {s.key: s.files for s in iter_tar_samples(io.BytesIO(storage.read_bytes(src)), TarReadResult())}
    return src, np.stack([np.asarray(Image.open(io.BytesIO(samples[k]["png"])).convert("RGB")) for k in keys])


def test_one_view_writes_todays_shards_of_the_whole_images(encoded):
    """encode.views = 1 (the default) is what encode wrote before views existed: the columns of
    token_schema without a view column, one row per image, its tokens the dVAE's codes of the whole
    image."""
    import torch

    from tessera.data.token_loader import load_token_manifest, token_schema

    cfg, prepared, _, _, model = encoded
    manifest = load_token_manifest(cfg.paths.tokens)  # the published one (an earlier test may redo it)
    assert manifest["views"] == 1
    (entry, table), = _shards(cfg, manifest, "train")[1:2]
    assert table.schema == token_schema(8) and "view" not in table.column_names
    _, images = _train_images(cfg, prepared, 1, table.column("key").to_pylist())
    grid = np.array(table.column("image_tokens").to_pylist(), dtype=np.int64).reshape(-1, 8, 8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert np.array_equal(grid, model.encode(x).numpy())


def test_views_add_crops_of_each_training_image_as_rows_of_their_own(encoded, tmp_path):
    """Paper §B.2: "When training the transformer, we apply data augmentation to the images before
    encoding them using the dVAE encoder. We use slightly different augmentations from the ones used
    to train the dVAE; the code used for this is given in Listing 2." With encode.views = 2 every
    training image gives two adjacent rows: view 0, the tokens views = 1 writes, and view 1, of a
    crop (different tokens for some images), drawn the same way in any process; other splits keep
    one row per image."""
    from tessera import storage
    from tessera.data.token_loader import load_token_manifest
    from tessera.inference.encode import ShardEncoder, read_token_shard, run_encode

    cfg, prepared, _, _, _ = encoded
    one = load_token_manifest(cfg.paths.tokens)  # the published one (an earlier test may redo it)
    two_cfg = cfg.model_copy(update={"encode": cfg.encode.model_copy(
        update={"views": 2, "output_uri": cfg.encode.output_uri + "-views"})})
    two = run_encode(two_cfg)
    assert two["views"] == 2
    assert two["splits"]["train"]["num_samples"] == 2 * one["splits"]["train"]["num_samples"]
    for split in ("val", "heldout"):
        assert two["splits"][split]["num_samples"] == one["splits"][split]["num_samples"]
    differ = 0
    for (_, t1), (_, t2) in zip(_shards(cfg, one, "train"), _shards(two_cfg, two, "train"), strict=True):
        assert t2.num_rows == 2 * t1.num_rows
        assert t2.column("view").to_pylist() == [0, 1] * t1.num_rows
        for column in ("key", "caption", "text_ids"):
            assert t2.column(column).to_pylist()[::2] == t2.column(column).to_pylist()[1::2] \
                == t1.column(column).to_pylist()
        tokens = np.array(t2.column("image_tokens").to_pylist())
        assert np.array_equal(tokens[::2], np.array(t1.column("image_tokens").to_pylist()))
        differ += int((tokens[::2] != tokens[1::2]).any(axis=1).sum())
    assert differ > 0.2 * one["splits"]["train"]["num_samples"]
    (_, v1), = _shards(cfg, one, "val")
    (_, v2), = _shards(two_cfg, two, "val")
    assert v2.column("view").to_pylist() == [0] * v1.num_rows
    assert v2.column("image_tokens").to_pylist() == v1.column("image_tokens").to_pylist()

    # The same rows again from an encoder in this process (the job's ran in a Ray actor).
    e = two_cfg.encode
    tokenizer_json = storage.read_bytes(storage.join(cfg.paths.tokens, one["tokenizer"]["path"])).decode()
    opts = storage.StorageOptions.from_config(cfg.storage)
    encoder = ShardEncoder(dvae_uri=cfg.paths.encode_dvae, opts=opts, tokenizer_json=tokenizer_json,
                           image_ext=prepared["image_format"],
                           resolution=prepared["resolution"], batch_size=16, use_gpu=False, measure_psnr=(),
                           views=e.views, view_scale=e.view_scale, seed=e.seed)
    src = storage.join(cfg.paths.data, prepared["splits"]["train"]["shards"][1]["path"])
    encoder.encode_shard(src, str(tmp_path / "again.parquet"), "train")
    assert read_token_shard(str(tmp_path / "again.parquet")).equals(_shards(two_cfg, two, "train")[1][1])
