"""Scale-out on one machine (issue 15): two `mta serve` replicas and one `mta worker` on one real
`redis-server` (AOF on), behind HAProxy running `deploy/haproxy/haproxy.cfg`, the single-host form
of `deploy/k8s/ingress.yaml`: each user sticks to a replica by consistent hashing on `X-User-Id`.

Every user request goes through the proxy. To send a request to a chosen replica, the test sets
`X-User-Id` to a routing key that the proxy hashes onto that replica (found by asking the proxy);
the body names the real user, as a gateway would set the header from it. Admin calls (bank
reload) go to each replica's own port, as `docs/deploy.md` says to do: the proxy does not route
`/admin`. The scenarios share one cluster and run in file order; the replica kill comes last.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server.launcher import free_port

from .conftest import server_env
from .prerequisites import missing
from .redis_server import RedisServer, start_redis_server
from .server_process import ADMIN_TOKEN, ServerProcess
from .test_api_e2e import PROFILES, PROMPT
from .test_finetune import EXAMPLES, FAST

REPO = Path(__file__).resolve().parents[1]
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
REPLICAS = ("replica-1", "replica-2")  # the `server` names in haproxy.cfg
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TIMEOUT = 60.0


@dataclass
class Proxy:
    """HAProxy in the foreground with the repository's configuration."""

    workdir: Path
    replicas: dict[str, ServerProcess]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Proxy:
        env = {**os.environ, "MTA_PROXY_BIND": f"127.0.0.1:{self.port}"}
        env |= {f"MTA_REPLICA_{i}": f"127.0.0.1:{r.port}" for i, r in enumerate(self.replicas.values(), 1)}
        log = open(self.workdir / "haproxy.log", "ab")  # noqa: SIM115 - for the proxy's whole life
        self.proc = subprocess.Popen(["haproxy", "-f", str(HAPROXY_CFG), "-db"], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while set(self.routes()) != set(REPLICAS):  # both replicas pass the proxy's health check
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy: {(self.workdir / 'haproxy.log').read_text(errors='replace')}")
            time.sleep(0.5)
        return self

    def routes(self, keys: int = 64) -> dict[str, str]:
        """A routing key (an `X-User-Id` value) per replica the proxy currently sends requests to."""
        found: dict[str, str] = {}
        for k in range(keys):
            try:
                r = httpx.get(f"{self.url}/healthz", headers={"X-User-Id": f"route-{k}"}, timeout=5)
            except httpx.HTTPError:
                return found
            if r.status_code == 200:
                found.setdefault(r.headers["X-Served-By"], f"route-{k}")
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class Cluster:
    redis: RedisServer
    replicas: dict[str, ServerProcess]
    worker: ServerProcess
    proxy: Proxy
    banks: Path  # holds the bank versions and the `current` symlink the replicas load
    route: dict[str, str]  # replica name -> an X-User-Id value the proxy hashes onto it

    def via(self, replica: str) -> httpx.Client:
        """A client whose requests the proxy sends to `replica`."""
        return httpx.Client(base_url=self.proxy.url, headers={"X-User-Id": self.route[replica]}, timeout=TIMEOUT)

    def home(self, user: str) -> str:
        """The replica the proxy sends `user` to when the header is the user's own id."""
        return httpx.get(f"{self.proxy.url}/healthz", headers={"X-User-Id": user}, timeout=5).headers["X-Served-By"]

    def bank_version(self, replica: str) -> str:
        return httpx.get(f"{self.replicas[replica].url}/admin/bank", headers=ADMIN, timeout=10).json()["bank_version"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir, make_bank) -> Iterator[Cluster]:
    if shutil.which("haproxy") is None:
        missing("proxy", "haproxy is not installed")
    if shutil.which("redis-server") is None:
        missing("redis", "redis-server is not installed")
    tmp = tmp_path_factory.mktemp("replicas")
    banks = tmp / "banks"
    banks.mkdir()
    for version in ("v1", "v2"):
        (banks / version).symlink_to(make_bank(f"replicas-{version}", bank_version=f"replicas-{version}", seed=len(version) + (version == "v2")))
    (banks / "current").symlink_to("v1")
    # AOF with an fsync per write: whatever Redis acknowledged survives its restart.
    redis = start_redis_server(tmp / "redis", args=("--appendonly", "yes", "--appendfsync", "always"))
    started: list[ServerProcess] = []
    proxy = None
    try:

        def process(name: str, args: tuple[str, ...] = ("serve",), **kw) -> ServerProcess:
            workdir = tmp / name
            workdir.mkdir()
            env = server_env(
                workdir, tiny_model_dir, banks / "current",
                MTA_STORE_URL=redis.url, MTA_FINETUNE_RUNNER="worker", MTA_FINETUNE_QUEUE_SIZE="8",
            )  # fmt: skip
            proc = ServerProcess(workdir, env, args, name=name, **kw)
            started.append(proc)
            return proc

        replicas = {name: process(name) for name in REPLICAS}
        worker = process("worker", ("worker",), ready_line="worker ready")
        with ThreadPoolExecutor(3) as pool:  # the three start side by side
            for future in [pool.submit(p.start) for p in (*replicas.values(), worker)]:
                future.result()
        proxy = Proxy(tmp, replicas).start()
        yield Cluster(redis, replicas, worker, proxy, banks, proxy.routes())
    finally:
        if proxy is not None:
            proxy.stop()
        for proc in started:
            proc.stop()
        redis.stop()


def generate(c: httpx.Client, user: str, headers: dict | None = None) -> httpx.Response:
    return c.post("/generate", json={"user_id": user, "prompt": PROMPT, "max_tokens": 8}, headers=headers)


def served(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json() | {"served_by": r.headers["X-Served-By"]}


def put_profile(c: httpx.Client, user: str, items: list[dict]) -> dict:
    r = c.put(f"/users/{user}/profile", json={"items": items})
    assert r.status_code == 200, r.text
    return r.json()


def finetune(cluster: Cluster, user: str, through: str, status_via: str) -> dict:
    """A fine-tune submitted through one replica, followed through another until it ends."""
    with cluster.via(through) as c:
        r = c.post(f"/users/{user}/finetune", json={"examples": EXAMPLES, **FAST})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
    with cluster.via(status_via) as c:
        deadline = time.monotonic() + 180
        while (job := c.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
    assert job["status"] == "succeeded", job
    return job


def test_a_profile_written_through_one_replica_is_served_by_the_other(cluster):
    one, other = REPLICAS
    with cluster.via(one) as c:
        put_profile(c, "mr-profile", PROFILES["space"])
        here = served(generate(c, "mr-profile"))
    with cluster.via(other) as c:
        there = served(generate(c, "mr-profile"))
    assert (here["served_by"], there["served_by"]) == (one, other)
    assert here["personalized"] and there["personalized"]
    # Same profile, same bank, same model, greedy: the same adapter and the same tokens.
    assert there["anchors"] == here["anchors"] and there["token_ids"] == here["token_ids"]


def test_a_fine_tune_through_one_replica_is_trained_by_the_worker_and_served_by_the_other(cluster):
    one, other = REPLICAS
    with cluster.via(one) as c:
        put_profile(c, "mr-tuned", PROFILES["crime"])
        before = served(generate(c, "mr-tuned"))
    job = finetune(cluster, "mr-tuned", through=one, status_via=other)
    assert f"fine-tune {job['job_id']} of user 'mr-tuned' succeeded" in cluster.worker.log_text()  # trained there
    with cluster.via(other) as c:
        after = served(generate(c, "mr-tuned"))
    assert after["served_by"] == other and after["stacked"] is True
    assert after["stacked_version"] == job["stacked_version"] and after["token_ids"] != before["token_ids"]


def test_a_delete_through_one_replica_stops_the_other_at_once(cluster):
    one, other = REPLICAS
    with cluster.via(one) as c:
        put_profile(c, "mr-deleted", PROFILES["romance"])
    finetune(cluster, "mr-deleted", through=one, status_via=one)
    entries = {}
    for replica in REPLICAS:  # both replicas serve the user's stacked adapter and hold it in their cache
        with cluster.via(replica) as c:
            out = served(generate(c, "mr-deleted"))
        assert out["personalized"] and out["stacked"], out
        entries[replica] = adapter_cache(cluster, replica)["entries"]
    with cluster.via(one) as c:
        assert c.delete("/users/mr-deleted").status_code == 204
    with cluster.via(other) as c:  # at once: the next request on the other replica
        out = served(generate(c, "mr-deleted"))
        assert not out["personalized"] and not out["stacked"] and out["anchors"] == [], out
        assert c.get("/users/mr-deleted").status_code == 404
    # Neither replica keeps the user's stacked adapter in its cache (the other one learns of the
    # delete from Redis); the fused adapter is the neighbourhood's, not the user's, and stays.
    for replica in REPLICAS:
        deadline = time.monotonic() + 5
        while adapter_cache(cluster, replica)["entries"] >= entries[replica]:
            assert time.monotonic() < deadline, f"{replica} still caches the deleted user's stacked adapter"
            time.sleep(0.1)


def adapter_cache(cluster: Cluster, replica: str) -> dict:
    return httpx.get(f"{cluster.replicas[replica].url}/admin/bank", headers=ADMIN, timeout=10).json()["adapter_cache"]


@dataclass
class Traffic:
    """Requests through the proxy from several threads until stopped: generations for `users`
    (each with its own id as `X-User-Id`) and, with `writers`, profile rewrites whose items carry
    the write's number. Every request is recorded with its start and end time."""

    proxy: Proxy
    users: list[str]
    writers: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    records: list[dict] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        self.threads = [threading.Thread(target=self.generations, args=(i,), daemon=True) for i in range(3)]
        self.threads += [threading.Thread(target=self.writes, args=(w,), daemon=True) for w in self.writers]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(TIMEOUT + 10)

    def generations(self, worker: int) -> None:
        n = worker
        with httpx.Client(base_url=self.proxy.url, timeout=TIMEOUT) as c:
            while not self.stop.is_set():
                user = self.users[n % len(self.users)]
                n += 1
                self.request("generate", user, lambda: generate(c, user, headers={"X-User-Id": user}))

    def request(self, kind: str, user: str, send: Callable[[], httpx.Response]) -> httpx.Response | None:
        record = {"kind": kind, "user": user, "start": time.monotonic()}
        try:
            r = send()
            record |= {"status": r.status_code, "served_by": r.headers.get("X-Served-By")}
            if r.status_code == 200:
                body = r.json()
                record |= {"bank_version": body["bank_version"]} if kind == "generate" else {"version": body["profile_version"]}
        except httpx.HTTPError as e:
            record["error"] = f"{type(e).__name__}: {e}"
            r = None
        record["end"] = time.monotonic()
        self.records.append(record)
        return r

    def writes(self, user: str) -> None:
        k = 0
        with httpx.Client(base_url=self.proxy.url, headers={"X-User-Id": user}, timeout=TIMEOUT) as c:
            while not self.stop.is_set():
                k += 1
                items = [{"description": f"{user} write {k}: a crew explores a distant planet.", "tag": f"w{k}"}]
                self.request("write", user, lambda: c.put(f"/users/{user}/profile", json={"items": items}))
                time.sleep(0.05)

    def failed(self, since: float = 0.0) -> list[dict]:
        return [r for r in self.records if r["start"] >= since and r.get("status") != 200]

    def acked_versions(self, writer: str) -> list[int]:
        """Profile versions acknowledged to `writer`, in the order it sent the writes."""
        return [r["version"] for r in self.records if r["kind"] == "write" and r["user"] == writer and r.get("status") == 200]


def users_on_each_replica(cluster: Cluster, prefix: str, per_replica: int = 2) -> dict[str, list[str]]:
    """User ids whose own `X-User-Id` the proxy sends to each replica, `per_replica` of each."""
    homes: dict[str, list[str]] = {name: [] for name in REPLICAS}
    k = 0
    while min(map(len, homes.values())) < per_replica:
        user = f"{prefix}-{k}"
        k += 1
        if len(home := homes[cluster.home(user)]) < per_replica:
            home.append(user)
    return homes


def with_profiles(cluster: Cluster, homes: dict[str, list[str]]) -> list[str]:
    users = [u for us in homes.values() for u in us]
    with httpx.Client(base_url=cluster.proxy.url, timeout=TIMEOUT) as c:
        for i, user in enumerate(users):
            r = c.put(f"/users/{user}/profile", json={"items": list(PROFILES.values())[i % len(PROFILES)]}, headers={"X-User-Id": user})
            assert r.status_code == 200, r.text
    return users


def test_a_bank_rollout_to_every_replica_under_load_fails_no_request(cluster):
    users = with_profiles(cluster, users_on_each_replica(cluster, "mr-rollout"))
    old, new = (f"replicas-{v}" for v in ("v1", "v2"))
    assert {cluster.bank_version(r) for r in REPLICAS} == {old}
    reloaded: dict[str, tuple[float, float]] = {}
    with Traffic(cluster.proxy, users) as traffic:
        time.sleep(2)
        # docs/deploy.md, "Rolling out a new bank": point `current` at the new bank atomically,
        # then reload every replica on its own port, naming the path.
        link = cluster.banks / ".current.tmp"
        link.symlink_to("v2")
        os.replace(link, cluster.banks / "current")
        for name, replica in cluster.replicas.items():
            asked = time.monotonic()
            r = httpx.post(f"{replica.url}/admin/bank/reload", json={"path": str(cluster.banks / "current")}, headers=ADMIN, timeout=120)
            assert r.status_code == 200 and r.json()["bank_version"] == new, r.text
            reloaded[name] = (asked, time.monotonic())
            time.sleep(2)
        # Traffic goes on until every replica has answered twice on the new bank (a loaded machine
        # may take longer than the pause above for that), bounded.
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not all(
            sum(r.get("served_by") == name and r.get("bank_version") == new for r in list(traffic.records)) >= 2
            for name in REPLICAS
        ):
            time.sleep(0.5)
    assert not traffic.failed(), traffic.failed()[:5]
    seen: Counter = Counter()
    for record in traffic.records:
        asked, done = reloaded[record["served_by"]]
        # A request answered before its replica was told to reload ran on the old bank; one sent
        # after the reload returned, on the new one; one overlapping the reload, on either.
        expected = {old} if record["end"] < asked else {new} if record["start"] > done else {old, new}
        assert record["bank_version"] in expected, (record, reloaded)
        seen[record["served_by"], record["bank_version"]] += 1
    assert all(seen[r, v] >= 2 for r in REPLICAS for v in (old, new)), seen
    assert {cluster.bank_version(r) for r in REPLICAS} == {new}
    print(f"bank rollout under load: {len(traffic.records)} requests, 0 failed; {dict(seen)}")


def test_a_redis_restart_under_load_is_a_503_and_recovers_without_losing_anything(cluster):
    homes = users_on_each_replica(cluster, "mr-outage")
    users = with_profiles(cluster, homes)
    writers = [us[0] for us in users_on_each_replica(cluster, "mr-outage-writer", 1).values()]
    before = finetune(cluster, users[0], through=REPLICAS[0], status_via=REPLICAS[1])  # acknowledged and done
    with Traffic(cluster.proxy, users, writers) as traffic:
        time.sleep(2)
        down = time.monotonic()
        cluster.redis.stop()
        time.sleep(3)
        cluster.redis.start()  # same port and directory: it reloads its append-only file
        up = time.monotonic()
        deadline = up + 30
        while {(r["kind"], r["served_by"]) for r in traffic.records if r["start"] > up and r.get("status") == 200} != {
            (kind, name) for kind in ("generate", "write") for name in REPLICAS
        }:
            assert time.monotonic() < deadline, "the replicas did not recover from the Redis restart"
            time.sleep(0.2)
        time.sleep(1)
    statuses = Counter(r.get("status", r.get("error")) for r in traffic.records)
    assert set(statuses) <= {200, 503}, statuses  # an outage is a 503, never a 500 or a dropped connection
    assert any(r.get("status") == 503 and down <= r["start"] <= up for r in traffic.records), statuses
    for writer in writers:  # a lost write would hand out one of its versions again
        versions = traffic.acked_versions(writer)
        assert versions == sorted(set(versions)) and len(versions) >= 4, versions
    with cluster.via(REPLICAS[1]) as c:  # the job and stacked LoRA acknowledged before it survive
        assert c.get(f"/jobs/{before['job_id']}").json()["status"] == "succeeded"
        assert served(generate(c, users[0]))["stacked_version"] == before["stacked_version"]
    finetune(cluster, users[1], through=REPLICAS[1], status_via=REPLICAS[0])  # the worker recovered too
    recovered = min(r["end"] for r in traffic.records if r["start"] > up and r.get("status") == 200) - up
    print(
        f"Redis restarted under load (down {up - down:.1f} s): {len(traffic.records)} requests, "
        f"{statuses[503]} answered 503, none lost; first success {recovered:.2f} s after Redis was back"
    )


def test_a_replica_killed_under_load_hands_its_users_to_the_other_and_loses_no_write(cluster):
    survivor, victim = REPLICAS
    homes = users_on_each_replica(cluster, "mr-kill")
    users = with_profiles(cluster, homes)
    writers = [us[0] for us in users_on_each_replica(cluster, "mr-kill-writer", 1).values()]
    with cluster.via(victim) as c:  # a job accepted by the replica about to die
        r = c.post(f"/users/{homes[victim][0]}/finetune", json={"examples": EXAMPLES, **FAST})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
    with Traffic(cluster.proxy, users, writers) as traffic:
        time.sleep(2)
        killed = time.monotonic()
        os.killpg(cluster.replicas[victim].proc.pid, signal.SIGKILL)  # the replica and its engine, as a pod dies
        time.sleep(5)
    failed = traffic.failed()
    # Only requests running on the dying replica may fail (and the proxy answers them 502/503):
    # the proxy sends every later one to the survivor.
    assert all(f["start"] < killed + 0.5 for f in failed), failed
    assert len(failed) <= len(traffic.threads), failed
    after = [r for r in traffic.records if r["start"] > killed + 0.5]
    assert after and all(r["served_by"] == survivor for r in after)
    assert {r["user"] for r in after if r["kind"] == "generate"} >= set(homes[victim])
    with cluster.via(survivor) as c:
        for user in homes[victim]:  # its users, personalized by the survivor
            assert served(generate(c, user))["personalized"] is True
        for writer in writers:  # every acknowledged write is there
            versions = traffic.acked_versions(writer)
            assert versions == sorted(set(versions)) and versions, versions
            assert c.get(f"/users/{writer}").json()["profile_version"] >= versions[-1]
        deadline = time.monotonic() + 180  # and the accepted job is trained by the worker
        while (job := c.get(f"/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "succeeded", job
    print(f"replica killed under load: {len(traffic.records)} requests, {len(failed)} failed (in flight on it)")
