"""Build a meta-LoRA bank offline (MTA stage 1) from a LaMP-format user file.

Steps (docs/architecture.md, section 1):

1. Read and validate the users (`[{"user_id", "profile": [items], "query": [...]}, ...]`).
2. Split them deterministically into the **anchor pool** and **held-out users**: users are
   ordered by `sha256(str(user_id))` and the first `round(holdout_fraction * n)` are held
   out (never seen by the bank; evaluation uses them). The split depends only on the user
   ids and the fraction, not on the file order or the seed, and is recorded in the manifest.
3. Embed every pool user: the normalised mean of the embeddings of the user's history
   items rendered with the task's history template (`server.embedding.Embedder`).
4. k-means (FAISS, seeded, best of a few restarts) over the pool; the anchor of a
   cluster is its member with the longest history (ties: the lowest user id).
5. Train one meta-LoRA per anchor (`server.training`) on leave-one-out examples: each
   history item becomes an instruction (the task's prompt template) whose prompt carries
   the BM25 top-1 OTHER history item (`server.prompts`, as serving does), and whose answer
   is the item's answer field. `meta_data="cluster"` trains on the histories of all the
   cluster's members instead of the anchor's alone (for data where every user is sparse).
   `init="zero"` (the paper's): every meta-LoRA from one shared init (`TrainConfig.seed`,
   recorded as the manifest's `lora_init_seed`), so `linear` fusion averages comparable
   factors. `init="task"`: first one task LoRA on the whole anchor pool, then every meta-LoRA
   as a residual over it (frozen); the task LoRA is stored once (`shared_lora`).
   `init="continue"`: the same task LoRA, then every meta-LoRA continues training its own A
   and B (its rank and modules); the bank stores only the meta-LoRAs, and the fusion choice
   reports each candidate against the task LoRA alone (`reference`).
   With `validation_items`, each pool user's last items are held out of all training: every
   training stops on their loss (best epoch kept), and the fusion defaults are chosen on
   them (`server.bank.selection`); with `stacking_lrs`, so is the per-user stacked LoRA's
   learning rate (`server.bank.stacking_choice`). The manifest records the recipe, curves and
   choices. `refit` then retrains every LoRA on all its items for the epochs chosen, so the choice
   costs the shipped bank none of its training data.
6. Write the bank (manifest.json, anchor_embeddings.npy, loras/<anchor>/, shared/) into a
   temporary directory beside `out` and rename it into place.

Resumable: each trained meta-LoRA is kept in a work directory with a fingerprint of
everything it depends on (model, training config, examples); a rerun skips anchors whose
fingerprint matches (the fusion-default and stacking choices are kept the same way). Deterministic: the
same data, model and settings give the same anchors and a byte-identical manifest
(`bank_version` is a digest of the inputs; no timestamps).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from server.adapters import load_adapter, save_adapter
from server.adapters.peft_io import _move_into_place
from server.adapters.targets import ModelTargets
from server.bank.manifest import (
    EMBEDDINGS_FILE,
    MANIFEST_FILE,
    AnchorSpec,
    BankManifest,
    EmbeddingSpec,
    FusionDefaults,
    SharedLoraSpec,
    StackingDefaults,
    TaskSpec,
)
from server.embedding import DEFAULT_EMBEDDING_MODEL
from server.lamp_data import (
    DataError,
    User,
    heldout_examples,
    leave_one_out_examples,
    load_users,
    split_items,
    split_users,
)
from server.tasks import Task
from server.training import Example, TrainConfig

log = logging.getLogger(__name__)

MetaData = Literal["anchor", "cluster"]
Init = Literal["zero", "task", "continue"]
SHARED_LORA_DIR = "shared"  # the directory of the task LoRA that `--init task|continue` trains first
REFIT_DIR = "refit"  # in the work directory: the LoRAs of a `refit` build, as the bank ships them
_ANCHOR_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


class BankBuildError(DataError):
    """Bad input for a bank build (task, settings); the message says what and where."""


def anchor_id(user_id: int | str) -> str:
    """The user id when it is a valid anchor id, else a sanitised form with a digest."""
    text = str(user_id)
    if _ANCHOR_ID.match(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', text)[:80]}-{digest}"


# --- embedding and clustering ---------------------------------------------------------------


def embed_users(embedder: Any, users: Sequence[User], task: Task, *, progress: bool = True) -> np.ndarray:
    """[n_users, dim] float32: each user's normalised mean item embedding."""
    from tqdm.auto import tqdm

    rows = [
        embedder.embed_user([task.render(item) for item in user.profile])
        for user in tqdm(users, desc="embedding users", unit="user", disable=not progress)
    ]
    return np.stack(rows).astype(np.float32)


