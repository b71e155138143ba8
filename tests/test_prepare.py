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
    # The tokenizer lives in the generation, beside its shards.
    assert manifest["tokenizer"]["path"] == f"{manifest['generation']}/tokenizer.json"
    tok_json = storage.read_bytes(storage.join(data_uri, manifest["tokenizer"]["path"])).decode()
    tok = CaptionTokenizer.from_json(tok_json)
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

    # Re-preparing replaces it whole: the old generation stays until the new manifest is written
    # (and then until the next publish, for jobs still reading it).
    def shard_bytes(m):
        return [storage.read_bytes(str(tmp_path / "out" / s["path"])) for s in m["splits"]["train"]["shards"]]

    old_bytes = shard_bytes(manifest)
    cfg2 = corpus_config(str(tmp_path / "in"), str(tmp_path / "out"), "webdataset", "data.overwrite=true")
    newer = run_prepare(cfg2)
    assert newer["generation"] != manifest["generation"]
    gens = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("gen-"))
    assert gens == sorted([manifest["generation"], newer["generation"]])
    assert newer["previous_generation"] == manifest["generation"]
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
    assert "prepared/manifest.json" in names and f"prepared/{manifest['tokenizer']['path']}" in names
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


def _generation_dir(out: Path) -> Path:
    [gen] = [p for p in out.iterdir() if p.name.startswith("gen-")]
    return gen


def test_a_killed_worker_then_a_rerun_reads_only_the_unfinished_inputs(ray_cluster, tmp_path, monkeypatch):
    """A worker dies (os._exit) while reading input 4 of 6 and the job stops; the rerun resumes the
    same generation and reads only input 4. The finished inputs are overwritten with garbage before
    the rerun: had it read them, it would count unreadable or truncated shards and lose samples."""
    from corpus import good_samples, tar_bytes

    from tessera.data.prepare import FAULT_ENV

    good = good_samples(72)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        (src / f"{i:05d}.tar").write_bytes(tar_bytes(good[12 * i:12 * (i + 1)]))
    reference = run_prepare(corpus_config(str(src), str(tmp_path / "ref"), "webdataset"))

    out = tmp_path / "out"
    cfg = corpus_config(str(src), str(out), "webdataset", "data.task_retries=0")
    monkeypatch.setenv(FAULT_ENV, "exit:4")
    with pytest.raises(RuntimeError, match=r"00004\.tar failed .*5 of 6 inputs are finished"):
        run_prepare(cfg)
    assert not (out / "manifest.json").exists()
    gen = _generation_dir(out)
    markers = {p.name: json.loads(p.read_text()) for p in (gen / "parts").glob("*.json")}
    assert sorted(markers) == [f"{u:06d}.json" for u in (0, 1, 2, 3, 5)]
    first_run = {m["run"] for m in markers.values()}
    assert len(first_run) == 1
    for u in (0, 1, 2, 3, 5):
        (src / f"{u:05d}.tar").write_bytes(b"garbage: this input must not be read again" * 50)

    monkeypatch.delenv(FAULT_ENV)
    manifest = run_prepare(cfg)
    assert manifest["generation"] == gen.name
    assert {k: manifest["work"][k] for k in ("units", "reused_units", "processed_units")} == \
        {"units": 6, "reused_units": 5, "processed_units": 1}
    assert not any(manifest["skipped"].values()) and manifest["kept_samples"] == 72
    # The same dataset as an uninterrupted run, byte for byte.
    for split, info in reference["splits"].items():
        assert [s["num_samples"] for s in manifest["splits"][split]["shards"]] == \
            [s["num_samples"] for s in info["shards"]]
        for mine, theirs in zip(manifest["splits"][split]["shards"], info["shards"], strict=True):
            assert (out / mine["path"]).read_bytes() == (tmp_path / "ref" / theirs["path"]).read_bytes()
    assert not (gen / "parts").exists() and not (gen / "drops").exists()


def test_resuming_needs_the_same_inputs_and_settings(ray_cluster, tmp_path, monkeypatch):
    """An unfinished generation made with other data settings is not resumed but cleared."""
    from corpus import good_samples, tar_bytes

    from tessera.data.prepare import FAULT_ENV

    good = good_samples(24)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"{i:05d}.tar").write_bytes(tar_bytes(good[8 * i:8 * (i + 1)]))
    out = tmp_path / "out"
    monkeypatch.setenv(FAULT_ENV, "exit:2")
    with pytest.raises(RuntimeError, match="2 of 3 inputs"):
        run_prepare(corpus_config(str(src), str(out), "webdataset", "data.task_retries=0"))
    stale = _generation_dir(out).name
    monkeypatch.delenv(FAULT_ENV)
    manifest = run_prepare(corpus_config(str(src), str(out), "webdataset", "data.resolution=16"))
    assert manifest["generation"] != stale and manifest["work"]["reused_units"] == 0
    assert [p.name for p in out.iterdir() if p.name.startswith("gen-")] == [manifest["generation"]]


