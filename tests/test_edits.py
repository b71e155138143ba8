"""Image-to-image by the DALL·E paper's priming: uploads prepared as training images are, the kept
token rows exactly the image's, the rest drawn; and POST /v1/images/edits over real HTTP on 127.0.0.1
through the official `openai` client and a browser."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import torch
from bundles import make_bundle
from PIL import Image

from serve.api import ApiError, Limits, Upload, check_multipart, parse_edit_form
from tessera.bundle import load_bundle
from tessera.sampling.generate import GenerationParams, ImageGenerator
from tessera.sampling.priming import MAX_PIXELS, default_keep_rows, load_image, prime_tokens
from tessera.sampling.sampler import sample_image_tokens
from tessera.sampling.seeds import candidate_seeds


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def noise(seed: int, size=(32, 32), mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr, mode)


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> ImageGenerator:
    return ImageGenerator(load_bundle(make_bundle(tmp_path_factory.mktemp("edit-bundle"), seed=0)))


def test_uploads_are_prepared_as_training_images_and_non_images_refused():
    # 64x32: the fit keeps the centre 32x32 (all green), not a squeeze of the red and blue sides.
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :16], wide[:, 16:48], wide[:, 48:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = load_image(encoded(Image.fromarray(wide), "JPEG"), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    inner = out[:, 2:-2].astype(int)  # JPEG and the bicubic filter blur the crop's edges
    assert inner[..., 1].min() > 200 and inner[..., 0].max() < 60 and inner[..., 2].max() < 60
    # Transparency becomes white (RGBA -> RGB), and a 64 px image is resized to the model's 32.
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:32] = (200, 10, 10, 255)  # opaque red top half, fully transparent bottom half
    out = load_image(encoded(Image.fromarray(rgba, "RGBA")), 32)
    assert (out[20:] == 255).all() and (out[:12] == (200, 10, 10)).all()

    for data, why in [(b"", "empty"), (b"not an image at all", "not an image"),
                      (encoded(noise(0), "GIF"), "PNG, JPEG or WebP"),
                      (encoded(noise(0))[:60], "not an image"),  # truncated
                      (encoded(Image.new("L", (4097, 4096))), f"more than {MAX_PIXELS:,} pixels")]:
        with pytest.raises(ValueError, match=f"^image: .*{why}"):
            load_image(data, 32)


def test_primed_sampling_keeps_the_image_rows_and_draws_the_rest(generator):
    prior, dvae, G = generator.prior, generator.dvae, generator.prior.shape.grid
    image = load_image(encoded(noise(1)), 32)
    full = dvae.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0]  # (G, G)
    k = 3
    prime = prime_tokens(dvae, image[None], k)
    assert prime.shape == (1, k * G) and torch.equal(prime[0], full[:k].flatten())
    ids, mask = generator.encode_prompts(["a red circle on the left"])
    out = sample_image_tokens(prior, ids, mask, prime=prime, samples_per_prompt=6, seed=0, top_k=50)
    assert out.shape == (6, G, G)
    assert (out[:, :k] == full[:k]).all()  # the kept rows: exactly the image's tokens, in every draw
    rest = out[:, k:].flatten(1)
    assert len({tuple(r.tolist()) for r in rest}) == 6  # the rest drawn: every seed its own
    assert not (out[:, k:] == full[k:]).all(dim=(1, 2)).any()  # not copied from the image
    # The prefix goes through the KV cache once; the uncached reference draws the same tokens.
    ref = sample_image_tokens(prior, ids, mask, prime=prime, samples_per_prompt=6, seed=0, top_k=50,
                              use_cache=False)
    assert torch.equal(out, ref)


def test_image_generator_edits_are_the_primed_draws(generator):
    G = generator.prior.shape.grid
    image, other = load_image(encoded(noise(2)), 32), load_image(encoded(noise(3)), 32)
    prompt = "a large blue square at the top"
    edit = GenerationParams(n=1, seed=7, image=image)
    plain = GenerationParams(n=1, seed=7)
    # A batch mixing edits (two keep_rows) and a plain job: each gets what it gets alone.
    batch = generator.generate([(prompt, edit), (prompt, plain), (prompt, GenerationParams(
        n=1, seed=7, image=other, keep_rows=2))])
    alone = [generator.generate([job])[0] for job in [(prompt, edit), (prompt, plain)]]
    assert np.array_equal(batch[0][0], alone[0][0]) and np.array_equal(batch[1][0], alone[1][0])
    # The edit is the prior's draw primed with the image's top G/2 token rows, decoded.
    ids, mask = generator.encode_prompts([prompt])
    tokens = sample_image_tokens(generator.prior, ids, mask, seed=candidate_seeds([7], 1),
                                 prime=prime_tokens(generator.dvae, image[None], default_keep_rows(G)))
    expected = (generator.dvae.decode(tokens).clamp(0, 1) * 255).round().to(torch.uint8)
    assert np.array_equal(batch[0][0], expected[0].permute(1, 2, 0).numpy())
    assert not np.array_equal(batch[0][0], batch[1][0])  # the image matters
    assert generator.edit(prompt, Image.fromarray(image), seed=7).size == (32, 32)

    for params, field in [(GenerationParams(image=image, keep_rows=G), "keep_rows"),
                          (GenerationParams(keep_rows=2), "keep_rows"),
                          (GenerationParams(image=image[:16]), "image")]:
        with pytest.raises(ValueError, match=f"^{field}: "):
            generator.generate([(prompt, params)])


LIMITS = Limits(model_name="m", resolution=32, has_reranker=True, max_prompt_chars=50, max_n=4,
                max_candidates=8, grid=8)
PNG = Upload("a.png", b"\x89PNG...")


def _refused(items, status: int, param: str | None, **kw) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_edit_form(items, LIMITS, max_image_bytes=kw.get("max_image_bytes", 100))
    assert (e.value.status, e.value.param) == (status, param), e.value.message
    return e.value


def test_edit_form_parsing_names_the_field_at_fault():
    req, data = parse_edit_form([("prompt", "a cat"), ("n", "2"), ("keep_rows", "3"), ("seed", "5"),
                                 ("stream", "false"), ("image[]", PNG)], LIMITS, max_image_bytes=100)
    assert (req.n, req.keep_rows, req.seed, data) == (2, 3, 5, PNG.data)
    assert "keep_rows" in _refused([("prompt", "a"), ("image", PNG), ("mask", PNG)], 400, "mask").message
    _refused([("prompt", "a")], 400, "image")
    _refused([("prompt", "a"), ("image", "not a file")], 400, "image")
    _refused([("prompt", "a"), ("image", PNG), ("image", PNG)], 400, "image")
    assert _refused([("prompt", "a"), ("image", Upload("b.png", b"x" * 101))], 413, "image").code == \
        "request_too_large"
    _refused([("prompt", "a"), ("prompt", "b"), ("image", PNG)], 400, "prompt")
    _refused([("prompt", "a"), ("colour", "red"), ("image", PNG)], 400, "colour")
    _refused([("prompt", "a"), ("n", "two"), ("image", PNG)], 400, "n")
    _refused([("prompt", "a"), ("keep_rows", "8"), ("image", PNG)], 400, "keep_rows")
    _refused([("prompt", "a"), ("size", "1024x1024"), ("image", PNG)], 400, "size")
    _refused([("image", PNG)], 400, "prompt")
    check_multipart("multipart/form-data; boundary=x")
    with pytest.raises(ApiError) as e:
        check_multipart("application/json")
    assert e.value.status == 415


# --- over HTTP ---------------------------------------------------------------------------------

KEY, MAX_IMAGE = "edit-key", 16384


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    from conftest import free_port
    from ray import serve

    from serve.app import build_app
    from tessera.bundle import read_manifest

    uri = make_bundle(tmp_path_factory.mktemp("edit-serve-bundle"), seed=1)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"bundle": uri, "num_cpus": 0.5, "max_batch_size": 4, "api_keys": [KEY],
                             "max_image_bytes": MAX_IMAGE, "max_candidates": 8}),
                  name="tessera-edits", route_prefix="/")
        yield {"base": f"http://127.0.0.1:{port}", "bundle": uri, "name": read_manifest(uri)["name"]}
    finally:
        serve.shutdown()


def _png_array(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG" and img.size == (32, 32)
    return np.asarray(img.convert("RGB"))


@pytest.mark.integration
def test_edits_over_http_with_the_openai_client(app):
    import openai

    client = openai.OpenAI(base_url=f"{app['base']}/v1", api_key=KEY, max_retries=0, timeout=120)
    upload = encoded(noise(4, size=(48, 40), mode="RGBA"))  # any size, with alpha: fitted by the server

    def edit(image: bytes = upload, **extra):
        res = client.images.edit(image=("in.png", image, "image/png"), prompt="a small red circle", n=2,
                                 size="32x32", response_format="b64_json", model=app["name"],
                                 extra_body={"seed": 11, "keep_rows": 3, **extra})
        return [_png_array(d.b64_json) for d in res.data]

    first = edit()
    assert len(first) == 2 and not np.array_equal(first[0], first[1])
    # What the replica drew is the library's edit of the same upload (one torch thread each, as the
    # replica runs with num_cpus 0.5, so the arithmetic is the same).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = GenerationParams(n=2, seed=11, keep_rows=3, image=load_image(upload, 32))
        local = ImageGenerator(load_bundle(app["bundle"])).generate([("a small red circle", params)])[0]
    finally:
        torch.set_num_threads(threads)
    assert all(np.array_equal(a, b) for a, b in zip(first, local, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(edit(), first, strict=True))  # seeded: repeatable
    assert not np.array_equal(edit(encoded(noise(5)))[0], first[0])  # another image, another edit

    url = client.images.edit(image=("in.png", upload, "image/png"), prompt="a cat", response_format="url")
    assert requests.get(url.data[0].url, timeout=30).status_code == 200

    def refused(error, **kw):
        with pytest.raises(error) as e:
            client.images.edit(**{"image": ("in.png", upload, "image/png"), "prompt": "a", **kw})
        return e.value

    assert refused(openai.BadRequestError, mask=("m.png", upload, "image/png")).body["param"] == "mask"
    assert refused(openai.BadRequestError, image=("x.png", b"GIF89a not really", "image/png")).body["param"] \
        == "image"
    assert refused(openai.BadRequestError, extra_body={"keep_rows": 8}).body["param"] == "keep_rows"
    big = encoded(noise(6, size=(128, 128)))
    assert len(big) > MAX_IMAGE
    assert refused(openai.APIStatusError, image=("b.png", big, "image/png")).status_code == 413
    refused(openai.AuthenticationError, extra_headers={"Authorization": "Bearer wrong"})
    # The edit route is multipart; generations' JSON is a 415 here.
    r = requests.post(f"{app['base']}/v1/images/edits", json={"prompt": "a"},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    # Malformed multipart is the client's error, never the server's.
    part = b'--b\r\nContent-Disposition: form-data; name="%s"%s\r\n\r\n%s\r\n'
    for content_type, body, status in [
            ("multipart/form-data", b"no boundary", 400),
            ("multipart/form-data; boundary=b", b"garbage", 400),
            ("multipart/form-data; boundary=b", part % (b"prompt", b"", b"\xff\xfe") + b"--b--\r\n", 400),
            ("multipart/form-data; boundary=b", part % (b"image", b"", upload) + b"--b--\r\n", 400),
            ("multipart/form-data; boundary=b", b"".join(part % (b"f%d" % i, b"", b"x") for i in range(100))
             + b"--b--\r\n", 400),
            ("multipart/form-data; boundary=b", part % (b"prompt", b"", b"a") + part % (
                b"image", b'; filename="a.png"', upload) + b"--b--\r\n", 200)]:
        r = requests.post(f"{app['base']}/v1/images/edits", data=body, timeout=120,
                          headers={"Content-Type": content_type, "Authorization": f"Bearer {KEY}"})
        assert r.status_code == status, (r.status_code, r.text[:300], body[:80])


@pytest.mark.integration
def test_web_page_uploads_an_image_to_edit(app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve import _chromium

    path = tmp_path / "upload.png"
    path.write_bytes(encoded(noise(7)))
    driver = _chromium(tmp_path)
    try:
        driver.get(f"{app['base']}/")
        driver.find_element(By.ID, "prompt").send_keys("a large green triangle")
        n = driver.find_element(By.ID, "n")
        n.clear()
        n.send_keys("1")
        driver.find_element(By.ID, "seed").send_keys("3")
        driver.find_element(By.ID, "image").send_keys(str(path))
        driver.find_element(By.ID, "keepRows").send_keys("5")
        driver.find_element(By.ID, "apiKey").send_keys(KEY)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 90).until(lambda d: d.execute_script(
            "const i = document.querySelector('#images img'); return !!i && i.complete && i.naturalWidth > 0")
            or "error" in d.find_element(By.ID, "status").get_attribute("class"))
        assert "error" not in driver.find_element(By.ID, "status").get_attribute("class"), \
            driver.find_element(By.ID, "status").text
        src = driver.execute_script("return document.querySelector('#images img').src")
    finally:
        driver.quit()
    # The page sent an edit: the same image, seed and keep_rows through the API give the same PNG.
    with path.open("rb") as f:
        r = requests.post(f"{app['base']}/v1/images/edits", headers={"Authorization": f"Bearer {KEY}"},
                          files={"image": ("upload.png", f, "image/png")},
                          data={"prompt": "a large green triangle", "n": "1", "seed": "3", "keep_rows": "5",
                                "temperature": "1"}, timeout=120)
    assert r.status_code == 200, r.text
    assert src == "data:image/png;base64," + r.json()["data"][0]["b64_json"]


# --- jobs/generate.py --image ------------------------------------------------------------------

@pytest.mark.integration
def test_generate_job_edits_one_image_for_every_caption(tmp_path, generator, ray_cluster, s3_client, bucket,
                                                        monkeypatch):
    import sys

    from test_generate import _generate_job

    from tessera import storage
    from tessera.config import ConfigError, load_config
    from tessera.inference.batch_generate import caption_seed, load_edit_image

    image = encoded(noise(8, size=(40, 40)))
    s3_client.put_object(Bucket=bucket, Key="in/photo.png", Body=image)
    (tmp_path / "captions.txt").write_text("a red circle on the left\na blue square at the top\n")
    job = _generate_job()
    # --image sets generate.image_uri, as --bundle sets generate.bundle_uri.
    seen = []
    monkeypatch.setattr(sys, "argv", ["generate.py", "--image", f"s3://{bucket}/in/photo.png",
                                      "--set", "generate.keep_rows=2"])
    job.bundle_job_main(seen.append, section="generate", uri_flags={"image": "image_uri"})
    assert (seen[0].generate.image_uri, seen[0].generate.keep_rows) == (f"s3://{bucket}/in/photo.png", 2)

    cfg = load_config("debug", [f"run.root_uri={tmp_path}", f"generate.bundle_uri={generator.bundle.uri}",
                                f"generate.captions_uri={tmp_path / 'captions.txt'}",
                                f"generate.image_uri=s3://{bucket}/in/photo.png", "generate.keep_rows=2",
                                "generate.sampling.seed=4", "generate.actors.cpus_per_actor=1"])
    assert job.main(cfg) == 0
    out = cfg.paths.generated
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    assert manifest["edited_image"] == {"uri": f"s3://{bucket}/in/photo.png", "keep_rows": 2}
    index = [json.loads(line) for line in
             storage.read_bytes(storage.join(out, manifest["index"])).decode().splitlines()]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's actor (cpus_per_actor=1)
    try:
        for row in index:
            params = GenerationParams(seed=caption_seed(4, row["index"]), image=load_image(image, 32),
                                      keep_rows=2)
            [[want]] = generator.generate([(row["caption"], params)])
            got = np.asarray(Image.open(io.BytesIO(storage.read_bytes(storage.join(out, row["file"])))))
            assert np.array_equal(got, want), row
    finally:
        torch.set_num_threads(threads)

    # A file that is not an image, or too many rows kept, fails before Ray work with the field named.
    s3_client.put_object(Bucket=bucket, Key="in/notes.png", Body=b"hello")
    bad = cfg.model_copy(update={"generate": cfg.generate.model_copy(
        update={"image_uri": f"s3://{bucket}/in/notes.png"})})
    with pytest.raises(ValueError, match=r"generate.image_uri .*notes.png.*image: not an image"):
        load_edit_image(bad, {"resolution": 32, "parts": {"prior": {"shape": {"grid": 8}}}})
    assert job.main(bad) == 2
    with pytest.raises(ConfigError, match="keep_rows"):
        load_config("debug", ["generate.keep_rows=2"])
