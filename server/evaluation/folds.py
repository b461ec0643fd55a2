"""`--folds 2`: swap the anchor pool and the held-out users so that every user is evaluated.

Fold 1 is the given bank with its recorded split. Fold 2 evaluates fold 1's anchor-pool
users with a second bank built on fold 1's held-out users, with the SAME build settings,
read back from the given bank's manifest and handed to the bank builder
(`server.bank.build.build_bank`): the two folds differ only in which users they saw.
The fold-2 bank is built from a data file holding only its anchor pool (so its manifest
honestly records that it saw every user of that file) and cached in
`<out>/work/fold2-bank`; it is rebuilt only when its recorded settings or data differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.bank.build import BankBuildError, BuildConfig, build_bank
from server.bank.manifest import MANIFEST_FILE, FusionDefaults
from server.evaluation.protocol import split_from_manifest
from server.lamp_data import User
from server.tasks import Task
from server.training import TrainConfig

if TYPE_CHECKING:
    from server.evaluation.config import EvalConfig


FOLD2_BANK = "fold2-bank"
FOLD2_DATA = "fold2-anchor-pool.json"


@dataclass(frozen=True)
class Fold:
    """Who trains (anchor pool: bank and task_lora) and who is evaluated, and where adapters are cached."""

    index: int  # 1-based
    bank: Path | None
    pool: list[User]
    held: list[User]
    work: Path


def read_manifest_json(bank: Path) -> dict[str, Any]:
    return json.loads((Path(bank) / MANIFEST_FILE).read_text())


def _not_recorded(path: str, bank: Path | str) -> BankBuildError:
    return BankBuildError(
        f"--folds 2 rebuilds the bank on the other users with the same build settings, but "
        f"{Path(bank) / MANIFEST_FILE} does not record the setting `{path}` (build the bank with `mta bank build`)"
    )


def _setting(manifest: dict[str, Any], path: str, bank: Path | str) -> Any:
    """The value at a dotted manifest path; a clear error naming it when the bank did not record it."""
    node: Any = manifest
    for key in path.split("."):
        if not isinstance(node, dict) or node.get(key) is None:
            raise _not_recorded(path, bank)
        node = node[key]
    return node


def build_config_from_manifest(manifest: dict[str, Any], bank: Path | str, *, holdout_fraction: float) -> BuildConfig:
    """The `BuildConfig` a bank was built with, as its manifest records it (no setting guessed)."""

    def get(path: str) -> Any:
        return _setting(manifest, path, bank)

    def train_config(path: str) -> TrainConfig:
        recorded = get(path)
        missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in recorded]
        if missing:
            raise _not_recorded(f"{path}.{missing[0]}", bank)
        return TrainConfig(**{f.name: recorded[f.name] for f in dataclasses.fields(TrainConfig)})

    train = train_config("extra.training.config")
    task = Task(
        name=get("task.name"),
        history_template=get("task.history_template"),
        prompt_template=get("extra.training.prompt_template"),
        answer_field=get("extra.training.answer_field"),
    )
    init = get("extra.training.init")
    stacking = get("extra").get("stacking_selection") or {}
    return BuildConfig(
        task=task,
        n_anchors=get("extra.clustering.k"),
        train=train,
        meta_data=get("extra.training.meta_data"),
        holdout_fraction=holdout_fraction,
        kmeans_seed=get("extra.clustering.seed"),
        kmeans_restarts=get("extra.clustering.restarts"),
        dtype=get("extra.training.adapter_dtype"),
        embedding_model=get("embedding_model.name"),
        fusion=FusionDefaults(**get("extra.fusion_selection.requested")),  # what was asked for, not what was chosen
        name=get("name"),
        init=init,
        task_train=train_config("extra.training.shared.config") if init in ("task", "continue") else TrainConfig(),
        validation_items=get("extra.validation.items_per_user"),
        patience=get("extra.validation.patience"),
        select_fusion=get("extra.fusion_selection.enabled"),
        max_fused_rank=get("extra.fusion_selection.max_fused_rank"),
        refit=bool(get("extra.training").get("refit")),  # banks from before `refit` record none: not refit
        stacking_lrs=tuple(stacking.get("learning_rates", ())),
        stacking_users=stacking.get("max_users") or 0,
    )


def fold2_build_config(bank: Path) -> BuildConfig:
    """The given bank's settings, for a bank over a file holding only its anchor pool (nothing held out)."""
    manifest = read_manifest_json(bank)
    config = build_config_from_manifest(manifest, bank, holdout_fraction=0.0)
    return dataclasses.replace(config, name=f"{config.bank_name}-fold2")


