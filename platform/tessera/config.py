"""One typed config for every tessera job.

A job reads a YAML preset (jobs/configs/*.yaml), applies `--set dotted.path=value` overrides and
validates the whole thing before any work starts. Every section forbids unknown keys, so a typo is
an error naming its field path rather than a silently ignored setting. The validated model travels
whole into Ray tasks and Train workers (it pickles), so there is one source of truth.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from tessera import storage
from tessera.paths import RunPaths

# The presets ship inside the package (package data), so `--config debug` works from an installed
# wheel; jobs/configs in a checkout links here.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# A location: an object-store URI or a local path; a relative path is resolved where the config
# is loaded (the driver), since workers run elsewhere.
Uri = Annotated[str, AfterValidator(storage.absolute)]


class ConfigError(ValueError):
    """A config a user wrote is wrong; the message names the file and field path at fault."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("debug", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # Where a run's outputs live when a section does not name its own URI.
    root_uri: Uri = Field("runs/debug", validate_default=True)


class StorageConfig(Section):
    """Object-store settings. Credentials are never config: they come from the standard AWS /
    Google variables, instance roles or workload identity, so nothing secret is written to outputs."""

    # S3-compatible endpoint (MinIO, Ceph, a test server); None: AWS_ENDPOINT_URL(_S3), else AWS.
    endpoint_url: str | None = None
    region: str | None = None
    anonymous: bool = False
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(60.0, gt=0)
    # S3 objects above this go up as a multipart upload in parts of this size (S3 allows 5 MiB to
    # 5 GiB, and 10,000 parts: a larger object gets larger parts); a failed upload is aborted.
    multipart_part_mib: int = Field(64, ge=5, le=5120)
    # GCS endpoint (an emulator, a private endpoint); None: STORAGE_EMULATOR_HOST, else Google.
    gcs_endpoint_url: str | None = None


class RayConfig(Section):
    # None: join a running cluster if RAY_ADDRESS is set, else start a local one on 127.0.0.1.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    # CPUs Ray Data may use at once; bounded, Data and Train never wait on each other for a slot.
    data_cpu_limit: float | None = Field(None, gt=0)
    # Prometheus metrics in a Ray the job starts itself; off: an idle local Ray costs ~30% less CPU.
    local_metrics: bool = False


class ShapesConfig(Section):
    num_samples: int = Field(10_000, ge=1)
    num_heldout: int = Field(500, ge=0)
    image_size: int = Field(64, ge=32, le=1024)
    max_objects: int = Field(3, ge=1, le=3)
    seed: int = Field(0, ge=0)
    # (colour, shape) pairs never in training, as "colour shape" strings (checked against the
    # vocabulary by jobs/prepare.py before it starts); None: tessera.data.shapes.DEFAULT_HELD_OUT.
    held_out: list[str] | None = None

    @model_validator(mode="after")
    def _held_out_pairs(self) -> ShapesConfig:
        if self.held_out is not None and not [p for p in self.held_out if p.strip()] and self.num_heldout > 0:
            raise ValueError("held_out is empty but num_heldout > 0: declare pairs or set num_heldout: 0")
        return self


class EmojiConfig(Section):
    """The built-in real data (source.kind: emoji): Google's Noto emoji images (Apache-2.0), 64 px,
    captioned with their lower-cased Unicode names, from the npm package emoji-datasource-google.
    prepare first writes them to source.uri as WebDataset shards (skipped when that package's shards
    are already there: source.json there records its checksum), then reads them as a webdataset source."""

    # name@X.Y.Z, an exact version: npm never changes a published one, so it names one checksum.
    package: str = "emoji-datasource-google@16.0.0"
    # The package tarball, already fetched (a local path, s3:// or gs://); None: `npm pack` (needs npm).
    tarball_uri: Uri | None = None
    # The skin-tone variants as images of their own ("thumbs up sign: medium skin tone").
    skin_tones: bool = True
    samples_per_shard: int = Field(1_000, ge=1)  # images per shard it writes

    @model_validator(mode="after")
    def _exact_version(self) -> EmojiConfig:
        name, _, version = self.package.rpartition("@")
        parts = version.split(".")
        if not name.strip("@") or len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"package: {self.package!r} must name an exact version, "
                             "like emoji-datasource-google@16.0.0")
        return self


