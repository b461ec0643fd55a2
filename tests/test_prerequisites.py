"""A missing test prerequisite skips on a developer's machine and fails where it is required (CI)."""

from __future__ import annotations

import pytest

from .prerequisites import PREREQUISITES, REQUIRE_ENV, missing, required


def test_a_missing_prerequisite_skips_unless_required(monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "")
    with pytest.raises(pytest.skip.Exception, match="redis: no redis-server"):
        missing("redis", "no redis-server")
    monkeypatch.setenv(REQUIRE_ENV, "kernel, redis")
    with pytest.raises(pytest.fail.Exception, match="required test prerequisite 'redis' is missing"):
        missing("redis", "no redis-server")
    with pytest.raises(pytest.skip.Exception):
        missing("userns", "no namespaces")  # not in the list: still a skip


def test_all_requires_every_prerequisite_and_a_misspelt_name_is_an_error(monkeypatch):
    monkeypatch.setenv(REQUIRE_ENV, "all")
    assert required() == set(PREREQUISITES)
    with pytest.raises(pytest.fail.Exception):
        missing("compose", "no compose CLI")
    monkeypatch.setenv(REQUIRE_ENV, "redis,kernal")
    with pytest.raises(pytest.UsageError, match="kernal"):
        required()


def test_ci_requires_every_prerequisite():
    """`.ci/run` is what CI runs: it must not let a missing prerequisite pass as a skip."""
    from pathlib import Path

    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert 'MTA_TEST_REQUIRE="${MTA_TEST_REQUIRE:-all}"' in ci and "make test" in ci.split("MTA_TEST_REQUIRE")[-1]
