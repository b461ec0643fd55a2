"""One settings object for the whole server, read from `MTA_*` environment variables."""

from __future__ import annotations

import os
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, computed_field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# vLLM accepts only these values for `max_lora_rank` (adapters may be any rank up to it).
ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

FusionMode = Literal["linear", "cat"]


def _default_adapter_cache_dir() -> Path:
    # tmpfs: materialized adapters are written per new user and read once by vLLM.
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return root / f"mta-adapters-{os.getuid()}"


class Settings(BaseSettings):
    """Server configuration; every field is `MTA_<NAME>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="MTA_", env_file=".env", extra="ignore")

    # --- model and engine -------------------------------------------------
    model_path: Path | None = Field(
        None, description="Base model directory; unset = SmolLM2-135M-Instruct, converted once into cache_dir."
    )
    model_id: str | None = Field(None, description="Served model name; unset = the model directory's name.")
    cache_dir: Path = Field(Path("~/.cache/mta"), description="Converted default model and other caches.")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "bfloat16"
    max_model_len: int = Field(2048, ge=64)
    max_num_seqs: int = Field(64, ge=1)
    max_lora_rank: int = 16
    max_loras: int | None = Field(
        None, ge=1, description="Distinct adapters one engine step can batch; unset = as many as lora_memory_mb holds."
    )
    lora_memory_mb: int = Field(
        600, ge=1, description="Memory for the engine's LoRA slots when max_loras is unset (at most max_num_seqs slots)."
    )
    max_cpu_loras: int | None = Field(None, ge=1, description="Adapters vLLM keeps loaded; unset = 4 x max_loras.")
    cpu_kvcache_space_gb: int = Field(2, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    fast_cpu_lora_ops: bool = Field(
        True, description="On CPU, replace vLLM's per-token LoRA ops with grouped ones (server.lora_ops)."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    engine_seed: int = 0

    # --- bank and fusion --------------------------------------------------
    bank_path: Path | None = Field(
        None, description="Bank directory; unset = bank_artifacts/demo, else a random bank generated in data_dir."
    )
    embedding_model_path: Path | None = Field(None, description="Override the bank's embedding model location.")
    top_k: int | None = Field(None, ge=1, le=16, description="Anchors fused per user; unset = bank default.")
    fusion_mode: FusionMode | None = Field(None, description="linear | cat; unset = bank default.")
    residual_scale: float | None = Field(
        None, ge=0, le=1, description="Factor on the fused residuals of a bank with a shared LoRA; unset = bank default."
    )
    weight_temperature: float | None = Field(
        None, gt=0, description="Softmax temperature over similarities; unset = similarities normalised to sum 1."
    )
    weight_round_step: float = Field(0.05, ge=0, lt=1, description="Weights rounded to this step (0 = off).")
    profile_context: bool = Field(True, description="Prefix prompts with the user's BM25 top-1 history item.")
    profile_index_cache_size: int = Field(
        256, ge=1, description="Users whose rendered history and BM25 index are kept (LRU), per profile version."
    )

    # --- storage ------------------------------------------------------------
    data_dir: Path = Field(Path("data"), description="Embedded store and generated banks.")
    store_url: str | None = Field(None, description="sqlite:///path or redis://host:port/db; unset = SQLite in data_dir.")
    adapter_cache_dir: Path = Field(
        default_factory=_default_adapter_cache_dir,
        description="Root shared by servers; each writes in a directory of its own (srv-<pid>-<random>) under it.",
    )
    adapter_cache_size: int = Field(256, ge=1, description="Materialized adapters kept on disk (LRU).")
    adapter_cache_max_bytes: int | None = Field(
        None, ge=1, description="Bytes of materialized adapters on disk, evicted ones still in use included; unset = no bound."
    )

    # --- fine-tuning (MTA stage 3) -----------------------------------------
    finetune_runner: Literal["inprocess", "worker"] = Field(
        "inprocess", description="Run fine-tunes in the API process, or leave them to `mta worker` processes."
    )
    finetune_queue_size: int = Field(16, ge=1, description="Queued fine-tune jobs before 429.")
    finetune_max_examples: int = Field(64, ge=1)
    finetune_max_example_chars: int = Field(8000, ge=1, description="Characters in one example (input + output).")
    # The stacked LoRA's recipe for fine-tunes that name none, also `mta eval`'s mta_stack. Unset: the
    # bank's choice (`mta bank build --stacking-lrs`), else rank 2 (1/4 of a rank-8 per-user LoRA's
    # bytes), lr 5e-4 (chosen on the demo bank's anchor pool, docs/results.md), 3 epochs
    # (`server.stacking.DEFAULT_RECIPE`); the paper's recipe (rank 4, lr 5e-5, 1 epoch) is one
    # optimizer step on 5 examples.
    finetune_rank: int | None = Field(None, ge=1, le=16, description="Stacked LoRA rank (unset: the bank's, else 2).")
    finetune_learning_rate: float | None = Field(
        None, gt=0, description="Stacked LoRA learning rate (unset: the bank's, else 5e-4)."
    )
    finetune_epochs: int | None = Field(None, ge=1, le=20, description="Stacked LoRA epochs (unset: the bank's, else 3).")
    finetune_batch_size: int = Field(2, ge=1)
    finetune_seed: int = 0
    job_stale_seconds: float = Field(300, gt=0, description="A running job with no heartbeat for this long failed.")
    job_timeout_seconds: float = Field(
        3600, gt=0, description="Wall-clock limit of one fine-tune job from its start; then it fails with that reason."
    )
    # Ended jobs keep a small record (status, losses, error; never the examples) this long, then it is deleted.
    job_retention_seconds: float = Field(
        7 * 24 * 3600, gt=0, description="How long a succeeded or failed job's record is kept (GET /jobs)."
    )

    # --- API ----------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    admin_token: SecretStr | None = Field(None, description="Bearer token for /admin; unset = admin disabled.")
    unknown_user: Literal["base", "404"] = Field("base", description="Users without a profile: base model or 404.")
    max_prompt_chars: int = Field(32_000, ge=1)
    max_tokens: int = Field(1024, ge=1, description="Upper bound on a request's max_tokens.")
    default_max_tokens: int = Field(128, ge=1)
    max_profile_items: int = Field(512, ge=1)
    max_item_chars: int = Field(20_000, ge=1, description="Characters in one profile item (all fields).")
    max_history_tokens: int = Field(
        512, ge=1, description="Tokens of the retrieved history item put in a prompt (longer items are truncated)."
    )
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    log_level: str = "info"

    @field_validator("max_lora_rank")
    @classmethod
    def _allowed_rank(cls, v: int) -> int:
        if v not in ALLOWED_MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {ALLOWED_MAX_LORA_RANKS} (vLLM), got {v}")
        return v

    @field_validator("model_path", "bank_path", "embedding_model_path", "cache_dir", "data_dir", "adapter_cache_dir")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 16:
            raise ValueError("admin_token must be at least 16 characters (or unset to disable /admin)")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must not exceed max_tokens")
        if self.max_tokens >= self.max_model_len:
            raise ValueError("max_tokens must be smaller than max_model_len")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @cached_property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{(self.data_dir / 'users.db').resolve()}"