class SourceConfig(Section):
    # files: loose {key}.jpg|png|webp + {key}.txt (+ {key}.json) files, img2dataset's `files` layout;
    # emoji: the built-in Noto emoji (source.emoji).
    kind: Literal["shapes", "webdataset", "parquet", "files", "emoji"] = "shapes"
    # A prefix/folder of shards (of loose files for kind files), one shard, or several separated by
    # commas; kind emoji: where its shards are written.
    uri: Uri | None = None
    # Parquet (LAION / img2dataset layout) column names.
    image_column: str = "jpg"
    caption_column: str = "caption"
    key_column: str | None = "key"
    shapes: ShapesConfig = Field(default_factory=ShapesConfig)
    emoji: EmojiConfig = Field(default_factory=EmojiConfig)

    @model_validator(mode="after")
    def _uri_for_files(self) -> SourceConfig:
        if self.kind != "shapes" and not self.uri:
            what = ("the folder or bucket prefix its shards are written to" if self.kind == "emoji"
                    else "a folder or bucket prefix of its files")
            raise ValueError(f"source.kind={self.kind!r} needs source.uri ({what})")
        return self


class HeldoutConfig(Section):
    """Samples of any source kept out of train and val and published as the held-out split, as
    the shapes source's novel colour/shape pairs are, so a model is evaluated on captions its prior
    never saw. The ways combine: a sample is held out when any of them names it. Captions match
    case- and whitespace-insensitively (the tokenizer lowercases: the prior could not tell them apart)."""

    captions: list[str] = []  # every sample with one of these captions
    keys: list[str] = []  # these samples only (others with the same caption stay)
    # A .txt file (a caption per line) or .jsonl ({"caption": ...} or {"key": ...} per line).
    uri: Uri | None = None
    # This share of the distinct captions, each chosen by a hash of (seed, caption): stable across
    # reruns and as the dataset grows; every sample of a chosen caption is held out.
    fraction: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0  # of the fraction's hash

    @model_validator(mode="after")
    def _file_kind(self) -> HeldoutConfig:
        if self.uri and not self.uri.lower().endswith((".txt", ".jsonl")):
            raise ValueError(f"uri: {self.uri} must be a .txt (a caption per line) or .jsonl file")
        return self

    @property
    def active(self) -> bool:
        return bool(self.captions or self.keys or self.uri or self.fraction)


class DataConfig(Section):
    source: SourceConfig = Field(default_factory=SourceConfig)
    # None: {run.root_uri}/data
    output_uri: Uri | None = None
    resolution: int = Field(64, ge=8, le=1024)
    min_side: int = Field(0, ge=0)
    # Paper: keep images whose aspect ratio is within [1/2, 2].
    max_aspect_ratio: float = Field(2.0, ge=1.0)
    min_caption_chars: int = Field(1, ge=1)
    max_caption_chars: int = Field(1_000, ge=1)
    # Decompression-bomb guard: images declaring more pixels than this are skipped unread.
    max_image_pixels: int = Field(50_000_000, ge=1)
    image_format: Literal["png", "jpg", "webp"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)
    samples_per_shard: int = Field(1_000, ge=1)
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)
    split_seed: int = 0
    # "dhash": skip an image whose difference hash (192-bit colour dHash of the resized image) is
    # within near_duplicate_bits bits of an earlier sample's: re-encoded or rescaled copies under
    # other keys, counted as near_duplicate. Repeated keys are always skipped (duplicate_key).
    near_duplicates: Literal["off", "dhash"] = "off"
    near_duplicate_bits: int = Field(20, ge=0, le=96)
    # Times Ray re-runs a prepare task whose worker died (node lost, OOM-killed); beyond that the job
    # stops, and a rerun resumes: input files already finished are not read again.
    task_retries: int = Field(3, ge=0)
    overwrite: bool = False
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig)

    @model_validator(mode="after")
    def _caption_bounds(self) -> DataConfig:
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError("min_caption_chars must not exceed max_caption_chars")
        return self


class TokenizerConfig(Section):
    vocab_size: int = Field(16_384, ge=260)
    min_frequency: int = Field(2, ge=1)
    lowercase: bool = True
    # Captions streamed to the BPE trainer (a sample is plenty for a caption vocabulary).
    max_training_captions: int = Field(1_000_000, ge=1)


class LoaderConfig(Section):
    batch_size: int = Field(64, ge=1)
    # Caption tokens per sample; longer captions are truncated, shorter ones padded (mask False).
    text_len: int = Field(64, ge=1, le=1024)
    # Seeds the file order, the shuffle buffer, the dVAE's crops and BPE-dropout (with the epoch).
    shuffle_seed: int = 0
    file_shuffle: bool = True
    local_shuffle_buffer: int = Field(1_000, ge=0)
    prefetch_batches: int = Field(2, ge=0)
    # BPE-dropout on the prior's training captions (paper: 0.1): each merge is skipped with this
    # probability when a caption is re-tokenized, afresh each epoch; validation captions never. A
    # segmentation that no longer fits text_len falls back to the plain one (no caption is cut by it).
    bpe_dropout: float = Field(0.0, ge=0, lt=1)
    # MB of its training shard a Train worker keeps in memory after the first epoch, reshuffling it
    # there each epoch instead of streaming it again (not the dVAE's crops, nor with bpe_dropout); 0: off.
    cache_mb: int = Field(0, ge=0)


