"""What a test needs from the machine: skipped where it is missing, unless it is required.

On a developer's machine a test whose prerequisite is missing (no `redis-server`, no C++
compiler or AVX512-BF16 for the kernel, ...) is skipped. `MTA_TEST_REQUIRE` (comma-separated
names below, or `all`) turns those skips into failures; `.ci/run` sets `all`, so CI can never
pass by skipping.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_ENV = "MTA_TEST_REQUIRE"
PREREQUISITES = {
    "redis": "a redis-server binary (or MTA_TEST_REDIS_URL)",
    "kernel": "the C++ LoRA kernel built (a C++ compiler and an AVX512-BF16 CPU)",
    "userns": "unprivileged user + mount namespaces (unshare -Urm) to mount a tmpfs",
    "compose": "the compose-spec validator and a Docker Compose v2 CLI (the `test` extra)",
    "proxy": "haproxy, the reverse proxy of the multi-replica test (deploy/haproxy/haproxy.cfg)",
    "kubectl": "kubectl, to check the Python kustomize rendering against `kubectl kustomize`",
}


def required() -> set[str]:
    """The prerequisites named by `MTA_TEST_REQUIRE`; an unknown name is an error, not ignored."""
    names = {n.strip() for n in os.environ.get(REQUIRE_ENV, "").split(",") if n.strip()}
    if "all" in names:
        return set(PREREQUISITES)
    if unknown := names - set(PREREQUISITES):
        raise pytest.UsageError(f"{REQUIRE_ENV}: unknown prerequisite(s) {sorted(unknown)}; known: {sorted(PREREQUISITES)} or all")
    return names


def missing(name: str, reason: str) -> NoReturn:
    """Skip the test for a missing prerequisite, or fail it when `MTA_TEST_REQUIRE` requires it."""
    assert name in PREREQUISITES, name
    if name in required():
        pytest.fail(f"required test prerequisite {name!r} is missing ({REQUIRE_ENV}): {reason}", pytrace=False)
    pytest.skip(f"{name}: {reason}")
