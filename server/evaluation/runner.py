"""`mta eval`: every method on the same held-out users and points, in one run.

Two phases, so the trainer and vLLM never hold the CPU (or memory) at the same time:
1. train and write every adapter (cached in `<out>/work`, so an interrupted run resumes);
2. one vLLM engine generates every point of every method, one `LoRARequest` per user.
With `folds=2` (`server.evaluation.folds`) phase 1 runs once per fold, with that fold's bank
and `task_lora`, and phase 2 serves both folds' users from the same engine; the scores and
their user-bootstrap intervals are over all evaluated users. Each phase's wall time is
recorded under `timings`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.adapters import (
    LoraWeights,
    adapter_to_bytes,
    load_adapter,
    save_adapter,
    stack,
)
from server.bank.manifest import StackingDefaults
from server.evaluation.config import EvalConfig
from server.evaluation.folds import Fold, make_folds, read_manifest_json
from server.evaluation.methods import COMPARISONS, Fused
from server.evaluation.metrics import METRICS, bootstrap_ci, normalize_label, paired_difference, score
from server.evaluation.protocol import EvalUser, eval_users, load_task_users
from server.lamp_data import leave_one_out_examples
from server.settings import ALLOWED_MAX_LORA_RANKS, Settings
from server.stacking import with_bank_recipe
from server.training import TrainConfig

log = logging.getLogger(__name__)



@dataclass
class Adapter:
    """One user's served adapter for one method, and what the method stores per user."""

    path: Path
    rank: int
    stored_bytes: int = 0
    train: dict[str, Any] = field(default_factory=dict)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class AdapterBuilder:
    """Trains and fuses the adapters of phase 1; each is cached under `work/<method>/<user>`.

    The training model, the served banks and `task_lora`'s weights are loaded on first use:
    a rerun whose adapters are all cached loads none of them.
    """

    def __init__(self, cfg: EvalConfig, work: Path, pool: Sequence[Any]) -> None:
        self.cfg, self.work, self.pool = cfg, work, pool
        self.settings = Settings(model_path=cfg.model_dir)
        self.load_seconds = 0.0  # time spent loading the training model
        self._task_adapter: Adapter | None = None
        self._task_lora: LoraWeights | None = None
        self._banks: dict[Any, Any] = {}
        self._embeddings: dict[tuple[str, str], Any] = {}

    @functools.cached_property
    def model(self) -> Any:
        from server.training import load_base_model

        started = time.perf_counter()
        model = load_base_model(self.cfg.model_dir)
        self.load_seconds += time.perf_counter() - started
        return model

    @functools.cached_property
    def tokenizer(self) -> Any:
        from server.training import load_tokenizer

        return load_tokenizer(self.cfg.model_dir)

    @functools.cached_property
    def bank_version(self) -> str:
        """The bank's version from its manifest: cache fingerprints need it, not the loaded bank."""
        assert self.cfg.bank is not None
        return read_manifest_json(self.cfg.bank)["bank_version"]

    @functools.cached_property
    def stack_train(self) -> TrainConfig:
        """`mta_stack`'s recipe on this fold's bank, as the server's fine-tune resolves it: the
        values given on the command line, else the bank's recorded choice, else the defaults."""
        recorded = read_manifest_json(self.cfg.bank).get("stacking") if self.cfg.bank is not None else None
        stacking = StackingDefaults(**recorded) if recorded else None
        return with_bank_recipe(self.cfg.stack_train, stacking, keep=self.cfg.stack_given)

    # --- cache --------------------------------------------------------------------------

    def _cached(self, method: str, user: str, fingerprint: str, make) -> Adapter:
        path = self.work / method / user
        record = path / "eval_record.json"
        if record.is_file():
            rec = json.loads(record.read_text())
            if rec.get("fingerprint") == fingerprint:
                return Adapter(path, rec["rank"], rec["stored_bytes"], rec["train"])
        lora, stored_bytes, train = make()
        save_adapter(lora, path, base_model_name_or_path=self.cfg.model_id)
        record.write_text(json.dumps({"fingerprint": fingerprint, "rank": lora.rank, "stored_bytes": stored_bytes, "train": train}))
        return Adapter(path, lora.rank, stored_bytes, train)

    @staticmethod
    def _train_info(result: Any) -> dict[str, Any]:
        return {"initial_loss": result.initial_loss, "final_loss": result.final_loss, "seconds": result.seconds, "steps": result.steps}

    # --- shared parts -----------------------------------------------------------------------

    def task_adapter(self) -> Adapter:
        """`task_lora`, trained once on the anchor pool's leave-one-out examples."""
        from server.training import train_lora

        if self._task_adapter is not None:
            return self._task_adapter
        cfg = self.cfg
        examples = [ex for user in self.pool for ex in leave_one_out_examples(user, cfg.task)]
        if not examples:
            raise ValueError("task_lora/oppu need anchor-pool users to train on, and the split has none")
        fp = _digest({"train": dataclasses.asdict(cfg.task_train), "examples": [dataclasses.astuple(e) for e in examples]})

        def make():
            log.info("training task_lora on %d examples of %d anchor-pool users", len(examples), len(self.pool))
            # no before/after loss pass over the whole pool: the step losses show the fit
            result = train_lora(
                self.model, self.tokenizer, examples, cfg.task_train, progress=_step_bar("task_lora"), report_loss=False
            )
            return result.lora, 0, self._train_info(result)

        self._task_adapter = self._cached("task_lora", "_shared", fp, make)
        return self._task_adapter

    def task_lora(self) -> LoraWeights:
        if self._task_lora is None:
            self._task_lora = load_adapter(self.task_adapter().path)
        return self._task_lora

    def served_bank(self, method: Fused) -> Any:
        from server.bank.registry import BankRegistry

        key = (method.fusion_mode, method.top_k, method.residual_scale)
        if key not in self._banks:
            overrides = {"fusion_mode": method.fusion_mode, "top_k": method.top_k, "residual_scale": method.residual_scale}
            settings = self.settings.model_copy(update={**overrides, "max_lora_rank": max(ALLOWED_MAX_LORA_RANKS)})
            self._banks[key] = BankRegistry(settings, self.cfg.model_id, self.cfg.model_dir).open(self.cfg.bank)
        return self._banks[key]

    def fused(self, method: Fused, user: EvalUser) -> LoraWeights:
        from server.fusion import build_adapter, plan_fusion

        served = self.served_bank(method)
        key = (served.embedding_model, str(user.user_id))  # the same embedding for every mta_* method
        if key not in self._embeddings:
            self._embeddings[key] = served.embedder.embed_user([served.render(item) for item in user.few_shot])
        emb = self._embeddings[key]
        plan = plan_fusion(
            served.bank,
            emb,
            bank_uid=served.uid,
            top_k=served.top_k,
            mode=served.mode,
            temperature=self.settings.weight_temperature,
            round_step=self.settings.weight_round_step,
        )
        return build_adapter(served.bank, plan, max(ALLOWED_MAX_LORA_RANKS))

    # --- per method (called by the `Method` objects) -------------------------------------------

    def oppu_adapter(self, user: EvalUser) -> Adapter:
        """A rank-8 LoRA trained on the user's few-shot set over `task_lora`, served concatenated onto it."""
        from server.training import train_lora

        examples = user.training_examples(self.cfg.task)
        shared, train = self.task_adapter(), self.cfg.oppu_train
        fp = _digest({"under": shared.train, "train": dataclasses.asdict(train), "ex": [dataclasses.astuple(e) for e in examples]})

        def make():
            task_lora = self.task_lora()
            result = train_lora(self.model, self.tokenizer, examples, train, base_adapter=task_lora)
            return stack(task_lora, result.lora), len(adapter_to_bytes(result.lora)), self._train_info(result)

        return self._cached("oppu", str(user.user_id), fp, make)

    def _bank_fingerprint(self, method: Fused) -> dict[str, Any]:
        """What a fused adapter depends on: the bank and the defaults it is served with (the
        method's overrides or the bank's own, which a rebuild may choose differently)."""
        served = self.served_bank(method)
        return {
            "bank": str(self.cfg.bank), "version": self.bank_version, "mode": served.mode, "k": served.top_k,
            "scale": served.bank.residual_scale,
        }  # fmt: skip

    def fused_adapter(self, method: Fused, user: EvalUser) -> Adapter:
        fp = _digest({**self._bank_fingerprint(method), "few": user.few_shot})
        return self._cached(method.name, str(user.user_id), fp, lambda: (self.fused(method, user), 0, {}))

    def stacked_adapter(self, method: Fused, user: EvalUser) -> Adapter:
        """The server's fine-tune: a stacked LoRA trained over the fused adapter, stored as the server stores it."""
        from server.stacking import stacked_to_bytes, train_stacked

        examples, train = user.training_examples(self.cfg.task), self.stack_train
        few = {"train": dataclasses.asdict(train), "ex": [dataclasses.astuple(e) for e in examples], "few": user.few_shot}
        fp = _digest({**self._bank_fingerprint(method), **few})

        def make():
            fused = self.fused(method, user)
            result = train_stacked(self.model, self.tokenizer, fused, examples, train)
            stored = stacked_to_bytes(result.lora, bank_version=self.bank_version, job_id="eval")
            return stack(fused, result.lora), len(stored), self._train_info(result)

        return self._cached(method.name, str(user.user_id), fp, make)


