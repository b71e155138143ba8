"""The training input loader: a prepared dataset's manifest -> the Ray Data dataset a training
stage consumes, and the worker-side iterator over its shard.

    manifest.json ─▶ shard URIs ─read_webdataset (file order shuffled per epoch, seeded)─▶
    decode PNG/JPEG + tokenize captions [+ the dVAE's random crops] (fused into the read tasks)
    ─▶ streaming_split by Ray Train ─▶ iter_torch_batches (local shuffle buffer) in each worker

Batches are {"image": uint8 (B, H, W, 3), "text_ids": int32 (B, L), "text_mask": bool (B, L),
"sample_id": int64 (B,)}. Images stay uint8 until the model moves them to its device (4x less to
copy than float); sample_id is a stable hash of the sample key, for bookkeeping and tests.

Crops (the paper's Listings 1 and 2): only the train split of the dataset a stage asks for with
`crops` (the dVAE: tessera.training.ray_io.dvae_crops), and encode's extra views; validation
images are never cropped.
Each sample's crop is drawn from (seed, epoch, sample_id), so it does not depend on which task,
worker or order the sample went through; "epoch" is the dataset's execution index, the counter
Ray Data's own per-epoch reseeding (the file shuffle above) uses.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tessera import published, storage
from tessera.config import TesseraConfig
from tessera.data.prepare import MANIFEST_KIND
from tessera.data.tokenizer import CaptionTokenizer


def load_manifest(data_uri: str, options: storage.StorageOptions | None = None) -> dict:
    return published.read(data_uri, MANIFEST_KIND, what="prepared dataset", produced_by="jobs/prepare.py",
                          options=options)


def shard_uris(data_uri: str, manifest: dict, split: str) -> list[str]:
    splits = manifest["splits"]
    if split not in splits or not splits[split]["shards"]:
        raise ValueError(f"{data_uri}: prepared dataset has no {split!r} split (has {sorted(splits)})")
    return [storage.join(data_uri, s["path"]) for s in splits[split]["shards"]]


def sample_id(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


@functools.lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str) -> CaptionTokenizer:
    # One parse per worker process, not per batch.
    return CaptionTokenizer.from_json(tokenizer_json)


def decode_batch(batch: dict, *, tokenizer_json: str, text_len: int, image_ext: str, resolution: int) -> dict:
    """Raw WebDataset columns (bytes) -> model-ready numpy arrays."""
    images = np.empty((len(batch["__key__"]), resolution, resolution, 3), dtype=np.uint8)
    for i, data in enumerate(batch[image_ext]):
        with Image.open(io.BytesIO(data)) as im:
            images[i] = np.asarray(im.convert("RGB"))
    captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in batch["txt"]]
    ids, mask = _tokenizer(tokenizer_json).encode(captions, text_len=text_len)
    return {
        "image": images,
        "text_ids": ids,
        "text_mask": mask,
        "sample_id": np.array([sample_id(k.rsplit("/", 1)[-1]) for k in batch["__key__"]], dtype=np.int64),
    }


@dataclass(frozen=True)
class Crops:
    """The paper's random crop of a training image, drawn per sample:

        a full square (side s = the shorter side): anywhere (Listing 1), or with its offset in the
        middle quarter of the slack (`central`, Listing 2) ─▶ resized to t x t, t uniform over the
        integers round(scale[0]·size) .. round(scale[1]·size) ─▶ a random size x size crop of that
        ─▶ a random left-right flip (`flip`: Listing 1 only)

    The resize and the crop are done as one resampling of the crop's window (side s·size/t) of
    the source: area (box) filtering when it shrinks, as the listings' AREA resize, bilinear when
    it enlarges. Unlike the listings, t is not capped at s: prepared images are already at the
    model's resolution (s = size), where the capped listings leave the image whole; uncapped, the
    window is 1/scale of the side and is enlarged to `size`.
    """

    size: int  # output side (the model's input resolution)
    scale: tuple[float, float]  # t / size, each >= 1
    flip: bool = False
    central: bool = False
    seed: int = 0

    def __post_init__(self):
        lo, hi = self.scale
        if not 1 <= lo <= hi:
            raise ValueError(f"crop scale must satisfy 1 <= low <= high, got {self.scale}")

    def crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (size, size, 3)."""
        h, w = image.shape[:2]
        s, n = min(h, w), self.size
        oy, ox = (_square_offset(rng, slack, self.central) for slack in (h - s, w - s))
        t = int(rng.integers(round(self.scale[0] * n), round(self.scale[1] * n) + 1))
        dy, dx = (int(d) for d in rng.integers(0, t - n + 1, size=2))
        k = s / t  # source pixels per pixel of the t x t resize
        box = (ox + dx * k, oy + dy * k, ox + (dx + n) * k, oy + (dy + n) * k)
        resample = Image.Resampling.BOX if s >= t else Image.Resampling.BILINEAR
        out = np.asarray(Image.fromarray(image).resize((n, n), resample=resample, box=box))
        if self.flip and rng.random() < 0.5:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)

    def crop_batch(self, images: np.ndarray, sample_ids: np.ndarray, *, draw: int) -> np.ndarray:
        """uint8 (B, H, W, 3) -> uint8 (B, size, size, 3); sample i's crop is drawn from
        (seed, draw, sample_ids[i]) alone, so `draw` (an epoch, a view) decides them all."""
        out = np.empty((len(images), self.size, self.size, 3), np.uint8)
        for i, (image, sid) in enumerate(zip(images, sample_ids, strict=True)):
            out[i] = self.crop(image, sample_rng(self.seed, draw, int(sid)))
        return out


