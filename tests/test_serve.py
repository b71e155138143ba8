"""The Serve application over real HTTP on 127.0.0.1: one app (a real tiny bundle) for the module.

The generator runs with max_ongoing_requests=1 and max_queued_requests=3, so overload is easy to
provoke on purpose (the overload test runs last); the requests before it are sequential, so those
limits never bite them. Tests that need other arguments deploy a second app beside it (_extra_app)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import requests
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytestmark = pytest.mark.integration

ARG_KEY, ENV_KEY = "arg-key-1", "env-key-2"
MAX_BODY = 16384
# request_timeout_s: several times a light request (~0.1-0.4 s), below 3 heavy ones (~0.8 s each)
TIMEOUT_S = 1.5
MAX_CANDIDATES_OVERLOAD = 512  # the overload test scales its heavy request up to this many draws
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Served:
    base: str
    name: str
    resolution: int
    has_reranker: bool
    bundle: str = ""

    def post(self, body, *, key: str | None = ARG_KEY, headers: dict | None = None, raw: bytes | None = None,
             timeout: float = 120):
        h = {"Content-Type": "application/json"}
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        h.update(headers or {})
        data = raw if raw is not None else json.dumps(body).encode()
        return requests.post(f"{self.base}/v1/images/generations", data=data, headers=h, timeout=timeout)


def assert_error(r: requests.Response, status: int, *, param: str | None = None,
                 code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
            and err["message"])
    assert isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def png_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.mode == "RGB"
    return img.size


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    from bundles import make_bundle
    from ray import serve

    from serve.app import build_app

    uri = make_bundle(tmp_path_factory.mktemp("serve-bundle"), seed=0)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_API_KEYS", ENV_KEY)
        application = build_app({
            "bundle": uri, "num_cpus": 0.5, "max_batch_size": 4, "batch_wait_timeout_s": 0.02,
            "min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 3,
            "request_timeout_s": TIMEOUT_S, "api_keys": [ARG_KEY], "max_body_bytes": MAX_BODY,
            "max_prompt_chars": 200, "max_candidates": 64})
    try:
        serve.run(application, name="tessera-test", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        from tessera.bundle import read_manifest

        manifest = read_manifest(uri)
        served = Served(base=base, name=manifest["name"], resolution=manifest["resolution"],
                        has_reranker=manifest["has_reranker"], bundle=uri)
        # The first call pays for the handle's first routing and torch's first run; keep that out
        # of the tests' short request timeout.
        deadline = time.time() + 60
        while served.post({"prompt": "warm up", "seed": 0}).status_code != 200 and time.time() < deadline:
            time.sleep(0.5)
        yield served
    finally:
        serve.shutdown()


def test_b64_json_returns_n_pngs_of_the_model_resolution(app):
    before = int(time.time())
    r = app.post({"prompt": "a small red circle", "n": 3, "seed": 1,
                  "size": f"{app.resolution}x{app.resolution}",
                  "model": app.name, "user": "tester", "quality": "standard", "style": "natural"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"created", "data"} and before <= out["created"] <= time.time() + 1
    assert len(out["data"]) == 3
    for item in out["data"]:
        assert set(item) == {"b64_json"}
        assert png_size(base64.b64decode(item["b64_json"])) == (app.resolution, app.resolution)


def test_same_seed_same_image_different_seed_different(app):
    def images(seed):
        r = app.post({"prompt": "a large blue square", "seed": seed, "n": 1})
        assert r.status_code == 200, r.text
        return r.json()["data"][0]["b64_json"]

    first = images(123)
    assert images(123) == first
    assert images(124) != first


def test_url_format_serves_the_pngs_from_the_ingress(app):
    r = app.post({"prompt": "a green triangle", "n": 2, "seed": 5, "response_format": "url"})
    assert r.status_code == 200, r.text
    urls = [d["url"] for d in r.json()["data"]]
    assert len(set(urls)) == 2
    for url in urls:
        assert url.startswith(f"{app.base}/v1/images/files/") and url.endswith(".png")
        got = requests.get(url, timeout=30)  # no key: the unguessable URL is the capability
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert png_size(got.content) == (app.resolution, app.resolution)
    # The same seed as b64_json gives the same bytes as the file.
    b64 = app.post({"prompt": "a green triangle", "n": 2, "seed": 5}).json()["data"]
    assert base64.b64decode(b64[0]["b64_json"]) == requests.get(urls[0], timeout=30).content
    assert_error(requests.get(f"{app.base}/v1/images/files/nope.png", timeout=30), 404, code="not_found")


def test_official_openai_client(app):
    import openai

    client = openai.OpenAI(base_url=f"{app.base}/v1", api_key=ENV_KEY, max_retries=0)
    res = client.images.generate(prompt="a yellow diamond", n=2, size=f"{app.resolution}x{app.resolution}",
                                 response_format="b64_json", model=app.name, quality="hd", style="vivid",
                                 user="someone", extra_body={"seed": 3, "temperature": 0.9, "top_k": 50})
    assert len(res.data) == 2 and isinstance(res.created, int)
    assert png_size(base64.b64decode(res.data[0].b64_json)) == (app.resolution, app.resolution)
    url_res = client.images.generate(prompt="a yellow diamond", response_format="url")
    assert requests.get(url_res.data[0].url, timeout=30).status_code == 200
    assert [m.id for m in client.models.list().data] == [app.name]

    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="x", n=11)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(prompt="x", size="1024x1024")
    assert size.value.body["param"] == "size"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{app.base}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(prompt="x", model="dall-e-3")
    assert missing.value.body["code"] == "model_not_found"


def test_api_keys(app):
    body = {"prompt": "a circle", "seed": 0}
    assert_error(app.post(body, key=None), 401, code="invalid_api_key")
    assert_error(app.post(body, key="wrong"), 401, code="invalid_api_key")
    assert_error(app.post(body, key=None, headers={"Authorization": f"Basic {ARG_KEY}"}), 401)
    assert app.post(body, key=ARG_KEY).status_code == 200
    assert app.post(body, key=ENV_KEY).status_code == 200  # from $TESSERA_API_KEYS
    assert_error(requests.get(f"{app.base}/v1/models", timeout=30), 401)
    models = requests.get(f"{app.base}/v1/models", headers={"Authorization": f"Bearer {ARG_KEY}"},
                          timeout=30).json()
    assert models["object"] == "list"
    assert models["data"] == [{"id": app.name, "object": "model", "created": models["data"][0]["created"],
                               "owned_by": "tessera"}]
    # One model: OpenAI's object plus the bundle's card summary (this test bundle has no README.md
    # card, so the summary comes from its manifest).
    one = requests.get(f"{app.base}/v1/models/{app.name}", headers={"Authorization": f"Bearer {ARG_KEY}"},
                       timeout=30).json()
    assert one["id"] == app.name and one["object"] == "model"
    card = one["card"]
    assert card["name"] == app.name and card["card"] is False and card["resolution"] == app.resolution
    assert {"dvae", "prior", "reranker"} <= set(card["parts"])
    assert not any(str(v).startswith(("/", "file:", "s3:")) for v in card.values())  # no URIs
    assert requests.get(f"{app.base}/healthz", timeout=30).json()["status"] == "ok"


def test_error_statuses_and_shapes(app):
    assert_error(app.post(None, raw=b'{"prompt": "a",'), 400, code="invalid_json")
    assert_error(app.post({"prompt": "a", "n": 0}), 400, param="n")
    assert_error(app.post({"prompt": "a", "colour": "red"}), 400, param="colour", code="unknown_parameter")
    assert_error(app.post({"prompt": "a", "n": "2"}), 400, param="n")
    assert_error(app.post({"prompt": ""}), 400, param="prompt")
    assert_error(app.post({"prompt": "a", "model": "dall-e-2"}), 404, param="model", code="model_not_found")
    assert_error(requests.get(f"{app.base}/v1/nothing-here", timeout=30), 404)
    assert_error(requests.get(f"{app.base}/v1/images/generations", timeout=30), 405)
    assert_error(app.post(None, raw=b"prompt=a",
                          headers={"Content-Type": "application/x-www-form-urlencoded"}), 415)
    # Too large: by Content-Length, and for a chunked body with no length, while reading.
    big = json.dumps({"prompt": "a", "user": "x" * MAX_BODY}).encode()
    assert_error(app.post(None, raw=big), 413, code="request_too_large")
    r = requests.post(f"{app.base}/v1/images/generations",
                      data=(big[i:i + 1000] for i in range(0, len(big), 1000)),
                      headers={"Content-Type": "application/json", "Authorization": f"Bearer {ARG_KEY}"},
                      timeout=60)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert_error(r, 413, code="request_too_large")
    if not app.has_reranker:
        assert_error(app.post({"prompt": "a", "candidates": 2}), 400, param="candidates")


def test_web_page_is_self_contained_and_generates_in_a_browser(app, tmp_path):
    import re

    page = requests.get(f"{app.base}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.I), (
        "the page refers to an external URL")
    # One script, this server's /app.js (the CSP runs no inline script), and nothing external in it.
    assert re.findall(r"<script\b[^>]*\bsrc=\"([^\"]*)\"", html) == ["/app.js"]
    assert "<link" not in html and "@import" not in html
    assert not re.search(r"https?://", requests.get(f"{app.base}/app.js", timeout=30).text)

    driver = _chromium(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(f"{app.base}/")
        driver.find_element(By.ID, "prompt").send_keys("a small red circle above a large blue square")
        n = driver.find_element(By.ID, "n")
        n.clear()
        n.send_keys("2")
        driver.find_element(By.ID, "apiKey").send_keys(ARG_KEY)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 90).until(lambda d: d.execute_script(
            "const imgs = [...document.querySelectorAll('#images img')];"
            "return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0);"))
        widths = driver.execute_script("return [...document.querySelectorAll('#images img')]"
                                       ".map(i => [i.naturalWidth, i.naturalHeight, i.src.slice(0, 22)])")
        assert widths == [[app.resolution, app.resolution, "data:image/png;base64,"]] * 2
        assert "error" not in driver.find_element(By.ID, "status").get_attribute("class")
    finally:
        driver.quit()


def _chromium(tmp_path):
    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -r requirements/dev.txt)")
    if missing:
        pytest.skip(f"browser test needs {', '.join(missing)}; "
                    "install with `apt-get install chromium chromium-driver`")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def test_page_headers_and_no_inline_script(app):
    page = requests.get(f"{app.base}/", timeout=30)
    directives = [d.split() for d in page.headers["Content-Security-Policy"].split(";") if d.strip()]
    csp = {d[0]: d[1:] for d in directives}
    assert csp["script-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in csp["default-src"] + csp["script-src"]
    # Every <script> without src is a JSON data block, which no browser runs.
    for attrs, body in re.findall(r"<script\b([^>]*)>(.*?)</script>", page.text, re.S):
        assert "src=" in attrs and not body.strip() or 'type="application/json"' in attrs, attrs
    config = re.search(r'<script id="tessera-config" type="application/json">(.*?)</script>', page.text, re.S)
    assert json.loads(config[1])["model"] == app.name
    js = requests.get(f"{app.base}/app.js", timeout=30)
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert js.text == (ROOT / "serve/app.js").read_text() and "tessera-config" in js.text
    error = requests.get(f"{app.base}/v1/nothing-here", timeout=30)
    for r in (page, js, error, requests.get(f"{app.base}/healthz", timeout=30)):
        assert r.headers["X-Content-Type-Options"] == "nosniff", r.url


def test_a_body_without_content_type_is_refused(app):
    url = f"{app.base}/v1/images/generations"
    for body in (b"prompt=a red circle", json.dumps({"prompt": "a red circle"}).encode()):
        r = requests.post(url, data=body, headers={"Authorization": f"Bearer {ARG_KEY}"}, timeout=30)
        assert "Content-Type" not in r.request.headers
        err = assert_error(r, 415, code="unsupported_media_type")
        assert "Content-Type" in err["message"]


def test_other_host_names_are_refused(app):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: refused before routing or auth."""
    port = app.base.rsplit(":", 1)[1]
    rebind = {"Host": f"rebind.example:{port}"}
    for path in ("/", "/healthz", "/app.js", "/v1/nothing-here"):
        err = assert_error(requests.get(f"{app.base}{path}", headers=rebind, timeout=30), 400,
                           code="host_not_allowed")
        assert "rebind.example" in err["message"] and "allowed_hosts" in err["message"]
    assert_error(app.post({"prompt": "a", "seed": 0}, headers=rebind), 400, code="host_not_allowed")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert requests.get(f"{app.base}/healthz", headers={"Host": host}, timeout=30).status_code == 200