class StageTrainConfig(Section):
    """What every training stage sets the same way: length, batch, schedule, reporting, workers."""

    steps: int = Field(3_000, ge=1)
    micro_batch: int = Field(32, ge=1)  # per worker
    grad_accum: int = Field(1, ge=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    report_every: int = Field(50, ge=1)
    eval_every: int = Field(500, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    # Checkpoints kept in the run's storage: the latest N (older ones are deleted as new ones land);
    # None keeps every one (weights + optimizer state each time: for a cluster run, terabytes).
    keep_checkpoints: int | None = Field(2, ge=1)
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    # Torch intra-op threads in each worker; None: Ray's default, the floor of cpus_per_worker (at
    # least 1). One worker with 2 threads beats two 1-thread workers on a 2-core machine.
    threads_per_worker: int | None = Field(None, ge=1)
    # Worker placement: PACK fills a node first (multi-GPU nodes); SPREAD uses as many nodes as it can.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    use_gpu: bool = False
    max_failures: int = Field(1, ge=-1)  # -1: retry forever
    seed: int = 0


class DVAETrainConfig(StageTrainConfig):
    """Stage 1: the dVAE and how it is trained (paper §A.2 defaults where they apply)."""

    size: Literal["debug", "small", "paper"] = "debug"
    num_tokens: int | None = Field(None, ge=2)  # override the size's codebook K
    # Conv weights at the start: "released" as OpenAI's dall_e code (normal(0, 1/√fan_in), zero
    # biases); "torch" PyTorch's default (a third of that variance). bench/dvae_init.py compares them.
    init: Literal["released", "torch"] = "released"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)
    tau_start: float = Field(1.0, gt=0)  # Gumbel-softmax temperature, cosine-annealed (paper: 1 -> 1/16)
    tau_end: float = Field(1 / 16, gt=0)
    tau_steps: int | None = Field(None, ge=1)  # steps of the τ annealing; None: all of `steps`
    beta_max: float = Field(6.6, ge=0)  # KL weight β, cosine-ramped from 0 (paper: 6.6 over 5k updates)
    beta_steps: int = Field(5_000, ge=1)
    # Beyond the paper (0 is the paper): weight of KL(batch-mean posterior || uniform), against
    # a short run using few codes.
    usage_weight: float = Field(0.1, ge=0)
    # Beyond the paper (1.0): factor on the encoder's logits before the Gumbel noise in training, so
    # a short run's posteriors outweigh the noise; tokens (argmax) do not depend on it.
    logit_scale: float = Field(1.0, gt=0)
    recon_loss: Literal["logit_laplace", "mse"] = "logit_laplace"  # the paper's; mse for small debug runs
    # The paper's Listing 1 on training images (a random crop, resized to the model's input, and a
    # random flip; validation images never); None: on for size paper only. Off for the shapes sizes:
    # their images are already at the model's resolution, so the crop enlarges (blurs) a part of
    # the image, and at the paper's scale leaves about 1 in 8 shapes objects less than half in frame.
    augment: bool | None = None
    # The listing's resize before its final crop, as multiples of the input side (paper: 9/8 to
    # 12/8): the crop keeps 1/scale of the side. [1, 1.125] keeps shapes' objects in frame.
    augment_scale: tuple[float, float] = (9 / 8, 12 / 8)
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # None: {run.root_uri}/dvae
    output_uri: Uri | None = None

    @model_validator(mode="after")
    def _augment_scale(self) -> DVAETrainConfig:
        lo, hi = self.augment_scale
        if not 1 <= lo <= hi:
            raise ValueError(f"augment_scale must be [low, high] with 1 <= low <= high (the crop cannot "
                             f"be larger than the image), got {list(self.augment_scale)}")
        return self


class PowerSGDConfig(Section):
    """PowerSGD between nodes as the paper's §2.5 and appendix E (tessera.parallel.powersgd)."""

    # Rank of the factors (P: rows × rank, Q: cols × rank) of each weight-matrix shard, i.e. per GPU:
    # the paper's "total compression rank 896 (so that each GPU uses a compression rank of 112 for
    # its parameter shards)" is rank: 112 on 8-GPU nodes.
    rank: int = Field(4, ge=1)
    # How Q changes between steps. fixed (the paper): one shared random Gaussian Q drawn at the start
    # of training and never updated. Beyond the paper: warm_start (Vogels et al.: the last step's
    # factor, one power iteration per step); resample (a fresh Q each step, which the paper reports
    # "causes a large performance hit"; for ablations).
    q_update: Literal["fixed", "warm_start", "resample"] = "fixed"
    error_feedback: bool = True
    seed: int = 0
    # ε of the ε·I added to P before its Householder orthogonalisation (paper: 1e-6), relative to P's
    # largest entry (the paper's P is pre-scaled by tuned constants; tessera's is not).
    orthogonalization_eps: float = Field(1e-6, ge=0, lt=1)
    # Optimizer steps averaged exactly before compression starts (torch's start_powerSGD_iter); 0: none.
    start_step: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "warm_start" in data:
            raise ValueError("powersgd.warm_start was replaced by powersgd.q_update: fixed (the paper), "
                             "warm_start (warm_start: true) or resample (warm_start: false)")
        return data


class ZeroPPConfig(Section):
    # Secondary weight partition within each node (hpZ): backward all-gathers stay in the node.
    hierarchical_partitioning: bool = True
    # qwZ / qgZ: DeepSpeed's quantizer kernels are CUDA-only, so these need use_gpu.
    quantized_weights: bool = False
    quantized_gradients: bool = False


class GradCommConfig(Section):
    """How gradients travel between nodes (tessera.training.grad_comm)."""

    method: Literal["none", "powersgd", "zeropp"] = "none"
    # Workers per node (consecutive ranks); None: detected from each worker's Ray node.
    ranks_per_node: int | None = Field(None, ge=1)
    # Steps between checks that every worker holds bit-identical parameters (replicas_identical); 0: never.
    verify_every: int = Field(0, ge=0)
    powersgd: PowerSGDConfig = Field(default_factory=PowerSGDConfig)
    zeropp: ZeroPPConfig = Field(default_factory=ZeroPPConfig)


class PriorTrainConfig(StageTrainConfig):
    """Stage 2: the transformer prior and how it is trained (paper §B.2 defaults where they apply).

    The shape's vocabularies and grid come from the token dataset's manifest and its caption
    length from `loader.text_len`; `size` names the rest (width, depth, heads, attention)."""

    size: Literal["debug", "small", "paper"] = "debug"
    # Overrides of the named size (None keeps the size's value).
    dim: int | None = Field(None, ge=8)
    depth: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    attention: Literal["full", "sparse"] | None = None  # sparse: the paper's row/column/conv masks
    glu: bool | None = None  # beyond the paper: gated (GEGLU) feed-forward blocks
    normformer: bool | None = None  # beyond the paper: NormFormer's extra norms (as DALL·E Mega)
    # 'auto': FlexAttention (block-sparse) on CUDA, the dense reference path elsewhere.
    attention_impl: Literal["auto", "dense", "flex"] = "auto"
    # Recompute each transformer block's activations in backward (torch checkpoint): less memory, more time.
    activation_checkpointing: bool = False
    # Paper: AdamW, lr 4.5e-4, β = (0.9, 0.96), ε = 1e-8, decay 4.5e-2, gradient norm clipped at 4.
    lr: float = Field(4.5e-4, gt=0)
    weight_decay: float = Field(4.5e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.96)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(4.0, gt=0)
    # Loss = text_weight · caption CE + image_weight · image CE (paper: 1/8, 7/8).
    text_weight: float = Field(1 / 8, ge=0)
    image_weight: float = Field(7 / 8, ge=0)
    # Probability a caption is replaced by all padding: the model also learns p(image), for guidance.
    caption_dropout: float = Field(0.1, ge=0, le=1)
    zero_stage: int = Field(3, ge=0, le=3)
    # auto: bf16 autocast on CUDA, else fp32; fp16 (CUDA only) uses the paper's per-resblock scaling.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Per-resblock gradient scaling; None: exactly with fp16 (true in fp32 exercises it, for tests).
    resblock_grad_scaling: bool | None = None
    # Validation: image loss with and without captions on the first val_samples val rows, and a
    # sample grid of grid_captions val captions x grid_samples images.
    val_samples: int = Field(256, ge=1)
    grid_captions: int = Field(8, ge=0)
    grid_samples: int = Field(4, ge=1)
    grid_temperature: float = Field(1.0, ge=0)
    grid_top_k: int | None = Field(None, ge=1)
    grad_comm: GradCommConfig = Field(default_factory=GradCommConfig)
    # None: {run.root_uri}/tokens (what jobs/encode.py writes)
    tokens_uri: Uri | None = None
    # None: {run.root_uri}/prior
    output_uri: Uri | None = None

    @model_validator(mode="after")
    def _precision(self) -> PriorTrainConfig:
        if self.resblock_grad_scaling and self.precision in ("bf16", "auto"):
            raise ValueError("resblock_grad_scaling: true needs precision fp16 "
                             "(or fp32, to exercise the scaler); "
                             "bf16 needs no loss scaling")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision: fp16 needs use_gpu: true "
                             "(fp16 autocast runs on CUDA; use bf16 or fp32 on CPU)")
        gc = self.grad_comm
        if gc.method in ("powersgd", "zeropp") and self.zero_stage != 3:
            raise ValueError(f"grad_comm.method: {gc.method} works with ZeRO-3 (zero_stage: 3), "
                             f"got zero_stage: {self.zero_stage}")
        if gc.ranks_per_node is not None and self.num_workers % gc.ranks_per_node:
            raise ValueError(f"grad_comm.ranks_per_node: {gc.ranks_per_node} does not divide "
                             f"num_workers: {self.num_workers}")
        quantized = [k for k in ("quantized_weights", "quantized_gradients") if getattr(gc.zeropp, k)]
        if gc.method == "zeropp" and quantized and not self.use_gpu:
            raise ValueError(f"grad_comm.zeropp.{quantized[0]} needs use_gpu: true (DeepSpeed's ZeRO++ "
                             "quantization kernels are CUDA-only); set it to false to run hierarchical "
                             "partitioning alone on CPU")
        if self.text_weight + self.image_weight <= 0:
            raise ValueError("text_weight + image_weight must be > 0")
        return self