def _step_bar(desc: str):
    """A tqdm bar driven by the trainer's progress callback."""
    from tqdm.auto import tqdm

    bar = None

    def progress(step: int, total: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="step")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step == total:
            bar.close()

    return progress


# --- phase 1: adapters, fold by fold ----------------------------------------------------------


def build_adapters(
    cfg: EvalConfig, folds: Sequence[Fold], fold_users: Sequence[Sequence[EvalUser]], timings: dict[str, Any]
) -> dict[str, list[Adapter | None]]:
    """Every trained method's adapter per evaluated user, in fold order; `task_lora` and banks per fold."""
    from tqdm.auto import tqdm

    trained = [m for m in cfg.methods if m.trains]
    adapters: dict[str, list[Adapter | None]] = {m.name: [] for m in trained}
    seconds: dict[str, float] = timings.setdefault("train", {})
    for fold, users in zip(folds, fold_users):
        if not trained or not users:
            continue
        builder = AdapterBuilder(dataclasses.replace(cfg, bank=fold.bank), fold.work, fold.pool)
        prefix = f"fold {fold.index} " if len(folds) > 1 else ""
        for m in trained:
            started, loading = time.perf_counter(), builder.load_seconds
            adapters[m.name] += [m.adapter(builder, u) for u in tqdm(users, desc=f"{prefix}adapters: {m.name}", unit="user")]
            spent = time.perf_counter() - started - (builder.load_seconds - loading)
            seconds[m.name] = seconds.get(m.name, 0.0) + spent
        timings["load_training_model"] = timings.get("load_training_model", 0.0) + builder.load_seconds
        del builder
        gc.collect()
    return adapters


