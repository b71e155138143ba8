"""The commands the README, docs/ and the Makefile give, as written: the local serve command
(`make demo`'s serve step) started for real and its sockets and auth checked; the documents
checked for commands that would start Ray on every interface, cluster commands without the
token, and KubeRay versions older than the fields the manifests use."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml
from conftest import free_port
from local_ray import (
    LOOPBACK,
    ROOT,
    dashboard_ports,
    gcs_status,
    http_status,
    listening,
    stop_tree,
    subprocess_env,
)

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _code_lines(path) -> list[str]:
    """The lines inside the document's fenced code blocks."""
    out, inside = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            out.append(line)
    return out


def _demo_serve_command() -> str:
    make = (ROOT / "Makefile").read_text()
    recipe = make.split("\ndemo: setup\n", 1)[1].split("\n\n", 1)[0]
    (line,) = [ln.strip() for ln in recipe.splitlines() if " serve" in ln and not ln.strip().startswith("@")]
    return line


def test_no_documented_command_runs_a_bare_serve_run():
    """`serve run` alone starts Ray on the machine's address (or joins any Ray it finds): every
    local serve command goes through `python -m serve`, which starts its own on 127.0.0.1."""
    assert _demo_serve_command() == "$(PY) -m serve serve/config.yaml"
    bare = [f"{p.name}: {line.strip()}" for p in DOCS for line in _code_lines(p)
            if re.search(r"(^|[\s/])serve run\b", line)]
    assert bare == []
    # The README serves through `tessera serve` (its loopback + token Ray: tests/test_cli.py).
    assert any("tessera serve " in line for line in _code_lines(ROOT / "README.md"))


def test_cluster_commands_carry_the_token():
    """The clusters have token auth on, so `ray job submit` needs RAY_AUTH_MODE and the token: the
    README and docs/pipeline.md set both before their first `ray job submit`."""
    for path in (ROOT / "README.md", ROOT / "docs" / "pipeline.md"):
        lines = _code_lines(path)
        first_submit = next(i for i, line in enumerate(lines) if "ray job submit" in line)
        before = "\n".join(lines[:first_submit])
        assert "RAY_AUTH_MODE=token" in before and "RAY_AUTH_TOKEN=" in before, path.name


def test_stated_kuberay_version_has_the_fields_the_manifests_use():
    """authOptions.secretName arrived in KubeRay 1.6.0 (1.5 has authOptions without it)."""
    manifests = sorted((ROOT / "infra" / "kuberay").glob("*.yaml"))
    specs = [d.get("spec", {}) for p in manifests for d in yaml.safe_load_all(p.read_text()) if d]
    auth = [s.get("authOptions") or s.get("rayClusterConfig", {}).get("authOptions") for s in specs]
    assert any(a and a.get("secretName") for a in auth)
    stated = [(p.name, m) for p in [*DOCS, *manifests]
              for m in re.findall(r"KubeRay\s*>=\s*([\d.]+)", p.read_text())]
    assert stated and all(tuple(map(int, v.split("."))) >= (1, 6, 0) for _, v in stated), stated
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    assert "kubectl delete rayjob tessera-$job --ignore-not-found" in deploy  # the loop reruns
    for p in (ROOT / "infra" / "kuberay").glob("rayjob-*.yaml"):
        name = yaml.safe_load(p.read_text())["metadata"]["name"]
        assert f"kubectl delete rayjob {name} --ignore-not-found" in p.read_text(), p.name


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_python_m_serve_listens_on_loopback_only_and_requires_the_token(tmp_path):
    """`make demo`'s serve step (`python -m serve serve/config.yaml`) on a tiny bundle, with the
    config's port moved to a free one: the app answers, and every socket of every process it
    started — Ray's, the HTTP proxy's, each replica's — is on 127.0.0.1; Ray refuses callers
    without the token, whatever the environment asked for."""
    from bundles import make_bundle

    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update(bundle=make_bundle(tmp_path / "b"), num_cpus=0.5)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = _demo_serve_command().replace("$(PY)", sys.executable).replace("serve/config.yaml",
                                                                             str(tmp_path / "config.yaml"))
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(command.split(), cwd=ROOT, env=subprocess_env(tmp_path), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while http_status(f"{url}/healthz") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("python -m serve did not come up:\n"
                            + (tmp_path / "serve.log").read_text()[-4000:])
            time.sleep(1)
        import urllib.request

        req = urllib.request.Request(f"{url}/v1/images/generations", method="POST",
                                     data=json.dumps({"prompt": "a small red circle on the left"}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:  # both deployments' replicas are up now
            assert len(json.loads(r.read())["data"]) == 1
        time.sleep(2)
        sockets = listening(proc.pid)
        names = {name for _, _, name in sockets}
        assert {"gcs_server", "raylet"} <= names and (port in {p for _, p, _ in sockets})
        assert sum("ServeReplica" in n for n in names) >= 2, names  # their gRPC ports included
        assert [s for s in sockets if s[0] not in LOOPBACK] == []

        token = (tmp_path / "ray_auth_token").read_text().strip()
        gcs = {p for _, p, n in sockets if n == "gcs_server"}
        assert "UNAUTHENTICATED" in {gcs_status(p) for p in gcs}
        assert any(gcs_status(p, token) == "OK" for p in gcs) and "OK" not in {gcs_status(p) for p in gcs}
        # The dashboard process also serves its own Prometheus metrics (any path, no auth, loopback).
        answers = {(http_status(f"http://127.0.0.1:{p}/api/jobs/"), http_status(f"http://127.0.0.1:{p}/api/jobs/",
                                                                                 token))
                   for p in dashboard_ports(proc.pid)}
        assert (401, 200) in answers, answers
    finally:
        stop_tree(proc)
        log.close()