class RerankerTrainConfig(StageTrainConfig):
    """The contrastive reranker (a small CLIP) that ranks sampled candidates by caption fit.

    Its caption vocabulary comes from the prepared dataset's tokenizer and its caption length from
    `loader.text_len`; `size` names the rest. It reads the prepared image shards (not tokens), at
    the resolution the dVAE decodes, so it scores what the sampler will show it."""

    size: Literal["debug", "small"] = "debug"
    # None: the dVAE size's image_size (what decoded candidates measure).
    image_size: int | None = Field(None, ge=8, le=1024)
    micro_batch: int = Field(64, ge=2)  # per worker; the in-batch negatives of the contrastive loss
    # AdamW as CLIP's β = (0.9, 0.98), ε = 1e-6, decay on matrices only (CLIP's 0.2 suits longer runs).
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    zero_stage: int = Field(1, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Retrieval accuracy among the first `val_pairs` validation image-caption pairs.
    val_pairs: int = Field(256, ge=2)
    # None: {run.root_uri}/reranker
    output_uri: Uri | None = None

    @model_validator(mode="after")
    def _precision(self) -> RerankerTrainConfig:
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision: fp16 needs use_gpu: true (use bf16 or fp32 on CPU)")
        return self


class ScorerTrainConfig(RerankerTrainConfig):
    """jobs/train_scorer.py: evaluate's contrastive model for R-precision. The reranker's
    architecture and training on the same train split, but another seed and its own output, so
    the model that grades an evaluation is not the one that picked the samples it grades."""

    seed: int = 1  # the reranker's is 0
    # None: {run.root_uri}/scorer
    output_uri: Uri | None = None


class ActorPoolConfig(Section):
    """Ray Data actors that each hold a loaded model (encode, evaluate, generate)."""

    num_actors: int = Field(2, ge=1)  # actors in the pool (encode: its upper bound)
    cpus_per_actor: float = Field(1.0, gt=0)  # CPUs reserved per actor; also its torch threads (at least 1)
    batch_size: int = Field(16, ge=1)  # items per model call in an actor (encode: images, else captions)
    use_gpu: bool | None = None  # one GPU per actor; None: when the cluster has GPUs


class SamplingConfig(Section):
    """How images are drawn from a bundle (evaluate, generate); what the HTTP API's options mean."""

    # Images drawn per caption, ranked by the reranker; None: as many as are kept (no reranking).
    candidates: int | None = Field(None, ge=1, le=64)
    temperature: float = Field(1.0, ge=0, le=10)  # sampling temperature (0: argmax)
    top_k: int | None = Field(None, ge=1)  # sample among the k likeliest tokens; None: all
    top_p: float | None = Field(None, gt=0, le=1)  # nucleus sampling; None: off
    guidance_scale: float = Field(1.0, ge=0, le=100)  # classifier-free guidance; 1: none
    seed: int = Field(0, ge=0)  # base seed: caption i of a run is seeded by a hash of (seed, i)


# Fields that sat directly in encode / evaluate / generate before the shared sections above; a
# config that still sets them there is moved into the section, with a warning.
_MOVED = {"actors": ("num_actors", "cpus_per_actor", "batch_size", "use_gpu"),
          "sampling": ("candidates", "temperature", "top_k", "top_p", "guidance_scale", "seed")}


def _move_flat_fields(section: str, data: Any, moves: tuple[str, ...]) -> Any:
    if not isinstance(data, dict):
        return data
    data, moved = dict(data), []
    for sub in moves:
        found = {k: data.pop(k) for k in _MOVED[sub] if k in data}
        if found:
            data[sub] = {**(data.get(sub) or {}), **found}  # an old --set wins over the preset
            moved += [f"{section}.{k} -> {section}.{sub}.{k}" for k in found]
    if moved:
        warnings.warn(f"config fields moved (read from their new place this time): {', '.join(moved)}",
                      FutureWarning, stacklevel=2)
    return data


class EncodeConfig(Section):
    """The encode job: image shards -> token shards with the exported dVAE."""

    dvae_uri: Uri | None = None  # the dVAE export; None: {dvae output}/export, where train_dvae exports
    output_uri: Uri | None = None  # None: {run.root_uri}/tokens
    # An actor per image shard at a time; its batch_size is images per dVAE forward.
    actors: ActorPoolConfig = Field(default_factory=lambda: ActorPoolConfig(batch_size=256))
    overwrite: bool = False  # redo token shards already published at output_uri
    # Rows per training image: view 0 is the whole image, views 1.. are random crops of it (the
    # paper's Listing 2), each a row of its own with its `view` index. Other splits: one view.
    views: int = Field(1, ge=1)
    # Listing 2's resize before its final crop, as multiples of the input side (paper: 1 to 9/8):
    # the crop keeps 1/scale of the side (shapes objects keep ~98% of their area in frame on average).
    view_scale: tuple[float, float] = (1.0, 9 / 8)
    seed: int = 0  # view v of a sample is drawn from (seed, v, its key)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return _move_flat_fields("encode", data, ("actors",))

    @model_validator(mode="after")
    def _view_scale(self) -> EncodeConfig:
        lo, hi = self.view_scale
        if not 1 <= lo <= hi:
            raise ValueError(f"view_scale must be [low, high] with 1 <= low <= high (the crop cannot "
                             f"be larger than the image), got {list(self.view_scale)}")
        return self


class CardConfig(Section):
    """The model card export writes into the bundle (README.md, tessera.model_card); the HTTP API's
    GET /v1/models/{id} returns its summary."""

    # The weights' license: an SPDX id (apache-2.0, cc-by-nc-4.0, ...) or "other"; None: not stated.
    license: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")
    license_name: str | None = Field(None, max_length=200)  # the name of an "other" license
    license_link: str | None = Field(None, max_length=500)  # where the license text is
    # What the model is for; None: research and demos of text-to-image generation on its data's domain.
    intended_use: str | None = Field(None, max_length=2000)
    limitations: list[str] = []  # added to those the card works out itself


class ExportConfig(Section):
    """jobs/export.py: the model bundle serving and generation load."""

    # The `model` id the HTTP API answers to; default: "tessera-{run.name}".
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    output_uri: Uri | None = None  # default: {run.root_uri}/bundle
    prior_uri: Uri | None = None  # the prior's export; default: {prior uri}/export
    include_reranker: bool = True  # when the reranker's export exists
    overwrite: bool = True  # replace a bundle already at output_uri (its manifest is removed first)
    card: CardConfig = Field(default_factory=CardConfig)


class ClassifierConfig(Section):
    """The shapes attribute classifier evaluation scores images with
    (tessera.inference.evaluation.classifier):
    a small CNN trained on its own renders of every colour/shape pair, held-out ones included."""

    width: int = Field(16, ge=4, le=256)  # channels of its full-resolution convs (doubled after each pooling)
    hidden: int = Field(256, ge=16)  # width of its MLP head
    # Scenes rendered for training (no held-out pair excluded).
    train_samples: int = Field(12_000, ge=16)
    # Fresh scenes (other seeds) it is measured on after training; the report gives the accuracy.
    test_samples: int = Field(2_000, ge=16)
    # Share rendered at twice the bundle's resolution and area-downsampled, as prepared data is.
    double_fraction: float = Field(0.3, ge=0, le=1)
    steps: int = Field(800, ge=1)  # AdamW steps, one-cycle learning rate
    batch_size: int = Field(128, ge=2)  # renders per step
    lr: float = Field(3e-3, gt=0)  # peak learning rate
    seed: int = Field(1234, ge=0)  # training renders use it; test renders seed + 1 and + 2
    # Light blur / noise / gain jitter, so it also reads the dVAE's decoded images.
    augment: bool = True
    # Share of training batches shown through the bundle's dVAE (decode(encode(x))); 0: renders only.
    recon_fraction: float = Field(0.0, ge=0, le=1)
    # Resolution it reads; None: the evaluated bundle's.
    image_size: int | None = Field(None, ge=8, le=1024)
    # Objects per scene it is trained and measured on, up to; None: the prepared data's max_objects.
    max_objects: int | None = Field(None, ge=1, le=3)
    # torch threads while training and scoring; None: torch's default.
    threads: int | None = Field(None, ge=1)
    # Where it is saved and reused while the fields above match; None: {run.root_uri}/eval/classifier.
    uri: Uri | None = None
    retrain: bool = False  # train again even when a matching classifier is saved


class EvaluateConfig(Section):
    """jobs/evaluate.py: a bundle's images for the validation and held-out captions, with and
    without reranking: R-precision under the scorer, FID/KID against the val images, and on shapes
    data the attribute classifier's caption accuracy; dVAE reconstruction PSNR/SSIM, the prior's
    bits per image token (with and without captions), sample grids and training curves."""

    # The bundle to evaluate (jobs/evaluate.py --bundle sets it); None: {run.root_uri}/bundle.
    bundle_uri: Uri | None = None
    # report.json (written last), report.md, sample grids and curves; None: {run.root_uri}/eval
    output_uri: Uri | None = None
    num_captions: int = Field(256, ge=0)  # the first this many captions of the prepared val split
    num_heldout: int = Field(256, ge=0)  # the first this many heldout captions (shapes: novel pairs)
    # All candidates kept: candidate 0 scores "without reranking", the reranker's best "with" it.
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(candidates=4))
    # generation actors, each holding the bundle
    actors: ActorPoolConfig = Field(default_factory=ActorPoolConfig)
    # Val images reconstructed by the dVAE (PSNR, codebook use, classifier accuracy on them).
    recon_images: int = Field(256, ge=0)
    # val images (encoded by the bundle's dVAE) for the prior's image loss
    prior_val_rows: int = Field(256, ge=0)
    grid_captions: int = Field(8, ge=0)  # captions per sample grid (val and held-out)
    # R-precision's contrastive model: a scorer export (train_scorer's, or any reranker export
    # trained with the data's tokenizer); None: {run.root_uri}/scorer/export. Not the bundle's reranker.
    scorer_uri: Uri | None = None
    r_precision_distractors: int = Field(99, ge=1)  # other distinct captions each image is ranked among
    # FID/KID features: a torch.export archive (.pt2) of Inception-v3 pool3, or torch-fidelity's
    # weights file (needs torch-fidelity); None: FID and KID are not computed (the report says so).
    inception_weights_uri: Uri | None = None
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return _move_flat_fields("evaluate", data, ("actors", "sampling"))

    @property
    def candidates(self) -> int:
        """Images drawn (and kept) per caption."""
        return self.sampling.candidates or 1


