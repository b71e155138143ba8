"""Sampler speed: KV-cached against uncached sampling of the same images, in the same run.

    python bench/sampling.py                      # the debug prior (dim 256, depth 4, 32 + 8×8 tokens)
    python bench/sampling.py --bundle runs/demo/bundle --images 4 --repeats 3
    python bench/sampling.py --size small --device cuda

Prints, per path: seconds per batch (median of --repeats), images/s, ms per image token, and the
cached/uncached speed-up; checks both paths drew the same tokens. The prior's weights do not
change its speed, so without --bundle a randomly initialised prior of the named size is used.
Needs torch only (no Ray), so it runs on a GPU box as is.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import torch  # noqa: E402

from tessera.models.prior import NAMED_SHAPES, Prior  # noqa: E402
from tessera.sampling.sampler import sample_image_tokens  # noqa: E402


def load_prior(args) -> tuple[Prior, str]:
    if args.bundle:
        from tessera.bundle import load_bundle

        b = load_bundle(args.bundle)
        return b.prior, f"bundle {b.name} ({args.bundle})"
    torch.manual_seed(0)
    return Prior(NAMED_SHAPES[args.size]), f"randomly initialised '{args.size}' prior"


def timed(fn, *, repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="a model bundle URI (default: a random prior of --size)")
    p.add_argument("--size", default="debug", choices=sorted(NAMED_SHAPES))
    p.add_argument("--images", type=int, default=4, help="images per batch (one prompt each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--guidance-scale", type=float, default=1.0, help="> 1 adds the caption-free branch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    prior, what = load_prior(args)
    prior = prior.to(device).eval()
    s = prior.shape
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, s.text_vocab, (args.images, s.text_len), generator=gen).to(device)
    mask = (torch.arange(s.text_len) < s.text_len // 2).expand(args.images, -1).to(device)
    print(f"{what}: dim {s.dim}, depth {s.depth}, {s.attention} attention, {s.text_len} caption + "
          f"{s.grid}×{s.grid} image tokens; {args.images} images per batch, guidance {args.guidance_scale}, "
          f"{device.type}, {torch.get_num_threads()} CPU threads, median of {args.repeats}")

    results = {}
    for name, cached in (("kv-cache", True), ("uncached", False)):
        seconds, tokens = timed(lambda c=cached: sample_image_tokens(prior, ids, mask, seed=1, use_cache=c,
                                                                       guidance_scale=args.guidance_scale),
                                repeats=args.repeats, device=device)
        results[name] = (seconds, tokens)
        print(f"  {name:9s} {seconds:8.3f} s per batch  {args.images / seconds:8.2f} images/s  "
              f"{1000 * seconds / s.num_image_tokens:7.2f} ms per image position")
    same = torch.equal(results["kv-cache"][1], results["uncached"][1])
    speedup = results["uncached"][0] / results["kv-cache"][0]
    print(f"  speed-up of the KV cache: {speedup:.1f}x (target >= 5x); same tokens on both paths: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
