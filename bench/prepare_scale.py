"""How the prepare job's cost grows with its input, under a capped Ray object store.

For each implementation (--impl new,old) and each input size (--sizes), one run of
`run_prepare(cfg)` on WebDataset input, each in a fresh subprocess with its own local Ray
(--num-cpus CPUs, an object store of --object-store-mb MiB), so that Ray's state and the RSS
figures start clean every time. Reported per run: samples/s (input samples / wall time around
run_prepare), the peak object-store use and the bytes Ray spilled to disk, the driver's peak RSS,
and the number of output shards.

Object store: the raylet's ObjectStoreStats (what `ray memory --stats-only` prints, via the
FormatGlobalMemoryInfo call of ray._private.internal_api.get_memory_info_reply), sampled every
0.25 s: peak = max object_store_bytes_used (shared memory; objects under 100 KiB stay in their
owner's process and count in its RSS instead; spikes shorter than a sample can be missed);
spilled = spilled_bytes_total after the run minus before (cumulative, exact). Driver RSS: the
process's ru_maxrss (whole life, ray.init included) and the sampled peak.

The goal is linear cost: samples/s at the largest size that succeeded divided by samples/s at the
smallest size should be >= 0.85 for each implementation (a job that keeps the whole dataset in the
object store spills, then slows down or fails, as the input grows past the store).

  new: tessera.data.prepare from this checkout.
  old: platform/tessera/data/prepare.py as it was at --baseline-ref (default 4f02c69), extracted
       with `git show` and imported as a module (its imports of tessera.data.plan, preprocess,
       sources, tessera.published and tessera.storage come from this checkout).

Inputs are img2dataset-style WebDataset shards of 1,000 samples each (00000.tar, 00001.tar, ...;
{key}.jpg, {key}.txt, {key}.json per sample, keys unique across all shards): 256x256 JPEGs of
1-3 coloured shapes on a smooth random background, captioned ("a red circle and a blue square on
a mottled background"). Only the first --base-shards shards (default 20: 20,000 images) hold
distinct images; the others re-pack those shards' bytes under new keys, so IMAGES REPEAT beyond
the base set (the prepare job decodes, resizes and writes every sample all the same). A size N
reads the first N/1000 shards. Making inputs is resumable: existing shards are kept.

    # inputs for up to 320,000 samples (~20 k distinct images, the rest repeats)
    .venv/bin/python bench/prepare_scale.py --make-inputs /tmp/ps-in --max-size 320000
    # the measurement: 420,000 samples per implementation, long on 2 CPUs
    .venv/bin/python bench/prepare_scale.py --inputs /tmp/ps-in --work /tmp/ps-work \\
        --sizes 20000,80000,320000 --impl new,old --json-out prepare_scale.json
    # a quick look
    .venv/bin/python bench/prepare_scale.py --make-inputs /tmp/ps-small --max-size 2000 \\
        --base-shards 1 --image-size 64
    .venv/bin/python bench/prepare_scale.py --inputs /tmp/ps-small --sizes 1000,2000 --impl new,old
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing as mp
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREPARE_PATH = "platform/tessera/data/prepare.py"
BASELINE_MODULE = "tessera_prepare_baseline"
SAMPLES_PER_INPUT_SHARD = 1_000
INPUTS_MANIFEST = "inputs.json"
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (240, 215, 30),
           "purple": (148, 103, 189), "orange": (255, 127, 14), "white": (245, 245, 245),
           "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("mottled", "textured", "blurry", "soft")
MIB = 2**20


# --- inputs -----------------------------------------------------------------------------------


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"{index:05d}.tar"


def sample_key(shard: int, position: int) -> str:
    return f"{shard:05d}{position:04d}"


def render_sample(rng, size: int) -> tuple[bytes, str]:
    """One photo-like JPEG and its caption: a smooth random background (low-res noise upsampled
    bicubically, plus a little fine grain) with 1-3 filled shapes in named colours."""
    import numpy as np
    from PIL import Image, ImageDraw

    low = int(rng.integers(3, 9))
    # Muted: random variation around one random colour, not full-range RGB noise.
    tint = rng.integers(40, 216, 3)
    coarse = np.clip(tint + rng.integers(-60, 61, (low, low, 3)), 0, 255).astype(np.uint8)
    background = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    grain = rng.integers(-4, 5, (size, size, 3), dtype=np.int16)
    image = Image.fromarray(np.clip(np.asarray(background, np.int16) + grain, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    names: list[str] = []
    for _ in range(int(rng.integers(1, 4))):
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        name = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"
        if name in names:  # "a red circle and a red circle" reads badly; one is enough
            continue
        r = float(rng.uniform(0.08, 0.2)) * size
        cx, cy = (float(v) for v in rng.uniform(r, size - r, 2))
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
        else:
            draw.regular_polygon((cx, cy, r), 3, rotation=float(rng.uniform(0, 120)), fill=COLOURS[colour])
        names.append(name)
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    caption = f"{listed} on a {rng.choice(BACKGROUNDS)} background"
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), caption


def write_tar_atomically(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Under a hidden temporary name first, so a killed run never leaves a shard that looks done."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def make_base_shard(directory: Path, shard: int, image_size: int) -> int:
    import numpy as np

    rng = np.random.default_rng(shard)
    members = []
    for i in range(SAMPLES_PER_INPUT_SHARD):
        key = sample_key(shard, i)
        jpg, caption = render_sample(rng, image_size)
        # image_id names the distinct image; re-packed shards keep it, so repeats are traceable.
        meta = {"image_id": key, "caption": caption, "width": image_size, "height": image_size,
                "status": "success"}
        members += [(f"{key}.jpg", jpg), (f"{key}.txt", caption.encode()),
                    (f"{key}.json", json.dumps(meta).encode())]
    write_tar_atomically(shard_path(directory, shard), members)
    return shard


def _make_base_shard_star(job: tuple[Path, int, int]) -> int:
    return make_base_shard(*job)


def repack_shard(directory: Path, shard: int, base: int) -> None:
    """Shard `shard` = base shard `base`'s bytes under new keys (member names only change)."""
    new_keys: dict[str, str] = {}
    members = []
    with tarfile.open(shard_path(directory, base)) as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            new = new_keys.setdefault(key, sample_key(shard, len(new_keys)))
            members.append((f"{new}.{ext}", tf.extractfile(m).read()))
    write_tar_atomically(shard_path(directory, shard), members)


