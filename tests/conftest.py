"""Shared fixtures: one real S3-compatible server (moto in server mode, spoken to over HTTP on
127.0.0.1) and one real local Ray cluster per test session.

The S3 variables are set before Ray starts, so Ray's worker processes resolve the same endpoint
and credentials as the test process, exactly as they would from a cluster's environment.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

# Reports take ~2 s each with Train's default health-check interval.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Before anything imports ray: the test cluster's servers listen on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray's worker processes inherit this, so functions defined in test modules (Train loops, Data
# UDFs) unpickle there as they do here.
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_TESTS, os.path.join(os.path.dirname(_TESTS), "platform")]
    + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _torch_linear_restored():
    """DeepSpeed's ZeRO-3 replaces torch.nn.functional.linear with its memory-efficient version for
    the rest of the process ("This will persist unless manually reset."): a test that builds a
    ZeRO-3 engine in this process would change what autograd saves in every later test. A stage
    run in this process sets torch's thread count (threads_per_worker): restored too."""
    import torch
    import torch.nn.functional as F

    linear, threads = F.linear, torch.get_num_threads()
    yield
    F.linear = linear
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client) -> str:
    name = f"tessera-test-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray on 127.0.0.1. Four logical CPUs on the 2-core machine: Train workers take
    fractions and Data is capped, so nothing waits forever for a slot."""
    import ray

    from tessera.cluster import configure_data_context
    from tessera.config import RayConfig

    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    configure_data_context(RayConfig())
    yield ray
    ray.shutdown()


def upload_dir(s3_client, local_dir, bucket: str, prefix: str) -> None:
    from pathlib import Path

    for p in sorted(Path(local_dir).rglob("*")):
        if p.is_file():
            s3_client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local_dir).as_posix()}")