class GenerateConfig(Section):
    """jobs/generate.py: offline generation from a file of captions to a folder of PNGs."""

    # A .txt (a caption per line), .jsonl ({"caption": ...}) or .parquet file, or a folder of them.
    captions_uri: Uri | None = None
    # {generation}/images/*.png, index.jsonl, then manifest.json; None: {run.root_uri}/generated.
    output_uri: Uri | None = None
    bundle_uri: Uri | None = None  # the bundle to draw with (--bundle sets it); None: {run.root_uri}/bundle
    # Image-to-image (--image sets it): a PNG, JPEG or WebP whose top keep_rows token rows prime every
    # caption (the DALL·E paper's priming); the rest of each image is drawn. None: plain generation.
    image_uri: Uri | None = None
    keep_rows: int | None = Field(None, ge=1)  # token rows of image_uri kept; None: the upper half
    n: int = Field(1, ge=1, le=64)  # images kept per caption: the reranker's best n of sampling.candidates
    # line i is seeded by a hash of (seed, i)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    max_caption_chars: int = Field(1_000, ge=1)  # longer lines are skipped and counted
    limit: int | None = Field(None, ge=1)  # only the first this many good captions
    # generation actors, each holding the bundle
    actors: ActorPoolConfig = Field(default_factory=ActorPoolConfig)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        return _move_flat_fields("generate", data, ("actors", "sampling"))

    @model_validator(mode="after")
    def _candidates(self) -> GenerateConfig:
        if self.sampling.candidates is not None and self.sampling.candidates < self.n:
            raise ValueError(f"sampling.candidates ({self.sampling.candidates}) must be at least "
                             f"n ({self.n})")
        if self.keep_rows is not None and self.image_uri is None:
            raise ValueError("keep_rows: only applies with an image to edit (generate.image_uri, or --image)")
        return self