# --- phase 2: generation ---------------------------------------------------------------------

Job = tuple[list[int], Adapter | None]  # prompt token ids, the user's adapter (None: the base model)


def generate(cfg: EvalConfig, jobs: dict[str, list[Job]]) -> dict[str, list[str]]:
    """Greedy outputs of every method's prompts, through one vLLM engine with the server's LoRA path."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from server.engine_args import EngineSpec

    ranks = [a.rank for js in jobs.values() for _, a in js if a is not None]  # from the cache records
    max_rank = min((r for r in ALLOWED_MAX_LORA_RANKS if r >= max(ranks, default=1)), default=max(ALLOWED_MAX_LORA_RANKS))
    config = json.loads((cfg.model_dir / "config.json").read_text())
    llm = EngineSpec(
        model=str(cfg.model_dir),
        dtype=cfg.dtype,
        max_lora_rank=max_rank,
        max_cpu_loras=32,
        max_model_len=min(2048, int(config.get("max_position_embeddings", 2048))),
        cpu_threads_bind="nobind",  # a shared machine: let the OS place threads
    ).offline_llm()
    params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=0.0)
    ids: dict[Path, int] = {}
    outputs: dict[str, list[str]] = {}
    for name, method_jobs in jobs.items():
        loras = [None if a is None else _lora_request(LoRARequest, name, a.path, ids) for _, a in method_jobs]
        print(f"[eval] generating {len(method_jobs)} points for {name}", flush=True)
        results = llm.generate(
            [TokensPrompt(prompt_token_ids=ids_) for ids_, _ in method_jobs],
            params,
            lora_request=loras if any(loras) else None,
            use_tqdm=True,
        )
        outputs[name] = [r.outputs[0].text for r in results]
    del llm
    gc.collect()
    return outputs


def _lora_request(cls: Any, method: str, path: Path, ids: dict[Path, int]) -> Any:
    """One request per adapter directory; the id, not the user id, keeps the folds' `_shared` apart."""
    lora_id = ids.setdefault(path, len(ids) + 1)
    return cls(f"{method}:{path.name}#{lora_id}", lora_id, str(path))


