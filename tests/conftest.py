"""Shared fixtures: a tiny random model, tiny random banks, real Redis, and the real server."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from .prerequisites import REQUIRE_ENV, required
from .redis_server import redis_url  # noqa: F401  (fixture)
from .server_process import ADMIN_TOKEN, ServerProcess
from .tiny_model import build_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Anchor users with clearly different tastes, so retrieval is predictable.
THEMES: dict[str, list[dict[str, str]]] = {
    "space": [
        {"description": "Astronauts travel through a wormhole to find a new planet for humanity.", "tag": "sci-fi"},
        {"description": "A spaceship crew is hunted by an alien creature in deep space.", "tag": "sci-fi"},
        {"description": "Robots and starships fight a galactic war among distant stars.", "tag": "sci-fi"},
    ],
    "romance": [
        {"description": "Two strangers fall in love over one summer in Paris.", "tag": "romance"},
        {"description": "A bride-to-be rediscovers her first love before the wedding.", "tag": "romance"},
        {"description": "Letters between two lovers separated by the war.", "tag": "romance"},
    ],
    "crime": [
        {"description": "A mob boss hands the family business to his reluctant son.", "tag": "violence"},
        {"description": "Detectives hunt a serial killer through a rainy city.", "tag": "violence"},
        {"description": "A bank heist goes wrong and the robbers turn on each other.", "tag": "violence"},
    ],
    "comedy": [
        {"description": "Two clumsy friends accidentally become famous chefs.", "tag": "comedy"},
        {"description": "A family road trip turns into a series of hilarious disasters.", "tag": "comedy"},
        {"description": "A talking dog runs for mayor of a small town.", "tag": "comedy"},
    ],
}
HISTORY_TEMPLATE = "Description: {description} Tag: {tag}"


def pytest_configure(config: pytest.Config) -> None:
    required()  # a misspelt MTA_TEST_REQUIRE stops the run before any test


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line saying what was skipped and why, so a skip is never silent."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons: dict[str, int] = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    listed = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    required_now = ",".join(sorted(required())) or "none"
    terminalreporter.write_line(f"skipped {len(skipped)} ({REQUIRE_ENV}={required_now}): {listed}", yellow=True)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for in-process training of the tiny model, restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_config(tiny_model_dir: Path) -> dict:
    return json.loads((tiny_model_dir / "config.json").read_text())


@pytest.fixture(scope="session")
def tiny_model_targets(tiny_model_dir: Path):
    from server.adapters.targets import ModelTargets

    return ModelTargets.from_checkpoint(tiny_model_dir)


@pytest.fixture(scope="session")
def embedder():
    from server.embedding import DEFAULT_EMBEDDING_MODEL, Embedder, resolve_embedding_model

    return Embedder(resolve_embedding_model(DEFAULT_EMBEDDING_MODEL))


@pytest.fixture(scope="session")
def theme_embeddings(embedder) -> np.ndarray:
    from server.prompts import render_item

    return np.stack([embedder.embed_user([render_item(i, HISTORY_TEMPLATE) for i in items]) for items in THEMES.values()])


@pytest.fixture(scope="session")
def make_bank(tmp_path_factory, tiny_model_dir, tiny_model_config, theme_embeddings):
    """Write a tiny random bank (one anchor per theme) on the tiny model; kwargs override defaults."""
    from server.adapters.targets import ModelTargets
    from server.bank.manifest import FusionDefaults, TaskSpec
    from server.bank.random_bank import write_random_bank
    from server.embedding import DEFAULT_EMBEDDING_MODEL

    def make(name: str = "tiny", **kw) -> Path:
        args = dict(
            targets=ModelTargets.from_config(tiny_model_config),
            model_id=tiny_model_dir.name,
            anchor_ids=list(THEMES),
            anchor_embeddings=theme_embeddings,
            embedding_model=DEFAULT_EMBEDDING_MODEL,
            rank=4,
            b_std=0.5,
            fusion=FusionDefaults(mode="cat", top_k=2),
            task=TaskSpec(name="movie_tagging", history_template=HISTORY_TEMPLATE),
            name=name,
        )
        args.update(kw)
        return write_random_bank(tmp_path_factory.mktemp("banks") / name, **args)

    return make


@pytest.fixture(scope="session")
def tiny_bank(make_bank) -> Path:
    return make_bank("tiny", bank_version="tiny-v1")


def server_env(tmp: Path, model_dir: Path, bank: Path, **extra: str) -> dict[str, str]:
    env = {
        "MTA_MODEL_PATH": str(model_dir),
        "MTA_BANK_PATH": str(bank),
        "MTA_DATA_DIR": str(tmp / "data"),
        "MTA_ADAPTER_CACHE_DIR": str(tmp / "adapters"),
        "MTA_DTYPE": "float32",
        "MTA_ADMIN_TOKEN": ADMIN_TOKEN,
        "MTA_MAX_MODEL_LEN": "512",
        "MTA_MAX_TOKENS": "64",
        "MTA_DEFAULT_MAX_TOKENS": "16",
        "MTA_MAX_NUM_SEQS": "8",
        "MTA_MAX_LORAS": "4",
        "MTA_MAX_LORA_RANK": "16",
        "MTA_CPU_KVCACHE_SPACE_GB": "1",
        "MTA_MAX_PROFILE_ITEMS": "20",
        "MTA_FINETUNE_QUEUE_SIZE": "2",
        "MTA_LOG_LEVEL": "info",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir, tiny_bank) -> Iterator[ServerProcess]:
    """One real server for the session (SQLite store); tests must not depend on each other's users."""
    tmp = tmp_path_factory.mktemp("server")
    proc = ServerProcess(tmp, server_env(tmp, tiny_model_dir, tiny_bank)).start()
    yield proc
    proc.stop()


@pytest.fixture()
def client(server: ServerProcess):
    with server.client() as c:
        yield c


@pytest.fixture()
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def job_services(store, tmp: Path, model_dir: Path, bank: Path, *, cache_size: int | None = None, **settings):
    """The real job service, runner and personalizer (with an adapter cache of `cache_size`
    entries, else none) on `store`, as `mta serve` wires them, for in-process tests."""
    from types import SimpleNamespace

    from server.adapter_cache import AdapterCache
    from server.bank.registry import BankRegistry
    from server.jobs import JobRunner, JobService
    from server.metrics import Metrics
    from server.personalize import Personalizer
    from server.settings import Settings

    config = Settings(
        model_path=model_dir, bank_path=bank, data_dir=tmp / "data", adapter_cache_dir=tmp / "adapters",
        dtype="float32", **settings,
    )  # fmt: skip
    banks = BankRegistry(config, model_dir.name, model_dir)
    await banks.load(bank)
    cache = AdapterCache(config.adapter_cache_dir, cache_size) if cache_size else None
    metrics = Metrics()
    personalizer = Personalizer(config, store, banks, cache, metrics)
    return SimpleNamespace(
        settings=config, store=store, cache=cache, metrics=metrics, personalizer=personalizer,
        jobs=JobService(config, store, personalizer), runner=JobRunner(config, store, personalizer, model_dir),
    )  # fmt: skip