def kmeans(
    embeddings: np.ndarray, k: int, *, seed: int, restarts: int = 5, iterations: int = 50, progress: bool = True
) -> np.ndarray:
    """Cluster labels [n] from FAISS k-means: the best (lowest objective) of `restarts` seeded runs."""
    import faiss
    from tqdm.auto import tqdm

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n, dim = x.shape
    if not 1 <= k <= n:
        raise BankBuildError(f"cannot make {k} clusters of {n} users (need 1 <= anchors <= users)")
    best_obj, best_labels = None, None
    for r in tqdm(range(restarts), desc="k-means", unit="run", disable=not progress):
        km = faiss.Kmeans(
            dim, k, niter=iterations, seed=seed * 1000 + r, min_points_per_centroid=1,
            max_points_per_centroid=max(n, 1) * 10, verbose=False,
        )  # fmt: skip
        km.train(x)
        _, labels = km.index.search(x, 1)
        obj = float(km.obj[-1]) if len(km.obj) else 0.0
        if best_obj is None or obj < best_obj:
            best_obj, best_labels = obj, labels[:, 0].astype(np.int64)
    assert best_labels is not None
    return best_labels


@dataclass(frozen=True)
class Cluster:
    anchor: User  # the member with the longest history (ties: lowest user id)
    members: tuple[User, ...]  # sorted by user id, anchor included
    embedding: np.ndarray  # the anchor user's embedding

    @property
    def id(self) -> str:
        return anchor_id(self.anchor.user_id)


def choose_anchors(users: Sequence[User], embeddings: np.ndarray, labels: np.ndarray) -> list[Cluster]:
    """One cluster per non-empty label, sorted by anchor user id."""
    clusters = []
    for label in sorted(set(labels.tolist())):
        idx = [i for i in range(len(users)) if labels[i] == label]
        members = sorted((users[i] for i in idx), key=lambda u: u.sort_key)
        best = min(idx, key=lambda i: (-len(users[i].profile), users[i].sort_key))
        clusters.append(Cluster(anchor=users[best], members=tuple(members), embedding=embeddings[best]))
    return sorted(clusters, key=lambda c: c.anchor.sort_key)


