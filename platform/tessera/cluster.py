"""Starting or joining Ray, the same way for every job.

Locally a job starts Ray bound to 127.0.0.1 (nothing listens on other interfaces); on a cluster
(`ray job submit`, or RAY_ADDRESS set) it joins the running one.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("tessera")

def local_only_env() -> None:
    """Make a Ray started by this process use the loopback address as its node IP, so its
    servers (GCS, raylet, workers, agents) listen on 127.0.0.1 only. Ray reads this variable when
    it is first imported, so call this before `import ray`; it is off for multi-node clusters."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(ray_cfg, *, log_to_driver: bool = True) -> None:
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    if not address:
        if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            log.warning("ray was imported before init_ray(); the local Ray may listen on all interfaces")
        local_only_env()
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
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls
        # (without it every training job logs "Failed to query Ray Train Controller actor state"
        # every few seconds); loopback only, like the rest of a local Ray.
        ray.init(
            num_cpus=ray_cfg.num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
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
