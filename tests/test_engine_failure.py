"""A dead engine never means endless 500s: requests get 503 and the server exits for its supervisor."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psutil

from server.api.app import ENGINE_DIED_EXIT_CODE

from .conftest import server_env
from .server_process import ServerProcess
from .test_api_e2e import PROFILES, PROMPT, put_profile


def engine_core(server: ServerProcess) -> psutil.Process:
    """vLLM's engine-core process, a child of the API process."""
    assert server.proc is not None
    children = psutil.Process(server.proc.pid).children(recursive=True)
    cores = [p for p in children if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert len(cores) == 1, [(p.name(), p.cmdline()) for p in children]
    return cores[0]


def test_a_killed_engine_gives_503_then_the_server_exits_non_zero(tmp_path, tiny_model_dir, tiny_bank):
    """Requests in flight when the engine core is SIGKILLed (a real crash; it is stopped first so
    that they are surely in flight) get a 503 naming the engine, never a 500, and the server then
    stops with ENGINE_DIED_EXIT_CODE so that its supervisor restarts it."""
    server = ServerProcess(tmp_path, server_env(tmp_path, tiny_model_dir, tiny_bank)).start()
    try:
        with server.client() as c:
            put_profile(c, "u-engine", PROFILES["space"])
            put_profile(c, "u-engine-2", PROFILES["romance"])
            ok = c.post("/generate", json={"user_id": "u-engine", "prompt": PROMPT, "max_tokens": 4})
            assert ok.status_code == 200, ok.text
            core = engine_core(server)
            core.suspend()
            with ThreadPoolExecutor(3) as pool:
                in_flight = [
                    pool.submit(c.post, "/generate", json={"user_id": user, "prompt": PROMPT, "max_tokens": 8})
                    for user in ("u-engine", "u-engine", "u-engine-2")
                ]
                time.sleep(2)
                early = [f.result().text for f in in_flight if f.done()]
                core.kill()
                assert not early, early
                answers = [f.result(timeout=60) for f in in_flight]
        assert [r.status_code for r in answers] == [503] * 3, [r.text for r in answers]
        assert all("engine" in r.json()["error"]["message"] for r in answers)
        assert server.proc.wait(timeout=60) == ENGINE_DIED_EXIT_CODE, server.log_tail()
        assert "the vLLM engine died" in server.log_text()
    finally:
        server.stop()