def test_one_caller_cannot_take_every_slot(app):
    """max_requests_per_client=1: while a request with one key is in flight, that key's next request
    is refused at once (429, Retry-After), another key's is served, and the slot comes back."""
    served = _extra_app(app, "fair", max_requests_per_client=1, api_keys=[ARG_KEY, ENV_KEY],
                        max_candidates=MAX_CANDIDATES_OVERLOAD)
    # Seconds on this machine's CPU (the overload test's heavy request), so it is still in flight
    # when the probe comes.
    heavy = {"prompt": "a busy picture", "n": 10, "guidance_scale": 3.0, "seed": 11,
             "candidates": MAX_CANDIDATES_OVERLOAD}
    results: dict[str, requests.Response] = {}
    try:
        for _ in range(3):  # a retry only if the probe reached the ingress before the heavy request
            results.clear()
            first = threading.Thread(target=lambda: results.update(first=served.post(heavy)))
            first.start()
            time.sleep(0.3)
            probe = served.post({"prompt": "a dot", "seed": 1}, timeout=60)
            # Sent while the first request still holds ARG_KEY's slot.
            other = threading.Thread(target=lambda: results.update(
                other=served.post({"prompt": "a dot", "seed": 2}, key=ENV_KEY)))
            other.start()
            first.join(timeout=120)
            other.join(timeout=120)
            if results["first"].status_code != 429:
                break
        err = assert_error(probe, 429, code="too_many_requests_in_flight")
        assert err["type"] == "rate_limit_error" and probe.headers.get("Retry-After") == "1"
        assert results["first"].status_code == 200 and results["other"].status_code == 200, results
        assert served.post({"prompt": "a dot", "seed": 1}).status_code == 200  # the slot was given back
    finally:
        from ray import serve

        serve.delete("fair")


