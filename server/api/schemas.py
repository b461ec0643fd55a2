"""Request and response models; requests convert themselves into service inputs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from server.generation import GenerationInput

USER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,127}$"
UserId = Annotated[str, StringConstraints(pattern=USER_ID_PATTERN)]
# NaN and infinities parse from JSON (Python's json accepts them) but cannot be stored as JSON.
ItemValue = str | int | Annotated[float, Field(allow_inf_nan=False)] | bool | None
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
INT64 = 2**63  # vLLM sends the seed to its engine core as a 64-bit integer


def _check_unicode(value: Any) -> None:
    """JSON can escape lone UTF-16 surrogates ("\\ud800"); no tokenizer, store or response encodes them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k)
            _check_unicode(v)
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v)


class _Request(BaseModel):
    """Base of every request body: all its strings, at any depth, are valid Unicode, and every
    field takes its own JSON type only (strict: `"yes"` or `1` is no boolean, `"1"` no number),
    as the schema says; a JSON integer is still a number."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _check_unicode(data)
        return data


class _Strict(_Request):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(BaseModel):
    # OpenAI clients send name/tool fields we do not use; strict as the request holding it.
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


def _stop_list(v: str | list[str] | None) -> list[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else v


class SamplingFields(_Request):
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0, description="Tokens generated before EOS or a stop string may end the output.")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=8)] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False


class GenerateRequest(SamplingFields, _Strict):
    user_id: UserId
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    chat_template: bool = Field(True, description="Wrap `prompt` in the model's chat template.")
    use_profile: bool | None = Field(None, description="Put the user's BM25 top-1 history item in the prompt.")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        return self

    def to_input(self) -> GenerationInput:
        return GenerationInput(
            user_id=self.user_id,
            prompt=self.prompt,
            messages=[m.model_dump() for m in self.messages] if self.messages else None,
            chat_template=self.chat_template,
            use_profile=self.use_profile,
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=_stop_list(self.stop),
            seed=self.seed,
        )


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable error type, e.g. `invalid_request`, `not_found`.")
    message: str = Field(description="What went wrong, for a person.")


class ErrorResponse(BaseModel):
    """The body of every error response (status 4xx and 5xx)."""

    error: ErrorDetail


class AnchorWeight(BaseModel):
    id: str
    weight: float


class AdapterInfo(BaseModel):
    lora_int_id: int
    rank: int
    cache_hit: bool


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Personalization(BaseModel):
    """How a response was personalized: every generation carries it (`/generate` inline, the
    OpenAI-compatible routes as `personalization`)."""

    user_id: str | None = Field(description="None on an OpenAI-compatible request without `user`.")
    personalized: bool
    anchors: list[AnchorWeight]
    bank_version: str
    fusion_mode: str | None
    stacked: bool = Field(description="A stacked LoRA is served on top of the fused adapter.")
    stacked_version: int | None = None
    stacked_bank_version: str | None = Field(None, description="Bank the stacked LoRA was trained against.")
    stacked_stale: bool = Field(False, description="Stacked LoRA from another bank: not served; fine-tune again.")
    stacked_error: str | None = Field(
        None, description="Why the stored stacked LoRA cannot be served on this model (unreadable, other layers): not served; fine-tune again or delete it."
    )
    adapter: AdapterInfo | None


class GenerateResponse(Personalization):
    user_id: str
    id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class _OpenAIResponse(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage
    personalization: Personalization


class CompletionResponse(_OpenAIResponse):
    """OpenAI's completion object, plus how it was personalized."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ChatCompletionResponse(_OpenAIResponse):
    """OpenAI's chat completion object, plus how it was personalized."""

    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class ProfileRequest(_Strict):
    items: list[dict[str, ItemValue]] = Field(
        description="History items as they are, e.g. LaMP {description, tag} or {text, title}."
    )


class UserView(BaseModel):
    user_id: str
    profile_items: int
    profile_version: int
    updated_at: float
    bank_version: str
    fusion_mode: str
    anchors: list[dict[str, Any]] = Field(description="Nearest anchors: id, similarity, fusion weight.")
    stacked: dict[str, Any] | None = Field(None, description="The stored stacked LoRA: version, bank_version, stale, error (why it cannot be served), bytes.")
    stored_bytes: dict[str, int] = Field(description="Bytes stored for this user: profile, embedding, stacked LoRA.")


class AppendItemsView(UserView):
    items_added: int = Field(description="Items appended by this request.")
    items_dropped: int = Field(description="Oldest items dropped to keep the newest MTA_MAX_PROFILE_ITEMS.")
    max_profile_items: int = Field(description="The rolling window: items kept at most.")


class FinetuneExample(_Strict):
    input: str = Field(description="The instruction, as a user would send it to /generate.")
    output: str = Field(description="The answer the user expects.")


class FinetuneRequest(_Strict):
    examples: list[FinetuneExample]
    epochs: int | None = Field(None, ge=1, le=20, description="Default MTA_FINETUNE_EPOCHS (paper: 1).")
    rank: int | None = Field(None, ge=1, le=16, description="Stacked LoRA rank; default MTA_FINETUNE_RANK (paper: 4).")
    learning_rate: float | None = Field(None, gt=0, le=1, description="Default MTA_FINETUNE_LEARNING_RATE (5e-4; paper: 5e-5).")
    add_to_profile: bool = Field(False, description="Also append the examples to the user's profile (used by fusion).")


