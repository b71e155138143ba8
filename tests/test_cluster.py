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
