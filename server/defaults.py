"""What `make run` serves when nothing is configured: SmolLM2 and the demo bank."""

from __future__ import annotations

import logging
from pathlib import Path

from server.settings import Settings

log = logging.getLogger(__name__)

REPO_BANKS = Path(__file__).resolve().parent.parent / "bank_artifacts"
DEMO_BANK = REPO_BANKS / "demo"


def resolve_model(settings: Settings) -> tuple[Path, str]:
    """(model directory, served model id); converts the packaged SmolLM2 once when unset."""
    if settings.model_path is not None:
        path = settings.model_path
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"MTA_MODEL_PATH={path} is not a model directory (no config.json)")
    else:
        from server.model_prep import prepare_smollm2

        path = prepare_smollm2(settings.cache_dir)
    return path.resolve(), settings.model_id or path.name


def resolve_bank_path(settings: Settings, model_path: Path, model_id: str) -> Path:
    """The configured bank, else the shipped demo bank, else a RANDOM demo bank generated once."""
    if settings.bank_path is not None:
        return settings.bank_path
    if (DEMO_BANK / "manifest.json").is_file():
        return DEMO_BANK
    from server.bank.random_bank import write_random_demo_bank

    path = (settings.data_dir / "banks" / f"random-demo-{model_id}").resolve()
    if not (path / "manifest.json").is_file():
        log.warning("no bank configured and none shipped: generating a RANDOM demo bank at %s", path)
        write_random_demo_bank(path, model_path=model_path, model_id=model_id)
    return path
