"""The prepare job end to end on a real local Ray, from local files and from a real
S3-compatible server: every bad-sample kind is skipped and counted exactly, every good sample
arrives, and outputs are published atomically."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import upload_dir
from corpus import write_parquet_corpus, write_webdataset_corpus

from tessera import storage
from tessera.config import load_config
from tessera.data.prepare import run_prepare
from tessera.data.tar import TarReadResult, iter_tar_samples
from tessera.data.tokenizer import CaptionTokenizer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def read_output(data_uri: str, manifest: dict) -> dict[str, list]:
    """split -> [(key, files)] read back from the written shards."""
    out = {}
    for split, info in manifest["splits"].items():
        rows = []
        for shard in info["shards"]:
            data = storage.read_bytes(storage.join(data_uri, shard["path"]))
            result = TarReadResult()
            samples = list(iter_tar_samples(io.BytesIO(data), result))
            assert not result.truncated and len(samples) == shard["num_samples"]
            rows += [(s.key, s.files) for s in samples]
        out[split] = rows
    return out


def check_prepared(data_uri: str, manifest: dict, good: set[str], expected: dict[str, int], per_shard: int):
    skipped = {k: v for k, v in manifest["skipped"].items() if v}
    assert skipped == expected
    out = read_output(data_uri, manifest)
    keys = [k for rows in out.values() for k, _ in rows]
    assert sorted(keys) == sorted(good)  # every good sample, once
    assert manifest["kept_samples"] == len(good)
    for info in manifest["splits"].values():
        sizes = [s["num_samples"] for s in info["shards"]]
        assert all(n == per_shard for n in sizes[:-1]) and sum(sizes) == info["num_samples"]
    for _, files in out["train"]:
        meta = json.loads(files["json"])
        assert set(files) == {"png", "txt", "json"} and meta["original_size"][0] > 0
    tok = CaptionTokenizer.from_json(storage.read_bytes(storage.join(data_uri, "tokenizer.json")).decode())
    ids, mask = tok.encode(["A Photo of Thing number 7"], text_len=16)
    assert tok.decode(ids, mask) == ["a photo of thing number 7"]  # lowercased, lossless
    assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size


def corpus_config(source_uri: str, out_uri: str, kind: str, *extra: str):
    return load_config("debug", [f"data.source.kind={kind}", f"data.source.uri={source_uri}",
                                 f"data.output_uri={out_uri}", "data.resolution=32",
                                 "data.samples_per_shard=7",
                                 "data.val_fraction=0.2", "data.max_image_pixels=4000000",
                                 "tokenizer.vocab_size=300", "tokenizer.min_frequency=1", *extra])


def test_webdataset_bad_samples_from_local_files(ray_cluster, tmp_path):
    good, expected = write_webdataset_corpus(tmp_path / "in")
    cfg = corpus_config(str(tmp_path / "in"), str(tmp_path / "out"), "webdataset")
    manifest = run_prepare(cfg)
    check_prepared(str(tmp_path / "out"), manifest, good, expected, per_shard=7)
    assert manifest["source"]["num_files"] == 3 and 0 < manifest["splits"]["val"]["num_samples"] < len(good)

    # A rerun finds the published dataset and does nothing.
    again = run_prepare(cfg)
    assert again["generation"] == manifest["generation"]

    # Re-preparing replaces it whole: the old generation stays until the new manifest is written.
    def shard_bytes(m):
        return [storage.read_bytes(str(tmp_path / "out" / s["path"])) for s in m["splits"]["train"]["shards"]]

    old_bytes = shard_bytes(manifest)
    cfg2 = corpus_config(str(tmp_path / "in"), str(tmp_path / "out"), "webdataset", "data.overwrite=true")
    newer = run_prepare(cfg2)
    assert newer["generation"] != manifest["generation"]
    gens = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("gen-"))
    assert gens == [newer["generation"]]
    # Same inputs, same rules -> byte-identical shards (order does not depend on task timing).
    assert shard_bytes(newer) == old_bytes


def test_webdataset_bad_samples_from_s3(ray_cluster, tmp_path, bucket, s3_client):
    good, expected = write_webdataset_corpus(tmp_path / "in")
    upload_dir(s3_client, tmp_path / "in", bucket, "raw/wds")
    out = f"s3://{bucket}/prepared"
    manifest = run_prepare(corpus_config(f"s3://{bucket}/raw/wds", out, "webdataset"))
    check_prepared(out, manifest, good, expected, per_shard=7)
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="prepared/")["Contents"]
    names = {o["Key"] for o in listed}
    assert "prepared/manifest.json" in names and "prepared/tokenizer.json" in names
    assert not any(".tmp" in n for n in names)


def test_parquet_bad_samples_from_s3(ray_cluster, tmp_path, bucket, s3_client):
    good, expected = write_parquet_corpus(tmp_path / "in")
    (tmp_path / "in" / "corrupt.parquet").write_bytes(b"PAR1 this is not really parquet")
    expected = dict(expected, unreadable_file=1)
    upload_dir(s3_client, tmp_path / "in", bucket, "raw/pq")
    out = f"s3://{bucket}/prepared-pq"
    manifest = run_prepare(corpus_config(f"s3://{bucket}/raw/pq", out, "parquet"))
    check_prepared(out, manifest, good, expected, per_shard=7)
    meta = json.loads(read_output(out, manifest)["train"][0][1]["json"])
    assert meta["source_meta"]["width"] == 64  # other LAION columns travel in the sample's JSON


def test_parquet_from_local_files(ray_cluster, tmp_path):
    good, expected = write_parquet_corpus(tmp_path / "in")
    manifest = run_prepare(corpus_config(str(tmp_path / "in"), str(tmp_path / "out"), "parquet"))
    check_prepared(str(tmp_path / "out"), manifest, good, expected, per_shard=7)


def test_shapes_heldout_never_in_training(ray_cluster, tmp_path):
    from tessera.data.shapes import DEFAULT_HELD_OUT

    cfg = load_config("debug", [f"run.root_uri={tmp_path}", "data.source.shapes.num_samples=600",
                                "data.source.shapes.num_heldout=60", "data.resolution=32",
                                "data.samples_per_shard=128", "data.source.shapes.image_size=32"])
    manifest = run_prepare(cfg)
    out = read_output(cfg.paths.data, manifest)
    assert len(out["heldout"]) == 60 and len(out["train"]) + len(out["val"]) == 600
    assert manifest["shapes"]["held_out"] == sorted(f"{c} {s}" for c, s in DEFAULT_HELD_OUT)
    for split, rows in out.items():
        for _, files in rows:
            attrs = json.loads(files["json"])["attributes"]
            pairs = {(o["colour"], o["shape"]) for o in attrs["objects"]}
            assert bool(pairs & DEFAULT_HELD_OUT) == (split == "heldout")
            caption = files["txt"].decode()
            assert all(o["colour"] in caption and o["shape"] in caption for o in attrs["objects"])


def test_cli_rejects_bad_input_before_work(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "jobs/prepare.py", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    r = run("--set", "data.resolutoin=64")
    assert r.returncode == 2 and "data.resolutoin: unknown field" in r.stderr
    r = run("--set", "data.source.kind=webdataset", "--set", f"data.source.uri={tmp_path}/nothing-here",
            "--set", f"run.root_uri={tmp_path}/out")
    assert r.returncode == 2 and "no input files with suffix .tar found" in r.stderr
    assert not (tmp_path / "out" / "data" / "manifest.json").exists()


def test_cli_runs_on_an_existing_cluster(ray_cluster, tmp_path):
    import ray

    env = dict(__import__("os").environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    r = subprocess.run([sys.executable, "jobs/prepare.py", "--config", "jobs/configs/debug.yaml",
                        "--set", f"run.root_uri={tmp_path}", "--set", "data.source.shapes.num_samples=120",
                        "--set", "data.source.shapes.num_heldout=10", "--set", "data.resolution=32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "heldout" in r.stdout and "rows/s" in r.stdout
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["input_samples"] == 130 and manifest["kept_samples"] == 130


@pytest.mark.parametrize("held_out, words", [("[mauve circle]", "unknown colour 'mauve'"),
                                             ("[red circle, red square, red triangle, red diamond]",
                                              "removes colour 'red'")])
def test_held_out_pairs_are_checked_before_prepare_starts(held_out, words, tmp_path):
    """The shapes vocabulary lives in tessera.data.shapes, above the config layer: prepare's
    preflight checks the declared pairs before any work, naming the field."""
    from tessera.config import ConfigError
    from tessera.data.prepare import preflight

    cfg = load_config("debug", [f"run.root_uri={tmp_path}", f"data.source.shapes.held_out={held_out}"])
    with pytest.raises(ConfigError, match=f"data.source.shapes.held_out: .*{words}"):
        preflight(cfg)
    assert not (tmp_path / "data").exists()
