"""data.heldout: captions (a list, a file, or a seeded fraction of the distinct ones) and keys held
out of train and val for any source, published as the held-out split as the shapes source's are."""

import json

import pytest
from corpus import good_samples, tar_bytes
from test_prepare import read_output

from tessera import storage
from tessera.config import ConfigError, HeldoutConfig, load_config
from tessera.data.heldout import HeldOut, in_fraction, normalize_caption
from tessera.data.prepare import preflight, run_prepare


def chosen(captions: list[str], *, fraction: float, seed: int) -> set[str]:
    held = HeldOut.load(HeldoutConfig(fraction=fraction, seed=seed), None)
    return {c for c in captions if held.holds("k", c)}


def test_a_fraction_is_seeded_stable_and_caption_wide():
    captions = [f"a photo of thing number {i}" for i in range(4000)]
    tenth = chosen(captions, fraction=0.1, seed=0)
    assert 340 <= len(tenth) <= 460  # 10% of 4000, within ~3.5 standard deviations
    # The same seed picks the same captions in any order and in any subset of the data.
    assert chosen(captions[::-1], fraction=0.1, seed=0) == tenth
    assert chosen(captions[:1000], fraction=0.1, seed=0) == {c for c in tenth if c in captions[:1000]}
    other = chosen(captions, fraction=0.1, seed=1)
    assert len(other & tenth) < 0.3 * len(tenth)  # another seed, another draw (expected overlap 10%)
    assert tenth <= chosen(captions, fraction=0.2, seed=0)  # a larger share only adds captions
    # One caption, however it is written, is one decision; the tokenizer could not tell them apart.
    assert normalize_caption("  A Photo\tof THING number 7 ") == "a photo of thing number 7"
    c = next(iter(tenth))
    assert HeldOut.load(HeldoutConfig(fraction=0.1), None).holds("k", c.upper().replace(" ", "  "))
    assert not in_fraction(c, fraction=0.0, seed=0)


def test_lists_and_files(tmp_path):
    (tmp_path / "held.txt").write_text("Red Apple\n\n  grinning   face \n")
    (tmp_path / "held.jsonl").write_text('{"caption": "thumbs up sign"}\n\n{"key": "00001/abc.def"}\n')
    held = HeldOut.load(HeldoutConfig(captions=["Cat"], keys=["k1"], uri=str(tmp_path / "held.txt")), None)
    assert held.captions == {"cat", "red apple", "grinning face"} and held.keys == {"k1"}
    assert held.holds("zz", "GRINNING FACE") and held.holds("k1", "anything") and not held.holds("k2", "dog")
    held = HeldOut.load(HeldoutConfig(uri=str(tmp_path / "held.jsonl")), None)
    # Keys compare as prepare writes them: "/" and "." become "_".
    assert held.captions == {"thumbs up sign"} and held.keys == {"00001_abc_def"}
    assert HeldOut.load(HeldoutConfig(), None) is None


@pytest.mark.parametrize("content, words", [
    ('{"caption": "ok"}\nnot json\n', "held.jsonl line 2 is not JSON"),
    ('{"caption": "ok"}\n["a list"]\n', 'held.jsonl line 2 needs a "caption" or "key" string'),
    ("\n\n", "held.jsonl holds no captions or keys"),
])
def test_a_bad_file_is_named_before_work(tmp_path, content, words):
    (tmp_path / "held.jsonl").write_text(content)
    cfg = load_config("debug", [f"run.root_uri={tmp_path / 'run'}",
                                f"data.heldout.uri={tmp_path / 'held.jsonl'}"])
    with pytest.raises(ConfigError, match=f"data.heldout.uri: .*{words}"):
        preflight(cfg)
    assert not (tmp_path / "run" / "data").exists()


def test_a_missing_file_or_wrong_kind_is_named(tmp_path):
    cfg = load_config("debug", [f"run.root_uri={tmp_path}", f"data.heldout.uri={tmp_path / 'gone.txt'}"])
    with pytest.raises(storage.StorageError, match="data.heldout.uri: .*gone.txt: not found"):
        preflight(cfg)
    with pytest.raises(ConfigError, match=r"data.heldout: .*uri: .*held.csv must be a .txt .* or .jsonl"):
        load_config("debug", ["data.heldout.uri=held.csv"])
    with pytest.raises(ConfigError, match="data.heldout.fraction"):
        load_config("debug", ["data.heldout.fraction=1.0"])


@pytest.mark.integration
def test_held_out_samples_leave_train_and_val(ray_cluster, tmp_path):
    """Captions from a list and a file, keys and a fraction together, on a webdataset source whose
    captions each appear under two keys: a held-out caption takes both, a held-out key only its own
    sample; the rest is split as before and bad samples are still counted."""
    samples = good_samples(40)
    for i, (_, files) in enumerate(samples):
        files["txt"] = f"a photo of thing number {i % 20}".encode()  # sample i and i + 20 share a caption
    bad = [("bad-nocaption", {"jpg": samples[0][1]["jpg"]})]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_bytes(tar_bytes(samples[:20] + bad))
    (tmp_path / "in" / "00001.tar").write_bytes(tar_bytes(samples[20:]))
    (tmp_path / "held.jsonl").write_text('{"caption": "a photo of thing number 5"}\n{"key": "good-00006"}\n')
    cfg = load_config("debug", [
        "data.source.kind=webdataset", f"data.source.uri={tmp_path / 'in'}",
        f"run.root_uri={tmp_path / 'run'}",
        "data.resolution=32", "data.samples_per_shard=8", "data.val_fraction=0.3", "tokenizer.vocab_size=300",
        "tokenizer.min_frequency=1", "data.heldout.captions=[A Photo of Thing Number 3]",
        "data.heldout.keys=[good-00004]", f"data.heldout.uri={tmp_path / 'held.jsonl'}",
        "data.heldout.fraction=0.2", "data.heldout.seed=7"])
    manifest = run_prepare(cfg)
    out = read_output(cfg.paths.data, manifest)

    by_caption = {n: f"a photo of thing number {n}" for n in range(20)}
    drawn = {n for n, c in by_caption.items() if in_fraction(c, fraction=0.2, seed=7)}
    assert drawn and len(drawn) < 20  # the fraction picked some captions here, not all
    held_captions = {3, 5} | drawn
    expected = {f"good-{i:05d}" for i in range(40) if i % 20 in held_captions} | {"good-00004", "good-00006"}
    assert {k for k, _ in out["heldout"]} == expected
    # A key takes only its own sample: its caption twin stays unless the fraction drew the caption.
    assert {4, 6} - drawn and all(f"good-{20 + n:05d}" not in expected for n in {4, 6} - drawn)
    seen = {files["txt"].decode() for split in ("train", "val") for _, files in out[split]}
    assert not seen & {by_caption[n] for n in held_captions}  # a held-out caption is never trained on
    assert len(out["train"]) + len(out["val"]) + len(out["heldout"]) == 40 and out["val"]
    assert manifest["splits"]["heldout"]["num_samples"] == len(expected)
    assert {k: v for k, v in manifest["skipped"].items() if v} == {"missing_caption": 1}
    h = manifest["heldout"]
    assert (h["captions"], h["keys"], h["fraction"], h["seed"]) == (2, 2, 0.2, 7)
    assert json.loads(out["heldout"][0][1]["json"])["key"] == out["heldout"][0][0]
