import pytest

pytestmark = pytest.mark.integration


def test_local_ray_and_s3_listen_on_loopback_only(ray_cluster, s3_server):
    import psutil

    me = psutil.Process()
    ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
    # Ray's GCS and raylet are started by this process; its workers are their children.
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "expected Ray and the S3 server to be listening"
    exposed = [(c.laddr.ip, c.laddr.port) for c in listening if c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert exposed == []
