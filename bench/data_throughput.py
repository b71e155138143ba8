"""Training-input throughput: tessera's Ray Data pipeline vs. a plain webdataset + DataLoader.

Both read the SAME prepared WebDataset shards from a real S3-compatible server (moto, on
127.0.0.1) and do the same work per sample: PNG -> uint8 HWC RGB, caption -> fixed-length ids +
mask with the prepared tokenizer (both call tessera.data.loader.decode_batch), shuffle through a
buffer of cfg.loader.local_shuffle_buffer samples, batches of --batch-size as torch tensors.

  A  tessera:  build_training_dataset(cfg) iterated with iter_training_batches (=
               iter_torch_batches with the loader config's shuffle buffer and prefetch) in the driver.
  B  baseline: wds.WebDataset over presigned HTTP URLs (pipe:curl) in a torch DataLoader,
               num_workers=2, persistent_workers=True.

Each pipeline gets one untimed warm-up epoch (worker start-up), then --epochs timed epochs, the two
pipelines' epochs alternating; every epoch must yield each training sample exactly once (checked
by sample_id against the shards). Preparing the dataset (run_prepare into the bucket) is setup and
is not timed. Reported: samples/s over the timed epochs, and time to first batch per epoch.

    cd /work/main && .venv/bin/python bench/data_throughput.py [--samples 5000] [--epochs 2]
        [--batch-size 64] [--set loader.prefetch_batches=8 ...]

--set applies tessera config overrides (batch size, shuffle buffer and text_len apply to both).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING

from tessera.data.loader import (
    build_training_dataset,
    decode_batch,
    iter_training_batches,
    load_manifest,
    sample_id,
    shard_uris,
)

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from tessera.config import TesseraConfig

BUCKET = f"tessera-bench-{uuid.uuid4().hex[:8]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_s3(port: int, stop: mp.synchronize.Event, parent: int) -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # Also stop if the bench dies without telling us, so no server outlives it.
    while not stop.wait(1.0) and os.getppid() == parent:
        pass
    server.stop()


def start_s3() -> tuple[mp.Process, mp.synchronize.Event, str]:
    """moto in its own process: in the driver its request threads would compete for the GIL with
    whichever pipeline consumes batches there, skewing the comparison."""
    port = free_port()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_serve_s3, args=(port, stop, os.getpid()), daemon=True)
    proc.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, stop, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or not proc.is_alive():
                raise RuntimeError("moto S3 server did not start") from None
            time.sleep(0.2)


def shard_ids(s3, keys: list[str]) -> set[int]:
    """Ground truth, read independently of both pipelines: sample_id of every key in the shards
    (key = member name up to the first dot of its base name, WebDataset's rule)."""
    ids: set[int] = set()
    for key in keys:
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(body)) as tf:
            ids.update(sample_id(m.name.rsplit("/", 1)[-1].split(".", 1)[0]) for m in tf if m.isfile())
    return ids


def one_epoch(batches: Iterable[dict], expected: set[int], what: str) -> tuple[float, float]:
    ids: list[int] = []
    start, first = time.perf_counter(), None
    for batch in batches:  # lazy: both pipelines start their epoch's work here
        # Time to first batch: the per-epoch start-up cost, which short epochs feel most.
        first = first if first is not None else time.perf_counter() - start
        ids.extend(batch["sample_id"].tolist())
    took = time.perf_counter() - start
    if len(ids) != len(expected) or set(ids) != expected:
        raise SystemExit(f"{what}: {len(ids)} samples, {len(set(ids))} distinct, "
                         f"{len(expected - set(ids))} missing; expected each of {len(expected)} once")
    print(f"  {what}: {len(ids)} samples in {took:.2f} s (first batch after {first or 0:.2f} s)", flush=True)
    return took, first or 0.0