def test_the_first_of_a_repeated_key_in_input_order_is_kept_and_shards_span_inputs(ray_cluster, tmp_path):
    """Duplicates found by the key-only pass, whichever input finishes first: the sample kept is the
    one earliest in input order (file, then position). Shards of 5 are cut across inputs."""
    from corpus import good_samples, tar_bytes

    good = good_samples(40)

    def dup(caption: str):
        key, files = good_samples(1, prefix="dup")[0]
        return key, dict(files, txt=caption.encode())

    src = tmp_path / "in"
    src.mkdir()
    files = [good[0:9] + [dup("the first dup")], good[9:18], good[18:27] + [dup("second"), dup("third")],
             [dup("fourth")] + good[27:40], good[0:2]]
    for i, samples in enumerate(files):
        (src / f"{i:05d}.tar").write_bytes(tar_bytes(samples))
    cfg = corpus_config(str(src), str(tmp_path / "out"), "webdataset", "data.samples_per_shard=5",
                        "data.val_fraction=0")
    manifest = run_prepare(cfg)
    assert {k: v for k, v in manifest["skipped"].items() if v} == {"duplicate_key": 5}
    out = read_output(str(tmp_path / "out"), manifest)
    keys = [k for k, _ in out["train"]]
    assert keys == [k for k, _ in good[:9]] + ["dup-00000"] + [k for k, _ in good[9:]]  # input order
    assert dict(out["train"])["dup-00000"]["txt"] == b"the first dup"
    assert [s["num_samples"] for s in manifest["splits"]["train"]["shards"]] == [5] * 8 + [1]


