"""The bank's `manifest.json`: what a bank directory holds, as a validated schema."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.settings import FusionMode

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "anchor_embeddings.npy"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddingSpec(_Strict):
    name: str = Field(min_length=1, description="Model name or path; resolved by server.embedding.")
    dim: int = Field(gt=0)


class FusionDefaults(_Strict):
    mode: FusionMode = "linear"
    top_k: int = Field(2, ge=1, le=16)
    residual_scale: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Factor on the fused anchors' delta (banks with a shared LoRA: 0 serves the shared LoRA alone).",
    )


class StackingDefaults(_Strict):
    """The stacked LoRA's recipe chosen on the bank's anchor pool (`mta bank build --stacking-lrs`):
    what the server's fine-tunes and `mta eval`'s `mta_stack` train with unless the request (or a set
    `MTA_FINETUNE_*`) says otherwise. Banks without one: `server.stacking.DEFAULT_RECIPE`."""

    rank: int = Field(ge=1, le=16)
    learning_rate: float = Field(gt=0, le=1)
    epochs: int = Field(ge=1, le=20)


class TaskSpec(_Strict):
    """How history items are rendered to text (for embedding and for the BM25 prompt context)."""

    name: str = "generic"
    history_template: str | None = Field(None, description="e.g. 'Description: {description} Tag: {tag}'")


class _LoraDir(_Strict):
    rank: int = Field(ge=1)
    target_modules: list[str] = Field(min_length=1)
    lora_path: str = Field(min_length=1, description="PEFT adapter directory, relative to the bank.")

    @field_validator("lora_path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError(f"lora_path must stay inside the bank directory, got {v!r}")
        return v


class AnchorSpec(_LoraDir):
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    cluster_size: int = Field(ge=1)


class SharedLoraSpec(_LoraDir):
    """A LoRA every anchor's meta-LoRA is a residual over (banks built with `--init task`).

    Stored once: the served adapter is this LoRA plus `residual_scale` times the fused
    residuals, concatenated along the rank axis (`server.adapters.fuse`).
    """


class BankManifest(_Strict):
    format_version: int = FORMAT_VERSION
    bank_version: str = Field(min_length=1, max_length=128)
    name: str = Field(min_length=1)
    description: str = ""
    random: bool = Field(False, description="True for demo banks whose LoRAs are random, not trained.")
    base_model: str = Field(min_length=1, description="Model id the LoRAs were trained on (server's model_id).")
    embedding_model: EmbeddingSpec
    fusion: FusionDefaults = FusionDefaults()
    task: TaskSpec = TaskSpec()
    lora_init_seed: int | None = None
    embeddings_file: str = EMBEDDINGS_FILE
    anchors: list[AnchorSpec] = Field(min_length=1)
    shared_lora: SharedLoraSpec | None = Field(
        None, description="Set when every anchor's LoRA is a residual over this shared (task) LoRA."
    )
    stacking: StackingDefaults | None = None
    extra: dict = Field(default_factory=dict, description="Free-form build metadata (split, data, training).")

    @field_validator("format_version")
    @classmethod
    def _known_format(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"unsupported bank format_version {v} (this server reads {FORMAT_VERSION})")
        return v

    @model_validator(mode="after")
    def _unique_ids(self) -> BankManifest:
        ids = [a.id for a in self.anchors]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate anchor ids: {dupes}")
        return self
