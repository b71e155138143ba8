"""Batch generation: captions files with bad lines, seeds and candidate ranking that match the
ImageGenerator, and jobs/generate.py to an S3-compatible bucket on a real local Ray."""

import json

import numpy as np
import pytest
from bundles import make_bundle

from tessera.inference.batch_generate import (
    Sampling,
    caption_seed,
    draw_candidates,
    rank_candidates,
    read_captions,
)


@pytest.fixture(scope="module")
def bundle_uri(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def test_captions_files_skip_and_count_bad_lines(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_bytes(b"a red circle\n\n   \n" + b"x" * 50 + b"\n\xff\xfe bad\r\na  blue   square\r\n")
    rows, skipped = read_captions(str(txt), max_chars=40)
    assert rows == [{"caption": "a red circle", "index": 0}, {"caption": "a blue square", "index": 5}]
    assert skipped == {"empty": 2, "too_long": 1, "not_utf8": 1, "bad_record": 0}
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"caption": "a green diamond"}\nnot json\n{"text": "x"}\n["a"]\n{"caption": "empty"}\n')
    rows, skipped = read_captions(str(jsonl))
    assert [r["caption"] for r in rows] == ["a green diamond", "empty"] and skipped["bad_record"] == 3
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a", None, "b"]}), tmp_path / "c.parquet")
    rows, skipped = read_captions(str(tmp_path / "c.parquet"))
    assert [r["index"] for r in rows] == [0, 2] and skipped["empty"] == 1


def test_seeds_are_a_function_of_base_and_index():
    seeds = [caption_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert caption_seed(0, 5) == caption_seed(0, 5) != caption_seed(1, 4) != caption_seed(0, 5, stream=1)


def test_ranks_order_by_score_and_keep_drawing_order_on_ties():
    ranks = rank_candidates(np.array([[0.1, 0.9, 0.5], [1.0, 1.0, 0.0]]), 3, 2)
    assert ranks.tolist() == [[2, 0, 1], [0, 1, 2]]
    assert rank_candidates(None, 3, 1).tolist() == [[0, 1, 2]]


def test_candidates_are_the_image_generators_draws(bundle_uri):
    """Candidate j of a caption seeded s is what ImageGenerator draws for it, so its reranked pick
    is the API's answer for (caption, seed s, n=1, candidates=M)."""
    from tessera.bundle import load_bundle
    from tessera.sampling.generate import GenerationParams, ImageGenerator

    gen = ImageGenerator(load_bundle(bundle_uri))
    prompts, seeds = ["a red circle on the left", "a blue square"], [caption_seed(0, 0), caption_seed(0, 1)]
    images, scores = draw_candidates(gen, prompts, seeds, Sampling(candidates=4, top_k=20))
    assert images.shape == (2, 4, 32, 32, 3) and images.dtype == np.uint8 and scores.shape == (2, 4)
    ranks = rank_candidates(scores, 4, 2)
    for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
        best = gen.generate([(p, GenerationParams(n=1, seed=s, top_k=20, candidates=4))])[0][0]
        assert np.array_equal(images[i, int(np.argmin(ranks[i]))], best)
    # Candidate 0 is the image without reranking: the API's answer with n=1 and no candidates,
    # whatever M is.
    plain = gen.generate([(prompts[1], GenerationParams(n=1, seed=seeds[1], top_k=20))])[0][0]
    one, _ = draw_candidates(gen, prompts[1:], seeds[1:], Sampling(candidates=1, top_k=20))
    assert np.array_equal(plain, images[1, 0]) and np.array_equal(one[0, 0], images[1, 0])


def _generate_job():
    import importlib.util
    import sys
    from pathlib import Path

    jobs = Path(__file__).resolve().parents[1] / "jobs"
    sys.path.insert(0, str(jobs))  # for its `from _common import ...`, while it loads
    try:
        spec = importlib.util.spec_from_file_location("generate_job", jobs / "generate.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(jobs))
    return module


@pytest.mark.integration
def test_generate_job_writes_pngs_and_manifest_to_s3(tmp_path, bundle_uri, ray_cluster, s3_client, bucket):
    from tessera import storage
    from tessera.config import load_config

    captions = "a red circle on the left\n\n" + "y" * 300 + "\na blue square at the top\na green triangle\n"
    s3_client.put_object(Bucket=bucket, Key="in/captions.txt", Body=captions.encode())
    out = f"s3://{bucket}/images"
    cfg = load_config("debug", [f"run.root_uri={tmp_path}", f"generate.bundle_uri={bundle_uri}",
                                f"generate.captions_uri=s3://{bucket}/in/captions.txt",
                                f"generate.output_uri={out}", "generate.n=2",
                                "generate.sampling.candidates=3", "generate.max_caption_chars=200",
                                "generate.actors.num_actors=1", "generate.actors.batch_size=2",
                                "generate.sampling.seed=7"])
    job = _generate_job()
    assert job.main(cfg) == 0
    manifest = storage.read_json(f"{out}/manifest.json")
    assert manifest["kind"] == "tessera.generated_images" and manifest["images"] == 6
    assert manifest["captions"]["used"] == 3 and manifest["captions"]["lines"] == 5
    assert manifest["captions"]["skipped"] == {"empty": 1, "too_long": 1, "not_utf8": 0, "bad_record": 0}
    index = [json.loads(line)
             for line in storage.read_bytes(f"{out}/{manifest['index']}").decode().splitlines()]
    assert [(r["index"], r["rank"]) for r in index] == [(0, 0), (0, 1), (3, 0), (3, 1), (4, 0), (4, 1)]
    assert all(r["seed"] == {0: caption_seed(7, 0), 3: caption_seed(7, 3), 4: caption_seed(7, 4)}[r["index"]]
               for r in index)
    assert all(r["score"] is not None for r in index) and index[0]["score"] >= index[1]["score"]
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="images/")["Contents"]}
    assert ({f"images/{r['file']}" for r in index} <= keys
            and f"images/{manifest['generation']}/images/00000003-1.png" in keys)
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(storage.read_bytes(f"{out}/{index[0]['file']}"))) as im:
        assert im.size == (32, 32)

    # A rerun publishes a new generation and retires the old one (kept until the next publish, for
    # readers of the old manifest); no captions at all is an error.
    assert job.main(cfg) == 0
    second = storage.read_json(f"{out}/manifest.json")
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="images/")["Contents"]}
    assert (second["generation"] != manifest["generation"]
            and second["previous_generation"] == manifest["generation"]
            and f"images/{manifest['index']}" in keys)
    s3_client.put_object(Bucket=bucket, Key="in/empty.txt", Body=b"\n\n")
    bad = cfg.model_copy(update={"generate": cfg.generate.model_copy(
        update={"captions_uri": f"s3://{bucket}/in/empty.txt"})})
    assert job.main(bad) == 2
