"""The Serve application's arguments, its config YAML, and the HTTP contract's parsing, without Ray.

The application over real HTTP is tests/test_serve.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from serve.api import ApiError, Limits, check_content_type, generation_kwargs, parse_request
from serve.args import AppArgs, auth_state, host_allowed, parse_args
from serve.images import ImageStore
from tessera.viz import png_bytes

ROOT = Path(__file__).resolve().parents[1]
LIMITS = Limits(model_name="m", resolution=32, has_reranker=True, max_prompt_chars=50, max_n=10,
                max_candidates=16)


def test_config_yaml_is_a_valid_serve_deploy_config_with_valid_app_args():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    args = parse_args(app.args, environ={})
    assert args.bundle == "runs/demo/bundle"
    assert args.max_replicas >= args.min_replicas and args.max_queued_requests >= 0


@pytest.mark.parametrize("bad, field", [
    ({}, "bundle"),
    ({"bundle": "b", "max_replica": 2}, "max_replica"),
    ({"bundle": "b", "device": "tpu"}, "device"),
    ({"bundle": "b", "num_cpus": -1}, "num_cpus"),
    ({"bundle": "b", "max_batch_size": 0}, "max_batch_size"),
    ({"bundle": "b", "min_replicas": 3, "max_replicas": 2}, "max_replicas"),
    ({"bundle": "b", "initial_replicas": 5, "max_replicas": 2}, "initial_replicas"),
    ({"bundle": "b", "device": "cuda"}, "num_gpus"),
    ({"bundle": "b", "public_url": "ftp://x"}, "public_url"),
    ({"bundle": "b", "api_keys": ["has space"]}, "api_keys"),
    ({"bundle": "b", "max_queued_requests": -2}, "max_queued_requests"),
    ({"bundle": "b", "request_timeout_s": 0}, "request_timeout_s"),
    ({"bundle": "b", "max_requests_per_client": 0}, "max_requests_per_client"),
    ({"bundle": "b", "allowed_hosts": "https://images.example.com"}, "allowed_hosts"),
    ({"bundle": "b", "allowed_hosts": ["127.0.0.1:8000"]}, "allowed_hosts"),
    ({"bundle": "b", "allowed_hosts": []}, "allowed_hosts"),
])
def test_build_app_refuses_bad_args_naming_the_field(bad, field):
    from serve.app import build_app

    with pytest.raises(ValueError, match=field) as info:
        build_app(bad)
    assert "invalid tessera serve arguments" in str(info.value)


def test_cli_strings_are_parsed_and_keys_merge_with_the_environment():
    # `serve run serve.app:build_app max_replicas=2 api_keys=a,b` passes every value as a string.
    args = parse_args({"bundle": "b", "max_replicas": "2", "num_cpus": "0.5", "api_keys": "a, b"},
                      environ={"TESSERA_API_KEYS": "c,,a"})
    assert args.max_replicas == 2 and args.num_cpus == 0.5
    assert args.api_keys == ["a", "b", "c"]
    assert parse_args({"bundle": "b"}, environ={}).api_keys == []
    with pytest.raises(ValueError, match="TESSERA_API_KEYS"):
        parse_args({"bundle": "b"}, environ={"TESSERA_API_KEYS": "good, has space"})
    cfg = args.autoscaling_config()
    assert cfg["max_replicas"] == 2 and "initial_replicas" not in cfg


def test_build_app_reads_the_bundle_manifest_and_names_a_missing_bundle(tmp_path):
    from bundles import make_bundle
    from ray.serve import Application

    from serve.app import build_app
    from tessera.bundle import BundleError

    uri = make_bundle(tmp_path / "b")
    assert isinstance(build_app({"bundle": uri, "max_replicas": 2, "public_url": "https://a.example/"}),
                      Application)
    assert AppArgs(bundle="b", public_url="https://a.example/").public_url == "https://a.example"
    with pytest.raises(BundleError, match="no-such-bundle"):
        build_app({"bundle": str(tmp_path / "no-such-bundle")})


def test_limits_agree_with_the_sampling_library():
    from serve.api import MAX_SEED as API_MAX_SEED
    from tessera.sampling.generate import MAX_SEED, GenerationParams

    assert API_MAX_SEED == MAX_SEED
    # The largest request the API lets through, the library accepts.
    req = parse_request(json.dumps({"prompt": "a", "n": 10, "seed": MAX_SEED, "temperature": 10, "top_p": 1,
                                    "guidance_scale": 100, "candidates": 16}).encode(), LIMITS)
    GenerationParams(**generation_kwargs(req)).validate(max_n=10, max_candidates=16)
    with pytest.raises(ValueError, match="max_n"):
        parse_args({"bundle": "b", "max_n": 11}, environ={})
    with pytest.raises(ValueError, match="max_candidates"):
        parse_args({"bundle": "b", "max_candidates": 513}, environ={})


def _err(body, limits=LIMITS) -> ApiError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(ApiError) as info:
        parse_request(raw, limits)
    return info.value


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"", 400, None, "invalid_json"),
    (b'{"prompt": NaN}', 400, None, "invalid_json"),
    (b"\xff\xfe\x00", 400, None, "invalid_json"),
    (b"[" * 500 + b"]" * 500, 400, None, "invalid_type"),
    (b"[" * 200000, 400, None, "invalid_json"),
    ([1, 2], 400, None, "invalid_type"),
    ({}, 400, "prompt", "missing_required_parameter"),
    ({"prompt": "a", "colour": "red"}, 400, "colour", "unknown_parameter"),
    ({"prompt": 3}, 400, "prompt", "invalid_value"),
    ({"prompt": "   "}, 400, "prompt", "invalid_value"),
    ({"prompt": "x" * 51}, 400, "prompt", "invalid_value"),
    ({"prompt": "\ud800"}, 400, "prompt", "invalid_value"),
    ({"prompt": "a", "n": 0}, 400, "n", "invalid_value"),
    ({"prompt": "a", "n": 11}, 400, "n", "invalid_value"),
    ({"prompt": "a", "n": "2"}, 400, "n", "invalid_value"),
    ({"prompt": "a", "n": True}, 400, "n", "invalid_value"),
    ({"prompt": "a", "size": "1024x1024"}, 400, "size", "invalid_value"),
    ({"prompt": "a", "model": "dall-e-3"}, 404, "model", "model_not_found"),
    ({"prompt": "a", "response_format": "jpeg"}, 400, "response_format", "invalid_value"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature", "invalid_value"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"prompt": "a", "seed": -1}, 400, "seed", "invalid_value"),
    ({"prompt": "a", "stream": True}, 400, "stream", "invalid_value"),
    ({"prompt": "a", "background": "transparent"}, 400, "background", "invalid_value"),
    ({"prompt": "a", "n": 4, "candidates": 3}, 400, "candidates", "invalid_value"),
    ({"prompt": "a", "candidates": 17}, 400, "candidates", "invalid_value"),
])
def test_bad_requests_name_the_field(body, status, param, code):
    e = _err(body)
    assert (e.status, e.param, e.code) == (status, param, code), e.message
    assert e.response().status_code == status


def test_candidates_need_a_reranker_and_good_requests_map_to_generation_fields():
    no_reranker = Limits(**{**LIMITS.__dict__, "has_reranker": False})
    assert _err({"prompt": "a", "candidates": 2}, no_reranker).param == "candidates"
    req = parse_request(json.dumps({"prompt": "a", "n": 2, "size": "32x32", "quality": "hd", "style": "vivid",
                                    "user": "u", "seed": 7, "top_k": 5, "candidates": 4}).encode(), LIMITS)
    assert generation_kwargs(req) == {"n": 2, "seed": 7, "top_k": 5, "candidates": 4}
    assert generation_kwargs(parse_request(b'{"prompt": "a", "size": "auto"}', LIMITS)) == {"n": 1}


def test_content_type_must_be_json_and_present():
    check_content_type("application/json; charset=utf-8")
    for bad in ("text/plain", None, ""):
        with pytest.raises(ApiError) as info:
            check_content_type(bad)
        assert info.value.status == 415 and info.value.code == "unsupported_media_type"
    with pytest.raises(ApiError, match="Content-Type is missing"):
        check_content_type(None)


def test_auth_state_fails_closed_off_loopback_and_never_shows_a_key():
    keys = AppArgs(bundle="b", api_keys=["secret-key-1", "secret-key-2"])
    for host in ("0.0.0.0", "127.0.0.1", None):
        state = auth_state(keys, host)
        assert "keys configured: 2" in state and "secret-key" not in state
    anonymous = AppArgs(bundle="b")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", None):
        assert auth_state(anonymous, host).startswith("anonymous on loopback"), host
    for host in ("0.0.0.0", "::", "10.1.2.3", "my-host.internal"):
        with pytest.raises(ValueError, match="refusing to serve without API keys") as info:
            auth_state(anonymous, host)
        assert all(w in str(info.value) for w in (host, "http_options.host", "api_keys", "TESSERA_API_KEYS",
                                                  "allow_anonymous"))
    chosen = AppArgs(bundle="b", allow_anonymous=True)
    assert auth_state(chosen, "0.0.0.0").startswith("anonymous by explicit choice")
    # The CLI's strings: `allow_anonymous=true`.
    assert parse_args({"bundle": "b", "allow_anonymous": "true"}, environ={}).allow_anonymous is True


def test_host_allow_list():
    default = AppArgs(bundle="b").allowed_hosts
    assert default == ["localhost", "127.0.0.1", "::1"]
    for ok in ("127.0.0.1:8000", "localhost", "LOCALHOST:80", "[::1]:8000", "localhost."):
        assert host_allowed(ok, default), ok
    # A DNS-rebinding page sends its own name; a missing Host is refused too.
    for bad in ("evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example", "", None,
                "[::2]:80"):
        assert not host_allowed(bad, default), bad
    listed = parse_args({"bundle": "b", "allowed_hosts": "images.example.com, *.corp.example, [::1]"},
                        environ={}).allowed_hosts
    assert listed == ["images.example.com", "*.corp.example", "::1"]
    assert host_allowed("images.example.com:443", listed) and host_allowed("a.b.corp.example", listed)
    assert not host_allowed("corp.example", listed) and not host_allowed("evilcorp.example", listed)
    assert host_allowed("anything:1", ["*"]) and host_allowed(None, ["*"])


def test_manifest_pinning_names_the_bundle_and_both_digests():
    from serve.generator import check_pinned, manifest_digest

    manifest = {"name": "m", "files": {"prior.safetensors": {"sha256": "aa"}}, "created": 1}
    digest = manifest_digest(manifest)
    # The content, not the key order or formatting, decides.
    assert digest == manifest_digest(json.loads(json.dumps(dict(reversed(manifest.items())), indent=2)))
    check_pinned(manifest, uri="s3://b/bundle", pinned=digest)
    changed = {**manifest, "files": {"prior.safetensors": {"sha256": "bb"}}}
    with pytest.raises(RuntimeError, match="refusing to serve bundle s3://b/bundle") as info:
        check_pinned(changed, uri="s3://b/bundle", pinned=digest)
    assert digest[:16] in str(info.value) and manifest_digest(changed)[:16] in str(info.value)
    assert "'m'" in str(info.value)


def test_png_encoding_round_trips():
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(png_bytes(img))))
    np.testing.assert_array_equal(back, img)
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(img.astype(np.float32))


def test_image_store_expires_by_age_and_evicts_oldest_past_the_byte_bound():
    now = [0.0]
    store = ImageStore(max_bytes=25, ttl_s=10, clock=lambda: now[0])
    a = store.put(b"a" * 10)
    now[0] = 5
    b = store.put(b"b" * 10)
    assert store.get(a) == b"a" * 10 and len(a) >= 20 and a != b
    now[0] = 6
    c = store.put(b"c" * 10)  # 30 bytes > 25: the oldest goes
    assert store.get(a) is None and store.get(b) and store.get(c) and store.nbytes == 20
    now[0] = 15.5  # b is 10.5 s old
    assert store.get(b) is None and store.get(c) == b"c" * 10
    now[0] = 100
    assert store.get(c) is None and len(store) == 0 and store.nbytes == 0
