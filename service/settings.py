"""The one typed settings object. Every field is also an environment variable `SEGSERVE_<NAME>`.

Nothing else in segserve reads the environment: the CLI turns its options into keyword arguments
of `Settings`, and tests build `Settings(...)` directly.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Sizes come from the environment as "512x512" and lists as "1,2,4", parsed by the validators below.
Size = Annotated[tuple[int, int], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEGSERVE_", extra="ignore")

    # --- transport ---
    host: str = Field("127.0.0.1", description="HTTP bind address.")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    grpc_port: int | None = Field(None, ge=0, le=65535, description="gRPC port; unset means no gRPC server.")

    # --- models: one config file, repeated --model NAME[:CHECKPOINT], or the single model below ---
    config: str | None = Field(
        None, description="Model repository file (TOML or YAML): several models served at once (see README)."
    )
    models: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Models to serve as NAME[:CHECKPOINT], comma-separated in the environment "
        "(the CLI's repeated --model); unset = the single `model` below.",
    )
    model: str = Field("edaformer-t", description="Registered model name (see `models.list_models()`).")
    checkpoint: str | None = Field(
        None, description="Checkpoint path (.pth, .bin or .safetensors); unset = the demo weights where the model has "
        "them, else random weights.",
    )
    random_weights: bool = Field(False, description="Serve random weights even where demo weights exist.")
    dataset: Literal["ade20k", "cityscapes", "coco-stuff", "demo"] | None = Field(
        None, description="Class names, palette and test pipeline, unless the checkpoint's meta overrides them "
        "(unset: from the checkpoint, else ADE20K).",
    )
    scales: Annotated[tuple[float, ...], NoDecode] = Field(
        (1.0, 0.75, 0.5), description="Input scales offered as operating points (1.0 = the dataset's reference scale)."
    )
    precisions: Annotated[tuple[str, ...], NoDecode] = Field(
        ("fp32",), description="Numeric precisions offered as operating points: fp32, and on CUDA with the torch "
        "backend bf16 and fp16 (autocast), e.g. fp32,bf16.",
    )
    quality_table: str | None = Field(
        None, description="Quality table (JSON from `segserve evaluate`) for the single model; measured values replace "
        "the planner's priors.",
    )
    resize_scale: Annotated[tuple[int, int] | None, NoDecode] = Field(
        None,
        description="Override the dataset's keep-ratio test scale as LONGxSHORT (e.g. 1024x256) to serve faster "
        "than the reference pipeline, at some cost in accuracy; unset = the reference pipeline.",
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where the backends run.")
    backend: Literal["torch", "onnx"] = Field("torch", description="Execution backend of the workers.")
    workers: int = Field(1, ge=1, le=64, description="Worker count; each owns one backend instance.")
    threads_per_worker: int | None = Field(
        None, ge=1, le=256, description="Intra-op threads per worker; unset = cores // workers (at least 1)."
    )
    levels: str | None = Field(
        None, description="Comma-separated knob level names to serve (default: the model's whole ladder)."
    )

    # --- planner and batching ---
    calibration_shape: Size = Field(
        (512, 512), description="Image size (HxW) the latency profile is measured for: each point's reference is a "
        "calibration-sized image's network input at the point's scale.",
    )
    calibration_batch_sizes: Annotated[tuple[int, ...], NoDecode] = Field(
        (1, 2, 4), description="The smallest and largest of these (up to max_batch_size) are measured at the anchor "
        "points; other batch sizes are interpolated.",
    )
    calibration_repeats: int = Field(2, ge=1, le=50, description="Timed runs per anchor and batch size; median kept.")
    profile_dir: str | None = Field(
        "~/.cache/segserve/profiles", description="Where calibrated latency profiles persist (keyed by machine, "
        "backend, model and weights), so that a restart is ready at once; empty = never persist.",
    )
    max_batch_size: int = Field(4, ge=1, le=64, description="Largest batch a worker runs.")
    max_queue_delay_ms: float = Field(
        2.0, ge=0, le=10_000,
        description="Longest a batch waits to fill up while a worker is idle (batches also form while all are busy).",
    )
    max_queue_size: int = Field(64, ge=1, le=100_000, description="Queued requests per model before 429.")
    safety_margin: float = Field(
        0.15, ge=0, le=2, description="Fraction added to predicted latency when checking a budget."
    )
    max_budget_ms: float = Field(600_000, gt=0, description="Largest accepted latency budget (ms).")
    request_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Hard bound on any request's wait: past it, a queued request gets 504."
    )
    onnx_cache_dir: str = Field(
        "~/.cache/segserve/onnx", description="Where exported ONNX graphs are kept (one per model, weights and level), "
        "shared by the server and `segserve export-onnx`/`bench`.",
    )

    # --- input limits ---
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    max_pixels: int = Field(40_000_000, ge=1024, description="Largest accepted image, in pixels.")
    min_side: int = Field(32, ge=1, description="Smallest accepted image side, in pixels.")
    max_inflight_bytes: int = Field(
        1024 * 1024 * 1024, ge=0, description="Memory budget of the images in flight (decoded pixels, label maps, "
        "answers) across every queued and running request; past it a request gets 429 (0 = unbounded).",
    )
    reduced_decode: bool = Field(
        True, description="Decode images of 2x the largest network input or more at a reduced size (JPEG DCT "
        "scaling, else an early downscale); false decodes every image at full size, as the reference pipeline.",
    )

    # --- cache ---
    redis_url: str | None = Field(None, description="redis:// URL; unset = in-memory LRU cache.")
    cache_bytes: int = Field(256 * 1024 * 1024, ge=0, description="In-memory cache size bound (0 disables).")
    cache_ttl_s: int = Field(3600, ge=1, description="Redis entry time-to-live.")
    cache_key_prefix: str = Field("segserve:", description="Prefix of every Redis key.")
    cache_max_value_bytes: int = Field(8 * 1024 * 1024, ge=1, description="Results larger than this are not cached.")
    redis_timeout_s: float = Field(0.05, gt=0, le=10, description="Redis socket timeout; the cache fails open.")

    # --- access: API keys, rate limit, CORS, ops port (service/api/guards.py, service/grpc/guards.py) ---
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="API keys: auto = required when keys are configured; on = required (the server refuses "
        "to start without keys); off = never asked, even with keys configured.",
    )
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys; clients send 'Authorization: Bearer <key>' (gRPC: the metadata "
        "authorization).",
    )
    api_keys_file: str | None = Field(
        None, description="File of SHA-256 hex digests of API keys, one a line (a label may follow; # comments), "
        "used with or instead of api_keys.",
    )
    rate_limit_rps: float = Field(
        0, ge=0, le=1_000_000, description="Requests a second per API key (per client address when no key is "
        "asked for), both transports together; past it 429 rate_limited with Retry-After (0 = no limit).",
    )
    rate_limit_burst: int = Field(
        0, ge=0, le=1_000_000, description="Requests a client may send at once before the rate applies "
        "(0 = the rate rounded up, at least 1).",
    )
    cors_origins: str = Field(
        "", description="Comma-separated origins allowed to call the API from a browser (e.g. https://app.example); "
        "empty = no CORS headers.",
    )
    ops_port: int | None = Field(
        None, ge=1, le=65535, description="Serve /healthz, /readyz and /metrics on this port only (and nothing else "
        "there); unset = on the API port, open without a key.",
    )

    # --- lifecycle ---
    shutdown_grace_s: float = Field(20.0, ge=0, le=600, description="How long SIGTERM waits for accepted work.")
    log_level: str = Field("info", description="Python logging level.")
    log_format: Literal["plain", "json"] = Field(
        "plain", description="Log lines as plain text or one JSON object per line (segserve's and uvicorn's alike)."
    )
    log_access: bool = Field(True, description="Log one line per HTTP request and gRPC call (logger segserve.access).")
    log_probes: bool = Field(
        False, description="Also log health probes and metric scrapes (/healthz, /readyz, /metrics, gRPC health)."
    )

    @field_validator("checkpoint", "redis_url", "grpc_port", "resize_scale", "threads_per_worker", "levels",
                     "config", "quality_table", "dataset", "profile_dir", "ops_port", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose and Kubernetes pass unset variables as "": treat that as "not set", not as a path.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("calibration_shape", "resize_scale", mode="before")
    @classmethod
    def _parse_shape(cls, value: object) -> object:
        # Accept "512x512" from the environment or the CLI.
        if isinstance(value, str):
            if not value.strip():
                return None
            height, width = value.lower().split("x")
            return (int(height), int(width))
        return value

    @field_validator("calibration_batch_sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(int(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("scales", mode="before")
    @classmethod
    def _parse_scales(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0 < s <= 4 for s in value):
            raise ValueError(f"scales must be numbers in (0, 4], got {value}")
        return tuple(sorted(set(value), reverse=True))

    @field_validator("precisions", mode="before")
    @classmethod
    def _parse_precisions(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list | tuple):
            unknown = sorted(set(value) - {"fp32", "bf16", "fp16"})
            if unknown or not value:
                raise ValueError(f"precisions must be among fp32, bf16, fp16; got {value}")
            return tuple(dict.fromkeys(value))
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value
