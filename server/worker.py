"""`mta worker`: runs fine-tune jobs from the shared store's queue, apart from the API servers."""

from __future__ import annotations

import asyncio
import logging
import signal

from server.bank.registry import BankRegistry
from server.defaults import resolve_bank_path, resolve_model
from server.jobs import JobRunner
from server.personalize import Personalizer
from server.settings import Settings
from server.store import open_store

log = logging.getLogger(__name__)


async def run_worker(settings: Settings) -> None:
    model_path, model_id = resolve_model(settings)
    store = open_store(settings.resolved_store_url)
    await store.ping()
    banks = BankRegistry(settings, model_id, model_path)
    personalizer = Personalizer(settings, store, banks)
    await personalizer.swap_bank(resolve_bank_path(settings, model_path, model_id))
    runner = JobRunner(settings, store, personalizer, model_path, follow_bank=True)
    if failed := await runner.recover(all_running=False):
        log.warning("%d stale running job(s) marked failed", failed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)  # finish the current job, then exit
    log.info("worker ready: model %s, bank %s, store %s", model_id, banks.current.version, type(store).__name__)
    try:
        await runner.run_forever(stop)
    finally:
        await store.close()