def write_pool_file(data: Path, pool: list[User], path: Path) -> Path:
    """The records of `pool` from the data file, in file order (deterministic, so the bank's digest is)."""
    ids = {str(u.user_id) for u in pool}
    records = [r for r in json.loads(Path(data).read_text()) if str(r["user_id"]) in ids]
    text = json.dumps(records)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


def _is_current(bank: Path, config: BuildConfig, data: Path, model_id: str) -> bool:
    """A cached fold-2 bank matches when it recorded the same settings, data and base model."""
    if not (bank / MANIFEST_FILE).is_file():
        return False
    manifest = read_manifest_json(bank)
    try:
        recorded = build_config_from_manifest(manifest, bank, holdout_fraction=0.0)
    except (BankBuildError, TypeError, ValueError):
        return False
    from server.bank.selection import RULE

    sha = hashlib.sha256(data.read_bytes()).hexdigest()
    selection = (manifest.get("extra") or {}).get("fusion_selection") or {}
    return (
        recorded == config
        and manifest.get("base_model") == model_id
        and (manifest.get("extra") or {}).get("data", {}).get("sha256") == sha
        # defaults chosen by an earlier rule are chosen again (from the cached LoRAs)
        and (not selection.get("chosen") or selection.get("rule") in (RULE, "lowest mean"))
    )


def ensure_fold2_bank(
    bank: Path, data: Path, pool: list[User], work: Path, *, model_dir: Path, model_id: str
) -> tuple[Path, bool]:
    """(fold-2 bank, built now?): built on `pool` with `bank`'s settings, or reused from `work`."""
    config = fold2_build_config(bank)
    pool_file = write_pool_file(data, pool, work / FOLD2_DATA)
    out = work / FOLD2_BANK
    if _is_current(out, config, pool_file, model_id):
        print(f"[eval] fold 2: reusing the bank in {out}", flush=True)
        return out, False
    print(f"[eval] fold 2: building a bank on {len(pool)} users with the settings of {bank}", flush=True)
    try:
        # the work directory is kept: a rerun after a settings change retrains only what changed
        build_bank(
            pool_file, out, config, model_dir=model_dir, model_id=model_id, work_dir=work / f"{FOLD2_BANK}.build",
            keep_work=True,
        )  # fmt: skip
    except BankBuildError as e:
        raise BankBuildError(f"fold 2 bank: {e}") from e
    return out, True


def make_folds(cfg: EvalConfig, users: list[User]) -> tuple[list[Fold], bool]:
    """The folds to evaluate, and whether a fold-2 bank was built now (not reused).

    Fold 1 is the bank's recorded split (a fresh split when it records none); fold 2 swaps
    the two sides, with its own bank when a method needs one and its own adapter cache.
    """
    if cfg.folds not in (1, 2):
        raise ValueError(f"folds must be 1 or 2, got {cfg.folds}")
    manifest = read_manifest_json(cfg.bank) if cfg.bank is not None else {}
    pool, held = split_from_manifest(users, manifest.get("extra") or {}, cfg.holdout_fraction)
    work = cfg.out / "work"
    folds = [Fold(1, cfg.bank, pool, held, work)]
    if cfg.folds == 1:
        return folds, False
    bank2, built = None, False
    if cfg.bank is not None and any(m.bank for m in cfg.methods):
        _setting(manifest, "extra.split.anchor_pool", cfg.bank)
        bank2, built = ensure_fold2_bank(cfg.bank, cfg.data, held, work, model_dir=cfg.model_dir, model_id=cfg.model_id)
    folds.append(Fold(2, bank2, held, pool, work / "fold2"))
    return folds, built