def _grid_image(seed: int, side: int, fmt: str, quality: int = 90, hue_seed: int | None = None) -> bytes:
    """An 8x8 grid of random grey levels: structure a perceptual hash sees at any scale. With
    hue_seed, each cell gets a random colour of (about) the same brightness: a lookalike in grey."""
    import numpy as np
    from PIL import Image

    cells = np.random.default_rng(seed).integers(0, 256, (8, 8)).astype(float)
    rgb = np.stack([cells] * 3, -1)
    if hue_seed is not None:
        rng = np.random.default_rng(hue_seed)
        r, b = (np.clip(cells + rng.uniform(-80, 80, cells.shape), 0, 255) for _ in range(2))
        rgb = np.stack([r, np.clip((cells - 0.299 * r - 0.114 * b) / 0.587, 0, 255), b], -1)
    im = Image.fromarray(rgb.astype(np.uint8), "RGB").resize((side, side), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_near_duplicate_images_are_skipped_only_when_asked(ray_cluster, tmp_path):
    """Copies of an image re-encoded (JPEG quality 60 and 75) or rescaled (96 -> 120, 128 px) under
    other keys are near duplicates: with data.near_duplicates=dhash only the first is kept. A
    lookalike (the same brightness layout in other colours) shares the grey hash, so it is a
    candidate, but its colour hash differs in more than the default 20 bits: it stays."""
    import numpy as np
    from corpus import tar_bytes

    from tessera.data.preprocess import Rules, dhash, process_image

    def sample(key, data, ext):
        return key, {ext: data, "txt": f"picture {key}".encode()}

    originals = [sample(f"img-{s}", _grid_image(s, 96, "PNG"), "png") for s in range(6)]
    copies = [sample("copy-a", _grid_image(0, 96, "JPEG", quality=60), "jpg"),
              sample("copy-b", _grid_image(0, 120, "JPEG"), "jpg"),
              sample("copy-c", _grid_image(3, 128, "JPEG", quality=75), "jpg")]
    lookalike = sample("lookalike", _grid_image(1, 96, "PNG", hue_seed=0), "png")
    src = tmp_path / "in"
    src.mkdir()
    (src / "00000.tar").write_bytes(tar_bytes(originals[:3] + copies[:1]))
    (src / "00001.tar").write_bytes(tar_bytes(copies[1:] + [lookalike] + originals[3:]))
    rules = Rules(resolution=32)

    def bits(a: tuple, b: tuple) -> tuple[int, int]:
        """(grey, colour) hash bits that differ between two samples after resizing."""
        (ga, ca), (gb, cb) = (dhash(process_image(next(iter(x[1].values())), rules)[0]) for x in (a, b))
        return bin((ga ^ gb) % 2**64).count("1"), int(np.unpackbits(np.frombuffer(ca, np.uint8) ^
                                                                     np.frombuffer(cb, np.uint8)).sum())

    assert [bits(originals[s], c) for s, c in zip((0, 0, 3), copies, strict=True)] == [(0, 0), (0, 0), (1, 3)]
    assert bits(originals[1], lookalike) == (1, 29)
    assert min(bits(a, b)[0] for a in originals for b in originals if a != b) > 8

    def prepared(out: str, *extra: str) -> tuple[dict, list[str]]:
        m = run_prepare(corpus_config(str(src), str(tmp_path / out), "webdataset", "data.val_fraction=0",
                                      *extra))
        return m, [k for k, _ in read_output(str(tmp_path / out), m)["train"]]

    m, keys = prepared("off")
    assert len(keys) == 10 and m["skipped"]["near_duplicate"] == 0
    m, keys = prepared("on", "data.near_duplicates=dhash")
    assert m["skipped"]["near_duplicate"] == 3
    # The first of each image in input order: copy-c comes before img-3, its original.
    assert keys == ["img-0", "img-1", "img-2", "copy-c", "lookalike", "img-4", "img-5"]
    m, keys = prepared("strict", "data.near_duplicates=dhash", "data.near_duplicate_bits=2")
    assert m["skipped"]["near_duplicate"] == 2 and "copy-c" in keys and "img-3" in keys


def test_a_killed_driver_then_a_rerun_reads_only_the_unfinished_inputs(ray_cluster, tmp_path):
    """The job's driver (`python jobs/prepare.py` on the running cluster) is killed with SIGKILL
    while input 3 of 5 is still being read; Ray ends that driver's tasks, and the rerun processes
    input 3 only."""
    import os
    import signal
    import time

    import ray
    from corpus import good_samples, tar_bytes

    from tessera.data.prepare import FAULT_ENV

    good = good_samples(50)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        (src / f"{i:05d}.tar").write_bytes(tar_bytes(good[10 * i:10 * (i + 1)]))
    out = tmp_path / "out"
    sets = ["data.source.kind=webdataset", f"data.source.uri={src}", f"data.output_uri={out}",
            "data.resolution=32", "tokenizer.vocab_size=300", "tokenizer.min_frequency=1"]
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, **{FAULT_ENV: "sleep:3"})
    driver = subprocess.Popen([sys.executable, "jobs/prepare.py", "--config", "debug",
                               *(a for s in sets for a in ("--set", s))], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list(out.glob("gen-*/parts/*.json"))) < 4:
            assert driver.poll() is None and time.time() < deadline, "the driver ended before input 3"
            time.sleep(0.2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    gen = _generation_dir(out)
    assert sorted(p.name for p in (gen / "parts").glob("*.json")) == [f"{u:06d}.json" for u in (0, 1, 2, 4)]

    manifest = run_prepare(load_config("debug", sets))
    assert manifest["generation"] == gen.name and manifest["kept_samples"] == 50
    assert (manifest["work"]["reused_units"], manifest["work"]["processed_units"]) == (4, 1)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_republishing_keeps_the_generation_it_replaces_until_the_next_publish(ray_cluster, tmp_path,
                                                                              monkeypatch):
    """A job still reading the previous dataset keeps its shards and tokenizer through one more
    publish; a re-prepare that fails before its manifest leaves the published tokenizer as that
    manifest's sha256 says (it is written inside the new generation, not over the old one)."""
    from tessera import published

    def cfg(vocab: int):
        return load_config("debug", [f"run.root_uri={tmp_path}", "data.source.shapes.num_samples=120",
                                     "data.source.shapes.num_heldout=0", "data.source.shapes.held_out=[]",
                                     "data.resolution=32", "data.source.shapes.image_size=32",
                                     "data.samples_per_shard=64", "data.overwrite=true",
                                     f"tokenizer.vocab_size={vocab}", "tokenizer.min_frequency=1"])

    data = cfg(300).paths.data

    def intact(m: dict) -> bool:
        """Every file `m` names is there, and its tokenizer is the one it describes."""
        tok = storage.read_bytes(storage.join(data, m["tokenizer"]["path"]))
        shards = [s["path"] for split in m["splits"].values() for s in split["shards"]]
        return _sha256(tok) == m["tokenizer"]["sha256"] and all(storage.exists(storage.join(data, p))
                                                                 for p in shards)

    def generations() -> set[str]:
        return set(published.generation_names(data))

    first = run_prepare(cfg(300))
    second = run_prepare(cfg(280))
    assert second["previous_generation"] == first["generation"] != second["generation"]
    assert generations() == {first["generation"], second["generation"]}
    assert intact(first) and intact(second)

    def manifest_write_fails(*args, **kwargs):
        raise storage.StorageError("manifest.json: write failed (injected)")

    monkeypatch.setattr(published, "publish", manifest_write_fails)
    with pytest.raises(storage.StorageError, match="injected"):
        run_prepare(cfg(270))  # its tokenizer was written, its manifest was not
    monkeypatch.undo()
    assert published.existing(data) == second and intact(second) and intact(first)
    [failed] = generations() - {first["generation"], second["generation"]}

    third = run_prepare(cfg(270))  # resumes the failed run's generation (never a retained one)
    assert third["generation"] == failed and third["work"]["reused_units"] == third["work"]["units"]
    assert third["previous_generation"] == second["generation"]
    assert generations() == {second["generation"], third["generation"]}  # the first is gone now
    assert len({m["tokenizer"]["sha256"] for m in (first, second, third)}) == 3  # three tokenizers
    assert intact(second) and intact(third)
