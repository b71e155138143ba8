"""The deployment recipe, live: a Ray head started with `ray start` (token authentication on),
the debug pipeline's first stage submitted with `ray job submit --working-dir .` exactly as
docs/deploy.md does on a cloud cluster, and the prepared dataset checked.

The head is this test's own: bound to 127.0.0.1, on free ports, with its own temp dir, run as
`ray start --head --block` in a new session and stopped through that process (SIGTERM makes it
shut down every Ray process it started) — never `ray stop`, which would stop every Ray on the
machine, other tests' and other users' included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port
from local_ray import http_status, stop_tree

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the .venv's bin: its `ray`, and the `python` jobs resolve
# What docs/deploy.md passes besides --working-dir: the tessera package for the Ray workers.
RUNTIME_ENV = "infra/job-runtime-env.yaml"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _ray_env(token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",  # the server enforces it; the CLI sends the token only when set
        RAY_AUTH_TOKEN=token,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        # SIGTERM: shut down at once instead of draining the node for up to 30 s.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of this test's own; yields (dashboard URL, environment with the token, temp dir)."""
    token = secrets.token_hex(32)
    env = _ray_env(token)
    # Short: Ray's socket paths live under it and must stay within the 107-byte limit.
    temp_dir = Path(tempfile.mkdtemp(prefix="tjs", dir="/tmp"))
    cwd = temp_dir / "cwd"  # not the repository: jobs must run from their uploaded working dir
    cwd.mkdir()
    ports = set()
    while len(ports) < 9:
        ports.add(free_port())
    gcs, dash, agent_http, agent_grpc, client, metrics, node_mgr, obj_mgr, env_agent = sorted(ports)
    cmd = [str(BIN / "ray"), "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}",
           f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
           f"--runtime-env-agent-port={env_agent}", "--min-worker-port=0", "--max-worker-port=0",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = open(temp_dir / "head.log", "wb")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while http_status(f"{url}/api/version", token) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"ray start did not bring up a dashboard at {url}:\n"
                            + (temp_dir / "head.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url, env, temp_dir
    finally:
        stop_tree(proc, sig=signal.SIGTERM, timeout=30)  # SIGTERM: the head stops at once
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _client(url: str, env: dict):
    """Ray's job client in this process, with the token passed explicitly (this process itself
    does not run with RAY_AUTH_MODE set)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})


def test_cluster_refuses_requests_without_the_token(ray_head):
    url, env, _ = ray_head
    assert http_status(f"{url}/api/jobs/") == 401
    assert http_status(f"{url}/api/jobs/", "not-the-token") in (401, 403)
    assert http_status(f"{url}/api/jobs/", env["RAY_AUTH_TOKEN"]) == 200


def test_prepare_job_submitted_with_working_dir(ray_head, tmp_path):
    url, env, temp_dir = ray_head
    run_root = tmp_path / "run"
    job_id = f"tessera-prepare-{secrets.token_hex(4)}"
    submit = _ray("job", "submit", "--address", url, "--submission-id", job_id, "--working-dir", ".",
                  "--runtime-env", RUNTIME_ENV, "--",
                  "python", "jobs/prepare.py", "--config", "debug", "--set", f"run.root_uri={run_root}",
                  "--set", "data.source.shapes.num_samples=200", "--set", "data.source.shapes.num_heldout=20",
                  "--set", "data.source.shapes.image_size=32", "--set", "data.resolution=32",
                  "--set", "data.samples_per_shard=64", env=env, timeout=240)
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, out[-4000:]
    assert f"Job '{job_id}' succeeded" in out, out[-4000:]
    assert _client(url, env).get_job_status(job_id) == "SUCCEEDED"

    # The prepared dataset: the manifest (written last), every shard it lists, the tokenizer.
    data = run_root / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["input_samples"] == 220 and manifest["kept_samples"] == 220
    splits = manifest["splits"]
    assert splits["heldout"]["num_samples"] == 20
    assert (splits["train"]["num_samples"] + splits["val"]["num_samples"] == 200
            and splits["val"]["num_samples"] > 0)
    for info in splits.values():
        assert sum(s["num_samples"] for s in info["shards"]) == info["num_samples"]
        assert all((data / s["path"]).is_file() for s in info["shards"])
    assert (data / manifest["tokenizer"]["path"]).is_file() and manifest["tokenizer"]["vocab_size"] > 0
    assert manifest["resolution"] == 32 and not any(manifest["skipped"].values())

    # What was uploaded: the repository without runs/, .venv/, .git/ or caches (.rayignore), and
    # the tessera package for the workers.
    resources = next(temp_dir.glob("session_*/runtime_resources"))
    (working_dir,) = [p for p in (resources / "working_dir_files").iterdir() if p.is_dir()]
    uploaded = {p.name for p in working_dir.iterdir()}
    assert {"jobs", "platform", "serve", "pyproject.toml"} <= uploaded
    assert not uploaded & {".venv", "runs", ".git", ".pytest_cache", ".ruff_cache"}
    (module_dir,) = [p for p in (resources / "py_modules_files").iterdir() if p.is_dir()]
    assert (module_dir / "tessera" / "config.py").is_file()


def test_jobs_run_with_the_heads_python(ray_head):
    """`python` in an entrypoint is whatever the head's PATH finds: here the .venv's."""
    import ray

    url, env, _ = ray_head
    client = _client(url, env)
    job_id = client.submit_job(
        entrypoint="python -c 'import sys, ray; print(\"EXE\", sys.executable, ray.__version__)'")
    deadline = time.monotonic() + 120
    while (status := client.get_job_status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {job_id} still {status}"
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"EXE {BIN / 'python'} {ray.__version__}" in logs, logs[-3000:]
