"""LoRA training on the base model: meta-LoRAs (bank build) and stacked user LoRAs (fine-tuning).

One recipe for both (docs/architecture.md, section 3; each point was found to matter on LaMP-2M):

- Prompts are the user turn of the model's chat template (`server.prompts.chat_prompt`),
  exactly as the server builds them; the target is the answer plus the end-of-turn token.
- Prompt and answer are tokenized separately and their ids joined (`"comedy"` and
  `" comedy"` tokenize differently); prompt tokens get label -100.
- Padding is masked by the attention mask, never by token id: SmolLM2's pad token is its
  end-of-turn token, which must stay a label.
- AdamW, linear warm-up then linear decay, bf16 autocast on the CPU.
- `torch.manual_seed(config.seed)` right before the new LoRA is created, so every LoRA
  trained with one seed (every meta-LoRA of a bank) starts from the same `A`: `linear`
  fusion (averaging A and B separately) is only meaningful for LoRAs that share an init.

`init_adapter` starts the new LoRA from given weights instead (a bank's `--init continue`:
every meta-LoRA continues the shared task LoRA's own A and B).
`base_adapter` trains a new LoRA on top of a frozen one (MTA stage 3: the user's fused
adapter). Both are attached as PEFT adapters and are active together, so training sees
exactly what serving the concatenated adapter computes:

    Semantics: y = W x + s_base B_base A_base x + s_new B_new A_new x   (only B_new, A_new train)

The model is borrowed, never kept: adapters are attached in place and removed again
(`unload`), parameters' `requires_grad` flags are restored, so one loaded model serves
many jobs. Calls on one model are serialized by a per-model lock (PEFT injects layers
into the model object, so two jobs cannot share it at the same time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.adapters import LoraWeights, fold_scaling, lora_from_peft_model
from server.adapters.targets import ModelTargets
from server.prompts import chat_prompt

IGNORE_INDEX = -100
NEW_ADAPTER = "default"  # the LoRA being trained (PEFT's default name)
BASE_ADAPTER = "frozen_base"  # the frozen adapter under it
_EVAL_BATCH = 8


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one LoRA training run (defaults: docs/architecture.md, section 3)."""

    rank: int = 8
    alpha: float = 16
    target_modules: tuple[str, ...] = ()  # () = every linear layer of the decoder, named by `with_targets`
    learning_rate: float = 2e-4
    epochs: int = 2
    batch_size: int = 4
    warmup_ratio: float = 0.05
    seed: int = 0  # seeds the LoRA A init (shared across a bank) and the example order
    max_length: int = 512
    bf16_autocast: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        problems = []
        if not (isinstance(self.rank, int) and self.rank >= 1):
            problems.append(f"rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha!r}")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.epochs < 1 or self.batch_size < 1:
            problems.append(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.max_length < 8:
            problems.append(f"max_length must be >= 8, got {self.max_length}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def with_targets(self, targets: ModelTargets) -> TrainConfig:
        """The default targets named as this model has them (Llama's 7 projections, Phi-3's fused
        `qkv_proj`/`gate_up_proj`, ...), so records and fingerprints say what was trained."""
        if self.target_modules:
            targets.select(self.target_modules)  # refuses kinds the model does not have
            return self
        return dataclasses.replace(self, target_modules=tuple(targets.kinds))


@dataclass(frozen=True)
class Example:
    """One training example: the user-turn content (`server.prompts.user_content`) and the answer."""

    prompt: str
    answer: str


@dataclass
class TrainResult:
    lora: LoraWeights  # scaling kept (alpha / r), not folded
    losses: list[float]  # training loss of every optimizer step
    # mean_loss on the examples before (new LoRA at init: B = 0) and after training, evaluated
    # with the training's precision (bf16 autocast when config.bf16_autocast); None if not asked for
    initial_loss: float | None
    final_loss: float | None
    seconds: float
    # with a validation set: its mean loss before training, then after each epoch run; the
    # returned LoRA is the one after epoch `best_epoch` (0: the init, a LoRA with B = 0)
    validation_losses: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    steps: int = field(init=False)

    def __post_init__(self) -> None:
        self.steps = len(self.losses)


# --- tokenization ------------------------------------------------------------------------


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn in the chat template (ChatML: `<|im_end|>`).

    Found by rendering a conversation and taking the first special token after the
    assistant's text; falls back to the tokenizer's eos token.
    """
    sentinel = "MTA-ANSWER-SENTINEL"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - templates may reject anything; the eos token is the fallback
        text = ""
    if isinstance(text, str) and sentinel in text:
        tail = tokenizer(text.split(sentinel, 1)[1], add_special_tokens=False)["input_ids"]
        special = set(tokenizer.all_special_ids)
        for token in tail:
            if token in special:
                return int(token)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-turn or eos token to end answers with")
    return int(tokenizer.eos_token_id)


def encode_example(tokenizer: Any, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: chat-template prompt, then answer + end-of-turn.

    Labels are -100 on the prompt. An example longer than `max_length` loses tokens from
    the middle of its prompt (the retrieved history item, usually), keeping the template's
    head, the instruction's end and the assistant header; the answer is cut only when it
    alone takes more than half of `max_length`.
    """
    return _encode(tokenizer, ex, max_length, end_of_turn_id(tokenizer))


def _encode(tokenizer: Any, ex: Example, max_length: int, eot: int) -> tuple[list[int], list[int]]:
    prompt = chat_prompt(tokenizer, [{"role": "user", "content": ex.prompt}])
    answer = list(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + [eot]
    if len(prompt) + len(answer) > max_length:
        answer = answer[: max(max_length // 2, max_length - len(prompt))]
        budget = max_length - len(answer)
        head = budget // 4
        prompt = prompt[:head] + prompt[len(prompt) - (budget - head) :]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def _collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label -100 (by the mask, not the id)."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # [b, t]
    attention = torch.zeros((len(encoded), width), dtype=torch.long)  # [b, t]
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)  # [b, t]
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.tensor(labs)
    labels[attention == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _pad_id(tokenizer: Any, eot: int) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot


# --- model --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _load_model(model_dir: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()  # no dropout anywhere: training is deterministic for a seed
    model.requires_grad_(False)
    return model


def load_base_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The base model for training and loss evaluation, loaded once per (directory, dtype).

    float32 by default: bf16 autocast then computes in bf16 while the LoRA and the
    optimizer stay in float32.
    """
    return _load_model(str(Path(model_dir).resolve()), dtype)


@functools.lru_cache(maxsize=2)
def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_tokenizer(model_dir: str | Path) -> Any:
    """The model's tokenizer, loaded once per directory."""
    return _load_tokenizer(str(Path(model_dir).resolve()))


_MODEL_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _model_lock(model: torch.nn.Module) -> threading.Lock:
    with _LOCKS_LOCK:
        return _MODEL_LOCKS.setdefault(model, threading.Lock())


def _lora_config(rank: int, alpha: float, target_modules: Sequence[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,  # A: kaiming-uniform from torch's global RNG, B: zeros
    )


def _config_for(lora: LoraWeights) -> Any:
    """A LoraConfig that targets exactly `lora`'s modules (full names) with its scaling."""
    return _lora_config(lora.rank, lora.scaling * lora.rank, lora.modules)


def _set_weights(peft_model: torch.nn.Module, adapter: str, lora: LoraWeights) -> None:
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for m in lora.modules:
            layer = modules[f"base_model.model.{m}"]
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            a.copy_(lora.a[m].to(a.dtype))  # [r, in]
            b.copy_(lora.b[m].to(b.dtype))  # [out, r]


@contextlib.contextmanager
def _attached(
    model: torch.nn.Module,
    *,
    new: TrainConfig | None = None,
    adapter: LoraWeights | None = None,
    base_adapter: LoraWeights | None = None,
) -> Iterator[torch.nn.Module]:
    """`model` wrapped by PEFT with the given adapters active; `model` restored on exit.

    `new` creates a trainable LoRA: from `torch.manual_seed(new.seed)`, or from `adapter`'s
    weights when both are given; `adapter` alone attaches given weights as the (frozen) top
    adapter; `base_adapter` sits frozen under it.
    """
    from peft import get_peft_model

    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    layers: list[tuple[str, Any, LoraWeights | None]] = []
    if base_adapter is not None:
        layers.append((BASE_ADAPTER, _config_for(base_adapter), base_adapter))
    if new is not None and adapter is not None:
        layers.append((NEW_ADAPTER, _config_for(adapter), adapter))
    elif new is not None:
        new = new.with_targets(ModelTargets.of_module(model))
        layers.append((NEW_ADAPTER, _lora_config(new.rank, new.alpha, new.target_modules), None))
    elif adapter is not None:
        layers.append((NEW_ADAPTER, _config_for(adapter), adapter))
    peft_model = None
    try:
        for name, config, weights in layers:
            with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
                if name == NEW_ADAPTER and new is not None:
                    torch.manual_seed(new.seed)  # the shared A init of every LoRA trained with this seed
                if peft_model is None:
                    peft_model = get_peft_model(model, config, adapter_name=name)
                else:
                    peft_model.add_adapter(name, config)
            if weights is not None:
                _set_weights(peft_model, name, weights)
        if peft_model is None:
            yield model
            return
        peft_model.base_model.set_adapter([name for name, _, _ in layers])
        for name, p in peft_model.named_parameters():
            p.requires_grad_(new is not None and f".{NEW_ADAPTER}." in name)
        peft_model.eval()
        yield peft_model
    finally:
        if peft_model is not None:
            peft_model.unload()
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(name, False))


# --- loss ---------------------------------------------------------------------------------


def _answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, token count) over the labelled tokens of `batch`.

    The output layer runs only on the positions that predict a label (the answer, a few
    tokens per example), not on every position as the model's own loss does: with a
    49k-token vocabulary the full logits cost more than the rest of the forward pass.
    The sum is the same as the model's; models that transform their logits further
    (soft-capping, a logit scale) take the model's own path.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch["labels"][:, 1:]  # token t is predicted at position t - 1
    wanted = labels != IGNORE_INDEX
    if getattr(causal_lm.config, "final_logit_softcapping", None) or hasattr(causal_lm, "logit_scale"):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][wanted]
    else:
        body = causal_lm.get_decoder()
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][wanted])  # [n, vocab]
    loss = torch.nn.functional.cross_entropy(logits.float(), labels[wanted], reduction="sum")
    return loss, int(wanted.sum())


def _mean_loss(
    model: torch.nn.Module, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int, bf16_autocast: bool
) -> float:
    """Token-weighted mean cross-entropy over every labelled token."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), _EVAL_BATCH):
            batch = _collate(encoded[start : start + _EVAL_BATCH], pad_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
                loss, n = _answer_loss(model, batch)
            total += float(loss)
            count += n
    return total / max(count, 1)


def mean_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    adapter: LoraWeights | None = None,
    base_adapter: LoraWeights | None = None,
    *,
    max_length: int = 512,
    bf16_autocast: bool = False,
) -> float:
    """Mean cross-entropy per answer token (answer + end-of-turn) of `examples`.

    Evaluated with `adapter` on top of `base_adapter` (either may be None), in the model's
    dtype (float32 by default) unless `bf16_autocast`; the model is left as it was.
    """
    eot = end_of_turn_id(tokenizer)
    encoded = [_encode(tokenizer, ex, max_length, eot) for ex in examples]
    with _model_lock(model), _attached(model, adapter=adapter, base_adapter=base_adapter) as m:
        return _mean_loss(m, encoded, _pad_id(tokenizer, eot), bf16_autocast)


def mean_losses(
    model: torch.nn.Module,
    tokenizer: Any,
    jobs: Sequence[tuple[Sequence[Example], LoraWeights]],
    *,
    max_length: int = 512,
    bf16_autocast: bool = True,
) -> list[float]:
    """`mean_loss` of each (examples, adapter) job, for many adapters at the cost of one attach.

    One PEFT adapter of the jobs' largest rank is attached once; each job's adapter is copied
    into it, zero-padded (zero rank rows add nothing), so scoring a grid of fused adapters
    (the bank builder's fusion-default search) does not rebuild PEFT layers per adapter.
    """
    if not jobs:
        return []
    eot = end_of_turn_id(tokenizer)
    adapters = [fold_scaling(adapter) for _, adapter in jobs]
    rank = max(a.rank for a in adapters)
    features = {m: (a.a[m].shape[1], a.b[m].shape[0]) for a in adapters for m in a.modules}
    slot = LoraWeights(
        a={m: torch.zeros(rank, fan_in) for m, (fan_in, _) in features.items()},
        b={m: torch.zeros(fan_out, rank) for m, (_, fan_out) in features.items()},
        scaling=1.0,
    )
    out = []
    with _model_lock(model), _attached(model, adapter=slot) as peft_model:
        for (examples, _), adapter in zip(jobs, adapters):
            for m in slot.modules:  # the slot's tensors are the template: reuse them as the padded copy
                slot.a[m].zero_()
                slot.b[m].zero_()
                if m in adapter.a:
                    slot.a[m][: adapter.rank] = adapter.a[m]
                    slot.b[m][:, : adapter.rank] = adapter.b[m]
            _set_weights(peft_model, NEW_ADAPTER, slot)
            encoded = [_encode(tokenizer, ex, max_length, eot) for ex in examples]
            out.append(_mean_loss(peft_model, encoded, _pad_id(tokenizer, eot), bf16_autocast))
    return out


# --- training -----------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then linear decay; every step has lr > 0.

    Semantics: step i (0-based) uses (i + 1) / warmup while i < warmup,
    else (total - i) / (total - warmup).
    """
    if step < warmup:
        return (step + 1) / warmup
    return (total - step) / max(total - warmup, 1)


def train_lora(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    base_adapter: LoraWeights | None = None,
    init_adapter: LoraWeights | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    report_loss: bool = True,
    validation: Sequence[Example] | None = None,
    patience: int = 1,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a new LoRA on `examples` (optionally on top of a frozen `base_adapter`).

    `init_adapter`: start from its weights (its rank, scaling and modules; `config`'s are not
    used) instead of a fresh seeded init.

    `progress(step, total_steps, loss)` is called after every optimizer step (1-based).
    `report_loss=False` skips the before/after loss evaluation (a forward pass over all
    examples each: a third of the whole call's compute at 2 epochs) for large shared
    trainings whose step losses say enough.
    With `validation` examples, `config.epochs` is the most epochs trained: the validation
    loss is measured before training and after every epoch, training stops once it has not
    improved for `patience` epochs, and the LoRA of the best epoch is returned (the learning
    rate schedule still spans `config.epochs`, so a run is a prefix of the full one).
    `stop_after` trains only that prefix (0 returns the initial LoRA): a bank refit repeats
    on all items the trajectory that validation chose.
    Deterministic for a given config, model and examples. The model is unchanged after.
    """
    if not examples:
        raise ValueError("no training examples")
    empty = [i for i, ex in enumerate([*examples, *(validation or ())]) if not ex.answer.strip()]
    if empty:
        raise ValueError(f"examples with an empty answer: {empty[:5]}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if stop_after is not None and not 0 <= stop_after <= config.epochs:
        raise ValueError(f"stop_after must be in [0, {config.epochs}], got {stop_after}")
    if stop_after is not None and validation:
        raise ValueError("stop_after replays a chosen number of epochs: it takes no validation set")
    started = time.perf_counter()
    eot = end_of_turn_id(tokenizer)
    pad_id = _pad_id(tokenizer, eot)
    encoded = [_encode(tokenizer, ex, config.max_length, eot) for ex in examples]
    held = [_encode(tokenizer, ex, config.max_length, eot) for ex in validation or ()]
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = math.ceil(config.warmup_ratio * total)
    order = random.Random(config.seed)

    if init_adapter is not None and base_adapter is not None:
        raise ValueError("a LoRA either continues init_adapter or trains over base_adapter, not both")
    attach = {"new": config, "adapter": init_adapter, "base_adapter": base_adapter}
    with _model_lock(model), _attached(model, **attach) as peft_model:
        initial = _mean_loss(peft_model, encoded, pad_id, config.bf16_autocast) if report_loss else None
        curve = [_mean_loss(peft_model, held, pad_id, config.bf16_autocast)] if held else []
        best, best_epoch = (lora_from_peft_model(peft_model, NEW_ADAPTER), 0) if held else (None, None)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, total, warmup))
        losses: list[float] = []
        for epoch in range(1, (config.epochs if stop_after is None else stop_after) + 1):
            indices = list(range(len(encoded)))
            order.shuffle(indices)
            for start in range(0, len(indices), config.batch_size):
                batch = _collate([encoded[i] for i in indices[start : start + config.batch_size]], pad_id)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast):
                    loss_sum, n = _answer_loss(peft_model, batch)
                    loss = loss_sum / n  # the mean over the batch's answer tokens, as the model's own loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(len(losses), total, losses[-1])
            if held:
                curve.append(_mean_loss(peft_model, held, pad_id, config.bf16_autocast))
                if curve[-1] < min(curve[:-1]):
                    best, best_epoch = lora_from_peft_model(peft_model, NEW_ADAPTER), epoch
                elif epoch - best_epoch >= patience:
                    break
        if best is not None and best_epoch != epoch:
            _set_weights(peft_model, NEW_ADAPTER, best)  # the final loss is the returned LoRA's
        final = _mean_loss(peft_model, encoded, pad_id, config.bf16_autocast) if report_loss else None
        lora = best if best is not None else lora_from_peft_model(peft_model, NEW_ADAPTER)
    return TrainResult(
        lora=lora, losses=losses, initial_loss=initial, final_loss=final, seconds=time.perf_counter() - started,
        validation_losses=curve, best_epoch=best_epoch,
    )  # fmt: skip
