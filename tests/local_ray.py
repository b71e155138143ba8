"""Looking at a local Ray from outside: the listening sockets of a process tree, and whether its GCS
and dashboard let a caller in without Ray's auth token. For tests that start a documented local path
(a job, `python -m serve`) as a subprocess and check it listens on 127.0.0.1 only, with token auth."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment as a user's shell might have it, set against what tessera must
    do itself: auth off and Ray free to use the machine's address. The token file is the test's."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
               RAY_AUTH_TOKEN_PATH=str(tmp_path / "ray_auth_token"), RAY_USAGE_STATS_ENABLED="0")
    return env


def listening(root_pid: int) -> set[tuple[str, int, str]]:
    """(ip, port, process name) of every listening TCP socket of a process and its descendants."""
    try:
        root = psutil.Process(root_pid)
        ours = {root_pid} | {p.pid for p in root.children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()
    out = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in ours:
            try:
                out.add((c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()))
            except psutil.NoSuchProcess:
                pass
    return out


def dashboard_ports(root_pid: int) -> set[int]:
    """Listening ports of the dashboard process (`.../dashboard/dashboard.py`) in the tree."""
    ports = set()
    try:
        procs = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
        for p in procs:
            if any(a.endswith("dashboard/dashboard.py") for a in p.cmdline()):
                ports |= {c.laddr.port for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN}
    except psutil.NoSuchProcess:
        pass
    return ports


def http_status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def gcs_status(port: int, token: str | None = None) -> str:
    """The gRPC status of one GCS call (list the nodes) on 127.0.0.1:port, sent with `token` or
    with no authorization at all: "OK", "UNAUTHENTICATED", ..."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo")
        try:
            call(b"", metadata=[("authorization", f"Bearer {token}")] if token else None, timeout=5)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


class Watcher(threading.Thread):
    """Polls a process tree while it runs: every listening socket it opens, and for each GCS and
    dashboard port it sees, what a caller without the token gets."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.sockets: set[tuple[str, int, str]] = set()
        self.anonymous: dict[tuple[str, int], str | int] = {}  # (gcs | dashboard, port) -> answer
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(self.interval):
            now = listening(self.pid)
            self.sockets |= now
            for _, port, name in now:
                if name == "gcs_server" and ("gcs", port) not in self.anonymous:
                    self.anonymous["gcs", port] = gcs_status(port)
            for port in dashboard_ports(self.pid):
                if ("dashboard", port) not in self.anonymous:
                    self.anonymous["dashboard", port] = http_status(f"http://127.0.0.1:{port}/api/jobs/")


def stop_tree(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60) -> None:
    """Stop our subprocess (`sig` first, as Ctrl-C would), then kill whatever of its tree is left.
    Only descendants of our own process are touched."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