def _extra_app(app: Served, name: str, **overrides) -> Served:
    """Another app beside the module's, at /{name}, with the module app's arguments but `overrides`."""
    from ray import serve

    from serve.app import build_app

    args = {"bundle": app.bundle, "num_cpus": 0.5, "max_batch_size": 4, "batch_wait_timeout_s": 0.02,
            "min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 8,
            "request_timeout_s": 120, "api_keys": [ARG_KEY], "max_candidates": 64, **overrides}
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return replace(app, base=f"{app.base}/{name}", bundle=args["bundle"])


def _serve_logs() -> str:
    """Everything Serve's controller and replicas have logged in this Ray session."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "\n".join(p.read_text(errors="replace") for p in sorted(logs.glob("*.log")))


def test_an_added_replica_refuses_a_bundle_overwritten_since_the_app_was_built(app, tmp_path):
    """Overwrite the bundle while the app runs, load it until the autoscaler adds a replica: the new
    replica refuses the other weights with a log line naming both digests, and the app keeps
    serving the pinned ones from the replica it had."""
    from bundles import make_bundle
    from ray import serve

    from serve.generator import manifest_digest
    from tessera.bundle import read_manifest

    uri = make_bundle(tmp_path / "pinned", seed=0)
    pinned = manifest_digest(read_manifest(uri))
    served = _extra_app(app, "pinned", bundle=uri, num_cpus=0.25, max_replicas=2, initial_replicas=1,
                        target_ongoing_requests=1, upscale_delay_s=0, look_back_period_s=0.5,
                        metrics_interval_s=0.2, max_requests_per_client=64, max_queued_requests=64)
    try:
        assert requests.get(f"{served.base}/healthz", timeout=30).json()["bundle_sha256"] == pinned
        probe = {"prompt": "a small red circle", "seed": 7}
        before = served.post(probe).json()["data"][0]["b64_json"]
        make_bundle(tmp_path / "pinned", seed=1)  # other weights, same URI, same model name
        changed = manifest_digest(read_manifest(uri))
        assert changed != pinned
        refusal = re.compile(rf"refusing to serve bundle {re.escape(uri)}: its manifest has sha256 "
                             rf"{changed[:16]}, but this application was built with {pinned[:16]}")
        statuses, stop = [], threading.Event()

        def load():
            while not stop.is_set():
                r = served.post({"prompt": "a busy picture", "n": 4, "candidates": 16})
                statuses.append(r.status_code)

        clients = [threading.Thread(target=load) for _ in range(4)]
        for c in clients:
            c.start()
        deadline = time.time() + 120
        while not refusal.search(_serve_logs()) and time.time() < deadline:
            time.sleep(1)
        stop.set()
        for c in clients:
            c.join(timeout=120)
        assert refusal.search(_serve_logs()), "no replica refused the overwritten bundle"
        assert statuses and set(statuses) == {200}, statuses
        assert served.post(probe).json()["data"][0]["b64_json"] == before  # still the pinned weights
        generator = serve.status().applications["pinned"].deployments["ImageGenerator"]
        assert generator.replica_states.get("RUNNING") == 1, generator
    finally:
        serve.delete("pinned")


def _scrape(application: str) -> dict[tuple[str, str], float]:
    """tessera's series on this node's Prometheus endpoint (Ray's metrics export port) for one app:
    {(sample name, outcome tag): value}, summed over replicas and routes, histogram buckets left out."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    text = requests.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=30).text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name.startswith("ray_tessera_") and sample.labels.get("application") == application
                    and "le" not in sample.labels):
                key = (sample.name, sample.labels.get("outcome", ""))
                out[key] = out.get(key, 0) + sample.value
    return out