def measure(pipelines: dict[str, Callable[[int], Iterable[dict]]], epochs: int,
            expected: set[int]) -> dict[str, list[tuple[float, float]]]:
    """Epoch 0 is the untimed warm-up; returns each pipeline's timed (epoch s, first-batch s). Epochs of the
    pipelines alternate (and swap order each round) so that other load on a shared machine falls
    on both alike rather than on whichever happened to run during it."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
    for epoch in range(epochs + 1):
        order = list(pipelines) if epoch % 2 == 0 else list(pipelines)[::-1]
        for name in order:
            result = one_epoch(pipelines[name](epoch), expected,
                               f"{name} epoch {epoch}{' (warm-up)' if epoch == 0 else ''}")
            if epoch:
                times[name].append(result)
    return times


def _collate(samples: list[dict], image_ext: str, decode: Callable[..., dict]) -> dict:
    """Per-sample dicts -> the columnar layout Ray's read_webdataset hands decode_batch -> torch."""
    import torch

    batch = decode({k: [s[k] for s in samples] for k in ("__key__", image_ext, "txt")})
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def baseline_loader(s3, shard_keys: list[str], cfg: TesseraConfig, manifest: dict, tokenizer_json: str,
                    workers: int = 2) -> DataLoader:
    import webdataset as wds
    from torch.utils.data import DataLoader

    urls = [f"pipe:curl -s -S -f -L '"
            f"{s3.generate_presigned_url('get_object', Params={'Bucket': BUCKET, 'Key': k}, ExpiresIn=3600)}'"
            for k in shard_keys]
    ext = manifest["image_format"]
    decode = partial(decode_batch, tokenizer_json=tokenizer_json, text_len=cfg.loader.text_len,
                     image_ext=ext, resolution=manifest["resolution"])
    # Shuffle raw samples in each worker (the idiomatic place), then decode whole batches there
    # with tessera's own decode_batch so the per-sample work is identical. The buffer is split
    # across workers so as many samples are held as in tessera's one driver-side buffer, and is
    # filled before the first sample leaves (initial=), as Ray's local shuffle buffer is.
    buffer = max(1, cfg.loader.local_shuffle_buffer // workers)
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node,
                         workersplitter=wds.split_by_worker, seed=cfg.loader.shuffle_seed)
          .shuffle(buffer, initial=buffer)
          .batched(cfg.loader.batch_size, collation_fn=partial(_collate, image_ext=ext, decode=decode)))
    return DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=5000, help="training samples to prepare")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per pipeline")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra tessera config override, e.g. loader.prefetch_batches=8")
    ap.add_argument("--timeout", type=int, default=1200, help="abort (cleanly) after this many seconds")
    args = ap.parse_args()

    def _abort(signum: int, frame: object) -> None:
        raise TimeoutError(f"benchmark exceeded --timeout={args.timeout}s")

    # An exception (not a kill) so the finally blocks still stop Ray and the S3 server.
    signal.signal(signal.SIGALRM, _abort)
    signal.alarm(args.timeout)
    wall = time.perf_counter()

    proc, stop, endpoint = start_s3()
    try:
        # Before Ray starts: its worker processes inherit these and resolve the same endpoint.
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint,
                          RAY_USAGE_STATS_ENABLED="0")  # nothing leaves loopback
        import boto3

        from tessera import storage
        from tessera.cluster import init_ray
        from tessera.config import load_config
        from tessera.data.prepare import run_prepare

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        cfg = load_config("debug", [f"run.root_uri=s3://{BUCKET}/bench",
                                    f"data.source.shapes.num_samples={args.samples}",
                                    "data.source.shapes.num_heldout=0", "data.samples_per_shard=500",
                                    "data.val_fraction=0", f"loader.batch_size={args.batch_size}",
                                    *args.overrides])
        try:
            init_ray(cfg.ray, log_to_driver=False)
            # Only now: init_ray sets up the environment Ray reads when first imported.
            from ray.data import DataContext

            # Keep the report readable: no progress bars or per-execution INFO lines.
            DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            t = time.perf_counter()
            run_prepare(cfg)
            print(f"prepared {args.samples} samples into s3://{BUCKET}/bench "
                  f"in {time.perf_counter() - t:.1f} s", flush=True)

            opts = storage.StorageOptions.from_config(cfg.storage)
            manifest = load_manifest(cfg.paths.data, opts)
            shard_keys = [storage.resolve(u, opts)[1].split("/", 1)[1]
                          for u in shard_uris(cfg.paths.data, manifest, "train")]
            expected = shard_ids(s3, shard_keys)
            if len(expected) != manifest["splits"]["train"]["num_samples"]:
                raise SystemExit(f"shards hold {len(expected)} distinct samples, manifest says "
                                 f"{manifest['splits']['train']['num_samples']}")
            tokenizer_json = storage.read_bytes(storage.join(cfg.paths.data, manifest["tokenizer"]["path"]),
                                                opts).decode()

            ds = build_training_dataset(cfg)
            loader = baseline_loader(s3, shard_keys, cfg, manifest, tokenizer_json)
            times = measure({"tessera": lambda e: iter_training_batches(ds, cfg.loader, epoch=e),
                             "baseline": lambda e, loader=loader: loader}, args.epochs, expected)
            del loader  # stops the persistent workers
        finally:
            import ray

            ray.shutdown()
    finally:
        stop.set()
        proc.join(15)
        if proc.is_alive():
            proc.terminate()
        signal.alarm(0)

    n = len(expected)
    # Whole epochs, and the steady state after each epoch's first batch: long real epochs are
    # all steady state, short ones pay the per-epoch start-up (first-batch latency) in full.
    rate = {name: n * len(t) / sum(x for x, _ in t) for name, t in times.items()}
    steady = {name: (n - args.batch_size) * len(t) / sum(x - f for x, f in t) for name, t in times.items()}
    first = {name: sum(f for _, f in t) / len(t) for name, t in times.items()}
    labels = {"tessera": "tessera (Ray Data, S3)", "baseline": "baseline (webdataset+DataLoader, S3)"}
    print(f"\n{'pipeline':38s} {'samples':>8s} {'seconds':>8s} {'samples/s':>10s} "
          f"{'steady/s':>9s} {'1st batch':>9s}")
    for name, t in times.items():
        print(f"{labels[name]:38s} {n * len(t):8d} {sum(x for x, _ in t):8.1f} {rate[name]:10.0f} "
              f"{steady[name]:9.0f} {first[name]:8.2f}s")
    ratio = rate["tessera"] / rate["baseline"]
    steady_ratio = steady["tessera"] / steady["baseline"]
    print(f"ratio tessera/baseline: {ratio:.2f}x whole epochs, {steady_ratio:.2f}x after the first batch   "
          f"(batch {cfg.loader.batch_size}, shuffle buffer {cfg.loader.local_shuffle_buffer}, "
          f"prefetch_batches {cfg.loader.prefetch_batches}, total wall {time.perf_counter() - wall:.0f} s)")
    print(json.dumps({"tessera_samples_per_s": round(rate["tessera"], 1),
                      "baseline_samples_per_s": round(rate["baseline"], 1), "ratio": round(ratio, 3),
                      "tessera_steady_samples_per_s": round(steady["tessera"], 1),
                      "baseline_steady_samples_per_s": round(steady["baseline"], 1),
                      "steady_ratio": round(steady_ratio, 3),
                      "tessera_first_batch_s": round(first["tessera"], 2),
                      "baseline_first_batch_s": round(first["baseline"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