# --- the build -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildConfig:
    task: Task
    n_anchors: int = 8
    train: TrainConfig = field(default_factory=TrainConfig)
    meta_data: MetaData = "anchor"
    holdout_fraction: float = 0.2
    kmeans_seed: int = 0
    kmeans_restarts: int = 5
    dtype: Literal["bf16", "fp32"] = "fp32"
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    fusion: FusionDefaults = field(default_factory=FusionDefaults)
    name: str | None = None  # default: the task name
    # "task": first train one LoRA on the whole anchor pool (`task_train`), then every meta-LoRA
    # as a residual over it (stored once, served under the fused residuals); "continue": every
    # meta-LoRA continues that LoRA's A and B (`train`'s rank and modules give way to
    # `task_train`'s); "zero": the paper's recipe, every meta-LoRA from scratch from one shared A init.
    init: Init = "zero"
    task_train: TrainConfig = field(default_factory=TrainConfig)
    # The last N history items of every anchor-pool user are held out of all training: the
    # validation set that stops each training (`patience` epochs without improvement; `epochs`
    # is then the most) and on which the fusion defaults are chosen (`select_fusion`).
    validation_items: int = 0
    patience: int = 1
    select_fusion: bool = True
    max_fused_rank: int = 14  # the chosen fusion's served rank (shared LoRA included) leaves room to stack
    # Once validation has chosen every LoRA's epochs and the fusion defaults, retrain each LoRA
    # on all its items (the validation items too) for its chosen epochs, and ship those: the
    # choice costs the bank no training data.
    refit: bool = False
    # Choose the stacked LoRA's learning rate among these on the anchor pool, before any refit
    # (`server.bank.stacking_choice`), and record it as the bank's stacking defaults; () = none.
    stacking_lrs: tuple[float, ...] = ()
    # ... on the first N anchor-pool users only (0 = all): each costs a training per learning rate
    stacking_users: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stacking_lrs", tuple(float(lr) for lr in self.stacking_lrs))
        if self.meta_data not in ("anchor", "cluster"):
            raise BankBuildError(f"meta-data must be 'anchor' or 'cluster', got {self.meta_data!r}")
        if self.init not in ("zero", "task", "continue"):
            raise BankBuildError(f"init must be 'zero', 'task' or 'continue', got {self.init!r}")
        if self.validation_items < 0 or self.patience < 1:
            raise BankBuildError(
                f"validation items must be >= 0 and patience >= 1, got {self.validation_items} and {self.patience}"
            )
        if self.refit and self.validation_items == 0:
            raise BankBuildError("refit retrains for the epochs that validation chose: it needs validation items")
        if self.stacking_lrs and (self.validation_items == 0 or not all(0 < lr <= 1 for lr in self.stacking_lrs)):
            raise BankBuildError(
                f"stacking learning rates must be in (0, 1] and need validation items, got {list(self.stacking_lrs)}"
                f" with {self.validation_items} validation items"
            )
        if self.stacking_users < 0:
            raise BankBuildError(f"stacking users must be >= 0 (0 = every anchor-pool user), got {self.stacking_users}")
        if self.dtype not in ("bf16", "fp32"):
            raise BankBuildError(f"dtype must be 'bf16' or 'fp32', got {self.dtype!r}")
        if self.n_anchors < 1:
            raise BankBuildError(f"anchors must be >= 1, got {self.n_anchors}")

    @property
    def bank_name(self) -> str:
        return self.name or self.task.name


@dataclass
class BuildReport:
    path: Path
    manifest: BankManifest
    trained: list[str]  # anchors trained by this run
    skipped: list[str]  # anchors reused from the work directory
    seconds: float
    train_seconds: dict[str, float]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _model_fingerprint(model_dir: Path, model_id: str) -> dict[str, Any]:
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {
        "model_id": model_id,
        "config": sha256_file(model_dir / "config.json"),
        "weights": [(p.name, p.stat().st_size) for p in weights],
    }


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))  # key order kept: records go into the manifest
    os.replace(tmp, path)


