"""What operators look at: the Grafana dashboard and the Prometheus alert rules in deploy/.

Every metric their PromQL queries is one the server exports: the names come from the registry of
the `Metrics` object the server builds (server/api/app.py), walked in-process, with the suffixes
the exposition adds (counter `_total`, histogram `_bucket`/`_sum`/`_count`), and once from a real
server's /metrics. `promtool` is not needed: the rule file is checked in Python (structure,
durations, templates, functions and metrics). The metrics behind the job and state panels are
checked where they change: real job service and runner on SQLite, a real adapter cache.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import JobMetrics, Metrics

from .conftest import THEMES, job_services

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "mta-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "mta-alerts.yaml"

# --- metric names in PromQL ------------------------------------------------------------------------

# PromQL functions and aggregation operators (Prometheus 2.x/3.x): an identifier followed by "(".
PROMQL_FUNCTIONS = frozenset(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month
    deg delta deriv double_exponential_smoothing exp floor histogram_avg histogram_count
    histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
    holt_winters hour idelta increase info irate label_join label_replace last_over_time ln log10
    log2 mad_over_time max_over_time min_over_time minute month predict_linear present_over_time
    quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label
    sort_by_label_desc sort_desc sqrt start end stddev_over_time stdvar_over_time sum_over_time tan
    tanh time timestamp vector year
    sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio""".split()
)
# Keywords and literals that are not metric names when they stand alone.
PROMQL_KEYWORDS = frozenset(
    "by without on ignoring group_left group_right bool and or unless offset atan2 inf nan".split()
)
_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
_SELECTOR = re.compile(r"\{(?:[^{}\"'`]|" + _STRING + r")*\}")
_NAME_MATCHER = re.compile(r"__name__\s*(=~|!=|!~|=)\s*(" + _STRING + ")")
_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$([A-Za-z_]\w*)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.I)
_OFFSET = re.compile(r"\boffset\s+-?(?:\d+(?:\.\d+)?(?:ms|[smhdwy])?)+", re.I)
_AT = re.compile(r"@\s*(?:[-+]?\d+(?:\.\d+)?|start\s*\(\s*\)|end\s*\(\s*\))")
_NUMBER = re.compile(r"(?<![\w:.])(?:0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# Grafana's built-in variables (the rest must be the dashboard's own).
GRAFANA_GLOBALS = frozenset(
    "__interval __interval_ms __rate_interval __range __range_s __range_ms __from __to __dashboard __org __user".split()
)


def grafana_variables(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _GRAFANA_VARIABLE.finditer(expr)}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana variables allowed) selects.

    Strings, label matchers (`{...}`), ranges and subqueries (`[...]`), grouping label lists
    (`by (...)`, `on (...)`, ...), offsets, `@` modifiers and numbers are removed; then an
    keyword (`and`, `by`, ...) is skipped, any other identifier followed by `(` must be a PromQL
    function, and the rest are metric names. A selector `{__name__="x"}` names `x`; a regex on `__name__`
    (which no check can resolve) and unbalanced brackets are errors.
    """
    names: set[str] = set()
    unquoted = re.sub(_STRING, '""', expr)
    for bracket in ("()", "[]", "{}"):
        assert unquoted.count(bracket[0]) == unquoted.count(bracket[1]), f"unbalanced {bracket} in {expr!r}"

    def selector(m: re.Match[str]) -> str:
        for op, value in _NAME_MATCHER.findall(m.group(0)):
            if op != "=":
                raise ValueError(f"__name__{op} cannot be checked: use the metric name in {expr!r}")
            names.add(value[1:-1])
        return " "

    text = _SELECTOR.sub(selector, _GRAFANA_VARIABLE.sub(" ", expr))
    text = re.sub(_STRING, " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _AT.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    for m in _IDENTIFIER.finditer(text):
        word = m.group(0)
        if word.lower() in PROMQL_KEYWORDS:  # also before a parenthesis: `and (...)`
            continue
        if text[m.end() :].lstrip().startswith("("):
            if word not in PROMQL_FUNCTIONS:
                raise ValueError(f"unknown PromQL function {word!r} in {expr!r}")
        else:
            names.add(word)
    return names


@pytest.mark.parametrize(
    "expr, names",
    [
        ("up", {"up"}),
        ('rate(mta_requests_total{route!~"/healthz|/readyz", status=~"5.."}[5m])', {"mta_requests_total"}),
        (
            "histogram_quantile(0.95, sum by (le, route) (rate(mta_request_latency_seconds_bucket[$__rate_interval])))",
            {"mta_request_latency_seconds_bucket"},
        ),
        ("sum(rate(a_total[5m])) by (instance) / on (instance) group_left (x) b", {"a_total", "b"}),
        ("max(q) - max(q offset 30m) > 1e3 and on () resets(q[30m:1m]) == 0", {"q"}),
        ('{__name__="by_name", instance=~"$instance"} @ end()', {"by_name"}),
        ('label_replace(x, "dst", "$1", "src", "(.*)") or vector(0)', {"x"}),
        ('count(mta_finetune_runner_up{instance=~"${instance:regex}"} == 0) or vector(0)', {"mta_finetune_runner_up"}),
        ("sum without (route, status) (rate(x_total[1h])) * 3600 > bool 0.5", {"x_total"}),
        ("topk(3, sum by (le) (y)) unless z", {"y", "z"}),
        ("a > 0 and (b - c) < 1 or(d)", {"a", "b", "c", "d"}),
    ],
)
def test_metric_names_from_promql(expr, names):
    assert metric_names(expr) == names


@pytest.mark.parametrize(
    "expr, error",
    [
        ("rat(x[5m])", "unknown PromQL function 'rat'"),
        ('{__name__=~"mta_.*"}', "cannot be checked"),
        ("sum(rate(x[5m])", "unbalanced ()"),
    ],
)
def test_metric_names_refuses_what_it_cannot_check(expr, error):
    with pytest.raises((ValueError, AssertionError), match=re.escape(error)):
        metric_names(expr)


# --- what the server exports ------------------------------------------------------------------------

# The sample names a metric family of each type is exposed under.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def exported_names(families) -> set[str]:
    """Names a query can select: each family's names by its type (also for a family with no
    samples yet, e.g. a labelled counter before its first increment) and every sample's name."""
    names: set[str] = set()
    for family in families:
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """The names of the `Metrics` the server builds, from its registry; the walk agrees with the
    exposition /metrics sends (`generate_latest`, parsed back)."""
    metrics = Metrics()
    names = exported_names(metrics.registry.collect())
    assert names == exported_names(text_string_to_metric_families(metrics.render().decode()))
    return names


