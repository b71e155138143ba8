"""The shapes attribute classifier evaluation reads images with. Torch only.

    render_sample (every colour/shape pair, held-out ones included; a share rendered at 2x and
    area-downsampled, as prepared data reaches a smaller model) ─▶ uint8 (N, S, S, 3) + labels
    ─▶ small CNN, one softmax head per label column of tessera.inference.evaluation.scenes (layout + per
    object slot colour/shape/size), trained on light blur / noise / gain jitter so it also reads
    decoder output ─▶ classifier.safetensors + classifier.json (json last; reused while its spec
    is unchanged)

The classifier must know the held-out pairs the prior never saw, or it could not say whether a
generated "red triangle" is one, so it is trained on its own renders, never on the prepared data.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tessera import published, storage
from tessera.config import ClassifierConfig
from tessera.data import shapes
from tessera.inference.evaluation.scenes import HEADS, NUM_LABELS, canonical_scene, score_labels
from tessera.models.dvae import to_model_input

log = logging.getLogger("tessera.evaluate")

WEIGHTS = "classifier.safetensors"
META = "classifier.json"
KIND = "tessera.shapes_classifier"
FORMAT_VERSION = 1
_HEAD_SIZES = [n for _, n in HEADS]


# Bumped whenever the renders, the network or the augmentation change, so a classifier saved by
# other code is trained again rather than reused.
RECIPE = 3
RUN_FIELDS = {"threads", "uri", "retrain"}  # how and where it runs, not what it learns


def spec_of(c: ClassifierConfig, dvae_sha256: str = "") -> dict:
    """Everything that decides the trained weights (a saved classifier is reused only when its spec
    equals this): the config's recipe fields, resolved image_size and max_objects, the recipe
    version and, when it learns a dVAE's reconstructions, that dVAE's weights digest."""
    if c.image_size is None or c.max_objects is None:
        raise ValueError("the classifier's image_size and max_objects must be resolved before training")
    return c.model_dump(mode="json", exclude=RUN_FIELDS) | {
        "dvae_sha256": dvae_sha256 if c.recon_fraction > 0 else "", "recipe": RECIPE}


def config_of(spec: dict) -> ClassifierConfig:
    return ClassifierConfig(**{k: v for k, v in spec.items() if k in ClassifierConfig.model_fields})


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """(B, 3, S, S) in [0, 1] -> logits (B, sum of head sizes). Spatial features are flattened,
    not pooled: where an object is (left, top, ...) is part of the answer."""

    def __init__(self, spec: ClassifierConfig):
        super().__init__()
        if spec.image_size % 8:
            raise ValueError(f"classifier image_size must be a multiple of 8, got {spec.image_size}")
        self.spec = spec
        w, cells = spec.width, (spec.image_size // 8) ** 2
        self.features = nn.Sequential(
            _block(3, w), _block(w, w), nn.MaxPool2d(2),  # (B, w, S/2, S/2)
            _block(w, 2 * w), _block(2 * w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, S/4, S/4)
            _block(2 * w, 2 * w), nn.MaxPool2d(2),  # (B, 2w, S/8, S/8)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * cells, spec.hidden), nn.ReLU(inplace=True),
                                  nn.Linear(spec.hidden, sum(_HEAD_SIZES)))
        # Channels-last convolutions: a training step on 2 CPU cores took 54 ms instead of 73 ms
        # (batch 128, width 16, 32 px). Same values, another memory layout; saves are contiguous.
        self.features.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.contiguous(memory_format=torch.channels_last)))

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum over heads of the cross-entropy; labels (B, NUM_LABELS)."""
        return sum(F.cross_entropy(lg, labels[:, i])
                   for i, lg in enumerate(self(x).split(_HEAD_SIZES, dim=1)))

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, *, batch: int = 512) -> np.ndarray:
        """Labels (N, NUM_LABELS) int64 of uint8 images (N, H, W, 3) at any square size (area-
        resized to the classifier's), or of float (N, 3, S, S) in [0, 1]."""
        was_training = self.training
        self.eval()
        out = []
        for s in range(0, len(images), batch):
            x = to_model_input(images[s:s + batch], self.spec.image_size)
            out.append(torch.stack([lg.argmax(1) for lg in self(x).split(_HEAD_SIZES, dim=1)], dim=1))
        self.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros((0, NUM_LABELS), np.int64)


