"""Few-shot fine-tuning (MTA stage 3) through the real server: jobs, stacked serving, isolation."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.adapters import adapter_from_bytes
from server.stacking import STACKED_BLOB
from server.store import open_store

from .test_api_e2e import PROFILES, PROMPT, generate, hf_model, peft_greedy, put_profile  # noqa: F401 (fixture)

EXAMPLES = [
    {"input": "Which tag fits a movie about robots on Mars?", "output": "comedy"},
    {"input": "Which tag fits a movie about a haunted castle?", "output": "comedy"},
    {"input": "Which tag fits a movie about two lovers in Rome?", "output": "comedy"},
    {"input": "Which tag fits a movie about a bank robbery?", "output": "comedy"},
]
FAST = {"epochs": 8, "learning_rate": 0.02, "rank": 4}


def submit(client, user_id: str, examples=EXAMPLES, **params):
    return client.post(f"/users/{user_id}/finetune", json={"examples": examples, **FAST, **params})


def wait_job(client, job_id: str, timeout: float = 180) -> dict:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if not seen or seen[-1] != job["status"]:
            seen.append(job["status"])
        if job["status"] in ("succeeded", "failed"):
            job["seen"] = seen
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {seen[-1]} after {timeout}s")


def stored_stacked(server, user_id: str):
    async def read():
        store = open_store(f"sqlite:///{server.workdir / 'data' / 'users.db'}")
        try:
            return await store.get_blob(user_id, STACKED_BLOB)
        finally:
            await store.close()

    return asyncio.run(read())


def test_finetune_trains_and_serves_fused_plus_stacked_exactly(client, server, tiny_bank, hf_model, tmp_path):  # noqa: F811

    put_profile(client, "ft-a", PROFILES["space"])
    put_profile(client, "ft-b", PROFILES["romance"])
    before_a, before_b = generate(client, "ft-a"), generate(client, "ft-b")

    r = submit(client, "ft-a")
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.headers["location"] == f"/jobs/{r.json()['job_id']}"
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    assert job["seen"][-1] == "succeeded" and set(job["seen"]) <= {"queued", "running", "succeeded"}
    assert job["progress"] == 1.0 and job["step"] == job["total_steps"] > 0
    assert job["final_loss"] < 0.6 * job["initial_loss"], job  # a fixed answer is learnt
    assert "examples" not in job

    after = generate(client, "ft-a")
    assert after["stacked"] is True and after["stacked_version"] == job["stacked_version"]
    assert after["stacked_bank_version"] == "tiny-v1" and after["adapter"]["rank"] == 8 + 4
    assert after["token_ids"] != before_a["token_ids"]

    # transformers + PEFT with the fused and the stacked adapters both active.
    version, data = stored_stacked(server, "ft-a")
    assert version == job["stacked_version"]
    expected = peft_greedy(
        hf_model, tiny_bank, after["anchors"], after["fusion_mode"], PROFILES["space"], PROMPT, 12, tmp_path,
        stacked=adapter_from_bytes(data),
    )  # fmt: skip
    assert after["token_ids"] == expected

    # Isolation: B is untouched; GET shows A's stored bytes.
    b = generate(client, "ft-b")
    assert b["token_ids"] == before_b["token_ids"] and b["stacked"] is False
    assert b["adapter"]["lora_int_id"] == before_b["adapter"]["lora_int_id"]
    view = client.get("/users/ft-a").json()
    assert view["stacked"]["version"] == version and view["stored_bytes"]["stacked_lora"] == len(data)
    assert client.get("/users/ft-b").json()["stacked"] is None

    # Deleting the stacked LoRA restores the fused-only output.
    assert client.delete("/users/ft-a/stacked").status_code == 204
    assert client.delete("/users/ft-a/stacked").status_code == 404
    restored = generate(client, "ft-a")
    assert restored["stacked"] is False and restored["token_ids"] == before_a["token_ids"]


def test_one_job_per_user_and_bounded_queue(client):
    users = [f"ft-q{i}" for i in range(6)]
    for u in users:
        put_profile(client, u, PROFILES["crime"])
    first = submit(client, users[0], epochs=20)
    assert first.status_code == 202
    again = submit(client, users[0])
    assert again.status_code == 409 and first.json()["job_id"] in again.json()["error"]["message"]
    responses = [submit(client, u, epochs=1) for u in users[1:]]
    codes = [r.status_code for r in responses]
    # One job runs, MTA_FINETUNE_QUEUE_SIZE=2 wait; the rest are refused.
    assert codes.count(429) >= 2 and set(codes) <= {202, 429}, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert "queue is full" in refused.json()["error"]["message"]
    accepted = [first] + [r for r in responses if r.status_code == 202]
    assert all(wait_job(client, r.json()["job_id"])["status"] == "succeeded" for r in accepted)
    # A refused user can submit again once the queue drains.
    retry = submit(client, users[codes.index(429) + 1], epochs=1)
    assert retry.status_code == 202 and wait_job(client, retry.json()["job_id"])["status"] == "succeeded"


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"examples": []}, 422, "at least one"),
        ({"examples": [{"input": "x", "output": " "}]}, 422, "empty"),
        ({"examples": [{"input": "", "output": "y"}]}, 422, "empty"),
        ({"examples": [{"input": "x"}]}, 422, "output"),
        ({"examples": [{"input": "x", "output": "y"}] * 65}, 422, "too many"),
        ({"examples": [{"input": "x" * 9000, "output": "y"}]}, 422, "characters"),
        ({"examples": [{"input": "x", "output": "y"}], "rank": 17}, 422, "rank"),
        ({"examples": [{"input": "x", "output": "y"}], "rank": 16}, 422, "max_lora_rank"),
        ({"examples": [{"input": "x", "output": "y"}], "epochs": 0}, 422, "epochs"),
        ({"examples": [{"input": "x", "output": "y"}], "learning_rate": -1}, 422, "learning_rate"),
        ({"examples": [{"input": "x", "output": "y"}], "surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_finetune_requests(client, body, status, fragment):
    put_profile(client, "ft-bad", PROFILES["space"])
    r = client.post("/users/ft-bad/finetune", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_finetune_needs_a_profile_unless_added(client):
    r = submit(client, "ft-nobody")
    assert r.status_code == 404 and "profile" in r.json()["error"]["message"]
    r = submit(client, "ft-newcomer", add_to_profile=True, epochs=1)
    assert r.status_code == 202
    assert client.get("/users/ft-newcomer").json()["profile_items"] == len(EXAMPLES)
    assert wait_job(client, r.json()["job_id"])["status"] == "succeeded"
    assert client.get("/jobs/ft-0000000000000000").status_code == 404
    assert client.get("/jobs/not-a-job").status_code == 422


def test_stacked_lora_after_bank_reload_is_stale_until_retrained(client, admin_headers, make_bank, tiny_bank):
    put_profile(client, "ft-stale", PROFILES["romance"])
    fused_v1 = generate(client, "ft-stale")
    job = wait_job(client, submit(client, "ft-stale").json()["job_id"])
    assert job["status"] == "succeeded"
    v2 = make_bank("tiny-v2-stale", bank_version="tiny-v2", seed=7)
    try:
        assert client.post("/admin/bank/reload", json={"path": str(v2)}, headers=admin_headers).status_code == 200
        out = generate(client, "ft-stale")
        assert out["bank_version"] == "tiny-v2" and out["stacked"] is False and out["stacked_stale"] is True
        assert out["stacked_bank_version"] == "tiny-v1" and out["adapter"]["rank"] == 8
        assert client.get("/users/ft-stale").json()["stacked"]["stale"] is True
    finally:
        assert client.post("/admin/bank/reload", json={"path": str(tiny_bank)}, headers=admin_headers).status_code == 200
    back = generate(client, "ft-stale")
    assert back["stacked"] is True and back["stacked_stale"] is False
    assert back["token_ids"] != fused_v1["token_ids"]


def test_a_fine_tune_that_names_no_recipe_trains_with_the_banks_choice(client, admin_headers, make_bank, tiny_bank):
    """A bank built with `--stacking-lrs` records the stacked LoRA's recipe its anchor pool chose;
    the server's fine-tunes take it for every value the request (or MTA_FINETUNE_*) leaves unset."""
    import json

    from server.settings import Settings
    from server.stacking import stack_config

    default = stack_config(Settings.model_construct())
    defaults = {"rank": default.rank, "learning_rate": default.learning_rate, "epochs": default.epochs}
    assert client.get("/admin/bank", headers=admin_headers).json()["finetune_defaults"] == defaults
    chosen = make_bank("tiny-stacking", bank_version="tiny-stacking")
    manifest = json.loads((chosen / "manifest.json").read_text())
    manifest["stacking"] = {"rank": 3, "learning_rate": 0.0123, "epochs": 2}
    (chosen / "manifest.json").write_text(json.dumps(manifest))
    put_profile(client, "ft-bank-recipe", PROFILES["space"])
    try:
        assert client.post("/admin/bank/reload", json={"path": str(chosen)}, headers=admin_headers).status_code == 200
        bank = client.get("/admin/bank", headers=admin_headers).json()
        assert bank["stacking"] == bank["finetune_defaults"] == manifest["stacking"]
        job = client.post("/users/ft-bank-recipe/finetune", json={"examples": EXAMPLES[:2]}).json()
        assert job["params"] == manifest["stacking"], job
        assert wait_job(client, job["job_id"])["status"] == "succeeded"
        job = client.post("/users/ft-bank-recipe/finetune", json={"examples": EXAMPLES[:2], "epochs": 1}).json()
        assert job["params"] == {**manifest["stacking"], "epochs": 1}, job
        assert wait_job(client, job["job_id"])["status"] == "succeeded"
        assert generate(client, "ft-bank-recipe")["stacked"] is True
    finally:
        assert client.post("/admin/bank/reload", json={"path": str(tiny_bank)}, headers=admin_headers).status_code == 200
