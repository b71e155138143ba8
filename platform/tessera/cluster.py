"""Starting or joining Ray, the same way for every job.

Locally a job starts its own Ray bound to 127.0.0.1 (nothing listens on other interfaces) with
Ray's token authentication on (every RPC, the dashboard and the jobs API refuse callers without
the token); on a cluster (`ray job submit`, or RAY_ADDRESS / ray.address set) it joins the running
one, whose token and auth mode come from the environment as Ray's own CLI reads them.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import sys
from collections.abc import MutableMapping
from pathlib import Path

log = logging.getLogger("tessera")

LOOPBACK = "127.0.0.1"


def token_file(environ: MutableMapping[str, str] | None = None) -> Path:
    """The file Ray reads its auth token from when RAY_AUTH_TOKEN is unset: RAY_AUTH_TOKEN_PATH,
    else ~/.ray/auth_token (Ray's default, so `ray status` and the dashboard login find it too)."""
    environ = os.environ if environ is None else environ
    custom = environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    home = environ.get("HOME") or str(Path.home())
    return Path(custom).expanduser() if custom else Path(home) / ".ray" / "auth_token"


def _ensure_token_file(path: Path) -> None:
    """A token in `path` readable by this user only: an empty or missing file gets a random one
    (created 0600, never world-readable for an instant); a looser existing file is tightened."""
    try:
        if path.read_text().strip():
            if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                path.chmod(0o600)
                log.info("%s was readable by other users; now 0600", path)
            return
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    try:
        if path.exists():  # empty
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # two processes at once: the first token written stays
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    log.info("new Ray auth token in %s (mode 0600)", path)


def local_ray_env(environ: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Set in `environ` (default: this process's environment; pass a copy to build a subprocess's)
    what a local Ray started from it needs to listen on 127.0.0.1 only and to require Ray's auth
    token. Returns `environ`.

    - RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray uses the loopback address as its node IP, so its
      servers (GCS, raylet, workers, agents, dashboard) bind 127.0.0.1. Ray reads it when first
      imported: call this before `import ray` (or before the subprocess starts).
    - RAY_AUTH_MODE=token (a `disabled` there is overridden), with the token from RAY_AUTH_TOKEN,
      else from the file token_file() names, created with a random token (mode 0600) when missing.

    Only for a Ray this process starts: a driver joining a cluster keeps the environment as it is.
    """
    environ = os.environ if environ is None else environ
    environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        log.warning("RAY_AUTH_MODE=%s ignored: a local Ray tessera starts always requires its token",
                    environ["RAY_AUTH_MODE"])
    environ["RAY_AUTH_MODE"] = "token"
    if not environ.get("RAY_AUTH_TOKEN", "").strip():
        environ.pop("RAY_AUTH_TOKEN", None)  # an empty value would hide the file's token from Ray
        _ensure_token_file(token_file(environ))
    return environ


def local_only_env() -> None:
    """The environment of a local Ray on 127.0.0.1 with token auth (kept for the bench scripts;
    see local_ray_env)."""
    local_ray_env()


def serve_replicas_on_loopback() -> None:
    """Bind Ray Serve's per-replica gRPC server to 127.0.0.1 on a local Ray.

    Ray Serve 2.60 opens each replica's inter-deployment gRPC port on [::]:0, every interface,
    whatever the node's address (token auth guards it, but it is reachable from the network).
    Callers reach a replica at its node's IP, which is 127.0.0.1 on a local Ray, so binding there
    loses nothing. The `serve` package calls this on import, which a replica does (unpickling its
    deployment class) before it opens that port. A no-op unless Ray is loaded and the Ray is local
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, inherited from the process that started it).
    """
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0" or "ray" not in sys.modules:
        return
    from ray._common import tls_utils

    original = tls_utils.add_port_to_grpc_server
    if getattr(original, "tessera_loopback", False):
        return

    def add_port(server, address: str):
        return original(server, f"{LOOPBACK}:{address[5:]}" if address.startswith("[::]:") else address)

    add_port.tessera_loopback = True
    tls_utils.add_port_to_grpc_server = add_port
    replica = sys.modules.get("ray.serve._private.replica")  # imported before the user's code
    if replica is not None and hasattr(replica, "add_port_to_grpc_server"):
        replica.add_port_to_grpc_server = add_port


def _loopback_store(create):
    """torch's _create_c10d_store, except that rank 0's TCPStore for a loopback MASTER_ADDR listens
    on that address alone: torch binds its server to [::] (every interface) with no option to
    choose, but takes a socket already listening (master_listen_fd)."""
    import socket

    from torch.distributed import TCPStore

    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or hostname != LOOPBACK:
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen()
        return TCPStore(hostname, port, world_size, True, timeout=timeout, multi_tenant=True,
                        master_listen_fd=sock.detach(), use_libuv=use_libuv)

    create_store.tessera_loopback = True
    return create_store


def bind_rendezvous_to_loopback() -> None:
    """Before a process group starts (a Ray Train worker, or one process on its own): see
    _loopback_store."""
    import importlib

    # The module (torch.distributed.rendezvous is also the name of a function).
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    if not getattr(rendezvous._create_c10d_store, "tessera_loopback", False):
        rendezvous._create_c10d_store = _loopback_store(rendezvous._create_c10d_store)


def torch_config():
    """Ray Train's TorchConfig for tessera's trainers: as Ray Train's own, except that on a local
    Ray (MASTER_ADDR 127.0.0.1: every rank on this machine) the process group's rendezvous store
    listens on 127.0.0.1 only, like the rest of the local Ray. On a cluster nothing changes."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class Backend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            worker_group.execute(bind_rendezvous_to_loopback)
            super().on_start(worker_group, backend_config)

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return Backend

    return LoopbackTorchConfig()


def init_ray(ray_cfg, *, log_to_driver: bool = True) -> None:
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if not address:
        if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            log.warning("ray was imported before init_ray(); the local Ray may listen on all interfaces")
        local_ray_env()
        if not ray_cfg.local_metrics:
            # Read by every process the local Ray starts; an explicit setting in the environment wins.
            os.environ.setdefault("RAY_enable_metrics_collection", "0")
    import ray

    if ray.is_initialized():
        return
    # Ray Data's own progress bars give rows/s per operator; keep them, drop the noise.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        from ray._raylet import Config

        # Ray caches its auth mode when first asked: reread it from the environment set above.
        Config.initialize("")
        # address="local": always a Ray of our own, never one found in /tmp/ray (a `ray start`
        # cluster there may listen on every interface). The dashboard serves Ray's State API,
        # which Ray Train's placement-group cleaner polls (without it every training job logs
        # "Failed to query Ray Train Controller actor state" every few seconds); loopback only.
        ray.init(
            address="local",
            num_cpus=ray_cfg.num_cpus,
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            log_to_driver=log_to_driver,
            configure_logging=False,
        )
    configure_data_context(ray_cfg)


def configure_data_context(ray_cfg) -> None:
    from ray.data import DataContext, ExecutionResources

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = True
    if ray_cfg.data_cpu_limit is not None:
        ctx.execution_options.resource_limits = ExecutionResources(cpu=ray_cfg.data_cpu_limit)
