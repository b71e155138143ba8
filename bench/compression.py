"""Cross-node gradient traffic of the debug prior with and without PowerSGD, in one run.

    python bench/compression.py --tokens runs/demo/tokens --steps 200 --rank 8 16

Starts a Ray cluster of two Ray nodes on this machine (`ray.cluster_utils.Cluster`, 127.0.0.1,
2 CPUs each), and trains the same debug prior (the real prior job, `tessera.training.ray_io.fit`:
Ray Data from the token
shards, Ray Train, DeepSpeed ZeRO-3) with 4 workers spread 2 per node — the node layout is
detected from the workers' Ray nodes, not declared — once with `grad_comm.method: none` and once
with `powersgd` at each rank given. Same seed, data order and schedule. Prints, for each: cross-node bytes
per optimizer step (all of them, and the gradient part: ZeRO-3's reduce-scatter for `none`,
PowerSGD's factors for `powersgd`) in the last report window, and over the whole run (which
includes the first steps: ZeRO-3's first step gathers twice; `--start-step` steps are uncompressed),
the final training loss (mean of the last report window) and
the final validation loss (text/8 + 7·image/8 on fixed validation rows); then the ratios, and one
JSON line. Bytes are those the step's collectives move across the node boundary under the ring
model of tessera.parallel.comm_ledger; the last window's figures are the steady state.

The token dataset is what `make demo` (jobs/encode.py) writes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before ray is imported
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")])


def run_setting(method: str, rank: int, args, root: str) -> tuple[dict, float]:
    from tessera.config import load_config
    from tessera.training.ray_io import fit

    overrides = [f"run.root_uri={root}", f"run.name=bench-{method}-{rank}", f"prior.tokens_uri={args.tokens}",
                 f"prior.steps={args.steps}", "prior.num_workers=4", "prior.cpus_per_worker=0.5",
                 "prior.threads_per_worker=1", "prior.zero_stage=3",
                 "prior.placement_strategy=SPREAD", f"prior.micro_batch={args.micro_batch}",
                 f"prior.report_every={args.report_every}", f"prior.eval_every={args.steps}",
                 f"prior.checkpoint_every={args.steps}", "prior.grid_captions=0", "prior.precision=fp32",
                 f"prior.warmup_steps={min(100, args.steps // 10)}", "ray.data_cpu_limit=1",
                 f"prior.grad_comm.method={method}", f"prior.grad_comm.powersgd.rank={rank}",
                 f"prior.grad_comm.powersgd.start_step={args.start_step}", *args.set]
    cfg = load_config("debug", overrides)
    started = time.time()
    result = fit(cfg, "prior")
    m = dict(result.metrics)
    m["val_loss"] = cfg.prior.text_weight * m["val_text_loss"] + cfg.prior.image_weight * m["val_image_loss"]
    return m, time.time() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=str(ROOT / "runs/demo/tokens"),
                    help="token dataset URI (jobs/encode.py)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rank", type=int, nargs="+", default=[8], help="PowerSGD rank(s)")
    ap.add_argument("--start-step", type=int, default=0,
                    help="PowerSGD averages exactly for this many steps first (powersgd.start_step)")
    ap.add_argument("--micro-batch", type=int, default=8, help="per worker (4 workers)")
    ap.add_argument("--report-every", type=int, default=25)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides for every setting, e.g. prior.activation_checkpointing=true")
    args = ap.parse_args()
    if "://" not in args.tokens and not Path(args.tokens, "manifest.json").exists():
        sys.exit(f"no token dataset at {args.tokens} (manifest.json missing): run `make demo` first, "
                 "or pass --tokens")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    from tessera.cluster import configure_data_context
    from tessera.config import RayConfig

    configure_data_context(RayConfig(data_cpu_limit=1))
    print(f"Ray nodes: {len(ray.nodes())}; 4 workers spread over them", flush=True)
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="tessera-bench-compression-") as root:
            results["none"] = run_setting("none", args.rank[0], args, root)  # rank unused by none
            for r in args.rank:
                results[f"powersgd rank {r}"] = run_setting("powersgd", r, args, root)
    finally:
        ray.shutdown()
        cluster.shutdown()

    print(f"\n{'setting':<18}{'nodes':>6}{'cross-node MB/step':>20}{'of which grads':>16}"
          f"{'train loss':>12}{'val loss':>10}{'wall s':>8}")
    for name, (m, wall) in results.items():
        print(f"{name:<18}{m['nodes']:>6}{m['cross_node_bytes'] / 1e6:>20.3f}"
              f"{m['cross_node_grad_bytes'] / 1e6:>16.3f}"
              f"{m['loss']:>12.4f}{m['val_loss']:>10.4f}{wall:>8.0f}")
    base = results["none"][0]
    for r in args.rank:
        psgd = results[f"powersgd rank {r}"][0]
        summary = {
            "steps": args.steps, "rank": r, "workers": 4, "nodes": psgd["nodes"],
            "none_cross_node_bytes_per_step": base["cross_node_bytes"],
            "powersgd_cross_node_bytes_per_step": psgd["cross_node_bytes"],
            "start_step": args.start_step,
            "bytes_ratio": psgd["cross_node_bytes"] / base["cross_node_bytes"],
            "run_mean_bytes_ratio": psgd["cross_node_bytes_run_mean"] / base["cross_node_bytes_run_mean"],
            "grad_bytes_ratio": psgd["cross_node_grad_bytes"] / base["cross_node_grad_bytes"],
            "powersgd_sent_fraction": psgd.get("powersgd_sent_fraction"),
            "none_val_loss": base["val_loss"], "powersgd_val_loss": psgd["val_loss"],
            "val_loss_gap": psgd["val_loss"] / base["val_loss"] - 1,
            "none_train_loss": base["loss"], "powersgd_train_loss": psgd["loss"],
            "train_loss_gap": psgd["loss"] / base["loss"] - 1,
        }
        print(f"\nrank {r}: cross-node bytes powersgd / none = {summary['bytes_ratio']:.3f} "
              f"in the last window (gradients alone {summary['grad_bytes_ratio']:.3f}), "
              f"{summary['run_mean_bytes_ratio']:.3f} over the "
              "whole run; target <= 0.15")
        print(f"rank {r}: final val loss {psgd['val_loss']:.4f} vs {base['val_loss']:.4f} "
              f"({100 * summary['val_loss_gap']:+.2f}%); train loss {100 * summary['train_loss_gap']:+.2f}%; "
              "target within 2%")
        whole = psgd["powersgd_uncompressed_bytes"]
        print(f"rank {r}: sent uncompressed (rank 0's shards, {whole:,} bytes per step):")
        for role, names in sorted(psgd["powersgd_uncompressed"].items()):
            print(f"  {role}: {', '.join(names)}")
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