def test_serving_metrics_are_exported_on_the_nodes_prometheus_endpoint(app):
    served = _extra_app(app, "metered")
    try:
        assert served.post({"prompt": "a red circle", "n": 2, "candidates": 5, "seed": 1}).status_code == 200
        assert served.post({"prompt": "a blue square", "seed": 2}).status_code == 200
        assert_error(served.post({"prompt": "a", "n": 0}), 400, code="invalid_value")
        assert_error(served.post({"prompt": "a"}, key="wrong"), 401, code="invalid_api_key")
        expected = {
            ("ray_tessera_images_generated_total", ""): 3,  # n = 2 + 1
            ("ray_tessera_candidates_drawn_total", ""): 6,  # candidates = 5 + 1
            ("ray_tessera_request_latency_s_count", "ok"): 2,
            ("ray_tessera_request_latency_s_count", "invalid_value"): 1,
            ("ray_tessera_request_latency_s_count", "invalid_api_key"): 1,
            ("ray_tessera_queue_depth", ""): 0,  # nothing waiting any more
        }
        # Ray's metrics agent exports what the replicas report, every few seconds.
        deadline, got = time.time() + 60, _scrape("metered")
        while {k: got.get(k) for k in expected} != expected:
            assert time.time() < deadline, got
            time.sleep(1)
            got = _scrape("metered")
        assert got[("ray_tessera_request_latency_s_sum", "ok")] > 0
    finally:
        from ray import serve

        serve.delete("metered")