def test_exported_names_include_the_suffixes(exported):
    assert {"mta_requests_total", "mta_request_latency_seconds_bucket", "mta_request_latency_seconds_count"} <= exported
    assert {"mta_fusion_seconds_sum", "mta_bank_info", "mta_adapter_cache_evictions_total"} <= exported
    assert "mta_requests" not in exported and "mta_bank_info_total" not in exported


# --- the dashboard ----------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels, those inside collapsed rows included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and query variable."""
    queries = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            queries.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            m = re.fullmatch(r"label_values\((?:(.+),)?\s*(\w+)\s*\)", query.strip())
            assert m, f"variable {variable['name']}: only label_values(metric, label) is checked: {query!r}"
            queries.append((f"variable {variable['name']!r}", m.group(1) or ""))
    return queries


def test_dashboard_is_an_importable_grafana_dashboard():
    d = load_dashboard()
    assert d.get("id") is None, "an id ties the JSON to one Grafana instance: leave it out"
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds_vars = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(ds_vars) == 1 and ds_vars[0]["query"] == "prometheus", ds_vars
    ds_ref = {"type": "prometheus", "uid": "${%s}" % ds_vars[0]["name"]}
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for panel in panels(d):
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, panel["title"]
        for other_title, o in boxes:  # no two panels on the same cells
            across = g["x"] < o["x"] + o["w"] and o["x"] < g["x"] + g["w"]
            down = g["y"] < o["y"] + o["h"] and o["y"] < g["y"] + g["h"]
            assert not (across and down), f"panels {panel['title']!r} and {other_title!r} overlap"
        boxes.append((panel["title"], g))
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), panel
        assert panel["datasource"] == ds_ref, panel["title"]
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == ds_ref and target["expr"].strip(), (panel["title"], target)
    for annotation in d["annotations"]["list"]:
        if "expr" in annotation:
            assert annotation["datasource"] == ds_ref, annotation
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == ds_ref, variable


