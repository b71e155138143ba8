"""Load on the Serve application: a burst of concurrent HTTP requests, autoscaling 1 → 2 → 1.

    python bench/serve_load.py --bundle runs/demo/bundle --concurrency 8 --n 4

Starts a local Ray on 127.0.0.1 and `serve.run(build_app(...))` with the generator autoscaling
between 1 and 2 replicas on short delays, then keeps `--concurrency` clients posting
/v1/images/generations until the second replica has served for `--after-scale-s` (at most
`--burst-max-s`), then idles until the autoscaler is back at one replica. Samples the running
replica count from `serve.status()` every `--sample-s`. Prints latency p50/p99, errors by status,
requests and images per second, the replica timeline (max reached, time to 2, time back to 1), and
the baseline side by side: images/s while one replica served vs while two did, same run.
Exit status 1 if any request failed or the 1 → 2 → 1 scaling was not seen.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]
# Serve's replicas import serve.app and tessera in their own processes.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "platform"),
                                            os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

from tessera.cluster import local_only_env  # noqa: E402

APP, GENERATOR = "bench", "ImageGenerator"
RAMP_S = 2.0
PROMPTS = ["a small red circle above a large blue square",
           "a green triangle to the right of a yellow diamond",
           "a large blue circle", "a small yellow square below a red triangle"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


class ReplicaSampler(threading.Thread):
    """(seconds since start, RUNNING replicas, STARTING replicas) of the generator every period."""

    def __init__(self, t0: float, period_s: float):
        super().__init__(daemon=True)
        self.t0, self.period_s, self.samples, self.stop = t0, period_s, [], threading.Event()

    def run(self) -> None:
        from ray import serve

        while not self.stop.is_set():
            try:
                states = serve.status().applications[APP].deployments[GENERATOR].replica_states
                self.samples.append((time.time() - self.t0, states.get("RUNNING", 0),
                                     states.get("STARTING", 0)))
            except (KeyError, AttributeError):
                pass
            self.stop.wait(self.period_s)

    @property
    def running(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def first(self, count: int, after: float = 0.0) -> float | None:
        return next((t for t, r, _ in self.samples if r == count and t >= after), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=str(ROOT / "runs/demo/bundle"),
                    help="model bundle URI (jobs/export.py)")
    ap.add_argument("--concurrency", type=int, default=8, help="clients posting back to back")
    ap.add_argument("--n", type=int, default=4, help="images per request")
    ap.add_argument("--candidates", type=int, default=None,
                    help="per request (needs a bundle with a reranker)")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="per generator replica")
    ap.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2, help="logical CPUs of the local Ray")
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--target-ongoing", type=float, default=2.0, help="autoscaling target_ongoing_requests")
    ap.add_argument("--upscale-delay-s", type=float, default=8.0,
                    help="also the length of the one-replica baseline window")
    ap.add_argument("--downscale-delay-s", type=float, default=5.0)
    ap.add_argument("--look-back-s", type=float, default=2.0)
    ap.add_argument("--metrics-interval-s", type=float, default=0.5,
                    help="how often load reaches the autoscaler")
    ap.add_argument("--after-scale-s", type=float, default=15.0,
                    help="keep the burst going this long at 2 replicas")
    ap.add_argument("--burst-max-s", type=float, default=120.0)
    ap.add_argument("--idle-max-s", type=float, default=90.0)
    ap.add_argument("--sample-s", type=float, default=0.5)
    a = ap.parse_args()

    local_only_env()
    import ray
    import requests
    from ray import serve

    from serve.app import build_app

    ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app_args = {
        "bundle": a.bundle, "num_cpus": a.num_cpus, "max_batch_size": a.max_batch_size,
        "batch_wait_timeout_s": 0.05,
        "min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
        "target_ongoing_requests": a.target_ongoing,
        "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
        "look_back_period_s": a.look_back_s, "metrics_interval_s": a.metrics_interval_s,
        "max_ongoing_requests": a.max_batch_size,
        # Room for every client: this bench measures scaling, not refusals.
        "max_queued_requests": 2 * a.concurrency, "request_timeout_s": 300, "max_n": 10, "max_candidates": 64,
        # Every client is 127.0.0.1 without a key, so one caller to the per-caller limit.
        "max_requests_per_client": a.concurrency}
    t_deploy = time.time()
    serve.run(build_app(app_args), name=APP, route_prefix="/")
    deploy_s = time.time() - t_deploy
    url = f"http://127.0.0.1:{port}/v1/images/generations"
    body = {"n": a.n} | ({"candidates": a.candidates} if a.candidates else {})
    warm = requests.post(url, json={"prompt": PROMPTS[0], **body}, timeout=300)
    if warm.status_code != 200:
        print(f"warm-up request failed: {warm.status_code} {warm.text[:300]}", file=sys.stderr)
        return 1

    t0 = time.time()
    sampler = ReplicaSampler(t0, a.sample_s)
    sampler.start()
    results: list[tuple[float, float, int]] = []  # (end time since t0, latency s, status)
    lock, stop = threading.Lock(), threading.Event()

    def client(k: int) -> None:
        session = requests.Session()
        i = 0
        while not stop.is_set():
            start = time.time()
            try:
                status = session.post(url, json={"prompt": PROMPTS[(k + i) % len(PROMPTS)],
                                                 "seed": 1000 * k + i, **body}, timeout=300).status_code
            except requests.RequestException:
                status = -1  # connection error
            with lock:
                results.append((time.time() - t0, time.time() - start, status))
            i += 1

    clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(a.concurrency)]
    for c in clients:
        c.start()
    while time.time() - t0 < a.burst_max_s:
        t2 = sampler.first(2)
        if t2 is not None and time.time() - t0 >= t2 + a.after_scale_s:
            break
        time.sleep(0.2)
    stop.set()
    for c in clients:
        c.join(timeout=300)
    burst_end = time.time() - t0
    while time.time() - t0 < burst_end + a.idle_max_s:
        if (sampler.first(2) is not None and sampler.running == 1
                and sampler.first(1, after=burst_end) is not None):
            break
        time.sleep(0.2)
    time.sleep(2 * a.sample_s)
    sampler.stop.set()
    sampler.join()
    serve.shutdown()
    ray.shutdown()
    return report(a, results, sampler.samples, burst_end, deploy_s)


def report(a, results, samples, burst_end: float, deploy_s: float) -> int:
    ok = [r for r in results if r[2] == 200]
    errors = Counter(r[2] for r in results if r[2] != 200)
    lat = [r[1] for r in ok]
    t2 = next((t for t, r, _ in samples if r == 2), None)
    back = next((t for t, r, _ in samples if r == 1 and t2 is not None and t > t2), None)
    peak = max((r for _, r, _ in samples), default=0)
    # Timeline: only the samples where the count changed.
    timeline, last = [], None
    for t, r, s in samples:
        if (r, s) != last:
            timeline.append(f"{t:.1f}s: {r} running" + (f" (+{s} starting)" if s else ""))
            last = (r, s)
    # Baseline side by side: images/s while one replica served alone (upscale_delay_s holds the
    # second back; it ends when a second replica starts, because loading one takes CPU from the
    # first) and while two served (from when the second was running to the end of the burst).
    # The first RAMP_S of each window is left out: requests finishing then were mostly queued earlier.
    t_start2 = next((t for t, r, st in samples if r + st >= 2), None)

    def rate(lo: float, hi: float) -> float:
        lo += RAMP_S
        done = sum(1 for t, _, st in ok if lo <= t < hi)
        return done * a.n / (hi - lo) if hi > lo else float("nan")

    one = rate(0.0, t_start2 if t_start2 else burst_end)
    two = rate(t2, burst_end) if t2 else float("nan")
    figures = {
        "requests": len(results), "ok": len(ok), "errors_by_status": dict(errors),
        "concurrency": a.concurrency,
        "n": a.n, "candidates": a.candidates, "burst_s": round(burst_end, 1), "deploy_s": round(deploy_s, 1),
        "latency_p50_s": round(percentile(lat, 50), 3), "latency_p99_s": round(percentile(lat, 99), 3),
        "latency_mean_s": round(statistics.fmean(lat), 3) if lat else None,
        "requests_per_s": round(len(ok) / burst_end, 2), "images_per_s": round(len(ok) * a.n / burst_end, 2),
        "images_per_s_1_replica": round(one, 2), "images_per_s_2_replicas": round(two, 2),
        "ratio_2_vs_1": round(two / one, 2) if one > 0 and two == two else None,
        "max_replicas_seen": peak,
        "upscale_started_s": None if t_start2 is None else round(t_start2, 1),
        "time_to_2_replicas_s": None if t2 is None else round(t2, 1),
        "time_back_to_1_s": None if back is None else round(back, 1),
        "back_to_1_after_burst_s": None if back is None else round(back - burst_end, 1),
    }
    print(f"{len(results)} requests ({a.concurrency} clients, n={a.n}) in {burst_end:.1f} s: {len(ok)} ok, "
          f"errors {dict(errors) or 0}")
    print(f"latency p50 {figures['latency_p50_s']} s, p99 {figures['latency_p99_s']} s; "
          f"{figures['requests_per_s']} requests/s, {figures['images_per_s']} images/s")
    print(f"images/s with 1 replica {figures['images_per_s_1_replica']} vs 2 replicas "
          f"{figures['images_per_s_2_replicas']}: ratio {figures['ratio_2_vs_1']}")
    print(f"replicas: max {peak}, 2 running at {figures['time_to_2_replicas_s']} s, back to 1 at "
          f"{figures['time_back_to_1_s']} s ({figures['back_to_1_after_burst_s']} s after the burst ended)")
    print("timeline: " + "; ".join(timeline))
    print(json.dumps(figures))
    failed = bool(errors) or not ok
    scaled = peak >= 2 and back is not None
    if failed:
        print(f"FAILED: {sum(errors.values())} requests failed", file=sys.stderr)
    if not scaled:
        print("FAILED: the generator did not scale 1 -> 2 -> 1", file=sys.stderr)
    return 0 if not failed and scaled else 1


if __name__ == "__main__":
    sys.exit(main())
