"""The Serve application's arguments: one typed model, validated before anything is deployed.

They arrive as a dict from `serve run serve.app:build_app key=value ...` (every value a string),
from the `args:` of a Serve config YAML, or from Python. Lax parsing turns "2" into 2 for the CLI;
unknown keys are refused so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

API_KEYS_ENV = "TESSERA_API_KEYS"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: str = Field(min_length=1, description="URI of the model bundle (local path, file://, s3://, gs://)")
    device: Literal["cpu", "cuda"] = "cpu"
    # Per generator replica. Fractions are fine (tests pack replicas into a small local Ray).
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # serve.batch: requests (each up to n×candidates images) sampled together in one call.
    max_batch_size: int = Field(4, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    # Generator autoscaling (Ray Serve's request-based policy).
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)
    # How often replicas and handles report load to the autoscaler. Ray marks the field deprecated
    # (to become an environment variable) but in 2.60 it is still what sets the push period, and
    # its 10 s default dominates short upscale delays.
    metrics_interval_s: float = Field(10.0, gt=0)
    # Admission control: a replica runs at most max_ongoing_requests at once; at most
    # max_queued_requests wait for a replica (-1 = unbounded, which trades 429s for latency).
    max_ongoing_requests: int = Field(8, ge=1)
    max_queued_requests: int = Field(32, ge=-1)
    request_timeout_s: float | None = Field(120.0, gt=0)
    # Fairness: generation requests one caller (its API key, or its address without keys) may have
    # in flight, running or queued; more get a 429, so one caller cannot fill the queue for all.
    max_requests_per_client: int = Field(8, ge=1)
    api_keys: list[str] = Field(default_factory=list)
    # Without keys the app refuses to start unless HTTP listens on loopback only, or this is true.
    allow_anonymous: bool = False
    # Host headers answered (port ignored; "*.example.com" matches subdomains, "*" any): a
    # DNS-rebinding page reaches 127.0.0.1 under its own name and is refused.
    allowed_hosts: list[str] = Field(default_factory=lambda: list(LOOPBACK_NAMES), min_length=1)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    # POST /v1/images/edits: the uploaded image's bytes (OpenAI's own limit for dall-e-2 edits: 4 MB).
    max_image_bytes: int = Field(4 * 2**20, ge=1024)
    max_prompt_chars: int = Field(1000, ge=1)
    # At most the sampling library's own bounds (GenerationParams.validate: n ≤ 10, MAX_CANDIDATES
    # = 512, what the DALL·E paper reranked); each draw costs a full sample, so the default is low.
    max_n: int = Field(10, ge=1, le=10)
    max_candidates: int = Field(16, ge=1, le=512)
    public_url: str | None = None
    # The store behind response_format=url lives in the ingress's memory: bounded in bytes and age.
    url_ttl_s: float = Field(3600.0, gt=0)
    url_store_mb: float = Field(256.0, gt=0)

    @field_validator("api_keys", "allowed_hosts", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        # The CLI passes `api_keys=k1,k2` as one string.
        if isinstance(v, str):
            return [k for k in (p.strip() for p in v.split(",")) if k]
        return v

    @field_validator("api_keys")
    @classmethod
    def _keys_are_tokens(cls, v: list[str]) -> list[str]:
        for k in v:
            if not k or any(c.isspace() for c in k):
                raise ValueError("an API key must be non-empty and contain no whitespace")
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        out = []
        for h in v:
            name = h.strip().lower().removeprefix("[").removesuffix("]")
            domain = name.removeprefix("*.")
            if name != "*" and not _is_ipv6(name) and (not domain or any(c in domain for c in "/:@ *")):
                raise ValueError(f"{h!r} is not a host name: give names like images.example.com, "
                                 "*.example.com, 127.0.0.1, ::1 or * (no scheme, port or path)")
            out.append(name)
        return out

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"must be an http(s) URL like https://images.example.com, got {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _consistent(self) -> AppArgs:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= "
                             f"min_replicas ({self.min_replicas})")
        if (self.initial_replicas is not None
                and not self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie in "
                             f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]")
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError("num_gpus must be > 0 when device is 'cuda' (each replica needs a GPU reserved)")
        return self

    def autoscaling_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = dict(
            min_replicas=self.min_replicas, max_replicas=self.max_replicas,
            target_ongoing_requests=self.target_ongoing_requests, upscale_delay_s=self.upscale_delay_s,
            downscale_delay_s=self.downscale_delay_s, look_back_period_s=self.look_back_period_s,
            metrics_interval_s=self.metrics_interval_s)
        if self.initial_replicas is not None:
            cfg["initial_replicas"] = self.initial_replicas
        return cfg


def _is_ipv6(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).version == 6
    except ValueError:
        return False


def host_allowed(host_header: str | None, allowed: list[str]) -> bool:
    """Whether a request's Host header (with or without port) names one of `allowed`."""
    if "*" in allowed:
        return True
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".")
    return any(host == a or (a.startswith("*.") and host.endswith(a[1:])) for a in allowed)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_state(args: AppArgs, http_host: str | None) -> str:
    """How the app authenticates, for the startup log (never a key), or a ValueError when it would
    serve anyone on a non-loopback address without allow_anonymous. http_host: where Serve's HTTP
    proxy listens (its http_options.host; None: no proxy)."""
    if args.api_keys:
        return f"API keys required: keys configured: {len(args.api_keys)}"
    if http_host is None or is_loopback(http_host):
        return f"anonymous on loopback: no API keys, HTTP listens on {http_host or 'no address'} only"
    if args.allow_anonymous:
        return (f"anonymous by explicit choice: no API keys, allow_anonymous is true, "
                f"HTTP listens on {http_host}")
    raise ValueError(
        f"refusing to serve without API keys: Serve's HTTP proxy listens on {http_host} "
        "(http_options.host), which is not a loopback address. Set api_keys or "
        f"${API_KEYS_ENV}, or allow_anonymous: true to answer anyone who can reach it.")


def parse_args(args: dict[str, Any] | AppArgs | None, *, environ: dict[str, str] | None = None) -> AppArgs:
    """Validated arguments, with keys from $TESSERA_API_KEYS (comma-separated) added to `api_keys`.

    The variable is read where the app is built: the `serve run` process, or on the cluster for
    `serve deploy` (set it in the app's runtime_env or the cluster's environment)."""
    if isinstance(args, AppArgs):
        parsed = args
    else:
        try:
            parsed = AppArgs.model_validate(dict(args or {}))
        except ValidationError as e:
            raise ValueError(f"invalid tessera serve arguments: {format_errors(e)}") from None
    env = os.environ if environ is None else environ
    from_env = AppArgs._split_keys(env.get(API_KEYS_ENV, ""))
    if from_env:
        try:
            AppArgs._keys_are_tokens(from_env)
        except ValueError as e:
            raise ValueError(f"invalid tessera serve arguments: ${API_KEYS_ENV}: {e}") from None
        parsed = parsed.model_copy(update={"api_keys": list(dict.fromkeys([*parsed.api_keys, *from_env]))})
    return parsed


def format_errors(e: ValidationError) -> str:
    out = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "args"
        if err["type"] == "extra_forbidden":
            out.append(f"{where}: unknown argument (known: {', '.join(AppArgs.model_fields)})")
        else:
            out.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(out)