def test_dashboard_queries_only_exported_metrics(exported):
    d = load_dashboard()
    defined = {v["name"] for v in d["templating"]["list"]}
    queried: set[str] = set()
    for where, expr in dashboard_queries(d):
        names = metric_names(expr)
        assert names or where.startswith("variable"), f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where} queries metrics the server does not export: {sorted(names - exported)}"
        unknown = grafana_variables(expr) - defined - GRAFANA_GLOBALS
        assert not unknown, f"{where} uses undefined variables {sorted(unknown)}"
        queried |= names
    # What issue 15 asks operators to see.
    wanted = {
        "mta_requests_total",  # request rate, errors by status
        "mta_request_latency_seconds_bucket",  # latency quantiles
        "mta_adapter_cache_hits_total",  # hit rate
        "mta_adapter_cache_misses_total",
        "mta_adapter_cache_bytes",  # cache bytes
        "mta_fusion_seconds_bucket",  # fusion time
        "mta_finetune_queue_depth",  # jobs queued
        "mta_finetune_jobs_running",  # running
        "mta_finetune_jobs_finished_total",  # failed
        "mta_engine_requests",  # engine load
    }
    assert wanted <= queried, sorted(wanted - queried)


# --- the alert rules --------------------------------------------------------------------------------

_DURATION = re.compile(r"^(?:\d+(?:ms|s|m|h|d|w|y))+$")
_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.S)
_TEMPLATE_REF = re.compile(r"\$labels\.(\w+)|\$(value|externalLabels|externalURL)\b")
_AGGREGATIONS = re.compile(r"\b(?:sum|min|max|avg|count|group|stddev|stdvar|topk|bottomk|quantile)\s*(?:by|without|\()")


def load_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert isinstance(doc, dict) and set(doc) == {"groups"}, "a rule file holds `groups:` only"
    groups = doc["groups"]
    assert isinstance(groups, list) and groups
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names)), "group names must be unique"
    rules = []
    for group in groups:
        assert set(group) <= {"name", "interval", "rules", "limit", "query_offset"}, group.keys()
        assert isinstance(group["name"], str) and group["name"]
        assert isinstance(group["rules"], list) and group["rules"], group["name"]
        rules.extend(group["rules"])
    return rules


def test_alert_rules_have_the_prometheus_structure():
    rules = load_rules()
    alerts = [r["alert"] for r in rules]
    assert len(alerts) == len(set(alerts)), "alert names must be unique"
    for rule in rules:
        name = rule.get("alert")
        assert isinstance(name, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), rule
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, (name, rule.keys())
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
        assert isinstance(rule["for"], str) and _DURATION.match(rule["for"]), (name, rule.get("for"))
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert all(isinstance(v, str) for v in rule["labels"].values()), name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and len(annotations["description"].strip()) > 40, name
        aggregated = bool(_AGGREGATIONS.search(rule["expr"]))
        for text in annotations.values():
            assert text.count("{{") == text.count("}}"), (name, text)
            for template in _TEMPLATE.findall(text):
                refs = _TEMPLATE_REF.findall(template)
                assert refs, f"{name}: template {{{{{template}}}}} names no $labels.x or $value"
                for label, _ in refs:
                    # A label survives an aggregation only if it is grouped by (heuristic: by (... label ...)).
                    if label and aggregated:
                        assert re.search(rf"\bby\s*\([^)]*\b{label}\b", rule["expr"]), (name, label)


def test_alert_rules_query_only_exported_metrics(exported):
    covered: set[str] = set()
    for rule in load_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = sorted(names - exported)
        assert not unknown, f"{rule['alert']} queries metrics the server does not export: {unknown}"
        covered |= names
    # error rate, queue depth, dead worker / runner, cache thrash
    assert {
        "mta_requests_total",
        "mta_finetune_queue_depth",
        "mta_finetune_runner_up",
        "mta_adapter_cache_misses_total",
    } <= covered


