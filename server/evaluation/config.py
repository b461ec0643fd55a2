"""What one `mta eval` run evaluates: the task, the users' file, the methods, the model and every
training recipe (its own module: the runner and the folds both read it)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from server.adapters.targets import ModelTargets
from server.evaluation.methods import Method
from server.settings import Settings
from server.stacking import OPPU_TRAIN, stack_config
from server.tasks import MetricKind, Task
from server.training import TrainConfig


@dataclass(frozen=True)
class EvalConfig:
    task: Task
    data: Path
    out: Path
    methods: tuple[Method, ...]
    model_dir: Path
    model_id: str
    bank: Path | None = None
    kind: MetricKind = "classification"
    labels: tuple[str, ...] = ()
    n_few_shot: int = 5
    max_users: int | None = None
    holdout_fraction: float = 0.5  # used only when the bank records no split
    max_new_tokens: int = 10
    dtype: str = "bfloat16"  # vLLM's
    task_train: TrainConfig = field(default_factory=TrainConfig)
    oppu_train: TrainConfig = OPPU_TRAIN
    # the server's defaults with the command line's values; a bank's recorded choice fills the rest
    stack_train: TrainConfig = field(default_factory=lambda: stack_config(Settings.model_construct()))
    stack_given: frozenset[str] = frozenset()  # of `server.stacking.RECIPE_FIELDS`: set on the command line
    resamples: int = 1000
    seed: int = 0
    folds: int = 1  # 2: also swap anchor pool and held-out users (a second bank), to evaluate every user

    def with_model_targets(self) -> EvalConfig:
        """Every training config's default targets named as the model has them (recorded, fingerprinted)."""
        targets = ModelTargets.from_config(json.loads((self.model_dir / "config.json").read_text()))
        return dataclasses.replace(
            self,
            task_train=self.task_train.with_targets(targets),
            oppu_train=self.oppu_train.with_targets(targets),
            stack_train=self.stack_train.with_targets(targets),
        )