class TrackingConfig(Section):
    """Experiment tracking: every training stage's reports (the figures of its progress lines) and
    sample grids, sent from rank 0 (tessera.training.tracking). Each stage is one tracked run,
    {run.name}-{stage}; rerunning a stage at the same place (a resume) continues it."""

    # none; tensorboard (event files: the `tensorboard` package); mlflow (`mlflow-skinny` is
    # enough); wandb (the `wandb` package). The package is imported only when chosen.
    kind: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"
    # tensorboard: the log folder, a local path or a storage URI (s3://, gs://: events are written
    # locally and copied there); mlflow: the tracking URI (a local path: a file store, or a server's
    # http(s)://); wandb: the folder of its local files. None: {run.root_uri}/tracking (mlflow and
    # wandb need a local run.root_uri for it).
    uri: Uri | None = None
    # The MLflow experiment, or the W&B project.
    experiment: str = Field("tessera", min_length=1)
    images: bool = True  # sample grids (PNG) logged too: TensorBoard images, MLflow/W&B artifacts

    # kind -> (module imported, package to install)
    PACKAGES: ClassVar[dict[str, tuple[str, str]]] = {
        "tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"),
        "wandb": ("wandb", "wandb")}

    @model_validator(mode="after")
    def _backend(self) -> TrackingConfig:
        if self.kind == "none":
            return self
        module, package = self.PACKAGES[self.kind]
        # Checked here so a missing package fails before Ray starts; not imported until a stage logs.
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"kind: {self.kind} needs the {package} package, which is not installed "
                             f"(pip install {package})")
        if self.kind in ("mlflow", "wandb") and self.uri and storage.scheme_of(self.uri) in ("s3", "gs"):
            raise ValueError(f"uri: {self.kind} cannot keep its store in object storage ({self.uri}); "
                             "give a local path or, for mlflow, a tracking server (http://...)")
        return self


class TesseraConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    dvae: DVAETrainConfig = Field(default_factory=DVAETrainConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    prior: PriorTrainConfig = Field(default_factory=PriorTrainConfig)
    reranker: RerankerTrainConfig = Field(default_factory=RerankerTrainConfig)
    scorer: ScorerTrainConfig = Field(default_factory=ScorerTrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _tracking_store(self) -> TesseraConfig:
        t = self.tracking
        local_root = storage.scheme_of(self.run.root_uri) in ("", "file")
        if t.kind in ("mlflow", "wandb") and t.uri is None and not local_root:
            raise ValueError(f"tracking.uri: tracking.kind {t.kind} keeps its files locally and run.root_uri "
                             f"is {self.run.root_uri}; set tracking.uri (a local path"
                             + (", or a tracking server's http(s)://)" if t.kind == "mlflow" else ")"))
        return self

    @property
    def paths(self) -> RunPaths:
        """Every stage's location: its section's own URI, else its default under run.root_uri."""
        return RunPaths.of(self)

    @property
    def bundle_name(self) -> str:
        return self.export.name or f"tessera-{self.run.name}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'data.resolution=64' -> (['data', 'resolution'], 64); the value is read as YAML."""
    path, sep, raw = text.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise ConfigError(f"--set {text!r}: expected dotted.path=value, e.g. data.resolution=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e})") from None
    return [k.strip() for k in keys], value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                at = ".".join(keys[: depth + 1])
                raise ConfigError(f"--set {text!r}: {at} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown field")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return "\n".join(lines)


def validate_config(raw: dict, *, origin: str = "config") -> TesseraConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections at the top level, "
                          f"got {type(raw).__name__}")
    try:
        return TesseraConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{origin}: invalid config\n{_describe(e)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TesseraConfig:
    """Load a YAML preset (a path, or a preset name like 'debug': platform/tessera/configs/,
    linked from jobs/configs) plus overrides."""
    raw: dict = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists() and (CONFIG_DIR / f"{path}.yaml").exists():
            p = CONFIG_DIR / f"{path}.yaml"
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        origin = str(p)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{origin}: not valid YAML: {e}") from None
    raw = apply_overrides(raw, list(overrides))
    return validate_config(raw, origin=origin)


def preset_paths() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))
