"""Server lifecycle: restarts keep users (both stores); a failed start exits with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import server_env
from .server_process import ServerProcess
from .test_api_e2e import PROFILES, generate, put_profile


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_restart_keeps_users(backend, request, tmp_path, tiny_model_dir, tiny_bank):
    extra = {}
    if backend == "redis":
        extra["MTA_STORE_URL"] = request.getfixturevalue("redis_url")
    proc = ServerProcess(tmp_path, server_env(tmp_path, tiny_model_dir, tiny_bank, **extra))
    proc.start()
    try:
        with proc.client() as c:
            put_profile(c, f"restart-{backend}", PROFILES["romance"])
            first = generate(c, f"restart-{backend}")
        assert proc.stop() == 0
        proc.start()
        with proc.client() as c:
            view = c.get(f"/users/restart-{backend}").json()
            assert view["profile_items"] == 2 and view["anchors"][0]["id"] == "romance"
            again = generate(c, f"restart-{backend}")
            assert again["token_ids"] == first["token_ids"] and again["adapter"]["cache_hit"] is False
    finally:
        proc.stop()


def test_engine_that_cannot_start_exits_with_the_reason(tmp_path, tiny_model_dir, tiny_bank):
    import json
    import shutil

    broken = Path(shutil.copytree(tiny_model_dir, tmp_path / tiny_model_dir.name))
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    proc = ServerProcess(tmp_path, server_env(tmp_path, broken, tiny_bank))
    with pytest.raises(RuntimeError) as e:
        proc.start(timeout=180)
    assert "exited with 3" in str(e.value)
    assert "cannot start: vLLM engine failed to start" in proc.log_path.read_text()