def _square_offset(rng: np.random.Generator, slack: int, central: bool) -> int:
    if not central:
        return int(rng.integers(0, slack + 1))
    # Listing 2: uniform in [3·slack // 8, max(3·slack // 8 + 1, 5·slack // 8)).
    lo = 3 * slack // 8
    return int(rng.integers(lo, max(lo + 1, 5 * slack // 8)))


def sample_rng(*parts: int) -> np.random.Generator:
    """A generator for one sample's draw: parts are any ints (negative ones wrap to uint64)."""
    return np.random.default_rng([p % 2**64 for p in parts])


def dataset_epoch() -> int:
    """Inside a Ray Data task: which execution of its dataset this is (0, 1, ...: one per epoch
    of a Train run, whose streaming_split runs the dataset again each epoch). This is the private
    counter Ray Data's public per-epoch reseeding keys on (FileShuffleConfig's
    reseed_after_execution, ray.data.expressions.random); 0 outside a task. A job resumed from a
    checkpoint builds its dataset anew, so its crops start again from epoch 0's, as its file
    order does."""
    from ray.data import DataContext

    return int(getattr(DataContext.get_current(), "_execution_idx", 0))


def decode_shards(batch: dict, *, crops: Crops | None = None, **decode_kwargs) -> dict:
    """Whole tar shards (one per row, as read_binary_files gives them) -> decoded samples, each
    image cropped by `crops` (drawn for this execution of the dataset) when given."""
    from tessera.data.tar import TarReadResult, iter_tar_samples

    ext = decode_kwargs["image_ext"]
    cols: dict[str, list] = {"__key__": [], ext: [], "txt": []}
    for data in batch["bytes"]:
        result = TarReadResult()
        for s in iter_tar_samples(io.BytesIO(data), result):
            cols["__key__"].append(s.key)
            cols[ext].append(s.files[ext])
            cols["txt"].append(s.files["txt"])
        if result.truncated:
            # Prepared shards are written atomically, so this is storage corruption, not input noise.
            raise OSError(f"prepared shard is damaged: {result.error}")
    out = decode_batch(cols, **decode_kwargs)
    if crops is not None:
        out["image"] = crops.crop_batch(out["image"], out["sample_id"], draw=dataset_epoch())
    return out


def read_validation_samples(data_uri: str, manifest: dict, *, limit: int, text_len: int,
                            options: storage.StorageOptions | None = None) -> dict[str, np.ndarray] | None:
    """The first `limit` samples of the prepared val split, read directly (no Ray), so every rank
    reads the same ones: {"image", "text_ids", "text_mask"} as decode_batch gives them; None when
    the split is missing or empty."""
    if not manifest["splits"].get("val", {}).get("num_samples"):
        return None
    tokenizer_json = storage.read_bytes(storage.join(data_uri, manifest["tokenizer"]["path"]),
                                        options).decode()
    parts: dict[str, list] = {"image": [], "text_ids": [], "text_mask": []}
    for uri in shard_uris(data_uri, manifest, "val"):
        out = decode_shards({"bytes": [storage.read_bytes(uri, options)]}, tokenizer_json=tokenizer_json,
                            text_len=text_len, image_ext=manifest["image_format"],
                            resolution=manifest["resolution"])
        for k in parts:
            parts[k].append(out[k])
        if sum(len(i) for i in parts["image"]) >= limit:
            break
    return {k: np.concatenate(v)[:limit] for k, v in parts.items()}


def build_training_dataset(cfg: TesseraConfig, *, split: str = "train", data_uri: str | None = None,
                           crops: Crops | None = None):
    """The Ray Data dataset a training stage consumes (lazy: nothing is read until iterated);
    `crops` (the dVAE's: ray_io.dvae_crops(cfg)) applies to the train split only."""
    import ray
    from ray.data import FileShuffleConfig

    opts = storage.StorageOptions.from_config(cfg.storage)
    data_uri = data_uri or cfg.paths.data
    manifest = load_manifest(data_uri, opts)
    uris = shard_uris(data_uri, manifest, split)
    fs, _ = storage.resolve(uris[0], opts)
    paths = [storage.resolve(u, opts)[1] for u in uris]
    tokenizer_json = storage.read_bytes(storage.join(data_uri, manifest["tokenizer"]["path"]), opts).decode()
    shuffle = (
        FileShuffleConfig(seed=cfg.loader.shuffle_seed, reseed_after_execution=True)
        if cfg.loader.file_shuffle and split == "train"
        else None
    )
    # One row per shard (the whole tar, ~1-30 MB), parsed and decoded in the same task: whole
    # blocks (batch_size=None) let Ray fuse the decode into the read, so raw bytes never pass
    # through the object store, and no per-sample Python rows are built on the way.
    ds = ray.data.read_binary_files(paths, filesystem=fs, shuffle=shuffle, override_num_blocks=len(paths))
    return ds.map_batches(
        decode_shards,
        batch_size=None,
        fn_kwargs=dict(tokenizer_json=tokenizer_json, text_len=cfg.loader.text_len,
                       image_ext=manifest["image_format"], resolution=manifest["resolution"],
                       crops=crops if split == "train" else None),
    )


def _writable_collate():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class WritableTensors(NumpyBatchCollateFn):
        def __call__(self, batch: dict) -> dict:
            import torch

            return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in batch.items()}

    return WritableTensors()


def epoch_shuffle_seed(seed: int, epoch: int) -> int:
    """The row order's seed in an epoch: the stream's shuffle buffer and EpochCache's permutation."""
    return seed + 1_000_003 * epoch


def iter_training_batches(shard, loader_cfg, *, epoch: int = 0):
    """Inside a Train worker: torch batches from `ray.train.get_dataset_shard(...)`."""
    buffer = loader_cfg.local_shuffle_buffer
    return shard.iter_torch_batches(
        batch_size=loader_cfg.batch_size,
        local_shuffle_buffer_size=buffer or None,
        local_shuffle_seed=epoch_shuffle_seed(loader_cfg.shuffle_seed, epoch) if buffer else None,
        prefetch_batches=loader_cfg.prefetch_batches,
        # Without a shuffle buffer the arrays are views of read-only blocks in the object store;
        # copy them so a training step may modify its batch in place.
        collate_fn=None if buffer else _writable_collate(),
        drop_last=False,
    )


class EpochCache:
    """A Train worker's shard kept in memory after its first whole epoch (loader.cache_mb), then
    reshuffled there each later epoch instead of streamed again: on a small dataset every epoch's
    Ray Data start (read tasks, the shuffle buffer refilling) stalled training for seconds.

    `fill(batches)` passes the first epoch's batches through unchanged and keeps copies while they
    total at most `limit_bytes`; past that, or for a batch that is not all tensors/arrays, it keeps
    nothing and every epoch streams. `epoch(n)` (once `full`) yields the kept rows in a seeded
    permutation of (seed, n), batch_size at a time, the last batch short as in the stream."""

    def __init__(self, limit_bytes: int, batch_size: int, seed: int):
        self.limit, self.batch_size, self.seed = limit_bytes, batch_size, seed
        self.rows: dict | None = None
        self._off = limit_bytes <= 0

    @property
    def full(self) -> bool:
        return self.rows is not None

    def fill(self, batches):
        import torch

        parts, size = [], 0
        for batch in batches:
            if not self._off:
                arrays = all(isinstance(v, (torch.Tensor, np.ndarray)) for v in batch.values())
                size += sum(v.nbytes for v in batch.values()) if arrays else 0
                if not arrays or size > self.limit:
                    self._off, parts = True, []  # too big, or not arrays: stream every epoch
                else:
                    parts.append({k: v.copy() if isinstance(v, np.ndarray) else v.clone() for k, v in batch.items()})
            yield batch
        if parts and not self._off:  # the whole epoch went through: keep it
            self.rows = {k: (torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor)
                             else np.concatenate([p[k] for p in parts])) for k in parts[0]}

    def epoch(self, n: int):
        import torch

        count = len(next(iter(self.rows.values())))
        order = torch.randperm(count, generator=torch.Generator().manual_seed(epoch_shuffle_seed(self.seed, n)))
        for i in range(0, count, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield {k: v[idx] if isinstance(v, torch.Tensor) else v[idx.numpy()] for k, v in self.rows.items()}


def train_data_config(cfg: TesseraConfig):
    """Ray Train's DataConfig with Data's CPU use bounded, so reading never waits on the CPUs
    the Train workers hold (and vice versa) on a small machine."""
    from ray.data import ExecutionOptions, ExecutionResources
    from ray.train import DataConfig

    options = ExecutionOptions()
    if cfg.ray.data_cpu_limit is not None:
        options.resource_limits = ExecutionResources(cpu=cfg.ray.data_cpu_limit)
    return DataConfig(execution_options=options)
