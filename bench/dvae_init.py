"""The dVAE's initialisation, side by side: OpenAI's released code (w ~ normal(0, 1/√fan_in),
b = 0) against PyTorch's Conv2d default, trained the same way in one process.

    python bench/dvae_init.py --config jobs/configs/debug.yaml --steps 800
    python bench/dvae_init.py --config jobs/configs/debug.yaml --set dvae.logit_scale=1 ...

For each init (same seed, same batches): the stage's recipe from the config's `dvae` section
(loss, τ/β schedules, usage weight, logit scale, AdamW, warm-up and cosine LR, clipping) on
shapes renders at the dVAE's resolution, one process and no DeepSpeed; then validation PSNR and
codebook use of argmax tokens on 512 fixed validation renders, the encoder's initial logit spread
(std over K, the figure dvae.logit_scale answers), and the ratio released / torch. One JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))


def shapes_images(cfg, split: str, start: int, count: int, size: int, *, labels: bool = False):
    """uint8 (count, size, size, 3) renders as prepare writes them (the source's size, box-resized);
    with labels=True also their scene labels (count, NUM_LABELS)."""
    import io

    import numpy as np
    from PIL import Image

    from tessera.data.shapes import render_sample
    from tessera.inference.evaluation.scenes import canonical_scene

    s = cfg.data.source.shapes
    out, scenes = [], []
    for i in range(start, start + count):
        sample = render_sample(i, seed=s.seed, image_size=s.image_size, split=split,
                               max_objects=s.max_objects)
        out.append(np.asarray(Image.open(io.BytesIO(sample.image_png)).convert("RGB")
                              .resize((size, size), Image.BOX)))
        scenes.append(canonical_scene(sample.attributes).labels())
    return (np.stack(out), np.stack(scenes)) if labels else np.stack(out)


def train(init: str, cfg, images, val, steps: int, batch: int, *, shape=None) -> dict:
    """The config's dvae recipe from `init`; the figures, and under "model" the trained DVAE."""
    import torch

    from tessera.models.dvae import DVAE, codebook_usage, psnr, to_model_input
    from tessera.training import schedules
    from tessera.training.dvae_loop import dvae_shape
    from tessera.training.skeleton import decay_groups

    t = cfg.dvae
    shape = shape or dvae_shape(cfg)
    torch.manual_seed(t.seed)
    model = DVAE(shape, init=init)
    vx = to_model_input(torch.as_tensor(val), shape.image_size)
    with torch.no_grad():
        spread = float(model.encoder(vx[:64]).std(dim=1).mean())
    opt = torch.optim.AdamW(decay_groups(model, t.weight_decay), lr=t.lr, betas=t.betas)
    order = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=order)
        x = to_model_input(torch.as_tensor(images[idx.numpy()]), shape.image_size)
        for g in opt.param_groups:
            g["lr"] = t.lr * schedules.lr_factor(step, warmup=t.warmup_steps, total=steps,
                                                 min_ratio=t.min_lr_ratio)
        tau = schedules.temperature(step, start=t.tau_start, end=t.tau_end, steps=t.tau_steps or steps)
        beta = schedules.kl_weight(step, end=t.beta_max, steps=t.beta_steps)
        out = model(x, tau=tau, beta=beta, usage_weight=t.usage_weight, recon_loss=t.recon_loss,
                    logit_scale=t.logit_scale)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
    model.eval()
    with torch.no_grad():
        tokens = model.encode(vx)
        recon = model.decode(tokens)
    _, used = codebook_usage(tokens, shape.num_tokens)
    return {"init": init, "val_psnr": round(float(psnr(recon, vx)), 3), "codes_used": round(used, 4),
            "initial_logit_std": round(spread, 4),
            "train_psnr_last": round(float(psnr(out["recon"].detach(), x)), 3),
            "seconds": round(time.perf_counter() - start, 1), "model": model}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "jobs/configs/debug.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    ap.add_argument("--steps", type=int, default=None, help="default: dvae.steps")
    ap.add_argument("--batch", type=int, default=None, help="default: micro_batch x num_workers")
    ap.add_argument("--train-images", type=int, default=8000)
    args = ap.parse_args()

    import torch

    from tessera.config import load_config
    from tessera.training.dvae_loop import dvae_shape

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(args.config, args.set)
    steps = args.steps or cfg.dvae.steps
    batch = args.batch or cfg.dvae.micro_batch * cfg.dvae.num_workers
    size = dvae_shape(cfg).image_size
    images = shapes_images(cfg, "train", 0, args.train_images, size)
    val = shapes_images(cfg, "train", 10**6, 512, size)
    results = {}
    for init in ("torch", "released"):
        r = train(init, cfg, images, val, steps, batch)
        r.pop("model")
        results[init] = r
        print(f"{init:9s} val PSNR {r['val_psnr']:.2f} dB  codes used {r['codes_used']:.1%}  "
              f"initial logit std {r['initial_logit_std']:.3f}  ({r['seconds']:.0f} s)", flush=True)
    a, b = results["released"], results["torch"]
    print(f"released - torch: PSNR {a['val_psnr'] - b['val_psnr']:+.2f} dB, codes used "
          f"{a['codes_used'] - b['codes_used']:+.1%}")
    print(json.dumps({"steps": steps, "batch": batch, "set": args.set, **{k: v for k, v in results.items()}}))


if __name__ == "__main__":
    main()
