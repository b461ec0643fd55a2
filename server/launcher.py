"""`mta serve` (or another `mta` command) in a subprocess on a free loopback port.

One launcher for the benchmarks and the tests: both drive the real server over real HTTP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`mta <args>` in its own process group; ready when /readyz answers 200, or on `ready_line` in its log.

    `executable` runs `-m server.cli` (a wrapper script can start it inside a namespace).
    """

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        args: tuple[str, ...] = ("serve",),
        *,
        ready_line: str | None = None,
        name: str | None = None,
        executable: str = sys.executable,
    ) -> None:
        self.workdir = workdir
        self.env = env
        self.args = args
        self.ready_line = ready_line
        self.executable = executable
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name or args[0]}-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    def start(self, timeout: float = 480) -> Self:
        env = {**os.environ, **self.env, "MTA_PORT": str(self.port), "MTA_HOST": "127.0.0.1"}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the server's log for its whole life
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            [self.executable, "-m", "server.cli", *self.args],
            cwd=self.workdir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._ready():
                self.start_seconds = time.perf_counter() - started
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        if self.ready_line is not None:
            return self.ready_line in self.log_text()
        import httpx

        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self, timeout: float = 60, sig: int = signal.SIGINT) -> int | None:
        """Signal the server and wait; SIGKILL its process group (only) after `timeout`. Returns its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self._log.close()
        return code

    def client(self, timeout: float = 120) -> Any:
        import httpx

        return httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