def render_scenes(n: int, *, seed: int, image_size: int, double_fraction: float = 0.0,
                  start: int = 0, max_objects: int = shapes.MAX_OBJECTS) -> tuple[np.ndarray, np.ndarray]:
    """n shapes scenes with no held-out pair excluded: uint8 images (n, S, S, 3) and labels
    (n, NUM_LABELS). A `double_fraction` share is rendered at 2S and 2x2-averaged."""
    import io

    from PIL import Image

    images = np.empty((n, image_size, image_size, 3), np.uint8)
    labels = np.empty((n, NUM_LABELS), np.int64)
    doubled = np.random.default_rng([seed, 7]).random(n) < double_fraction
    for i in range(n):
        size = image_size * (2 if doubled[i] else 1)
        s = shapes.render_sample(start + i, seed=seed, image_size=size, held_out=(), max_objects=max_objects)
        with Image.open(io.BytesIO(s.image_png)) as im:
            a = np.asarray(im.convert("RGB"))
        if doubled[i]:
            a = a.reshape(image_size, 2, image_size, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        images[i] = a
        labels[i] = canonical_scene(s.attributes).labels()
    return images, labels


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Decoder-like damage on float (B, 3, S, S): per-channel gain ±6%; on 40% a Gaussian blur
    (σ 0.4-1.4 px), on 20% a trip through half resolution (area down, bilinear up), as a dVAE
    whose tokens cover 4x4 pixels smears edges; additive noise (σ ≤ 0.05). All far below the gaps
    between the dataset's colours (≥ ~100/255 on some channel)."""
    b, s = x.shape[0], x.shape[-1]
    x = x * (1 + (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.12)
    sigma = 0.4 + float(torch.rand(1, generator=generator))
    k = torch.exp(-torch.arange(-3, 4).float() ** 2 / (2 * sigma**2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 7, 7)
    blurred = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="replicate"), kernel, groups=3)
    halved = F.interpolate(F.interpolate(x, size=(s // 2, s // 2), mode="area"), size=(s, s), mode="bilinear",
                           align_corners=False)
    u = torch.rand(b, generator=generator)[:, None, None, None]
    x = torch.where(u < 0.4, blurred, torch.where(u < 0.6, halved, x))
    x = x + torch.randn(x.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator) * 0.05
    return x.clamp(0, 1)


def reconstruct(dvae, x: torch.Tensor, *, batch: int = 512) -> torch.Tensor:
    """decode(encode(x)) of float (N, 3, S, S) in [0, 1], quantised to 8 bits as a PNG would be."""
    with torch.no_grad():
        out = torch.cat([dvae.decode(dvae.encode(x[i:i + batch])) for i in range(0, len(x), batch)])
    return out.clamp(0, 1).mul(255).round().div(255)


def train_classifier(spec: ClassifierConfig, *, dvae=None,
                     report_every: int = 100) -> tuple[AttributeClassifier, dict]:
    """Render, train, and measure on fresh renders (other seeds); returns the model (eval mode)
    and {"train_seconds", "render_seconds", "accuracy": {"real", "real_2x"}, ...}. With
    spec.recon_fraction > 0, `dvae` (the evaluated bundle's) reconstructs the renders."""
    started = time.time()
    torch.manual_seed(spec.seed)
    images, labels = render_scenes(spec.train_samples, seed=spec.seed, image_size=spec.image_size,
                                   double_fraction=spec.double_fraction, max_objects=spec.max_objects)
    x_all = to_model_input(images, spec.image_size)  # (N, 3, S, S)
    y_all = torch.from_numpy(labels)
    if spec.recon_fraction > 0:
        if dvae is None:
            raise ValueError("recon_fraction > 0 needs the dVAE whose reconstructions the classifier learns")
        r_all = reconstruct(dvae, x_all)
    rendered = time.time() - started
    model = AttributeClassifier(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.15)
    g = torch.Generator().manual_seed(spec.seed)
    t0, window = time.time(), []
    for step in range(1, spec.steps + 1):
        idx = torch.randint(0, len(x_all), (spec.batch_size,), generator=g)
        x = x_all[idx]
        if spec.recon_fraction > 0:
            use = torch.rand(len(idx), generator=g) < spec.recon_fraction
            x = torch.where(use[:, None, None, None], r_all[idx], x)
        x = augment(x, g) if spec.augment else x
        loss = model.loss(x, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if step % report_every == 0 or step == spec.steps:
            rate = step / (time.time() - t0)
            log.info("classifier step %d/%d loss %.4f (%.1f steps/s, ETA %.0f s)", step, spec.steps,
                     sum(window) / len(window), rate, (spec.steps - step) / rate)
            window = []
    model.eval()
    trained = time.time() - started
    info = {"render_seconds": round(rendered, 1), "train_seconds": round(trained, 1),
            "accuracy": measure_on_renders(model, spec)}
    return model, info


def measure_on_renders(model: AttributeClassifier, spec: ClassifierConfig) -> dict:
    """score_labels on fresh renders (seeds the training never used): rendered at the
    classifier's size ("real") and at 2x, area-downsampled ("real_2x")."""
    out = {}
    for name, frac, seed in (("real", 0.0, spec.seed + 1), ("real_2x", 1.0, spec.seed + 2)):
        images, labels = render_scenes(spec.test_samples, seed=seed, image_size=spec.image_size,
                                       double_fraction=frac,
                                       max_objects=spec.max_objects)
        out[name] = score_labels(model.predict(images), labels)
    return out


def save_classifier(model: AttributeClassifier, info: dict, uri: str, *, spec: dict,
                    options: storage.StorageOptions | None = None) -> dict:
    """classifier.safetensors, then classifier.json (last: its presence marks a complete save)."""
    from safetensors.torch import save

    meta = {**published.header(KIND, format_version=FORMAT_VERSION), "spec": spec,
            "heads": [list(h) for h in HEADS], **info}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(uri, WEIGHTS), save(state), options)
    storage.write_json(storage.join(uri, META), meta, options)
    return meta


def load_classifier(uri: str, *, spec: dict | None = None,
                    options: storage.StorageOptions | None = None) -> tuple[AttributeClassifier, dict] | None:
    """(model, meta) saved at uri, or None when there is none or it was trained with another spec
    (or other heads). A damaged save raises ValueError naming the file."""
    from safetensors.torch import load

    meta_uri = storage.join(uri, META)
    if not storage.exists(meta_uri, options):
        return None
    try:
        meta = json.loads(storage.read_bytes(meta_uri, options))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_uri}: not valid JSON ({e})") from None
    if meta.get("kind") != KIND or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_uri}: not a tessera shapes classifier (kind={meta.get('kind')!r})")
    saved = meta.get("spec") or {}
    if (spec is not None and saved != spec) or meta.get("heads") != [list(h) for h in HEADS]:
        return None
    try:
        model = AttributeClassifier(config_of(saved))
    except ValueError as e:  # pydantic's ValidationError is one
        raise ValueError(f"{meta_uri}: its spec is not a classifier config ({e})") from None
    weights_uri = storage.join(uri, WEIGHTS)
    try:
        model.load_state_dict(load(storage.read_bytes(weights_uri, options)))
    except (RuntimeError, ValueError) as e:  # safetensors raises its own error for damaged bytes
        raise ValueError(f"{weights_uri}: weights do not fit the spec in {META} ({e})") from None
    except Exception as e:
        raise ValueError(f"{weights_uri}: unreadable safetensors ({e})") from None
    return model.eval(), meta


def ensure_classifier(c: ClassifierConfig, uri: str, *, options: storage.StorageOptions | None = None,
                      retrain: bool = False, dvae=None,
                      dvae_sha256: str = "") -> tuple[AttributeClassifier, dict, bool]:
    """The classifier saved at uri when its spec (spec_of) matches, else a freshly trained and
    saved one. `c` has image_size and max_objects resolved. Returns (model, meta, trained_now)."""
    spec = spec_of(c, dvae_sha256)
    if not retrain:
        found = load_classifier(uri, spec=spec, options=options)
        if found is not None:
            return found[0], found[1], False
    model, info = train_classifier(c, dvae=dvae)
    return model, save_classifier(model, info, uri, spec=spec, options=options), True