def make_inputs(directory: Path, *, max_size: int, base_shards: int, image_size: int, processes: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    num_shards = math.ceil(max_size / SAMPLES_PER_INPUT_SHARD)
    base = min(base_shards, num_shards)
    described = directory / INPUTS_MANIFEST
    settings = {"samples_per_shard": SAMPLES_PER_INPUT_SHARD, "base_shards": base_shards,
                "image_size": image_size}
    if described.exists():
        old = json.loads(described.read_text())
        clash = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if clash:
            raise SystemExit(f"{described}: inputs made with other settings {clash} (was, now); "
                             "use another folder or delete this one")
    todo = [s for s in range(base) if not shard_path(directory, s).exists()]
    started = time.perf_counter()
    print(f"making inputs in {directory}: {num_shards} shards of {SAMPLES_PER_INPUT_SHARD} samples "
          f"({image_size}px JPEG); {base} base shards hold distinct images ({len(todo)} to render), "
          f"the other {num_shards - base} re-pack them under new keys (images repeat beyond "
          f"{base * SAMPLES_PER_INPUT_SHARD:,d} samples)", flush=True)
    jobs = [(directory, s, image_size) for s in todo]
    if processes > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(min(processes, len(jobs))) as pool:
            for done, s in enumerate(pool.imap_unordered(_make_base_shard_star, jobs), 1):
                print(f"  rendered {shard_path(directory, s).name} ({done}/{len(jobs)}, "
                      f"{time.perf_counter() - started:.0f} s)", flush=True)
    else:
        for job in jobs:
            _make_base_shard_star(job)
    repacked = 0
    for s in range(base, num_shards):
        if not shard_path(directory, s).exists():
            repack_shard(directory, s, s % base)
            repacked += 1
    described.write_text(json.dumps({**settings, "num_shards": _count_shards(directory),
                                     "note": f"only the first {base_shards} shards hold distinct images; "
                                             "later shards repeat them under new keys"}, indent=1))
    took = time.perf_counter() - started
    print(f"inputs ready: {num_shards} shards ({repacked} re-packed) in {took:.0f} s", flush=True)


def _count_shards(directory: Path) -> int:
    n = 0
    while shard_path(directory, n).exists():
        n += 1
    return n


def input_files(directory: Path, size: int) -> list[Path]:
    if size <= 0 or size % SAMPLES_PER_INPUT_SHARD:
        raise SystemExit(f"--sizes: {size} is not a positive multiple of {SAMPLES_PER_INPUT_SHARD} "
                         "(one input shard holds that many samples)")
    files = [shard_path(directory, i) for i in range(size // SAMPLES_PER_INPUT_SHARD)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"{missing[0]} does not exist ({len(missing)} shards missing for size {size}); "
                         f"make them with --make-inputs {directory} --max-size {size}")
    return files


# --- one measured run (in its own process) ----------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def baseline_source(ref: str) -> str:
    try:
        return git("show", f"{ref}:{PREPARE_PATH}")
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--baseline-ref {ref}: cannot read {PREPARE_PATH} there "
                         f"({e.stderr.strip()})") from None


def load_prepare(impl: str, *, ref: str, folder: Path) -> tuple[Callable[..., dict], str]:
    """run_prepare of the implementation, and a line saying which source it is."""
    if impl == "new":
        import tessera.data.prepare as module

        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--", PREPARE_PATH).strip())
        source = f"working tree at {head}" + (" with uncommitted changes to prepare.py" if dirty else "")
        text = Path(module.__file__).read_text()
    else:
        import ray.cloudpickle

        text = baseline_source(ref)
        path = folder / "prepare_baseline.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(BASELINE_MODULE, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[BASELINE_MODULE] = module  # cloudpickle requires it there to register it
        spec.loader.exec_module(module)
        # Workers cannot import a module from this temporary path: ship its functions by value.
        ray.cloudpickle.register_pickle_by_value(module)
        source = f"{ref} ({git('rev-parse', '--short', f'{ref}^{{commit}}').strip()})"
    return module.run_prepare, f"{source}, prepare.py sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}"


class Sampler(threading.Thread):
    """Every `interval` s: the object store's bytes in use (the raylet's store stats, which
    `ray memory --stats-only` prints) and this process's RSS; keeps the maxima."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        import psutil
        import ray
        from ray._common.network_utils import build_address
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc

        # ray._private.internal_api.get_memory_info_reply makes this call on a new channel each
        # time; one kept channel makes a sample cost ~1 ms. Any raylet answers for the cluster.
        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        self._channel = init_grpc_channel(build_address(node["NodeManagerAddress"], node["NodeManagerPort"]))
        self._stub = node_manager_pb2_grpc.NodeManagerServiceStub(self._channel)
        self._request = node_manager_pb2.FormatGlobalMemoryInfoRequest(include_memory_info=False)
        self._process = psutil.Process()
        self.interval = interval
        self.peak_store = self.peak_fallback = self.peak_rss = 0
        self.samples = self.errors = 0
        self._stopping = threading.Event()
        self.sample()

    def store_stats(self):
        """ObjectStoreStats (ray/core/generated/node_manager_pb2): bytes used, spilled, ..."""
        return self._stub.FormatGlobalMemoryInfo(self._request, timeout=10).store_stats

    def sample(self) -> None:
        try:
            stats = self.store_stats()
            self.peak_store = max(self.peak_store, stats.object_store_bytes_used)
            self.peak_fallback = max(self.peak_fallback, stats.object_store_bytes_fallback)
            self.peak_rss = max(self.peak_rss, self.rss())
            self.samples += 1
        except Exception:  # a busy raylet missing one sample is no reason to fail the run
            self.errors += 1

    def rss(self) -> int:
        return self._process.memory_info().rss

    def run(self) -> None:
        while not self._stopping.wait(self.interval):
            self.sample()

    def finish(self):
        """Stop sampling; the store stats at the end (cumulative spill totals included)."""
        self._stopping.set()
        self.join()
        self.sample()
        stats = self.store_stats()
        self._channel.close()
        return stats


def ray_temp_dir(work: Path) -> tuple[Path, bool]:
    """Ray's sockets live ~70 characters below its temp dir and a Unix socket path may hold
    107: the work folder when it is short enough, else a fresh short folder in /tmp (True: it is
    such a folder, to be removed after a successful run)."""
    candidate = work / "ray"
    if len(str(candidate)) <= 36:
        candidate.mkdir(parents=True, exist_ok=True)
        return candidate, False
    return Path(tempfile.mkdtemp(prefix="tps-", dir="/tmp")), True


def measure_one(args: argparse.Namespace) -> dict:
    from tessera.cluster import local_only_env

    # Before ray is imported (its servers listen on 127.0.0.1 only; no idle metrics agents).
    local_only_env()
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    import resource

    import ray

    from tessera.cluster import configure_data_context
    from tessera.config import load_config

    result: dict = {"impl": args.impl, "size": args.size, "ok": False, "error": None}
    files = input_files(args.inputs, args.size)
    out = args.work / f"out-{args.impl}-{args.size}"
    overrides = ["data.source.kind=webdataset", f"data.source.uri={','.join(str(f) for f in files)}",
                 f"data.output_uri={out}", "data.resolution=64", "data.samples_per_shard=1000",
                 "data.val_fraction=0.02", "data.overwrite=true", "tokenizer.vocab_size=2000", *args.set]
    temp_dir, temporary = ray_temp_dir(args.work)
    # address="local": never join some other Ray found running on this machine.
    ray.init(address="local", num_cpus=args.num_cpus, object_store_memory=args.object_store_mb * MIB,
             include_dashboard=False, configure_logging=False, _temp_dir=str(temp_dir))
    try:
        cfg = load_config("debug", overrides)
        configure_data_context(cfg.ray)  # as the prepare job's init_ray does
        with tempfile.TemporaryDirectory(prefix="prepare-baseline-") as folder:
            run_prepare, result["source"] = load_prepare(args.impl, ref=args.baseline_ref,
                                                         folder=Path(folder))
            sampler = Sampler()
            before = sampler.store_stats()
            rss_before = sampler.rss()
            sampler.start()
            started = time.perf_counter()
            try:
                manifest = run_prepare(cfg)
                result["ok"] = True
            except Exception as e:
                traceback.print_exc()
                manifest, result["error"] = None, f"{type(e).__name__}: {e}"[:2000]
            wall = time.perf_counter() - started
            stats = sampler.finish()
    finally:
        ray.shutdown()
    if not result["ok"]:
        result["ray_temp_dir"] = str(temp_dir)  # its session logs say what the workers saw
    elif temporary:
        shutil.rmtree(temp_dir, ignore_errors=True)
    inputs = manifest["input_samples"] if manifest else None
    result.update(
        input_samples=inputs,
        kept_samples=manifest["kept_samples"] if manifest else None,
        wall_s=round(wall, 2),
        samples_per_s=round(inputs / wall, 1) if inputs and wall > 0 else None,
        peak_object_store_mb=round(sampler.peak_store / MIB, 1),
        fallback_mmap_peak_mb=round(sampler.peak_fallback / MIB, 1),
        spilled_mb=round((stats.spilled_bytes_total - before.spilled_bytes_total) / MIB, 1),
        restored_mb=round((stats.restored_bytes_total - before.restored_bytes_total) / MIB, 1),
        # ru_maxrss: KiB on Linux; the whole process's life, imports and ray.init included.
        driver_peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        driver_sampled_peak_rss_mb=round(sampler.peak_rss / MIB, 1),
        driver_rss_before_mb=round(rss_before / MIB, 1),
        num_shards=sum(len(s["shards"]) for s in manifest["splits"].values()) if manifest else None,
        skipped={k: v for k, v in manifest["skipped"].items() if v} if manifest else None,
        store_samples=sampler.samples, store_sample_errors=sampler.errors,
        object_store_mb=args.object_store_mb, num_cpus=args.num_cpus,
    )
    return result


# --- the parent: one subprocess per run, then the table ----------------------------------------


def end_process_tree(pid: int, grace_s: float = 15) -> None:
    """The run's process and everything it started (Ray's GCS, raylet and workers; the workers
    sit in process groups of their own, so a process-group kill would miss them)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    for p in psutil.wait_procs(procs, timeout=grace_s)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def run_in_subprocess(args: argparse.Namespace, impl: str, size: int) -> dict:
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log, result_file = logs / f"{impl}-{size}.log", logs / f"{impl}-{size}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", "--impl", impl, "--size", str(size),
           "--inputs", str(args.inputs), "--work", str(args.work), "--object-store-mb",
           str(args.object_store_mb), "--num-cpus", str(args.num_cpus), "--baseline-ref", args.baseline_ref,
           "--result-file", str(result_file), *(a for s in args.set for a in ("--set", s))]
    failure = None
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            rc = proc.wait(timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            end_process_tree(proc.pid)
            rc, failure = proc.wait(), f"timeout after {args.timeout_s} s"
        except BaseException:  # Ctrl-C: leave no Ray behind
            end_process_tree(proc.pid)
            raise
    if failure is None and result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        result = {"impl": impl, "size": size, "ok": False,
                  "error": failure or f"exit code {rc} without a result; {log}: " + " | ".join(tail)}
    if not args.keep_outputs:
        shutil.rmtree(args.work / f"out-{impl}-{size}", ignore_errors=True)
    result["log"] = str(log)
    return result


def scaling_ratio(rows: list[dict]) -> tuple[float | None, str]:
    """samples/s at the largest size that succeeded over samples/s at the smallest size."""
    rows = sorted(rows, key=lambda r: r["size"])
    ok = [r for r in rows if r["ok"] and r.get("samples_per_s")]
    if not ok or ok[0]["size"] != rows[0]["size"] or len(ok) < 2:
        return None, "n/a (needs the smallest and a larger size to succeed)"
    ratio = ok[-1]["samples_per_s"] / ok[0]["samples_per_s"]
    return round(ratio, 3), f"{ratio:.3f} ({ok[-1]['size']:,d} vs {ok[0]['size']:,d} samples)"


def _cell(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def print_table(results: list[dict], impls: list[str], command: str) -> dict[str, float | None]:
    head = ("impl", "size", "samples/s", "peak store MB", "spilled MB", "driver peak RSS MB", "wall s", "ok")
    rows = [(r["impl"], f"{r['size']:,d}", *(_cell(r.get(k)) for k in (
                "samples_per_s", "peak_object_store_mb", "spilled_mb", "driver_peak_rss_mb", "wall_s")),
             "yes" if r["ok"] else f"NO: {r['error'][:80]}") for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    print()
    for row in (head, tuple("-" * w for w in widths), *rows):
        print(" | ".join(str(x).rjust(w) if i not in (0, 7) else str(x).ljust(w)
                         for i, (x, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    ratios = {}
    print()
    for impl in impls:
        ratios[impl], text = scaling_ratio([r for r in results if r["impl"] == impl])
        print(f"{impl}: samples/s(largest ok size) / samples/s(smallest size) = {text}; goal >= 0.85")
    sources = {r["impl"]: r["source"] for r in results if r.get("source")}
    for impl, source in sources.items():
        print(f"{impl}: {source}")
    print(f"command: {command}")
    return ratios


def measure(args: argparse.Namespace) -> None:
    impls = [s.strip() for s in args.impl.split(",") if s.strip()]
    if not impls or any(i not in ("new", "old") for i in impls):
        raise SystemExit(f"--impl {args.impl!r}: expected new, old or new,old")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    for size in sizes:
        input_files(args.inputs, size)  # every input exists before the first run starts
    if "old" in impls:
        baseline_source(args.baseline_ref)
    args.work.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, *sys.argv])
    print(f"prepare scaling: impl {impls}, sizes {sizes}, {args.num_cpus} CPUs, object store "
          f"{args.object_store_mb} MiB; logs in {args.work / 'logs'}", flush=True)
    results = []
    for impl in impls:
        for size in sizes:
            result = run_in_subprocess(args, impl, size)
            print(json.dumps(result), flush=True)
            results.append(result)
    ratios = print_table(results, impls, command)
    if args.json_out:
        args.json_out.write_text(json.dumps({"command": command, "ratios": ratios, "results": results},
                                            indent=1))
        print(f"results: {args.json_out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-inputs", type=Path, metavar="DIR",
                   help="write input shards into DIR (images repeat beyond --base-shards x 1000 samples)")
    p.add_argument("--max-size", type=int, default=320_000, help="samples to make inputs for")
    p.add_argument("--base-shards", type=int, default=20,
                   help="shards of distinct images; later shards repeat them under new keys")
    p.add_argument("--image-size", type=int, default=256, help="input image side in pixels")
    p.add_argument("--processes", type=int, default=2, help="processes rendering base shards")
    p.add_argument("--inputs", type=Path, metavar="DIR", help="measure on the shards in DIR")
    p.add_argument("--sizes", default="20000,80000,320000", help="input sizes, multiples of 1000")
    p.add_argument("--impl", default="new,old", help="new (this checkout), old (--baseline-ref) or both")
    p.add_argument("--baseline-ref", default="4f02c69", help="git ref of the old prepare.py")
    p.add_argument("--work", type=Path, help="outputs, logs and Ray's files (default: a new temp folder)")
    p.add_argument("--object-store-mb", type=int, default=300)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=3600, help="per run; a run past it counts as failed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra tessera config overrides for every run")
    p.add_argument("--keep-outputs", action="store_true", help="keep each run's prepared dataset")
    p.add_argument("--json-out", type=Path, help="write all results here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # one run, in this process
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("make_inputs", "inputs", "work", "json_out", "result_file"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    if args.one:
        try:
            result = measure_one(args)
        except Exception as e:  # before or around the run (ray.init, importing the job): still a result
            traceback.print_exc()
            result = {"impl": args.impl, "size": args.size, "ok": False, "error": f"{type(e).__name__}: {e}"}
        if args.result_file:
            args.result_file.write_text(json.dumps(result))
        print(json.dumps(result), flush=True)
        return
    if args.make_inputs is None and args.inputs is None:
        p.error("give --make-inputs DIR (make input shards) and/or --inputs DIR (measure)")
    if args.make_inputs is not None:
        if args.max_size < 1 or args.base_shards < 1:
            p.error("--max-size and --base-shards must be >= 1")
        make_inputs(args.make_inputs, max_size=args.max_size, base_shards=args.base_shards,
                    image_size=args.image_size, processes=args.processes)
    if args.inputs is not None:
        args.work = args.work or Path(tempfile.mkdtemp(prefix="prepare-scale-"))
        measure(args)


if __name__ == "__main__":
    main()