def generation_jobs(cfg: EvalConfig, users: Sequence[EvalUser], adapters: dict[str, list[Adapter | None]]) -> dict[str, list[Job]]:
    """Every model method's prompts (the server's chat template) with the user's adapter."""
    from server.prompts import chat_prompt
    from server.training import load_tokenizer

    tokenizer = load_tokenizer(cfg.model_dir)
    jobs: dict[str, list[Job]] = {}
    for m in cfg.methods:
        if not m.model:
            continue
        per_user = adapters.get(m.name, [None] * len(users))
        jobs[m.name] = [
            (chat_prompt(tokenizer, [{"role": "user", "content": u.prompt(p, with_context=m.context)}]), a)
            for u, a in zip(users, per_user)
            for p in u.points
        ]
    return jobs


def reference_outputs(cfg: EvalConfig, users: Sequence[EvalUser]) -> dict[str, list[str]]:
    """The rows computed from the data alone (no model)."""
    return {m.name: m.answers(users, cfg.task) for m in cfg.methods if not m.model}


# --- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _timed(timings: dict[str, Any], key: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - started


def run(cfg: EvalConfig) -> dict[str, Any]:
    started = time.perf_counter()
    cfg = cfg.with_model_targets()
    timings: dict[str, Any] = {}
    users, queries = load_task_users(cfg.data, cfg.task)
    with _timed(timings, "fold2_bank") if cfg.folds == 2 else contextlib.nullcontext():
        folds, _ = make_folds(cfg, users)
    fold_users = [eval_users(f.held, queries, cfg.task, cfg.n_few_shot)[: cfg.max_users] for f in folds]
    evaluated = [u for us in fold_users for u in us]
    if not evaluated:
        raise ValueError(f"no held-out user has more than {cfg.n_few_shot} profile items to evaluate on")
    for fold, us in zip(folds, fold_users):
        print(
            f"[eval] fold {fold.index}: {len(us)} held-out users, {sum(len(u.points) for u in us)} points, "
            f"{len(fold.pool)} anchor-pool users, bank {fold.bank}",
            flush=True,
        )

    adapters = build_adapters(cfg, folds, fold_users, timings)  # phase 1
    with _timed(timings, "generation"):  # phase 2
        jobs = generation_jobs(cfg, evaluated, adapters)
        outputs = generate(cfg, jobs) if jobs else {}
    outputs.update(reference_outputs(cfg, evaluated))

    with _timed(timings, "scoring"):
        result = score_run(cfg, evaluated, outputs, adapters)
        if len(folds) > 1:
            result["folds"] = fold_breakdown(cfg, folds, fold_users, outputs)
        result["setup"]["folds"] = cfg.folds
    result["seconds"] = time.perf_counter() - started
    result["timings"] = {**timings, "total": result["seconds"]}
    write_outputs(cfg, evaluated, outputs, result, fold_of=[f.index for f, us in zip(folds, fold_users) for _ in us])
    return result


def format_timings(timings: dict[str, Any]) -> str:
    parts = []
    for key, value in timings.items():
        if isinstance(value, dict):
            parts += [f"{key} {name} {seconds:.0f} s" for name, seconds in value.items()]
        else:
            parts.append(f"{key} {value:.0f} s")
    return ", ".join(parts)


def _by_user(users: Sequence[EvalUser], preds: list[str]) -> list[tuple[list[str], list[str]]]:
    """(predictions, golds) per user, from the users' points in order."""
    per_user, i = [], 0
    for u in users:
        per_user.append((preds[i : i + len(u.points)], [p.gold for p in u.points]))
        i += len(u.points)
    return per_user


def _metric(cfg: EvalConfig) -> Callable[[list[str], list[str]], dict[str, float]]:
    """The task's metrics of (predictions, golds), as the bootstrap resamples them."""
    return functools.partial(score, cfg.kind, labels=cfg.labels)


