"""Hardening (issue 8) against the real server: fuzzed and oversized input, user isolation,
bank reloads under load, SIGKILL during writes, a Redis outage, and graceful shutdown.

Server starts are the cost here (30-60 s each on this machine): the session `server` serves
the input, isolation and reload tests; two class-scoped servers serve the rest, a Redis-backed
API replica (fuzzing, isolation on Redis, the outage) and a SQLite server that is killed,
restarted and finally shut down.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from .conftest import server_env
from .prerequisites import missing
from .redis_server import RedisServer, start_redis_server
from .server_process import ADMIN_TOKEN, ServerProcess
from .test_api_e2e import PROFILES, PROMPT, generate, metric, put_profile
from .test_finetune import EXAMPLES

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {"content-type": "application/json"}
JOB_ID = re.compile(r"ft-[0-9a-f]{16}")
ADAPTER_DIR = re.compile(r"[0-9]+-[0-9a-f]{24}")
REQUEST_TIMEOUT = 30  # seconds: a request that takes longer counts as a hang
FUZZ_EXAMPLES = 25  # per operation, generation mode (positive, negative) and, on /admin, token (right, wrong)
STATEFUL_SEQUENCES = 50  # link-following call sequences of up to 6 steps


def assert_error(r: httpx.Response, status: int, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] and err["message"], err
    for fragment in fragments:
        assert fragment.lower() in err["message"].lower(), err["message"]
    return err


def wait_ready(client: httpx.Client, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"/readyz not 200 after {timeout} s")


# --- request size and count limits (what tests/test_api_errors.py does not cover) --------------


def test_chunked_body_over_the_limit_is_refused_while_it_streams(client):
    """No Content-Length to check up front: the body is counted as it arrives."""
    limit = 4 * 1024 * 1024  # MTA_MAX_REQUEST_BYTES default

    def body(size: int) -> Iterator[bytes]:
        yield b'{"items": [{"text": "'
        for _ in range(size // 65536):
            yield b"x" * 65536
        yield b'"}]}'

    r = client.put("/users/chunky/profile", content=body(limit + 2 * 65536), headers=JSON)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, "bytes")
    assert r.json()["error"]["type"] == "payload_too_large"
    # Under the limit, a chunked body is read as usual (here: refused for its content, a 422).
    assert_error(client.put("/users/chunky/profile", content=body(65536), headers=JSON), 422, "max_item_chars")
    small = (json.dumps({"items": PROFILES["space"]}).encode() for _ in range(1))
    assert client.put("/users/chunky/profile", content=small, headers=JSON).status_code == 200
    assert client.delete("/users/chunky").status_code == 204


def test_counts_and_values_that_reach_the_engine_are_bounded(client):
    """Each of these was a 500 (or broke the connection) before it was bounded in the API schema."""
    ask = {"user_id": "lim-user", "prompt": "Hi", "max_tokens": 4}
    assert_error(client.post("/generate", json={**ask, "stop": ["a"] * 9}), 422, "stop")
    assert_error(client.post("/generate", json={**ask, "stop": ""}), 422, "stop")  # vLLM refuses ""
    long_stop = client.post("/generate", json={**ask, "stop": "a single stop string of more than 8 characters"})
    assert long_stop.status_code == 200, long_stop.text
    assert_error(client.post("/generate", json={**ask, "seed": 2**64}), 422, "seed")  # not a 64-bit int
    assert client.post("/generate", json={**ask, "seed": 2**63 - 1, "temperature": 0.5}).status_code == 200
    # Thousands of (empty) messages: refused by the context limit, quickly.
    start = time.monotonic()
    many = {"user_id": "lim-user", "messages": [{"role": "user", "content": ""}] * 5000}
    assert_error(client.post("/generate", json=many), 422, "max_model_len")
    assert time.monotonic() - start < 10
    # JSON nested far deeper than any request: a 4xx from the parser, not a crash.
    deep = client.post("/generate", content="[" * 100_000 + "]" * 100_000, headers=JSON)
    assert 400 <= deep.status_code < 500, deep.text
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    "method, path, raw",
    [
        ("POST", "/generate", '{"user_id": "lim-user", "prompt": "\\ud800 lone surrogate"}'),
        ("POST", "/v1/chat/completions", '{"model": "\\udfff", "messages": [{"role": "user", "content": "Hi"}]}'),
        ("PUT", "/users/lim-user/profile", '{"items": [{"\\ud800": "key", "text": "a"}]}'),
        ("PUT", "/users/lim-user/profile", '{"items": [{"text": "a", "score": NaN}]}'),
        ("PUT", "/users/lim-user/profile", '{"items": [{"text": "a", "score": 1e999}]}'),
        ("POST", "/users/lim-user/finetune", '{"examples": [{"input": "\\ud800", "output": "b"}]}'),
    ],
)
def test_json_that_cannot_be_encoded_again_is_a_422(client, method, path, raw):
    """Python's JSON parser accepts lone surrogates and NaN/Infinity; no tokenizer, store or
    response can encode them, so they are refused at the door."""
    err = assert_error(client.request(method, path, content=raw, headers=JSON), 422)
    assert err["type"] == "invalid_request"
    assert client.get("/users/lim-user").status_code == 404  # nothing half-written


def test_unsupported_method_names_the_allowed_ones(client):
    r = client.request("TRACE", "/generate")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"


def test_admin_token_edge_cases_are_4xx(client):
    """Missing and wrong tokens are covered in test_api_e2e; these are the odd shapes."""
    for value in (b"Bearer \xff\xfe", f"Bearer {ADMIN_TOKEN}x".encode(), f"Bearer {ADMIN_TOKEN[:-1]}".encode(), b"Bearer"):
        r = client.get("/admin/bank", headers={"Authorization": value})
        assert r.status_code in (401, 403), (value, r.status_code, r.text)
    assert client.get("/admin/bank", headers={"Authorization": f"bearer {ADMIN_TOKEN}"}).status_code == 200


# --- one user cannot read or change another user's data ------------------------------------------


def check_isolation(c: httpx.Client, prefix: str, *, with_jobs: bool) -> None:
    a, b = f"{prefix}-a", f"{prefix}-b"
    put_profile(c, a, PROFILES["space"])
    put_profile(c, b, PROFILES["romance"])
    out_a, out_b = generate(c, a), generate(c, b)
    # Each response is about its own user only.
    assert (out_a["user_id"], out_b["user_id"]) == (a, b)
    assert out_a["anchors"][0]["id"] == "space" and out_b["anchors"][0]["id"] == "romance"
    assert out_a["adapter"]["lora_int_id"] != out_b["adapter"]["lora_int_id"]
    view_b = c.get(f"/users/{b}").json()

    # Writing A's profile changes nothing of B's.
    assert put_profile(c, a, PROFILES["crime"])["profile_version"] == 2
    assert c.get(f"/users/{b}").json() == view_b

    # Ids that look alike (case, separators used in store keys, prefixes) are other users:
    # nothing to read, nothing to delete.
    for other in (a.upper(), f"{a}:x", f"{a}.", f"{a}:stacked_lora", a[:-1], f"{prefix}-ab"):
        assert c.get(f"/users/{other}").status_code == 404, other
        assert c.delete(f"/users/{other}").status_code == 404, other
        assert c.delete(f"/users/{other}/stacked").status_code == 404, other

    jobs = {}
    if with_jobs:  # queued only: no worker runs next to this replica
        for user in (a, b):  # one active job per user, not per server
            r = c.post(f"/users/{user}/finetune", json={"examples": EXAMPLES, "epochs": 1})
            assert r.status_code == 202, r.text
            jobs[user] = r.json()["job_id"]
            assert JOB_ID.fullmatch(jobs[user]), jobs[user]  # 64 random bits: unguessable
        assert jobs[a] != jobs[b]
        view = c.get(f"/jobs/{jobs[a]}").json()
        assert view["user_id"] == a and "examples" not in view  # the training data is never shown

    # Deleting A removes A, and A's jobs, only.
    before = c.get(f"/users/{b}").json()
    assert c.delete(f"/users/{a}").status_code == 204
    assert c.get(f"/users/{a}").status_code == 404
    assert c.get(f"/users/{b}").json() == before
    assert generate(c, b)["token_ids"] == out_b["token_ids"]
    if with_jobs:
        assert c.get(f"/jobs/{jobs[a]}").status_code == 404
        assert c.get(f"/jobs/{jobs[b]}").json()["status"] == "queued"
    assert c.delete(f"/users/{b}").status_code == 204


def test_users_are_isolated_sqlite(client):
    check_isolation(client, f"iso-{uuid.uuid4().hex[:8]}", with_jobs=False)  # jobs: see the Redis replica


# --- bank reload under concurrent load ------------------------------------------------------------


@dataclass
class Load:
    """Threads sending /generate (plain and streamed) and /v1/chat/completions until stopped."""

    server: ServerProcess
    users: list[str]
    stop: threading.Event = field(default_factory=threading.Event)
    ok: Counter = field(default_factory=Counter)
    banks: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def run(self, worker: int) -> None:
        with self.server.client(timeout=REQUEST_TIMEOUT) as c:
            n = worker
            while not self.stop.is_set():
                user, kind = self.users[n % len(self.users)], ("plain", "stream", "openai")[n % 3]
                n += 1
                try:
                    bank = self.one(c, user, kind)
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    self.failures.append(f"{kind} {user}: {type(e).__name__}: {e}")
                else:
                    self.ok[kind] += 1
                    self.banks[bank] += 1

    @staticmethod
    def one(c: httpx.Client, user: str, kind: str) -> str:
        body = {"user_id": user, "prompt": PROMPT, "max_tokens": 8}
        if kind == "plain":
            r = c.post("/generate", json=body)
            assert r.status_code == 200, r.text
            out = r.json()
        elif kind == "openai":
            r = c.post("/v1/chat/completions", json={"user": user, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8})
            assert r.status_code == 200, r.text
            out = r.json()["personalization"]
        else:
            out, done = None, False
            with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: ") and json.loads(line[6:]).get("done"):
                        out = json.loads(line[6:])
            assert done and out is not None, "stream ended early"
        assert out["personalized"] is True, out
        return out["bank_version"]


def test_bank_reload_under_concurrent_generate_load_fails_no_request(server, client, admin_headers, make_bank, tiny_bank):
    other = make_bank("tiny-reload", bank_version="tiny-v3", seed=11)
    users = [f"reload-{theme}" for theme in ("space", "romance", "crime")]
    for user, theme in zip(users, ("space", "romance", "crime")):
        put_profile(client, user, PROFILES[theme])
    load = Load(server, users)
    threads = [threading.Thread(target=load.run, args=(i,), daemon=True) for i in range(3)]
    reloads = 0
    for t in threads:
        t.start()
    try:  # about 10 s; longer on a busy machine, until enough requests overlapped the reloads
        start = time.monotonic()
        while time.monotonic() - start < 10 or (sum(load.ok.values()) < 15 and time.monotonic() - start < 60):
            time.sleep(0.7)
            r = client.post("/admin/bank/reload", json={"path": str(other if reloads % 2 == 0 else tiny_bank)}, headers=admin_headers)
            assert r.status_code == 200, r.text
            reloads += 1
    finally:
        load.stop.set()
        for t in threads:
            t.join(timeout=60)
        back = client.post("/admin/bank/reload", json={"path": str(tiny_bank)}, headers=admin_headers)  # others share this server
        assert back.status_code == 200 and back.json()["bank_version"] == "tiny-v1", back.text
    assert not load.failures, load.failures[:5]
    assert reloads >= 6 and sum(load.ok.values()) >= 15, (reloads, load.ok)
    assert set(load.ok) == {"plain", "stream", "openai"}
    assert set(load.banks) == {"tiny-v1", "tiny-v3"}, load.banks  # requests ran on both banks
    for user in users:
        client.delete(f"/users/{user}")


# --- an API replica on Redis: fuzzing, isolation, outage -------------------------------------------


@pytest.fixture(scope="class")
def redis_replica(tmp_path_factory, tiny_model_dir, tiny_bank) -> Iterator[tuple[ServerProcess, RedisServer]]:
    """An API replica as deployed at scale: a Redis store (a private redis-server the tests may
    stop), fine-tunes only queued for `mta worker`s (none runs here, so nothing trains)."""
    import shutil

    if shutil.which("redis-server") is None:
        missing("redis", "redis-server is not installed")
    tmp = tmp_path_factory.mktemp("replica")
    redis = start_redis_server(tmp / "redis")
    env = server_env(
        tmp,
        tiny_model_dir,
        tiny_bank,
        MTA_STORE_URL=redis.url,
        MTA_FINETUNE_RUNNER="worker",
        MTA_FINETUNE_QUEUE_SIZE="1000",  # the fuzzer queues jobs that never run
    )
    proc = ServerProcess(tmp, env)
    try:
        proc.start()
        yield proc, redis
    finally:
        proc.stop()
        redis.stop()


def fuzz_openapi(server: ServerProcess) -> None:
    """Schemathesis generates valid and invalid requests for every operation of /openapi.json;
    each must answer within REQUEST_TIMEOUT with a status below 500, and as the schema says:
    a documented status and content type, a body matching the documented schema (errors in
    the envelope), and invalid input refused. The admin operations are fuzzed with the admin
    token and with a wrong one. Then stateful sequences follow the schema's links (PUT profile ->
    generate, get, export, fine-tune -> job, delete) with the same checks."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import FlakyStrategyDefinition, Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        negative_data_rejection,
    ]
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=REQUEST_TIMEOUT)
    statuses: Counter = Counter()
    media_types: Counter = Counter()
    failures: list[str] = []
    operations = 0
    wrong_token = {"Authorization": f"Bearer {ADMIN_TOKEN}-wrong"}

    def fuzz(operation, mode: GenerationMode, headers: dict[str, str], expected: set[int] | None) -> None:
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same requests on every run: a failure reproduces
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case) -> None:
            r = case.call(base_url=server.url, headers=headers, timeout=REQUEST_TIMEOUT)
            statuses[r.status_code] += 1
            media_types[r.headers.get("content-type", ["none"])[0].split(";")[0]] += 1  # schemathesis: lists
            where = case.as_curl_command(headers=headers, base_url=server.url)
            case.validate_response(r, checks=checks, headers=headers)
            if r.status_code >= 400:
                err = r.json()["error"]
                assert err["type"] and err["message"], f"no error envelope: {r.text[:300]}\n{where}"
            if expected is not None:
                assert r.status_code in expected, f"{r.status_code} {r.text[:300]}\n{where}"

        call()

    # Random bodies rarely make a valid streamed request (exactly one of prompt or messages):
    # one each, so the event streams are checked against the schema on every run.
    streamed = {
        "/generate": {"user_id": "fuzz-stream", "prompt": "Hello", "max_tokens": 4, "stream": True},
        "/v1/completions": {"prompt": "Hello", "max_tokens": 4, "stream": True},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "stream": True},
    }

    def stream(operation) -> None:
        case = operation.Case(body=streamed[operation.path], media_type="application/json")
        r = case.call(base_url=server.url, timeout=REQUEST_TIMEOUT)
        media_types[r.headers.get("content-type", ["none"])[0].split(";")[0]] += 1
        assert r.status_code == 200, r.text[:300]
        case.validate_response(r, checks=checks)
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]

    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        # The admin token everywhere, so the fuzzer gets past the admin endpoints' auth; there
        # also a wrong one, which never gets past it: a valid request is a 403; an invalid one
        # may instead lose its token (a 401) or be unreadable JSON (a 400/422: FastAPI reads
        # the body before it runs the auth dependency).
        wrong = operation.path.startswith("/admin/")
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            runs: list[tuple[dict[str, str], set[int] | None]] = [(ADMIN, None)]
            if wrong:
                runs.append((wrong_token, {403} if mode == GenerationMode.POSITIVE else {400, 401, 403, 422}))
            for headers, expected in runs:
                label = f"{operation.label} ({mode.value}{', wrong token' if expected else ''})"
                try:
                    fuzz(operation, mode, headers, expected)
                except Unsatisfiable:
                    pass  # no invalid request exists for an operation without parameters
                # Collect all operations' findings; schemathesis raises a BaseExceptionGroup.
                except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001
                    failures.append(f"{label}: {type(e).__name__}: {e}")
        if operation.path in streamed:
            try:
                stream(operation)
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001
                failures.append(f"{operation.label} (streamed): {type(e).__name__}: {e}")

    calls: Counter = Counter()

    class Stateful(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case) -> dict:
            return {"headers": ADMIN, "timeout": REQUEST_TIMEOUT}

        def after_call(self, response, case) -> None:
            calls[case.operation.label, response.status_code] += 1

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            # Collected, not raised: Hypothesis would replay a failing sequence, and a live
            # server's state (a job still running, a user deleted) makes replays diverge.
            try:
                case.validate_response(response, checks=checks, headers=ADMIN)
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001
                failures.append(f"stateful {case.operation.label} -> {response.status_code}: {type(e).__name__}: {e}")

    try:
        Stateful.run(
            settings=settings(
                max_examples=STATEFUL_SEQUENCES,
                stateful_step_count=6,
                phases=[Phase.generate],  # no replay, no shrinking (see validate_response)
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
        )
    except FlakyStrategyDefinition:
        pass  # the live server's state steers the sequences, so Hypothesis's re-runs of a sequence
        # can diverge: that ends the run, not a finding (findings are collected in validate_response)
    except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001
        failures.append(f"stateful: {type(e).__name__}: {e}")
    assert not failures, "\n\n".join(failures)
    # The links were followed with the ids they carry: the sequences reached users a previous
    # step created, not only 404s. (How far a run gets, e.g. to a job, depends on the server's
    # state when Hypothesis re-runs a sequence: see FlakyStrategyDefinition above.)
    followed = {label for (label, status), n in calls.items() if status < 300}
    by_user = {"POST /generate", "GET /users/{user_id}", "GET /users/{user_id}/export", "DELETE /users/{user_id}"}
    assert len(by_user & followed) >= 2, calls
    assert operations >= 14, operations
    assert sum(n for s, n in statuses.items() if s < 300) >= 30, statuses  # it got past validation too
    assert statuses[403] >= FUZZ_EXAMPLES, statuses  # the wrong admin token was refused
    # Streams and the Prometheus text were checked against their documented content types too.
    assert media_types["text/event-stream"] == len(streamed) and media_types["text/plain"], media_types
    with server.client() as c:
        assert c.get("/readyz").status_code == 200  # the engine survived it all


class TestRedisReplica:
    def test_fuzzing_from_the_openapi_schema_finds_no_server_error_and_no_hang(self, redis_replica):
        fuzz_openapi(redis_replica[0])

    def test_users_are_isolated_redis(self, redis_replica):
        server, _ = redis_replica
        with server.client() as c:
            check_isolation(c, f"iso-{uuid.uuid4().hex[:8]}", with_jobs=True)

    def test_redis_outage_is_a_503_with_a_message_and_recovers_without_a_restart(self, redis_replica):
        server, redis = redis_replica
        pid = server.proc.pid
        user = "outage-user"
        with server.client(timeout=REQUEST_TIMEOUT) as c:
            put_profile(c, user, PROFILES["space"])
            assert generate(c, user)["personalized"] is True

            # Redis hangs (SIGSTOP): every store call times out into a 503, nothing hangs.
            redis.process.send_signal(signal.SIGSTOP)
            try:
                self.assert_store_unavailable(c, user)
            finally:
                redis.process.send_signal(signal.SIGCONT)
            wait_ready(c)
            assert generate(c, user)["personalized"] is True  # the data is still there

            # Redis down: 503s. Back on the same port: served again by the same process.
            redis.stop()
            self.assert_store_unavailable(c, user)
            redis.start()
            wait_ready(c)
            put_profile(c, user, PROFILES["space"])  # this throw-away Redis keeps nothing across restarts
            assert generate(c, user)["personalized"] is True
        assert server.proc.pid == pid and server.proc.poll() is None

    @staticmethod
    def assert_store_unavailable(c: httpx.Client, user: str) -> None:
        requests = [
            ("POST", "/generate", {"user_id": user, "prompt": PROMPT, "max_tokens": 4}),
            ("PUT", f"/users/{user}/profile", {"items": PROFILES["space"]}),
            ("GET", f"/users/{user}", None),
            ("DELETE", f"/users/{user}", None),
            ("POST", f"/users/{user}/finetune", {"examples": EXAMPLES}),
            ("POST", "/v1/chat/completions", {"user": user, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        ]
        for method, path, body in requests:
            start = time.monotonic()
            r = c.request(method, path, json=body)
            assert time.monotonic() - start < 15, f"{method} {path} took {time.monotonic() - start:.1f} s"
            err = assert_error(r, 503, "redis", "unavailable")
            assert err["type"] == "store_unavailable", (method, path, err)
        assert_error(c.get("/readyz"), 503, "redis")
        assert c.get("/healthz").status_code == 200  # alive: no restart storm for a store outage
        # Requests that need no user data are still served.
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200, r.text


# --- adapter cache filesystem full (ENOSPC) -------------------------------------------------------

TMPFS_SIZE = "4m"  # the adapter cache's own filesystem: small, so the test can fill it


def userns_tmpfs_available(where: Path) -> bool:
    """Whether an unprivileged user + mount namespace may mount a tmpfs here (no root needed)."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    probe = where / "probe"
    probe.mkdir()
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', probe],
        check=False,
        capture_output=True,
    )
    return r.returncode == 0


@pytest.fixture(scope="class")
def full_disk_server(tmp_path_factory, tiny_model_dir, tiny_bank) -> Iterator[tuple[ServerProcess, Path]]:
    """A server whose adapter cache is on its own small tmpfs, mounted in a private user + mount
    namespace (`unshare`), so the test fills a real filesystem without root. Yields the server
    and the tmpfs as the test process sees it (through /proc/<pid>/root)."""
    import sys

    tmp = tmp_path_factory.mktemp("enospc")
    if not userns_tmpfs_available(tmp):
        missing("userns", "cannot mount a tmpfs in a user namespace here (unshare -Urm)")
    mnt = tmp / "adapter-fs"
    mnt.mkdir()
    launcher = tmp / "python-in-namespace"
    launcher.write_text(
        "#!/bin/sh\n"
        'exec unshare --user --map-root-user --mount sh -c \'mount -t tmpfs -o size="$ADAPTER_FS_SIZE" tmpfs'
        ' "$ADAPTER_FS" && exec "$0" "$@"\' ' + f'"{sys.executable}" "$@"\n'
    )
    launcher.chmod(0o755)
    env = server_env(tmp, tiny_model_dir, tiny_bank, MTA_ADAPTER_CACHE_DIR=str(mnt / "adapters"))
    env.update(ADAPTER_FS=str(mnt), ADAPTER_FS_SIZE=TMPFS_SIZE)
    proc = ServerProcess(tmp, env, executable=str(launcher))  # `python -m server.cli` inside the namespace
    try:
        proc.start()
        fs = Path(f"/proc/{proc.proc.pid}/root") / mnt.relative_to("/")
        assert (fs / "adapters").is_dir(), "the tmpfs is not visible through /proc/<pid>/root"
        yield proc, fs
    finally:
        proc.stop()


def fill(fs: Path) -> Path:
    """Write a file on `fs` until the filesystem is full; returns it (delete it to free the space)."""
    import errno

    filler = fs / "filler"
    chunk = b"\0" * (64 << 10)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def test_out_of_space_recognizes_full_filesystems_and_quotas_only():
    """What the e2e test below cannot reach: a quota (EDQUOT), and the errors that must stay 500s."""
    import errno

    from server.adapter_cache import out_of_space

    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert out_of_space(Exception("Error while serializing: I/O error: Disk quota exceeded (os error 122)"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("write failed") from e
    except RuntimeError as e:
        assert out_of_space(e)
    assert not out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not out_of_space(Exception("Error while serializing: I/O error: Permission denied (os error 13)"))
    assert not out_of_space(ValueError("rank 28"))


def adapter_ids(fs: Path) -> set[int]:
    """The lora_int_ids of the adapter directories (`<id>-<key digest>`) on the cache's filesystem."""
    return {int(d.name.split("-")[0]) for d in (fs / "adapters").rglob("*") if ADAPTER_DIR.fullmatch(d.name)}


class TestAdapterCacheFull:
    def test_full_filesystem_evicts_to_make_room_then_is_a_503_and_recovers_when_space_is_freed(
        self, full_disk_server, tiny_bank
    ):
        server, fs = full_disk_server
        users = {name: f"{name}-{uuid.uuid4().hex[:8]}" for name in ("space", "romance")}
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        with server.client(timeout=REQUEST_TIMEOUT) as c:
            for name, user in users.items():
                put_profile(c, user, PROFILES[name])
            first = generate(c, users["space"])
            assert first["adapter"]["cache_hit"] is False
            assert adapter_ids(fs) == {first["adapter"]["lora_int_id"]}

            filler = fill(fs)
            # A new adapter (another neighbourhood) does not fit: the cache evicts the least recently
            # used adapter that no request holds (and vLLM lets go of it) and writes it again.
            out = generate(c, users["romance"])
            assert out["personalized"] is True and out["adapter"]["cache_hit"] is False
            assert adapter_ids(fs) == {out["adapter"]["lora_int_id"]}
            again = generate(c, users["romance"])  # a cached adapter is served from a full filesystem
            assert again["adapter"]["cache_hit"] is True
            assert again["adapter"]["lora_int_id"] == out["adapter"]["lora_int_id"]

            # With nothing left to evict (a bank reload dropped every adapter, and the space it
            # freed is filled again), a new adapter is a clear 503, for both APIs.
            r = c.post("/admin/bank/reload", json={"path": str(tiny_bank)}, headers=ADMIN)
            assert r.status_code == 200 and r.json()["invalidated_adapters"] == 1, r.text
            filler = fill(fs)
            assert adapter_ids(fs) == set()
            for _ in range(2):
                r = c.post("/generate", json={"user_id": users["romance"], "prompt": PROMPT, "max_tokens": 4})
                err = assert_error(r, 503, "adapter cache", "disk space")
                assert err["type"] == "adapter_cache_full", err
            r = c.post("/v1/chat/completions", json={**chat, "user": users["romance"]})
            assert assert_error(r, 503, "adapter cache")["type"] == "adapter_cache_full"
            r = c.post("/generate", json={"user_id": users["romance"], "prompt": PROMPT, "stream": True, "max_tokens": 4})
            assert assert_error(r, 503, "adapter cache")["type"] == "adapter_cache_full"
            # No half-written adapter is left behind, and everything else is still served.
            assert adapter_ids(fs) == set()
            assert c.post("/v1/chat/completions", json=chat).status_code == 200  # the base model
            assert c.get(f"/users/{users['romance']}").status_code == 200
            assert c.get("/healthz").status_code == 200

            filler.unlink()  # space is back: served without a restart
            out = generate(c, users["romance"])
            assert out["personalized"] is True and out["adapter"]["cache_hit"] is False
            assert generate(c, users["romance"])["adapter"]["cache_hit"] is True
        assert server.proc is not None and server.proc.poll() is None


# --- SIGKILL during writes, then graceful shutdown (SQLite, the embedded default) -----------------


def test_fuzzing_on_the_sqlite_store_with_fine_tunes_that_run(tmp_path_factory, tiny_model_dir, tiny_bank):
    """The same fuzzing on the embedded default's store (SQLite), where the in-process runner
    trains the fine-tunes the fuzzer gets accepted (each cut at 30 s)."""
    tmp = tmp_path_factory.mktemp("fuzz-sqlite")
    env = server_env(tmp, tiny_model_dir, tiny_bank, MTA_FINETUNE_QUEUE_SIZE="1000", MTA_JOB_TIMEOUT_SECONDS="30")
    with ServerProcess(tmp, env) as server:
        fuzz_openapi(server)
        with server.client() as c:
            assert metric(c, "mta_finetune_jobs_started_total") >= 1  # they really ran


@pytest.fixture(scope="class")
def sqlite_server(tmp_path_factory, tiny_model_dir, tiny_bank) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("crash")
    # Room for long generations: graceful shutdown needs requests that are still running, and
    # the tiny model decodes a token in a few ms, so even 1900 tokens can end within 4 s.
    env = server_env(
        tmp, tiny_model_dir, tiny_bank, MTA_MAX_MODEL_LEN="4096", MTA_MAX_TOKENS="3900", MTA_FINETUNE_QUEUE_SIZE="4"
    )
    proc = ServerProcess(tmp, env)
    try:
        yield proc.start()
    finally:
        proc.stop()


@dataclass
class Writer:
    """Rewrites one user's profile in a loop; each write's items all carry the write's number."""

    user: str
    sent: int = 0
    acked: int = 0

    def items(self, k: int) -> list[dict]:
        return [{"description": f"{self.user} write {k} item {i}: a crew explores a distant planet.", "tag": f"w{k}"} for i in range(3)]

    def run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as c:
            while True:
                self.sent += 1
                try:
                    r = c.put(f"/users/{self.user}/profile", json={"items": self.items(self.sent)})
                except httpx.HTTPError:
                    return  # the server is gone
                assert r.status_code == 200, r.text
                self.acked = self.sent


@dataclass
class Flipper:
    """Creates and deletes one user in turn: ops are ("put", k) or ("delete", k)."""

    user: str
    acked: tuple[str, int] | None = None
    in_flight: tuple[str, int] | None = None

    def run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT) as c:
            k = 0
            while True:
                k += 1
                op = ("put", k) if k % 2 else ("delete", k)
                self.in_flight = op
                try:
                    if op[0] == "put":
                        r = c.put(f"/users/{self.user}/profile", json={"items": [{"text": f"flip {k}"}]})
                        assert r.status_code == 200, r.text
                    else:
                        assert c.delete(f"/users/{self.user}").status_code == 204
                except httpx.HTTPError:
                    return
                self.acked, self.in_flight = op, None


class TestCrashAndShutdown:
    def test_sigkill_during_profile_writes_and_a_finetune_leaves_the_store_consistent(self, sqlite_server):
        server = sqlite_server
        db = server.workdir / "data" / "users.db"
        with server.client() as c:
            put_profile(c, "crash-trainee", PROFILES["crime"])
            long = c.post("/users/crash-trainee/finetune", json={"examples": EXAMPLES * 16, "epochs": 20, "learning_rate": 0.01})
            assert long.status_code == 202, long.text
            job_id = long.json()["job_id"]
            deadline = time.monotonic() + 60
            while c.get(f"/jobs/{job_id}").json()["status"] != "running":
                assert time.monotonic() < deadline, "the fine-tune never started"
                time.sleep(0.1)

        writers = [Writer(f"crash-w{i}") for i in range(3)]
        flipper = Flipper("crash-flip")
        threads = [threading.Thread(target=w.run, args=(server.url,), daemon=True) for w in [*writers, flipper]]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while min(w.acked for w in writers) < 3 or flipper.acked is None or flipper.acked[1] < 3:
            assert time.monotonic() < deadline, "writes too slow"
            time.sleep(0.05)
        # Kill the whole process group (the API and vLLM's engine processes), as a container
        # runtime or the OOM killer would: no shutdown code runs.
        os.killpg(server.proc.pid, signal.SIGKILL)
        assert server.proc.wait(timeout=30) == -signal.SIGKILL
        for t in threads:
            t.join(timeout=30)
        server.stop()

        # The store on disk: intact, and every user is in a state some acknowledged or in-flight
        # write left it in (each write applied whole or not at all).
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
            rows = {r[0]: r for r in conn.execute("SELECT user_id, items, embedding, embedding_model, profile_version FROM users")}
            for w in writers:
                _, items, embedding, model, version = rows[w.user]
                marks = {item["tag"] for item in json.loads(items)}
                assert len(marks) == 1, f"{w.user}: items of several writes {marks}"
                k = int(marks.pop()[1:])
                assert w.acked <= k <= w.sent, (w.user, k, w.acked, w.sent)
                assert version == k  # one version per write, none lost or doubled
                assert model and len(embedding) == 384 * 4  # the embedding came with its items
            allowed = {flipper.acked} | ({flipper.in_flight} if flipper.in_flight else set())
            state = ("put", int(json.loads(rows[flipper.user][1])[0]["text"].split()[1])) if flipper.user in rows else None
            assert state in allowed or (state is None and any(op[0] == "delete" for op in allowed)), (state, allowed)
            assert conn.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()[0] == "running"
        finally:
            conn.close()

        # Restarted, the server serves every user as stored; the killed job is reported failed.
        server.start()
        with server.client() as c:
            for w in writers:
                view = c.get(f"/users/{w.user}").json()
                assert view["profile_items"] == 3 and view["profile_version"] == rows[w.user][4]
                assert generate(c, w.user)["personalized"] is True
                assert put_profile(c, w.user, w.items(0))["profile_version"] == rows[w.user][4] + 1
            job = c.get(f"/jobs/{job_id}").json()
            assert job["status"] == "failed" and "restart" in job["error"], job
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("SELECT COUNT(*) FROM active_jobs").fetchone()[0] == 0  # the user may train again
        finally:
            conn.close()

    def test_graceful_shutdown_finishes_in_flight_requests_and_refuses_new_ones(self, sqlite_server):
        server = sqlite_server
        if server.proc is None or server.proc.poll() is not None:  # the crash test failed half-way
            server.stop()
            server.start()
        with server.client() as c:
            put_profile(c, "graceful", PROFILES["romance"])
            # Requests that take about 12 s, however busy the machine: long enough to be in flight
            # at the signal even if the load changes, short enough to finish within uvicorn's 30 s.
            generate(c, "graceful", "Tell me a long story.", max_tokens=4)  # the user's adapter: built and loaded
            took = []  # a short and a long request: their difference is the decoding rate alone,
            for n in (8, 136):  # without the fixed cost of a request (HTTP, prefill), which is not per token
                start = time.monotonic()
                assert generate(c, "graceful", "Tell me a long story.", max_tokens=n, min_tokens=n)["usage"]["completion_tokens"] == n
                took.append(time.monotonic() - start)
            per_token = max(1e-4, (took[1] - took[0]) / 128)
        n_tokens = int(min(3900, max(48, 12.0 / per_token)))  # 3900 + the prompt fit max_model_len
        started = [threading.Event() for _ in range(2)]
        finished = [threading.Event() for _ in range(3)]
        results: list[dict] = [{}, {}, {}]

        def stream(i: int) -> None:
            body = {"user_id": "graceful", "prompt": "Tell me a long story.", "max_tokens": n_tokens, "min_tokens": n_tokens, "stream": True}
            try:
                with httpx.Client(base_url=server.url, timeout=120) as c, c.stream("POST", "/generate", json=body) as r:
                    results[i]["status"] = r.status_code
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            started[i].set()
                            if line == "data: [DONE]":
                                results[i]["done"] = True
                            elif (event := json.loads(line[6:])).get("done"):
                                results[i]["final"] = event
            except httpx.HTTPError as e:
                results[i]["error"] = repr(e)
            finally:
                started[i].set()
                finished[i].set()

        def plain() -> None:  # not streamed: admitted before the signal, answered after it
            body = {
            "user": "graceful",
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": n_tokens,
            "min_tokens": n_tokens,  # EOS cannot end it early
        }
            try:
                with httpx.Client(base_url=server.url, timeout=120) as c:
                    r = c.post("/v1/chat/completions", json=body)
                    results[2] = {"status": r.status_code, "final": r.json()}
            except httpx.HTTPError as e:
                results[2]["error"] = repr(e)
            finally:
                finished[2].set()

        threads = [threading.Thread(target=plain, daemon=True)]
        threads += [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(2)]
        threads[0].start()
        time.sleep(0.5)
        for t in threads[1:]:
            t.start()
        assert all(e.wait(60) for e in started) and not any("error" in r for r in results[:2]), results

        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        refused, running_then = None, None
        while time.monotonic() - signalled < 10:
            try:
                httpx.get(f"{server.url}/healthz", timeout=2)  # a new connection each time
            # Refused outright, or (if the kernel had queued it just before the listener closed)
            # closed by the server without a response: either way the new request is not served.
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
                refused = time.monotonic() - signalled
                running_then = sum(not e.is_set() for e in finished)
                break
            time.sleep(0.02)
        assert refused is not None, "new connections were still accepted 10 s after SIGTERM"
        assert running_then, (
            "nothing was in flight when new connections were refused: the test proves nothing "
            f"({n_tokens} tokens at {per_token:.3f} s/token; refused {refused:.2f} s after SIGTERM)"
        )

        for t in threads:
            t.join(timeout=90)
        for r in results[:2]:
            assert r.get("status") == 200 and r.get("done") and "error" not in r, r
            assert r["final"]["finish_reason"] in ("length", "stop") and r["final"]["usage"]["completion_tokens"] > 0, r
        assert results[2].get("status") == 200, results[2]
        assert results[2]["final"]["choices"][0]["finish_reason"] in ("length", "stop")

        code = server.proc.wait(timeout=60)
        took = time.monotonic() - signalled
        # uvicorn re-raises the signal once it has shut down, so the exit status is SIGTERM's.
        assert code in (0, -signal.SIGTERM), server.log_tail()
        assert "Application shutdown complete." in server.log_path.read_text()
        assert took < 30 + 15, f"exit {took:.1f} s after SIGTERM: over uvicorn's 30 s graceful timeout + engine shutdown"
        server.stop()