def build_bank(
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: BuildConfig,
    *,
    model_dir: str | os.PathLike[str],
    model_id: str | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    keep_work: bool = False,
    embedder: Any = None,
    progress: bool = True,
) -> BuildReport:
    """Build a bank from a LaMP user file into `out` (replaced atomically). See the module doc.

    `model_id` is the name the server serves the model under (default: the directory's
    name, as the server does). `embedder` reuses a loaded `Embedder` of
    `config.embedding_model`. The work directory (default `.<out>.build` beside `out`)
    keeps trained meta-LoRAs for resuming; it is removed after success unless `keep_work`.
    """
    from server.embedding import Embedder, resolve_embedding_model
    from server.training import load_base_model, load_tokenizer

    started = time.perf_counter()
    data, out, model_dir = Path(data), Path(out).resolve(), Path(model_dir).resolve()
    model_id = model_id or model_dir.name
    work = Path(work_dir).resolve() if work_dir else out.parent / f".{out.name}.build"
    task, train = config.task, config.train

    users = load_users(data, task)
    pool, held_out = split_users(users, config.holdout_fraction)
    if config.n_anchors > len(pool):
        raise BankBuildError(
            f"--anchors {config.n_anchors} is more than the {len(pool)} users of the anchor pool "
            f"({len(users)} users in {data.name}, {len(held_out)} held out): lower --anchors or --holdout-fraction"
        )
    if embedder is None:
        embedder = Embedder(resolve_embedding_model(config.embedding_model))
    embeddings = embed_users(embedder, pool, task, progress=progress)
    labels = kmeans(
        embeddings, config.n_anchors, seed=config.kmeans_seed, restarts=config.kmeans_restarts, progress=progress
    )
    clusters = choose_anchors(pool, embeddings, labels)
    if len(clusters) < config.n_anchors:
        log.warning("k-means left %d of %d clusters empty", config.n_anchors - len(clusters), config.n_anchors)

    model = load_base_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    targets = ModelTargets.of_module(model)
    config = dataclasses.replace(config, train=config.train.with_targets(targets), task_train=config.task_train.with_targets(targets))
    if config.init == "continue":  # each meta-LoRA is the task LoRA trained further: its shape
        shape = {k: getattr(config.task_train, k) for k in ("rank", "alpha", "target_modules")}
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, **shape))
    train = config.train
    trainer = _CachedTrainer(work, model, tokenizer, _model_fingerprint(model_dir, model_id), model_id, progress)
    splits = {u.user_id: split_items(u, config.validation_items) for u in pool}
    validation = {u.user_id: heldout_examples(*splits[u.user_id], task) for u in pool}

    shared, shared_record = None, None
    if config.init != "zero":
        examples = [ex for u in pool for ex in leave_one_out_examples(splits[u.user_id][0], task)]
        held = [ex for u in pool for ex in validation[u.user_id]]
        shared, shared_record = trainer.train(SHARED_LORA_DIR, "shared task LoRA", examples, held, config.task_train, config.patience)

    records: dict[str, dict[str, Any]] = {}
    for n, cluster in enumerate(clusters, 1):
        sources = cluster.members if config.meta_data == "cluster" else (cluster.anchor,)
        examples = [ex for member in sources for ex in leave_one_out_examples(splits[member.user_id][0], task)]
        held = [ex for member in sources for ex in validation[member.user_id]]
        _, record = trainer.train(
            f"loras/{cluster.id}", f"anchor {n}/{len(clusters)} {cluster.id}", examples, held, train, config.patience,
            **_from_task_lora(config, shared, shared_record),
        )  # fmt: skip
        records[cluster.id] = {
            "user_id": cluster.anchor.user_id,
            "history_items": len(cluster.anchor.profile),
            "members": [u.user_id for u in cluster.members],
            **record,
        }

    fusion, selection = config.fusion, None
    cluster_of = {u.user_id: c.id for c in clusters for u in c.members}
    if config.select_fusion and config.validation_items > 0 and len(clusters) > 1:
        from server.bank.selection import RULE, choose_fusion

        users_in = [(splits[u.user_id][0], validation[u.user_id], cluster_of[u.user_id]) for u in pool]
        selection = trainer.cached(
            "fusion_selection",
            {
                "anchors": {c.id: (c.embedding.tolist(), records[c.id]["fingerprint"]) for c in clusters},
                "shared": shared_record["fingerprint"] if shared_record else None,
                **({"reference": True} if config.init == "continue" else {}),
                "users": [(u.user_id, u.profile, [dataclasses.astuple(e) for e in held], own) for u, held, own in users_in],
                "base": config.fusion.model_dump(), "max_fused_rank": config.max_fused_rank, "max_length": train.max_length,
                "rule": RULE,
            },
            lambda: choose_fusion(
                embedder, model, tokenizer, task,
                users=users_in,
                anchors={c.id: (c.embedding, load_adapter(work / "loras" / c.id)) for c in clusters},
                shared=shared if config.init == "task" else None,
                reference=shared if config.init == "continue" else None,
                base=config.fusion, max_fused_rank=config.max_fused_rank,
                max_length=train.max_length, progress=progress,
            ),
        )  # fmt: skip
        fusion = FusionDefaults(**selection["chosen"])

    stacking = None
    if config.stacking_lrs:
        stacking = _choose_stacking(trainer, config, embedder, pool, splits, clusters, records, shared, shared_record, fusion, cluster_of)

    if config.refit:
        shared_record = _refit(trainer, config, pool, clusters, records, shared_record)

    manifest = _manifest(
        config, data=data, users=users, pool=pool, held_out=held_out, clusters=clusters, records=records,
        model_id=model_id, embedding_dim=int(embeddings.shape[1]), fusion=fusion, selection=selection,
        shared_record=shared_record, splits=splits, stacking=stacking,
    )  # fmt: skip
    _write_bank(out, manifest, clusters, work / REFIT_DIR if config.refit else work, model_id, config.dtype)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return BuildReport(out, manifest, trainer.trained, trainer.skipped, time.perf_counter() - started, trainer.seconds)