class ReloadRequest(_Strict):
    path: str | None = Field(None, description="Bank directory; unset = reload the configured bank path.")


# --- responses of the fine-tune, admin, export and health routes ----------------------------


class FinetuneParamsView(BaseModel):
    epochs: int
    rank: int
    learning_rate: float


class JobView(BaseModel):
    """A fine-tune job as the API shows it: never its training examples."""

    job_id: str
    user_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = Field(None, description="Last sign of life of the runner training it.")
    progress: float = Field(description="Fraction of the training steps done, 0 to 1.")
    step: int
    total_steps: int | None = None
    loss: float | None = Field(None, description="The last training step's loss.")
    initial_loss: float | None = None
    final_loss: float | None = None
    error: str | None = Field(None, description="Why the job failed.")
    params: FinetuneParamsView
    examples_count: int
    bank_version: str = Field(description="The bank whose fused adapter the stacked LoRA is trained over.")
    bank_path: str
    stacked_version: int | None = Field(None, description="The stored stacked LoRA's version, once succeeded.")


class StackedView(BaseModel):
    version: int
    bank_version: str
    job_id: str | None
    bytes: int


class ExportedProfile(BaseModel):
    items: list[dict[str, Any]]
    profile_version: int
    updated_at: float
    embedding_model: str | None


class UserExport(BaseModel):
    """Everything stored about a user, for an access request (the stacked LoRA's metadata, not its tensors)."""

    user_id: str
    profile: ExportedProfile
    stacked: StackedView | None
    jobs: list[JobView]


class AdapterCacheView(BaseModel):
    entries: int
    capacity: int
    bytes: int
    max_bytes: int | None
    hits: int
    misses: int
    evictions: int


class BankView(BaseModel):
    """The bank being served, its fusion settings and the materialized-adapter cache."""

    bank_version: str
    name: str
    description: str
    random: bool
    path: str
    base_model: str
    embedding_model: dict[str, Any]
    fusion: dict[str, Any] = Field(description="The served fusion defaults (mode, top_k, residual_scale).")
    shared_lora: dict[str, Any] | None = Field(None, description="A warm-started bank's shared task LoRA: rank, targets.")
    task: dict[str, Any]
    stacking: dict[str, Any] | None = Field(
        None, description="The stacked LoRA's recipe chosen on the bank's anchor pool (rank, learning_rate, epochs)."
    )
    finetune_defaults: dict[str, Any] = Field(
        description="What a fine-tune that names no rank, learning_rate or epochs trains with: MTA_FINETUNE_* if set, "
        "else the bank's `stacking`, else rank 2, lr 5e-4, 3 epochs."
    )
    anchors: list[dict[str, Any]] = Field(description="id, cluster_size, rank of every anchor.")
    top_k: int
    fusion_mode: str
    adapter_cache: AdapterCacheView


class ReloadView(BaseModel):
    previous_version: str | None
    bank_version: str
    path: str
    anchors: int
    invalidated_adapters: int = Field(description="Cached adapters of the old bank dropped by the swap.")


class RunnerHealth(BaseModel):
    """The fine-tune runner as /readyz sees it: `worker` (jobs run in `mta worker`), or the
    embedded runner's state and progress."""

    model_config = ConfigDict(extra="allow")
    mode: Literal["inprocess", "worker"]
    ok: bool = True
    state: str | None = None
    job_id: str | None = None
    seconds_since_progress: float | None = None
    store_error: str | None = None


class LoraSlotsView(BaseModel):
    max_loras: int = Field(description="Distinct adapters one engine step batches.")
    max_cpu_loras: int = Field(description="Adapters vLLM keeps loaded in host memory.")
    slot_bytes: int | None = Field(description="What one slot costs (None: MTA_MAX_LORAS was set).")
    chosen_by: str = Field(description="MTA_MAX_LORAS, or the memory budget and the slot size it was divided by.")


class ReadyView(BaseModel):
    status: Literal["ready"]
    bank_version: str
    model: str
    lora_path: str | None = Field(description="How LoRA layers run: kernel, grouped ops, or vLLM's stock ops.")
    lora_path_note: str | None = Field(None, description="Why a faster path was asked for and not used.")
    lora_slots: LoraSlotsView
    finetune_runner: RunnerHealth


class HealthView(BaseModel):
    status: Literal["ok"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- OpenAI-compatible --------------------------------------------------------------------


class _OpenAIBase(SamplingFields):
    # Unknown OpenAI fields (logprobs, presence_penalty, ...) are accepted and ignored, as
    # vLLM's own server does, so unmodified clients work.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    user: UserId | None = Field(None, description="Selects the user whose adapter serves the request.")
    n: int = Field(1, ge=1, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def _input(self, **kw: Any) -> GenerationInput:
        return GenerationInput(
            user_id=self.user,
            max_tokens=self.max_completion_tokens or self.max_tokens,
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=_stop_list(self.stop),
            seed=self.seed,
            **kw,
        )


class CompletionRequest(_OpenAIBase):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        text = v if isinstance(v, str) else v[0]
        if not text.strip():
            raise ValueError("prompt must not be empty")
        return v

    def to_input(self) -> GenerationInput:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return self._input(prompt=prompt, chat_template=False)


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)

    def to_input(self) -> GenerationInput:
        return self._input(messages=[m.model_dump() for m in self.messages])
