"""Fine-tune jobs across processes: `mta worker` on Redis, and jobs interrupted by a crash or restart."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

from .conftest import server_env
from .server_process import ServerProcess
from .test_api_e2e import PROFILES, generate, put_profile
from .test_finetune import EXAMPLES, submit, wait_job

LONG = {"examples": EXAMPLES * 16, "epochs": 20}  # 640 steps: long enough to interrupt


def wait_status(client, job_id: str, status: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] == status:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} never reached {status}: {job}")


def test_worker_runs_jobs_from_redis_and_stale_jobs_fail(tmp_path, tiny_model_dir, tiny_bank, redis_url):
    env = server_env(
        tmp_path,
        tiny_model_dir,
        tiny_bank,
        MTA_STORE_URL=redis_url,
        MTA_FINETUNE_RUNNER="worker",
        MTA_JOB_STALE_SECONDS="4",
    )
    api = ServerProcess(tmp_path, env).start()
    worker = ServerProcess(tmp_path, env, args=("worker",), ready_line="worker ready").start()
    try:
        with api.client() as c:
            put_profile(c, "w-user", PROFILES["space"])
            before = generate(c, "w-user")
            job = wait_job(c, submit(c, "w-user").json()["job_id"])
            assert job["status"] == "succeeded", job["error"]
            after = generate(c, "w-user")  # served by the API process from the worker's result
            assert after["stacked"] is True and after["stacked_version"] == job["stacked_version"]
            assert after["token_ids"] != before["token_ids"]

            # A worker killed mid-job: the job is reported failed, never left "running".
            long = submit(c, "w-user", **LONG).json()["job_id"]
            wait_status(c, long, "running")
            worker.stop(sig=signal.SIGKILL)
            failed = wait_status(c, long, "failed", timeout=30)
            assert "interrupted" in failed["error"]
            assert submit(c, "w-user", epochs=1).status_code == 202  # the user's slot is free again
    finally:
        worker.stop()
        api.stop()


def test_restart_fails_the_running_job_and_keeps_serving(tmp_path, tiny_model_dir, tiny_bank):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "models" / tiny_model_dir.name))
    proc = ServerProcess(tmp_path, server_env(tmp_path, model, tiny_bank)).start()
    try:
        with proc.client() as c:
            put_profile(c, "r-user", PROFILES["crime"])
            r = submit(c, "r-user", **LONG)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            wait_status(c, job_id, "running")
        proc.stop()
        proc.start()
        with proc.client() as c:
            job = c.get(f"/jobs/{job_id}").json()
            assert job["status"] == "failed" and "restart" in job["error"]
            assert generate(c, "r-user")["personalized"] is True
            # A job whose training raises is reported failed with the reason: this process's
            # trainer loads the model on its first job, and the model files are gone now.
            shutil.rmtree(model)
            failed = wait_job(c, submit(c, "r-user", epochs=1).json()["job_id"])
            assert failed["status"] == "failed" and str(model) in failed["error"], failed
            assert generate(c, "r-user")["personalized"] is True  # serving goes on
            assert submit(c, "r-user", epochs=1).status_code == 202  # the user's slot is free again
    finally:
        proc.stop()