_FIELDS = ["prompt", "model", "n", "size", "response_format", "user", "quality", "style", "background",
           "stream", "output_format", "output_compression", "partial_images", "seed", "temperature", "top_k",
           "top_p", "guidance_scale", "candidates", "no_such_field", "", "n "]
_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 20), st.sampled_from([2**31, 2**63, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", "32x32", "auto", "url", "b64_json", "hd", "dall-e-3", "png", "\ud800", "💥" * 3]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@st.composite
def _dict_bodies(draw):
    body = {"prompt": "a red square", "n": 1}
    for name in draw(st.lists(st.sampled_from(_FIELDS), min_size=1, max_size=3, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(_values)
    return json.dumps(body, allow_nan=True).encode()


_bodies = st.one_of(
    _dict_bodies(), _dict_bodies(), _dict_bodies(),
    st.binary(max_size=64),
    st.builds(lambda v: json.dumps(v, allow_nan=True).encode(), _values),
    st.sampled_from([b"[" * 100000, b"{" * 3000, b'{"prompt": "a"' + b" " * (MAX_BODY + 10) + b"}",
                     b'{"prompt": "a"}' + b"\x00", b'\xef\xbb\xbf{"prompt": 1}',
                     "{\"prompt\": \"\u00e9\"}".encode("latin-1")]),
)
_content_types = st.sampled_from([None, "application/json", "application/json; charset=utf-8", "text/plain",
                                  "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""])
_keys = st.sampled_from([ARG_KEY, ARG_KEY, ARG_KEY, None, "wrong", ""])


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_bodies, content_type=_content_types, key=_keys)
def test_malformed_requests_never_get_a_5xx(app, body, content_type, key):
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    r = requests.post(f"{app.base}/v1/images/generations", data=body, headers=headers, timeout=120)
    assert r.status_code < 500, (r.status_code, r.text[:300], body[:200])
    if r.status_code >= 400:
        assert_error(r, r.status_code)
    else:
        assert r.status_code == 200 and r.json()["data"]


def _one_replica_app(app: Served, timeout_s: float) -> Served:
    """The same bundle as a second app at /overload: one replica taking one request at a time,
    three more queued, and `timeout_s` per request (redeployed in place on a second call)."""
    from ray import serve

    from serve.app import build_app

    application = build_app({
        "bundle": app.bundle, "num_cpus": 0.5, "max_batch_size": 4, "batch_wait_timeout_s": 0.02,
        "min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 3,
        "request_timeout_s": timeout_s, "api_keys": [ARG_KEY], "max_candidates": MAX_CANDIDATES_OVERLOAD,
        "max_requests_per_client": 16})  # all its requests come from one caller
    serve.run(application, name="tessera-overload", route_prefix="/overload")
    return replace(app, base=f"{app.base}/overload")


def test_overload_answers_429_when_the_queue_is_full_and_503_past_the_timeout(app):
    """One request runs on the replica (max_ongoing_requests=1) and three heavy ones queue behind it
    (max_queued_requests=3): a further request is refused at once with 429, and the last queued ones
    cannot finish within request_timeout_s, set to 2.5 heavy requests as this machine runs them
    (timed first on the same app with a long timeout), so they get 503."""
    from ray import serve

    heavy = {"prompt": "a busy picture", "n": 10, "guidance_scale": 3.0}
    timing = _one_replica_app(app, 120.0)
    try:
        assert timing.post({**heavy, "seed": 100}).status_code == 200  # warm-up
        heavy_s = _time(timing, heavy, 101)
        # The test's model is tiny: draw more candidates until a heavy request takes ~2 s, so the
        # order in which requests reach the queue does not hang on 0.1 s gaps.
        while app.has_reranker and heavy_s < 2.0 and heavy.get("candidates", 10) < MAX_CANDIDATES_OVERLOAD:
            heavy["candidates"] = min(MAX_CANDIDATES_OVERLOAD, 2 * heavy.get("candidates", 10))
            heavy_s = _time(timing, heavy, 102)
        over = _one_replica_app(app, round(2.5 * heavy_s, 3))
        _overload(over, heavy, heavy_s)
    finally:
        serve.delete("tessera-overload")


def _time(app: Served, body: dict, seed: int) -> float:
    started = time.time()
    r = app.post({**body, "seed": seed})
    assert r.status_code == 200, r.text
    return time.time() - started


def _overload(app: Served, heavy: dict, heavy_s: float) -> None:
    results: dict[int, requests.Response] = {}

    def send(i):
        results[i] = app.post({**heavy, "seed": i})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:  # spaced so each is running or queued before the next arrives
        t.start()
        time.sleep(0.1)
    time.sleep(0.3)
    # A probe must never wait in the queue itself: one that got in ahead of a heavy request (a slow
    # proxy on a busy machine) would block this loop until the heavy ones had timed out. So each
    # probe gives up after a short wait (the proxy cancels it) and the next one is sent.
    rejected, probes = [], 0
    while any(t.is_alive() for t in threads[1:]) and not rejected:
        probes += 1
        try:
            r = app.post({"prompt": "a dot", "seed": 1}, timeout=max(1.0, heavy_s / 4))
        except requests.Timeout:
            continue
        if r.status_code == 429:
            rejected.append(r)
        time.sleep(0.02)
    assert rejected, (f"the queue was full but none of {probes} probes was refused; heavy requests: "
                      f"{ {i: r.status_code for i, r in results.items()} }")
    err = assert_error(rejected[0], 429, code="queue_full")
    assert err["type"] == "rate_limit_error" and rejected[0].headers.get("Retry-After") == "1"
    for t in threads:
        t.join(timeout=120)
    statuses = [results[i].status_code for i in range(4)]
    assert statuses[0] == 200 and set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, statuses
    timed_out = next(results[i] for i in range(4) if statuses[i] == 503)
    err = assert_error(timed_out, 503, code="timeout")
    assert err["type"] == "server_error" and timed_out.headers.get("Retry-After")
    # The replica finishes the work it had started, then serves again.
    deadline = time.time() + 60
    while (r := app.post({"prompt": "a dot", "seed": 1})).status_code != 200 and time.time() < deadline:
        time.sleep(0.5)
    assert r.status_code == 200, r.text
