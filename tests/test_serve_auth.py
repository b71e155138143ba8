"""The app fails closed: on a non-loopback HTTP host it refuses to start without API keys unless
allow_anonymous is set, and its startup log states the auth mode without ever showing a key.

Serve's HTTP options are fixed when Serve starts, so this module runs its own Serve instance with
http_options.host 0.0.0.0 and the proxy disabled: the ingress reads the host from the controller as
it would on a cluster, and nothing listens on any interface."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.integration

# Keys that appear nowhere else, so finding them in a log can only mean this app logged them.
ARG_KEY, ENV_KEY = "auth-test-arg-key-6f1d", "auth-test-env-key-93ab"


@pytest.fixture(scope="module")
def public_serve(ray_cluster, tmp_path_factory):
    from bundles import make_bundle
    from ray import serve

    serve.shutdown()  # new http_options apply to a new Serve instance only
    port = free_port()
    serve.start(proxy_location="Disabled", http_options={"host": "0.0.0.0", "port": port})
    try:
        yield make_bundle(tmp_path_factory.mktemp("auth-bundle"), seed=0), port
    finally:
        serve.shutdown()


def _ingress_log(app_name: str) -> str:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    files = sorted(logs.glob(f"replica_{app_name}_Ingress_*.log"))
    return "\n".join(p.read_text(errors="replace") for p in files)


def _deploy(name: str, bundle: str, **args):
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({"bundle": bundle, "num_cpus": 0.25, "max_replicas": 1, **args}), name=name,
              route_prefix=f"/{name}")


def test_no_keys_on_a_public_host_stops_the_deployment(public_serve, monkeypatch):
    from ray import serve

    bundle, port = public_serve
    monkeypatch.delenv("TESSERA_API_KEYS", raising=False)
    try:
        with pytest.raises(RuntimeError, match="Deploying application open failed"):
            _deploy("open", bundle)
        # What `serve status` shows for the app, and the ingress replica's log line.
        status = serve.status().applications["open"]
        message = status.deployments["Ingress"].message
        assert status.status == "DEPLOY_FAILED"
        assert "refusing to serve without API keys" in message and "listens on 0.0.0.0" in message, message
        assert "allow_anonymous" in message and "TESSERA_API_KEYS" in message
        log = _ingress_log("open")
        assert "ERROR" in log and "refusing to serve without API keys" in log
    finally:
        serve.delete("open")
    with socket.socket() as s:  # the proxy is disabled: the test opened nothing on any interface
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_anonymous_by_explicit_choice_is_logged(public_serve, monkeypatch):
    from ray import serve

    bundle, _ = public_serve
    monkeypatch.delenv("TESSERA_API_KEYS", raising=False)
    try:
        _deploy("anonymous", bundle, allow_anonymous=True)
        assert serve.status().applications["anonymous"].status == "RUNNING"
        assert ("tessera auth: anonymous by explicit choice: no API keys, allow_anonymous is true, "
                "HTTP listens on 0.0.0.0") in _ingress_log("anonymous")
    finally:
        serve.delete("anonymous")


def test_keys_are_counted_in_the_log_never_shown(public_serve, monkeypatch):
    import ray
    from ray import serve

    bundle, _ = public_serve
    monkeypatch.setenv("TESSERA_API_KEYS", ENV_KEY)
    try:
        _deploy("keyed", bundle, api_keys=[ARG_KEY])
        assert serve.status().applications["keyed"].status == "RUNNING"
        assert "tessera auth: API keys required: keys configured: 2" in _ingress_log("keyed")
        # Nowhere in the session's logs: Serve's, the replicas', the workers'.
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
        for path in logs.rglob("*"):
            if path.is_file():
                text = path.read_bytes()
                assert ARG_KEY.encode() not in text and ENV_KEY.encode() not in text, path
    finally:
        serve.delete("keyed")