def _from_task_lora(config: BuildConfig, shared: Any, shared_record: dict[str, Any] | None) -> dict[str, Any]:
    """How a meta-LoRA relates to the task LoRA: `_CachedTrainer.train`'s `base` or `start`."""
    if config.init == "task":
        return {"base": (shared, shared_record)}
    if config.init == "continue":
        return {"start": (shared, shared_record)}
    return {}


def _choose_stacking(
    trainer: _CachedTrainer,
    config: BuildConfig,
    embedder: Any,
    pool: Sequence[User],
    splits: Mapping[Any, tuple[User, tuple[dict[str, Any], ...]]],
    clusters: Sequence[Cluster],
    records: dict[str, dict[str, Any]],
    shared: Any,
    shared_record: dict[str, Any] | None,
    fusion: FusionDefaults,
    cluster_of: Mapping[Any, str],
) -> dict[str, Any]:
    """The stacked LoRA's learning rate chosen on the pool, over the validated (not refit) LoRAs."""
    from server.bank.stacking_choice import FEW_SHOT, choose_stacking
    from server.settings import Settings
    from server.stacking import stack_config

    base = stack_config(Settings.model_construct()).with_targets(ModelTargets.of_module(trainer.model))
    users = [(splits[u.user_id][0], splits[u.user_id][1], cluster_of[u.user_id]) for u in pool]
    return trainer.cached(
        "stacking_selection",
        {
            "anchors": {c.id: (c.embedding.tolist(), records[c.id]["fingerprint"]) for c in clusters},
            "shared": shared_record["fingerprint"] if shared_record else None,
            "users": [(u.user_id, u.profile, items, own) for u, items, own in users],
            "fusion": fusion.model_dump(), "base": dataclasses.asdict(base), "lrs": config.stacking_lrs,
            "few_shot": FEW_SHOT, "max_users": config.stacking_users or None,
        },
        lambda: choose_stacking(
            embedder, trainer.model, trainer.tokenizer, config.task, users=users,
            anchors={c.id: (c.embedding, load_adapter(trainer.work / "loras" / c.id)) for c in clusters},
            shared=shared if config.init == "task" else None, fusion=fusion, base=base,
            learning_rates=config.stacking_lrs, max_users=config.stacking_users, progress=trainer.progress,
        ),
    )  # fmt: skip


