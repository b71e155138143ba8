import pytest

pytestmark = pytest.mark.integration


def test_local_ray_and_s3_listen_on_loopback_only(ray_cluster, s3_server):
    import psutil

    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
    # Ray's GCS and raylet are started by this process; its workers are their children.
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "expected Ray and the S3 server to be listening"
    exposed = [(c.laddr.ip, c.laddr.port) for c in listening
               if c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert exposed == []


@pytest.mark.parametrize("local_metrics, env, expected",
                         [(False, None, "0"), (True, None, None), (False, "1", "1")])
def test_a_local_ray_collects_metrics_only_when_asked(ray_cluster, monkeypatch, local_metrics, env, expected):
    """ray.local_metrics decides RAY_enable_metrics_collection for a Ray the job starts; a value
    already in the environment wins. (Ray is up for the session, so init_ray returns after it.)"""
    import os

    from tessera.cluster import init_ray
    from tessera.config import RayConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if env is None:
        monkeypatch.delenv("RAY_enable_metrics_collection", raising=False)
    else:
        monkeypatch.setenv("RAY_enable_metrics_collection", env)
    init_ray(RayConfig(local_metrics=local_metrics))
    assert os.environ.get("RAY_enable_metrics_collection") == expected


def test_local_ray_env_sets_loopback_and_token_auth_with_a_private_token(tmp_path):
    """A user's shell may say auth off and the machine's address: a local Ray tessera starts gets
    neither. The token comes from RAY_AUTH_TOKEN, else the token file, made 0600 when missing."""
    import re
    import stat

    from tessera.cluster import local_ray_env

    env = {"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
           "RAY_AUTH_TOKEN": ""}
    assert local_ray_env(env) is env
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and env["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_TOKEN" not in env  # an empty one would hide the file's token from Ray
    token = tmp_path / ".ray" / "auth_token"
    first = token.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", first) and stat.S_IMODE(token.stat().st_mode) == 0o600
    local_ray_env(env)
    assert token.read_text() == first  # kept across runs: `ray status` and the dashboard login use it

    token.write_text("t" * 40)  # one Ray wrote itself, with the default umask
    token.chmod(0o644)
    local_ray_env(env)
    assert token.read_text() == "t" * 40 and stat.S_IMODE(token.stat().st_mode) == 0o600

    given = {"HOME": str(tmp_path / "h2"), "RAY_AUTH_TOKEN": "x" * 32}
    local_ray_env(given)
    assert given["RAY_AUTH_TOKEN"] == "x" * 32 and not (tmp_path / "h2").exists()

    elsewhere = tmp_path / "secrets" / "ray_token"
    custom = {"HOME": str(tmp_path / "h3"), "RAY_AUTH_TOKEN_PATH": str(elsewhere)}
    local_ray_env(custom)
    assert len(elsewhere.read_text()) == 64 and stat.S_IMODE(elsewhere.stat().st_mode) == 0o600
    assert not (tmp_path / "h3").exists()


DRIVER = """
import json, sys
from tessera.cluster import init_ray
from tessera.config import RayConfig
init_ray(RayConfig(num_cpus=1))
import ray
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                  "dashboard": ray._private.worker._global_node.address_info["webui_url"]}), flush=True)
sys.stdin.readline()
"""


@pytest.mark.timeout(180)
def test_init_ray_starts_a_loopback_ray_that_refuses_callers_without_the_token(tmp_path):
    """What every job does first (jobs/*.py call init_ray), in a fresh process whose environment
    asks for auth off and the machine's address: every socket of its Ray is on 127.0.0.1, and its
    GCS and dashboard answer only the token."""
    import json
    import subprocess
    import sys
    import time

    from local_ray import LOOPBACK, ROOT, gcs_status, http_status, listening, stop_tree, subprocess_env

    env = subprocess_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, f"the driver died:\n{proc.stderr.read()[-3000:]}"
        where = json.loads(line)
        gcs_port, dashboard = int(where["gcs"].rsplit(":", 1)[1]), f"http://{where['dashboard']}"
        time.sleep(3)  # the agents open their ports a moment after ray.init returns
        sockets = listening(proc.pid)
        assert {"gcs_server", "raylet"} <= {name for _, _, name in sockets}, sockets
        assert gcs_port in {port for _, port, _ in sockets}
        assert int(dashboard.rsplit(":", 1)[1]) in {port for _, port, _ in sockets}
        assert [s for s in sockets if s[0] not in LOOPBACK] == []

        token = (tmp_path / "ray_auth_token").read_text().strip()
        assert gcs_status(gcs_port) == gcs_status(gcs_port, "not-the-token") == "UNAUTHENTICATED"
        assert gcs_status(gcs_port, token) == "OK"
        assert http_status(f"{dashboard}/api/jobs/") == 401
        assert http_status(f"{dashboard}/api/jobs/", token) == 200
    finally:
        proc.stdin.close()
        stop_tree(proc)