def method_scores(cfg: EvalConfig, users: Sequence[EvalUser], outputs: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Every metric of every method with its user-bootstrap interval (outputs: the users' points in order)."""
    golds = [p.gold for u in users for p in u.points]
    metric = _metric(cfg)
    methods: dict[str, dict[str, Any]] = {}
    for m in cfg.methods:
        preds = outputs[m.name]
        values = metric(preds, golds)
        cis = bootstrap_ci(_by_user(users, preds), metric, resamples=cfg.resamples, seed=cfg.seed)
        methods[m.name] = {**values, **{f"{k}_ci": list(cis[k]) for k in values}}
        if cfg.labels:  # how often the answer is one of the task's labels at all
            on_list = {normalize_label(label) for label in cfg.labels}
            methods[m.name]["on_list"] = sum(normalize_label(p) in on_list for p in preds) / max(len(preds), 1)
    return methods


def comparisons(cfg: EvalConfig, users: Sequence[EvalUser], outputs: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The paired differences of `COMPARISONS` whose two methods both ran, with user-bootstrap intervals."""
    metric = _metric(cfg)
    rows = []
    for first, second in COMPARISONS:
        if first in outputs and second in outputs:
            diffs = paired_difference(
                _by_user(users, outputs[first]), _by_user(users, outputs[second]), metric,
                resamples=cfg.resamples, seed=cfg.seed,
            )  # fmt: skip
            rows.append({"first": first, "second": second, **{k: list(v) for k, v in diffs.items()}})
    return rows


def fold_breakdown(
    cfg: EvalConfig, folds: Sequence[Fold], fold_users: Sequence[Sequence[EvalUser]], outputs: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """Each fold's users, bank and scores (intervals over the fold's users)."""
    rows, start = [], 0
    for fold, users in zip(folds, fold_users):
        n = sum(len(u.points) for u in users)
        part = {name: preds[start : start + n] for name, preds in outputs.items()}
        start += n
        manifest = read_manifest_json(fold.bank) if fold.bank else {}
        rows.append(
            {
                "fold": fold.index,
                "bank": str(fold.bank) if fold.bank else None,
                "bank_version": manifest.get("bank_version"),
                "bank_stacking": manifest.get("stacking"),
                "anchor_pool_users": len(fold.pool),
                "n_users": len(users),
                "n_points": n,
                "users": [u.user_id for u in users],
                "methods": method_scores(cfg, users, part) if users else {},
            }
        )
    return rows


def score_run(
    cfg: EvalConfig, users: Sequence[EvalUser], outputs: dict[str, list[str]], adapters: dict[str, list[Adapter | None]]
) -> dict[str, Any]:
    """results.json: every metric with its user-bootstrap interval, and bytes stored per user."""
    per_user_bytes = {}
    for m in cfg.methods:
        stored = [a.stored_bytes for a in adapters.get(m.name, []) if a is not None]
        per_user_bytes[m.name] = round(sum(stored) / len(stored)) if stored else 0
    training = {
        name: {
            "mean_initial_loss": _mean([a.train.get("initial_loss") for a in ads if a]),
            "mean_final_loss": _mean([a.train.get("final_loss") for a in ads if a]),
        }
        for name, ads in adapters.items()
        if any(a and a.train for a in ads)
    }
    return {
        "task": cfg.task.name,
        "n_users": len(users),
        "n_points": sum(len(u.points) for u in users),
        "metrics": list(METRICS[cfg.kind]),
        "methods": method_scores(cfg, users, outputs),
        "comparisons": comparisons(cfg, users, outputs),
        "per_user_bytes": per_user_bytes,
        "training": training,
        "setup": {
            "data": str(cfg.data),
            "bank": str(cfg.bank) if cfg.bank else None,
            "model": cfg.model_id,
            "few_shot_items": cfg.n_few_shot,
            "max_new_tokens": cfg.max_new_tokens,
            "dtype": cfg.dtype,
            "task_lora": dataclasses.asdict(cfg.task_train),
            "oppu": dataclasses.asdict(cfg.oppu_train),
            # without a bank's recorded recipe; a fold's bank_stacking replaces what was not given
            "mta_stack": {**dataclasses.asdict(cfg.stack_train), "given": sorted(cfg.stack_given)},
            "bootstrap_resamples": cfg.resamples,
        },
    }


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_outputs(
    cfg: EvalConfig,
    users: Sequence[EvalUser],
    outputs: dict[str, list[str]],
    result: dict[str, Any],
    *,
    fold_of: Sequence[int] | None = None,
) -> None:
    from server.evaluation.report import bar_chart, markdown_table

    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(result, indent=2))
    (cfg.out / "results.md").write_text(markdown_table(result) + "\n")
    bar_chart(result, cfg.out / "results.png")
    folds = fold_of or [1] * len(users)
    with (cfg.out / "predictions.jsonl").open("w") as f:
        i = 0
        for u, fold in zip(users, folds):
            for p in u.points:
                f.write(json.dumps({"user_id": u.user_id, "fold": fold, "gold": p.gold, **{m: outputs[m][i] for m in outputs}}) + "\n")
                i += 1