def _refit(
    trainer: _CachedTrainer,
    config: BuildConfig,
    pool: Sequence[User],
    clusters: Sequence[Cluster],
    records: dict[str, dict[str, Any]],
    shared_record: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """Retrain the shared LoRA and every meta-LoRA on all their items for the epochs validation chose.

    Each run replays its validated run's prefix (same config, seed and learning-rate schedule,
    stopped after the best epoch) with the validation items added. Adds a `refit` entry to
    each anchor's record; returns the shared record with its own.
    """
    task = config.task
    shared = None
    if shared_record is not None:
        examples = [ex for u in pool for ex in leave_one_out_examples(u, task)]
        shared, refit = trainer.train(
            f"{REFIT_DIR}/{SHARED_LORA_DIR}", "refit: shared task LoRA", examples, (), config.task_train,
            config.patience, stop_after=shared_record.get("best_epoch", config.task_train.epochs),
        )  # fmt: skip
        shared_record = {**shared_record, "refit": refit}
    for n, cluster in enumerate(clusters, 1):
        sources = cluster.members if config.meta_data == "cluster" else (cluster.anchor,)
        examples = [ex for member in sources for ex in leave_one_out_examples(member, task)]
        _, records[cluster.id]["refit"] = trainer.train(
            f"{REFIT_DIR}/loras/{cluster.id}", f"refit: anchor {n}/{len(clusters)} {cluster.id}", examples, (),
            config.train, config.patience, **_from_task_lora(config, shared, shared_record["refit"] if shared_record else None),
            stop_after=records[cluster.id].get("best_epoch", config.train.epochs),
        )  # fmt: skip
    return shared_record


class _CachedTrainer:
    """Trains the bank's LoRAs into the work directory, reusing one whose inputs have not changed.

    Each LoRA is kept with a fingerprint of everything it depends on (the model, the training
    config, the examples, the validation set and the LoRA under it), so a rerun resumes.
    """

    def __init__(self, work: Path, model: Any, tokenizer: Any, model_fp: dict[str, Any], model_id: str, progress: bool):
        self.work, self.model, self.tokenizer = work, model, tokenizer
        self.model_fp, self.model_id, self.progress = model_fp, model_id, progress
        self.trained: list[str] = []
        self.skipped: list[str] = []
        self.seconds: dict[str, float] = {}

    def train(
        self,
        name: str,
        desc: str,
        examples: Sequence[Example],
        validation: Sequence[Example],
        train: TrainConfig,
        patience: int,
        base: tuple[Any, dict[str, Any] | None] = (None, None),
        stop_after: int | None = None,
        start: tuple[Any, dict[str, Any] | None] = (None, None),
    ) -> tuple[Any, dict[str, Any]]:
        """(the LoRA, its record for the manifest): trained now, or reused from the work directory.

        `base`: (LoRA, record) trained over, frozen; `start`: (LoRA, record) whose weights the new
        one starts from. `stop_after` (a refit): train that many epochs of `train`'s schedule,
        without validation.
        """
        from tqdm.auto import tqdm

        from server.training import train_lora

        base_lora, base_record = base
        start_lora, start_record = start
        fingerprint = _digest(
            {
                "model": self.model_fp,
                "train": dataclasses.asdict(train),
                "examples": [dataclasses.astuple(e) for e in examples],
                "validation": [dataclasses.astuple(e) for e in validation],
                "patience": patience if validation else None,
                "base": base_record["fingerprint"] if base_record else None,
                **({"stop_after": stop_after} if stop_after is not None else {}),  # older work dirs stay valid
                **({"start": start_record["fingerprint"]} if start_record else {}),
            }
        )
        record_file = self.work / "records" / f"{name.replace('/', '__')}.json"
        lora_dir = self.work / name
        label = ("refit " if stop_after is not None else "") + name.rsplit("/", 1)[-1]
        previous = json.loads(record_file.read_text()) if record_file.is_file() else None
        if previous and previous.get("fingerprint") == fingerprint and (lora_dir / "adapter_config.json").is_file():
            log.info("%s: already trained in %s, skipped", desc, self.work)
            self.skipped.append(label)
            return load_adapter(lora_dir), previous["record"]
        record_file.parent.mkdir(parents=True, exist_ok=True)
        steps = math.ceil(len(examples) / train.batch_size) * (train.epochs if stop_after is None else stop_after)
        with tqdm(total=steps, desc=f"{desc} ({len(examples)} examples)", unit="step", disable=not self.progress) as bar:

            def step(done: int, total: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix_str(f"loss={loss:.3f}")

            result = train_lora(
                self.model, self.tokenizer, examples, train, base_adapter=base_lora, init_adapter=start_lora, progress=step,
                report_loss=not validation and stop_after is None, validation=validation or None, patience=patience,
                stop_after=stop_after,
            )  # fmt: skip
            if validation:
                bar.set_postfix_str(f"validation loss by epoch {[round(v, 3) for v in result.validation_losses]}")
        save_adapter(result.lora, lora_dir, base_model_name_or_path=self.model_id)  # float32 in the work dir
        record = {
            "examples": len(examples),
            "validation_examples": len(validation),
            "steps": result.steps,
            "step_losses": [round(x, 4) for x in result.losses],
            **(
                {"validation_losses": [round(v, 4) for v in result.validation_losses], "best_epoch": result.best_epoch}
                if validation
                else {"epochs": stop_after}
                if stop_after is not None
                else {"initial_loss": round(result.initial_loss, 4), "final_loss": round(result.final_loss, 4)}
            ),
            "fingerprint": fingerprint,
        }
        _write_json_atomic(record_file, {"fingerprint": fingerprint, "record": record})
        self.trained.append(label)
        self.seconds[label] = result.seconds
        return result.lora, record

    def cached(self, name: str, inputs: Any, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`compute()`'s record, reused from the work directory while `inputs` (with the model) are unchanged."""
        fingerprint = _digest({"model": self.model_fp, "inputs": inputs})
        record_file = self.work / "records" / f"{name}.json"
        previous = json.loads(record_file.read_text()) if record_file.is_file() else None
        if previous and previous.get("fingerprint") == fingerprint:
            log.info("%s: already computed in %s, reused", name, self.work)
            return previous["record"]
        record = compute()
        record_file.parent.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(record_file, {"fingerprint": fingerprint, "record": record})
        return record


def _manifest(
    config: BuildConfig,
    *,
    data: Path,
    users: Sequence[User],
    pool: Sequence[User],
    held_out: Sequence[User],
    clusters: Sequence[Cluster],
    records: dict[str, dict[str, Any]],
    model_id: str,
    embedding_dim: int,
    fusion: FusionDefaults,
    selection: dict[str, Any] | None,
    shared_record: dict[str, Any] | None,
    splits: Mapping[Any, tuple[User, tuple[dict[str, Any], ...]]],
    stacking: dict[str, Any] | None = None,
) -> BankManifest:
    task, train = config.task, config.train
    settings = {
        "task": dataclasses.asdict(task),
        "anchors": config.n_anchors,
        "train": dataclasses.asdict(train),
        "meta_data": config.meta_data,
        "holdout_fraction": config.holdout_fraction,
        "kmeans_seed": config.kmeans_seed,
        "kmeans_restarts": config.kmeans_restarts,
        "dtype": config.dtype,
        "fusion": config.fusion.model_dump(),
        "name": config.bank_name,
        "init": config.init,
        "task_train": dataclasses.asdict(config.task_train) if config.init != "zero" else None,
        "validation_items": config.validation_items,
        "patience": config.patience,
        "select_fusion": config.select_fusion,
        "max_fused_rank": config.max_fused_rank,
        "refit": config.refit,
        **({"stacking_lrs": list(config.stacking_lrs)} if config.stacking_lrs else {}),
        **({"stacking_users": config.stacking_users} if config.stacking_users else {}),
    }
    data_info = {"file": data.name, "sha256": sha256_file(data), "users": len(users)}
    # the served defaults too: a rule that chooses them differently serves another bank
    version = _digest(
        {"data": data_info["sha256"], "settings": settings, "model": model_id, "emb": config.embedding_model,
         "served": fusion.model_dump()}
    )  # fmt: skip
    targets = sorted(train.target_modules)
    shared = None
    if config.init == "task":
        shared = SharedLoraSpec(
            rank=config.task_train.rank, target_modules=sorted(config.task_train.target_modules), lora_path=SHARED_LORA_DIR
        )
    return BankManifest(
        bank_version=f"{config.bank_name}-{version[:12]}",
        name=config.bank_name,
        description=(
            f"Meta-LoRAs trained on {data.name} ({task.name}): {len(clusters)} anchors from {len(pool)} anchor-pool "
            f"users, rank {train.rank} on {','.join(targets)}, each trained on "
            + ("its anchor's history" if config.meta_data == "anchor" else "the histories of its cluster's members")
            + {
                "task": f", as a residual over a rank-{config.task_train.rank} task LoRA trained on the whole anchor pool.",
                "continue": ", each continuing the A and B of a task LoRA trained first on the whole anchor pool.",
            }.get(config.init, ", from scratch.")
        ),
        random=False,
        base_model=model_id,
        embedding_model=EmbeddingSpec(name=config.embedding_model, dim=embedding_dim),
        fusion=fusion,
        task=TaskSpec(name=task.name, history_template=task.history_template),
        lora_init_seed=train.seed,
        shared_lora=shared,
        stacking=StackingDefaults(**stacking["chosen"]) if stacking else None,
        anchors=[
            AnchorSpec(
                id=c.id, cluster_size=len(c.members), rank=train.rank, target_modules=targets, lora_path=f"loras/{c.id}"
            )
            for c in clusters
        ],
        extra={
            "builder": "mta bank build",
            "data": data_info,
            "split": {
                "method": "users ordered by sha256(str(user_id)); the first round(holdout_fraction * n) are held out",
                "holdout_fraction": config.holdout_fraction,
                "anchor_pool": [u.user_id for u in pool],
                "held_out": [u.user_id for u in held_out],
            },
            "clustering": {
                "method": "faiss k-means on user embeddings (best objective of the restarts)",
                "k": config.n_anchors,
                "seed": config.kmeans_seed,
                "restarts": config.kmeans_restarts,
                "anchor_rule": "the member with the longest history; ties: the lowest user id",
            },
            "training": {
                "meta_data": config.meta_data,
                "examples": "leave-one-out over history items; prompt = instruction + BM25 top-1 other item",
                "prompt_template": task.prompt_template,
                "answer_field": task.answer_field,
                "config": {**dataclasses.asdict(train), "target_modules": list(train.target_modules)},
                "adapter_dtype": config.dtype,
                "init": config.init,
                "refit": (
                    "every LoRA retrained on all its items (validation items included) for the epochs its "
                    "validated run chose (same schedule, stopped there); fusion defaults chosen before"
                    if config.refit
                    else None
                ),
                "shared": (
                    {
                        "config": {**dataclasses.asdict(config.task_train), "target_modules": list(config.task_train.target_modules)},
                        "examples_from": "leave-one-out over the training items of every anchor-pool user",
                        **(shared_record or {}),
                    }
                    if config.init != "zero"
                    else None
                ),
            },
            "validation": {
                "items_per_user": config.validation_items,
                "method": "each anchor-pool user's last N history items, held out of every training (users keep >= 2)",
                "patience": config.patience,
                "users": {str(uid): len(items) for uid, (_, items) in splits.items() if items},
            },
            "fusion_selection": {
                "enabled": config.select_fusion,
                "requested": config.fusion.model_dump(),
                "max_fused_rank": config.max_fused_rank,
                **(selection or {}),
            },
            **({"stacking_selection": stacking} if stacking else {}),
            "anchors": {c.id: records[c.id] for c in clusters},
        },
    )


def _write_bank(
    out: Path, manifest: BankManifest, clusters: Sequence[Cluster], work: Path, model_id: str, dtype: str
) -> None:
    """Assemble the bank in a temporary directory beside `out`, then rename it into place."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        dirs = [f"loras/{c.id}" for c in clusters] + ([manifest.shared_lora.lora_path] if manifest.shared_lora else [])
        for name in dirs:
            save_adapter(load_adapter(work / name), tmp / name, base_model_name_or_path=model_id, dtype=torch_dtype)
        np.save(tmp / EMBEDDINGS_FILE, np.stack([c.embedding for c in clusters]).astype(np.float32))
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        for path in tmp.rglob("*"):  # a shipped bank is readable by a server run as another user
            path.chmod(0o755 if path.is_dir() else 0o644)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