# --- the state the new panels show, where it changes ----------------------------------------------


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_adapter_cache_and_engine_gauges_read_the_live_objects(tmp_path):
    from server.adapter_cache import AdapterCache, AdapterKey

    metrics = Metrics()
    assert sample(metrics, "mta_adapter_cache_bytes") is None  # exported, no sample until watched
    cache = AdapterCache(tmp_path / "adapters", capacity=2)
    metrics.watch_adapter_cache(cache)
    assert sample(metrics, "mta_adapter_cache_bytes") == 0 and sample(metrics, "mta_adapter_cache_entries") == 0
    assert sample(metrics, "mta_adapter_cache_capacity") == 2

    def key(i: int) -> AdapterKey:
        return AdapterKey("bank", ((f"anchor-{i}", 1.0),), "linear")

    def writer(size: int):
        async def build(path: Path) -> int:
            path.mkdir(parents=True)
            (path / "adapter_model.safetensors").write_bytes(b"\0" * size)
            (path / "adapter_config.json").write_text("{}")
            return 8

        return build

    async with cache.lease(key(1), writer(1000)):
        async with cache.lease(key(2), writer(2000)):
            assert sample(metrics, "mta_adapter_cache_bytes") == 3000 + 2 * len("{}")
        async with cache.lease(key(3), writer(4000)):  # evicts key 1, which is still leased: kept on disk
            assert sample(metrics, "mta_adapter_cache_evictions_total") == 1
            assert sample(metrics, "mta_adapter_cache_entries") == 2
            assert sample(metrics, "mta_adapter_cache_bytes") == 7000 + 3 * len("{}")
    assert sample(metrics, "mta_adapter_cache_bytes") == 6000 + 2 * len("{}")  # its lease ended: removed
    assert sample(metrics, "mta_adapter_cache_filesystem_free_bytes") > 0

    engine = SimpleNamespace(
        ready=True,
        settings=SimpleNamespace(max_num_seqs=8),
        _llm=SimpleNamespace(get_num_unfinished_requests=lambda: 3),
    )
    metrics.watch_engine(engine)
    engine_gauges = ("mta_engine_up", "mta_engine_requests", "mta_engine_max_num_seqs")
    assert [sample(metrics, n) for n in engine_gauges] == [1, 3, 8]

    def broken() -> int:
        raise RuntimeError("engine core died")

    engine.ready, engine._llm.get_num_unfinished_requests = False, broken
    assert sample(metrics, "mta_engine_up") == 0
    assert sample(metrics, "mta_engine_requests") is None  # no sample; the scrape itself never fails
    assert b"mta_engine_max_num_seqs 8.0" in metrics.render()


def test_job_metrics_without_a_registry_do_nothing():
    m = JobMetrics(None)  # a `mta worker`: its Personalizer has no Metrics
    m.watch_queue(object(), 4)
    m.watch_runner(object())
    m.submitted(), m.started("ft-1"), m.finished("ft-1", "failed"), m.interrupted("ft-2")


@pytest.fixture
async def jobs_env(tmp_path, tiny_model_dir, tiny_bank, one_torch_thread):
    """The real job service, runner and personalizer on a real SQLite store, with one Metrics."""
    from server.store import SQLiteUserStore

    store = SQLiteUserStore(tmp_path / "users.db")
    yield await job_services(store, tmp_path, tiny_model_dir, tiny_bank, finetune_queue_size=3, job_stale_seconds=5)
    await store.close()


def _job_record(job_id: str, user_id: str, status: str, bank: Any, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "user_id": user_id,
        "status": status,
        "created_at": time.time(),
        "started_at": None,
        "heartbeat_at": None,
        "params": {"epochs": 1, "rank": 2, "learning_rate": 0.01},
        "examples": [["Which tag fits a movie about robots?", "comedy"]],
        "bank_version": bank.version,
        "bank_path": str(bank.bank.path),
        **extra,
    }


