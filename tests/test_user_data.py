"""A user's data over real HTTP, on both stores: appending history items (a rolling window)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .conftest import server_env
from .server_process import ServerProcess

MAX_ITEMS = 6  # MTA_MAX_PROFILE_ITEMS of these servers


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def server(request, tmp_path_factory, tiny_model_dir, tiny_bank) -> Iterator[ServerProcess]:
    """One server per store, with MTA_UNKNOWN_USER=404 (appending must still create a user)."""
    tmp = tmp_path_factory.mktemp(f"user-data-{request.param}")
    extra = {"MTA_UNKNOWN_USER": "404", "MTA_MAX_PROFILE_ITEMS": str(MAX_ITEMS)}
    if request.param == "redis":
        extra["MTA_STORE_URL"] = request.getfixturevalue("redis_url")
    proc = ServerProcess(tmp, server_env(tmp, tiny_model_dir, tiny_bank, **extra)).start()
    try:
        yield proc
    finally:
        proc.stop()


def _items(tag: str, n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"description": f"{tag} film number {start + i}", "tag": tag} for i in range(n)]


def test_append_items_creates_appends_and_keeps_newest(server: ServerProcess) -> None:
    user = f"app-{uuid.uuid4().hex[:8]}"
    with server.client() as c:
        assert c.get(f"/users/{user}").status_code == 404
        # Creation by append, also with MTA_UNKNOWN_USER=404.
        r = c.post(f"/users/{user}/items", json={"items": _items("comedy", 2)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["profile_items"], body["items_added"], body["items_dropped"]) == (2, 2, 0)
        assert body["max_profile_items"] == MAX_ITEMS
        first_anchors, first_version = body["anchors"], body["profile_version"]
        assert c.post("/generate", json={"user_id": user, "prompt": "hi", "max_tokens": 2}).json()["personalized"]

        # Append: no resend, the profile grows and is re-embedded (new version, fusion recomputed).
        r = c.post(f"/users/{user}/items", json={"items": _items("horror", 3)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["profile_items"], body["items_added"], body["items_dropped"]) == (5, 3, 0)
        assert body["profile_version"] > first_version
        assert [a["id"] for a in body["anchors"]] and first_anchors  # a plan on the new embedding

        # Rolling window: 5 + 4 = 9 > 6 keeps the newest 6 and says 3 were dropped.
        r = c.post(f"/users/{user}/items", json={"items": _items("horror", 4, start=3)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["profile_items"], body["items_added"], body["items_dropped"]) == (MAX_ITEMS, 4, 3)
        assert c.get(f"/users/{user}").json()["profile_items"] == MAX_ITEMS
        # A request's own batch over the limit is refused like PUT, and changes nothing.
        r = c.post(f"/users/{user}/items", json={"items": _items("x", MAX_ITEMS + 1)})
        assert r.status_code == 422 and r.json()["error"]["type"], r.text
        assert c.get(f"/users/{user}").json()["profile_version"] == body["profile_version"]


def test_concurrent_appends_all_land(server: ServerProcess) -> None:
    """Appends are read-modify-writes: racing ones must each land, not overwrite each other."""
    from concurrent.futures import ThreadPoolExecutor

    user = f"race-{uuid.uuid4().hex[:8]}"
    n = MAX_ITEMS - 1

    def append(i: int) -> int:
        with server.client() as c:
            return c.post(f"/users/{user}/items", json={"items": _items(f"batch{i}", 1)}).status_code

    with ThreadPoolExecutor(n) as pool:
        assert list(pool.map(append, range(n))) == [200] * n
    with server.client() as c:
        view = c.get(f"/users/{user}").json()
        assert view["profile_items"] == n and view["profile_version"] == n, view


@pytest.mark.parametrize(
    "payload",
    [{"items": []}, {"items": [{"description": "   "}]}, {"items": [{"description": "x" * 30000}]}, {"item": []}, []],
)
def test_append_items_validation_matches_put(server: ServerProcess, payload) -> None:
    user = f"bad-{uuid.uuid4().hex[:8]}"
    with server.client() as c:
        put = c.put(f"/users/{user}/profile", json=payload)
        post = c.post(f"/users/{user}/items", json=payload)
        assert put.status_code == post.status_code and 400 <= post.status_code < 500, (put.text, post.text)
        assert set(post.json()) == {"error"} and set(post.json()["error"]) >= {"type", "message"}
        assert c.get(f"/users/{user}").status_code == 404  # nothing created


def test_export_returns_everything_stored(server: ServerProcess) -> None:
    user = f"exp-{uuid.uuid4().hex[:8]}"
    with server.client() as c:
        r = c.get(f"/users/{user}/export")
        assert r.status_code == 404 and r.json()["error"]["type"], r.text
        items = _items("drama", 3)
        assert c.put(f"/users/{user}/profile", json={"items": items}).status_code == 200
        ex = [{"input": "Which tag fits: a sad story", "output": "drama"}] * 2
        r = c.post(f"/users/{user}/finetune", json={"examples": ex, "epochs": 1})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 240
        while (status := c.get(f"/jobs/{job_id}").json()["status"]) not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, status
            time.sleep(1)
        assert status == "succeeded"
        r = c.get(f"/users/{user}/export")
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["user_id"] == user
        assert out["profile"]["items"] == items and out["profile"]["profile_version"] >= 1
        assert out["profile"]["embedding_model"]
        view = c.get(f"/users/{user}").json()
        st = out["stacked"]
        assert st == {
            "version": view["stacked"]["version"],
            "bank_version": view["stacked"]["bank_version"],
            "job_id": job_id,
            "bytes": view["stored_bytes"]["stacked_lora"],
        }
        assert [j["job_id"] for j in out["jobs"]] == [job_id]
        assert out["jobs"][0]["status"] == "succeeded" and "examples" not in out["jobs"][0]
        assert "Which tag fits" not in r.text  # no training example anywhere
        assert c.delete(f"/users/{user}").status_code == 204
        assert c.get(f"/users/{user}/export").status_code == 404


def _store_url(server: ServerProcess) -> str:
    return server.env.get("MTA_STORE_URL") or f"sqlite:///{Path(server.env['MTA_DATA_DIR']) / 'users.db'}"


async def _put_stacked(server: ServerProcess, user: str, data: bytes) -> None:
    """A stacked LoRA written behind the server's back (a bad migration, a bit flip, another model's)."""
    from server.stacking import STACKED_BLOB
    from server.store import open_store

    store = open_store(_store_url(server))
    try:
        await store.put_blob(user, STACKED_BLOB, data)
    finally:
        await store.close()


def _stacked_blob(kind: str, bank_version: str, tiny_model_config: dict) -> tuple[bytes, str]:
    """A blob the served model cannot take, and what the server must say about it."""
    from server.adapters import LoraWeights
    from server.stacking import stacked_to_bytes

    hidden = tiny_model_config["hidden_size"]
    module = "model.layers.0.self_attn.o_proj"
    if kind == "garbage":
        return b"\x00" * 64, "not a safetensors blob"
    if kind == "other_model":  # a LoRA trained for a model twice as wide
        a, b = {module: torch.zeros(2, 2 * hidden)}, {module: torch.zeros(2 * hidden, 2)}
        expected = f"maps {2 * hidden}->{2 * hidden}, the model's maps {hidden}->{hidden}"
    else:  # unknown_module
        a, b = {"model.layers.0.mlp.fc9": torch.zeros(2, hidden)}, {"model.layers.0.mlp.fc9": torch.zeros(hidden, 2)}
        expected = "is not a linear layer of this model"
    return stacked_to_bytes(LoraWeights(a=a, b=b, scaling=1.0), bank_version=bank_version, job_id="ft-x"), expected


@pytest.mark.parametrize("kind", ["garbage", "other_model", "unknown_module"])
def test_a_stacked_lora_the_model_cannot_take_is_reported_and_not_served(server: ServerProcess, tiny_model_config, kind: str) -> None:
    user = f"bad-stacked-{uuid.uuid4().hex[:8]}"
    body = {"user_id": user, "prompt": "Which tag fits a movie about a heist?", "max_tokens": 6}
    with server.client() as c:
        profile = c.put(f"/users/{user}/profile", json={"items": _items("crime", 3)}).json()
        fused = c.post("/generate", json=body).json()
        data, expected = _stacked_blob(kind, profile["bank_version"], tiny_model_config)
        asyncio.run(_put_stacked(server, user, data))
        for _ in range(2):  # checked once, remembered: the same answer on a warm request
            r = c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["personalized"] is True and out["stacked"] is False and not out["stacked_stale"], out
            assert expected in out["stacked_error"], out["stacked_error"]
            assert out["token_ids"] == fused["token_ids"]  # the fused adapter alone
        view = c.get(f"/users/{user}").json()
        assert expected in view["stacked"]["error"] and view["stacked"]["bytes"] == len(data)
        assert c.delete(f"/users/{user}/stacked").status_code == 204
        out = c.post("/generate", json=body).json()
        assert out["stacked_error"] is None and out["token_ids"] == fused["token_ids"]
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # the engine lives on
