"""A dVAE recipe on the shapes data, judged as evaluate judges it: how often the attribute classifier
(trained on renders only) reads the dVAE's reconstructions right, by attribute, shape and size.

    python bench/dvae_recipe.py --config jobs/configs/debug.yaml
    python bench/dvae_recipe.py --set dvae.num_tokens=2048 --shape hidden=48 --steps 1000

One process, no DeepSpeed, no Ray: the config's `dvae` recipe (bench/dvae_init.py's loop) from the
released initialisation on renders as prepare writes them, then 512 fixed validation renders
through encode → decode → classifier. --shape overrides fields of the dVAE's shape (grid_size,
hidden, blocks_per_group, decoder_init, decoder_kernel) beyond what the config can set. Prints the
figures and the seconds per training step, then one JSON line; --grid writes originals over
reconstructions as a PNG. The classifier is the one evaluate would train for this config, kept
under --classifier (trained there once, ~1 min).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "bench"))


def _shape_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = int(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "jobs/configs/debug.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    ap.add_argument("--shape", action="append", default=[], metavar="FIELD=INT")
    ap.add_argument("--steps", type=int, default=None, help="default: dvae.steps")
    ap.add_argument("--batch", type=int, default=None, help="default: micro_batch x num_workers")
    ap.add_argument("--train-images", type=int, default=8000)
    ap.add_argument("--classifier", default=str(ROOT / "runs/bench/classifier"))
    ap.add_argument("--grid", default=None, help="write originals and reconstructions here (PNG)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import numpy as np
    import torch
    from dvae_init import shapes_images, train

    from tessera.config import load_config
    from tessera.inference.evaluation.classifier import ensure_classifier
    from tessera.inference.evaluation.scenes import SHAPES, SIZES, score_labels
    from tessera.models.dvae import psnr, to_model_input, to_pixels
    from tessera.training.dvae_loop import dvae_shape, reconstruction_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    shape = replace(dvae_shape(cfg), **_shape_overrides(args.shape))
    steps = args.steps or cfg.dvae.steps
    batch = args.batch or cfg.dvae.micro_batch * cfg.dvae.num_workers
    c = cfg.evaluate.classifier
    c = c.model_copy(update={"image_size": c.image_size or cfg.data.resolution,
                             "max_objects": c.max_objects or cfg.data.source.shapes.max_objects})
    classifier, _, _ = ensure_classifier(c, args.classifier)

    images = shapes_images(cfg, "train", 0, args.train_images, shape.image_size)
    val, labels = shapes_images(cfg, "train", 10**6, 512, shape.image_size, labels=True)
    r = train(cfg.dvae.init, cfg, images, val, steps, batch, shape=shape)
    model = r.pop("model")
    vx = to_model_input(torch.as_tensor(val), shape.image_size)
    with torch.no_grad():
        recon = model.decode(model.encode(vx))
    predicted = classifier.predict(to_pixels(recon))
    scores = score_labels(predicted, labels)
    on_renders = score_labels(classifier.predict(val), labels)["caption_accuracy"]
    # Shape read right, by true shape and by size (slot 0: the demo's scenes have one object).
    ok = predicted[:, 2] == labels[:, 2]
    by_shape = {s: round(float(ok[labels[:, 2] == i].mean()), 3) for i, s in enumerate(SHAPES)}
    by_size = {s: round(float(ok[labels[:, 3] == i].mean()), 3) for i, s in enumerate(SIZES)}
    confusion = np.zeros((len(SHAPES), len(SHAPES) + 1), np.int64)
    for t, p in zip(labels[:, 2], predicted[:, 2], strict=True):
        confusion[t, min(p, len(SHAPES))] += 1
    out = {"set": args.set, "shape": shape.to_dict(), "steps": steps, "batch": batch,
           "params": sum(p.numel() for p in model.parameters()),
           "seconds_per_step": round(r["seconds"] / steps, 3),
           "val_psnr": round(float(psnr(recon, vx)), 3), "codes_used": r["codes_used"],
           "classifier_on_renders": on_renders, "read_right": scores["caption_accuracy"],
           "colour": scores["colour"], "shape_right": scores["shape"], "size": scores["size"],
           "layout": scores["layout"], "shape_by_true_shape": by_shape, "shape_by_size": by_size,
           "shape_confusion": {s: confusion[i].tolist() for i, s in enumerate(SHAPES)}}
    print(f"read right {out['read_right']:.1%} (shape {out['shape_right']:.1%}, colour "
          f"{out['colour']:.1%}, size {out['size']:.1%}); by shape {by_shape}; by size {by_size}; "
          f"PSNR {out['val_psnr']:.2f} dB, codes {out['codes_used']:.1%}, "
          f"{out['seconds_per_step']:.3f} s/step, {out['params']:,} parameters", flush=True)
    if args.grid:
        Path(args.grid).write_bytes(reconstruction_grid(vx[:32], recon[:32]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