async def test_job_metrics_follow_the_jobs(jobs_env):
    from server.jobs import FinetuneParams

    env, m = jobs_env, jobs_env.metrics
    finished = {s: lambda s=s: sample(m, "mta_finetune_jobs_finished_total", status=s) for s in ("succeeded", "failed")}

    # The queue: capacity at once, depth read from the store by the scrape (the previous one's read).
    assert sample(m, "mta_finetune_queue_capacity") == 3
    assert sample(m, "mta_finetune_queue_depth") is None  # not read yet
    await m.refresh()
    assert sample(m, "mta_finetune_queue_depth") == 0
    await env.personalizer.put_profile("alice", THEMES["space"])
    pairs = [("Which tag fits a movie about robots on Mars?", "comedy"), ("Which tag fits a haunted castle?", "comedy")]
    job = await env.jobs.submit("alice", pairs, FinetuneParams(epochs=1, rank=2, learning_rate=0.01), False)
    assert sample(m, "mta_finetune_jobs_submitted_total") == 1
    assert sample(m, "mta_finetune_queue_depth") == 0  # this scrape starts the read ...
    await asyncio.wait_for(m.state.queue._task, 10)
    assert sample(m, "mta_finetune_queue_depth") == 1  # ... the next one shows it

    # The runner: down until started, a job started and succeeded, none left running.
    assert sample(m, "mta_finetune_runner_up") == 0 and sample(m, "mta_finetune_jobs_running") == 0
    assert await env.store.dequeue_job(0) == job["job_id"]
    done = await env.runner.run_one(job["job_id"])
    assert done["status"] == "succeeded", done
    assert sample(m, "mta_finetune_jobs_started_total") == 1
    assert (finished["succeeded"](), finished["failed"]()) == (1, 0)
    assert sample(m, "mta_finetune_jobs_running") == 0

    # A job that fails once running (its user has no profile): started and failed.
    bank = env.personalizer.banks.current
    ghost = f"ft-{uuid.uuid4().hex[:16]}"
    await env.store.put_job(ghost, _job_record(ghost, "ghost", "queued", bank))
    failed = await env.runner.run_one(ghost)
    assert failed["status"] == "failed" and "no profile" in failed["error"], failed
    assert sample(m, "mta_finetune_jobs_started_total") == 2
    assert (finished["succeeded"](), finished["failed"]()) == (1, 1)

    # Running jobs whose runner died: found by GET /jobs (the API) or a runner's start-up recovery.
    long_ago = time.time() - 60
    stale = _job_record("ft-" + "a" * 16, "bob", "running", bank, started_at=long_ago, heartbeat_at=long_ago)
    await env.store.put_job(stale["job_id"], stale)
    assert (await env.jobs.get(stale["job_id"]))["status"] == "failed"
    assert (await env.jobs.get(stale["job_id"]))["status"] == "failed"  # counted once
    stale2 = {**stale, "job_id": "ft-" + "b" * 16}
    await env.store.put_job(stale2["job_id"], stale2)
    assert await env.runner.recover(all_running=False) == 1
    assert sample(m, "mta_finetune_jobs_interrupted_total") == 2
    assert finished["failed"]() == 3

    # A started runner is up; a store that does not answer leaves the depth unknown, not stale.
    stop = asyncio.Event()
    task = env.runner.start(stop)
    try:
        await asyncio.sleep(0.2)
        assert sample(m, "mta_finetune_runner_up") == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    await env.store.close()
    await m.refresh()
    assert sample(m, "mta_finetune_queue_depth") is None
    assert b"# TYPE mta_finetune_queue_depth gauge" in m.render()


def test_running_jobs_gauge_counts_started_until_finished():
    m = Metrics()
    m.watch_runner(SimpleNamespace(health=lambda: {"ok": True}))
    jobs = JobMetrics(m)
    jobs.started("ft-1"), jobs.started("ft-2")
    assert sample(m, "mta_finetune_jobs_running") == 2
    jobs.finished("ft-1", "succeeded"), jobs.interrupted("ft-2")
    assert sample(m, "mta_finetune_jobs_running") == 0
    assert sample(m, "mta_finetune_jobs_finished_total", status="failed") == 1


# --- a real server ----------------------------------------------------------------------------------


def test_a_running_server_exports_what_the_dashboard_and_alerts_query(client):
    """The names from the real /metrics (families without samples included), and the state the
    server wires in itself: the queue depth after a scrape has read it, the embedded runner."""
    queried = {n for _, expr in dashboard_queries(load_dashboard()) for n in metric_names(expr)}
    queried |= {n for rule in load_rules() for n in metric_names(rule["expr"])}
    deadline = time.monotonic() + 30
    while True:
        families = list(text_string_to_metric_families(client.get("/metrics").text))
        values = {s.name: s.value for f in families for s in f.samples if not s.labels}
        if "mta_finetune_queue_depth" in values or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    missing = queried - exported_names(families)
    assert not missing, f"/metrics lacks {sorted(missing)}"
    assert values.get("mta_finetune_queue_depth", -1) >= 0, values  # other tests may have queued jobs
    assert values["mta_finetune_queue_capacity"] == 2 and values["mta_finetune_runner_up"] == 1, values
