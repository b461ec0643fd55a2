"""A real, throw-away `redis-server` for tests, and the fixtures built on it.

Not a conftest. Import each fixture in exactly one place per test tree (`tests/conftest.py`
imports `redis_url`): a session fixture imported in two modules is registered twice and
would start two servers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from server.launcher import free_port

from .prerequisites import missing

REDIS_URL_ENV = "MTA_TEST_REDIS_URL"
_START_TIMEOUT = 10.0


@dataclass
class RedisServer:
    """A `redis-server` child process on 127.0.0.1 without persistence."""

    port: int
    dir: Path
    args: tuple[str, ...] = ()  # more redis-server options, e.g. ("--maxmemory", "8mb")
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / f"redis-{self.port}.log"

    def start(self) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.process is not None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        command = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            *self.args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def stop(self) -> None:
        """Terminate the server (idempotent); `start()` brings it back on the same port."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _wait_ready(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + _START_TIMEOUT
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    self.process = None
                    raise RuntimeError(f"redis-server exited on start: {self.log_path.read_text(errors='replace')}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {_START_TIMEOUT} s")
                time.sleep(0.05)
        finally:
            client.close()


def start_redis_server(tmp_dir: str | Path, attempts: int = 3, args: tuple[str, ...] = ()) -> RedisServer:
    """Start a server on a free loopback port; retries if another process takes the port first."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        server = RedisServer(port=free_port(), dir=tmp_dir, args=args)
        try:
            server.start()
            return server
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def delete_prefix(url: str, prefix: str) -> None:
    """Delete a test's keys only, so a shared `MTA_TEST_REDIS_URL` server is safe (no FLUSHALL)."""
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`MTA_TEST_REDIS_URL` if set, else a session-wide server started here."""
    if url := os.environ.get(REDIS_URL_ENV):
        yield url
        return
    if shutil.which("redis-server") is None:
        missing("redis", f"redis-server is not installed and {REDIS_URL_ENV} is unset")
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_key_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to one test; its keys are deleted afterwards."""
    prefix = f"mta-test:{uuid.uuid4().hex}:"
    yield prefix
    delete_prefix(redis_url, prefix)


@pytest.fixture
def private_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server this test alone owns, so it may stop and restart it (needs redis-server)."""
    if shutil.which("redis-server") is None:
        missing("redis", "redis-server is not installed (needed to stop and restart a server)")
    server = start_redis_server(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()
