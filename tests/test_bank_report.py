"""`mta bank show` (text and JSON) and the bank report picture (`--report`)."""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.bank.loader import read_manifest
from server.bank.report import assign_clusters, epoch_means, pool_embeddings, project_2d
from server.cli import main as mta

from .conftest import THEMES

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "bank_artifacts" / "demo"
LAMP_MOVIES = ROOT / "bank_artifacts" / "data" / "movie_tagging.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def show(capsys, *args: str) -> str:
    mta(["bank", "show", *map(str, args)])
    return capsys.readouterr().out


def line_of(text: str, start: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(start)]
    return line


def curve_of(text: str, name: str) -> str:
    """The training-curves row of a LoRA (the recipe also has a "shared task LoRA" line)."""
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(name) and ln.split()[len(name.split())].isdigit()]
    return line


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


class CachedEmbedder:
    """The session embedder, each user embedded once across the tests of this module."""

    def __init__(self, embedder):
        self.embedder, self.memo, self.calls = embedder, {}, 0

    def embed_user(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        key = tuple(texts)
        if key not in self.memo:
            self.memo[key] = self.embedder.embed_user(texts)
        return self.memo[key]


@pytest.fixture(scope="module")
def cached_embedder(embedder) -> CachedEmbedder:
    return CachedEmbedder(embedder)


@pytest.fixture()
def no_model_loading(monkeypatch, cached_embedder):
    """The CLI's report gets the session embedder instead of loading the model again."""
    monkeypatch.setattr("server.embedding.Embedder", lambda *a, **k: cached_embedder)
    return cached_embedder


# --- mta bank show ---------------------------------------------------------------------------


def test_show_the_demo_bank_prints_the_recipe_anchors_curves_and_fusion_choice(capsys):
    m = read_manifest(DEMO)
    extra = m.extra
    text = show(capsys, DEMO)

    assert line_of(text, "version").split() == ["version", m.bank_version]
    assert line_of(text, "random").split() == ["random", "no"]
    assert "SmolLM2-135M-Instruct" in line_of(text, "base model")
    assert "sentence-transformers/all-MiniLM-L6-v2 (dim 384)" in line_of(text, "embedding model")
    assert "36 anchor pool / 36 held out (holdout fraction 0.5)" in line_of(text, "split")
    assert line_of(text, "init").split()[1] == "task:"
    assert line_of(text, "meta-data").split()[1] == "cluster:"

    # the shared task LoRA of a --init task bank: its recipe and its curve
    shared = extra["training"]["shared"]
    assert m.shared_lora is not None and m.shared_lora.rank == 8
    recipe_line = line_of(text, "shared task LoRA  stored")
    assert "stored in shared/, rank 8" in recipe_line and f"on {shared['examples']} examples" in recipe_line
    curve_line = curve_of(text, "shared task LoRA")
    assert curve_line.split()[3] == str(shared["steps"])
    expected = " ".join(f"{v:.3f}" + ("*" if i == shared["best_epoch"] else "") for i, v in enumerate(shared["validation_losses"]))
    assert curve_line.endswith(expected)

    # the shipped bank is refit: every LoRA retrained on all its items for its chosen epochs
    assert "retrained on all its items" in line_of(text, "refit")
    assert recipe_line.endswith(f"refit: {shared['refit']['epochs']} epoch(s) on {shared['refit']['examples']} examples")

    # the 8 anchors: cluster size, rank, user and history length; then each one's curves
    assert "anchors (8)" in text
    for a in m.anchors:
        record = extra["anchors"][a.id]
        row = line_of(text, f"{a.id} ").split()
        assert row[:5] == [a.id, str(a.cluster_size), str(a.rank), str(record["user_id"]), str(record["history_items"])]
        assert row[7:] == [str(record["refit"]["epochs"]), "epoch(s)", "on", str(record["refit"]["examples"])]
        curve = curve_of(text, f"anchor {a.id}")
        val = " ".join(
            f"{v:.3f}" + ("*" if i == record["best_epoch"] else "") for i, v in enumerate(record["validation_losses"])
        )
        assert curve.endswith(val) and curve.split()[2] == str(record["steps"])
        # one mean training loss per epoch run (the validation curve has one more point: before training)
        assert len(epoch_means(record, extra["training"]["config"])) == len(record["validation_losses"]) - 1

    # the fusion defaults and how they were chosen: every grid row, the chosen one marked
    text, stacked = text.split("Stacked LoRA (fine-tune defaults)")
    chosen = extra["fusion_selection"]["chosen"]
    # the pool's losses favour no residual candidate beyond its noise: the shared LoRA alone is served
    assert (m.fusion.mode, m.fusion.top_k, m.fusion.residual_scale) == ("linear", 2, 0.0) == tuple(chosen.values())
    assert line_of(text, "served").split(None, 1)[1] == "linear, top-2, residual scale 0.0"
    assert "chosen on the anchor pool's validation items" in line_of(text, "how")
    assert line_of(text, "rule").split(None, 1)[1] == extra["fusion_selection"]["rule"]
    grid = extra["fusion_selection"]["grid"]
    (alone,) = [g for g in grid if (g["mode"], g["top_k"], g["residual_scale"]) == ("linear", 2, 0.0)]
    (chosen_row,) = [ln for ln in text.splitlines() if ln.endswith("<- chosen")]
    assert chosen_row.split()[:6] == ["linear", "2", "0.00", f"{alone['validation_loss']:.4f}", str(alone["served_rank"]), "-"]
    # a residual candidate has the lowest mean, but within the pool's noise: the rule passes it over
    best = min(grid, key=lambda g: g["validation_loss"])
    assert best["residual_scale"] > 0 and best["validation_loss"] < alone["validation_loss"] and best["vs_shared"][2] > 0
    rows = [ln for ln in text.splitlines() if ln.startswith("    ") and ln.split()[0] in ("linear", "cat")]
    mid, lo, hi = best["vs_shared"]
    assert [r.split()[:4] for r in rows if f"{mid:+.4f} [{lo:+.4f}, {hi:+.4f}]" in r] == [
        [best["mode"], str(best["top_k"]), f"{best['residual_scale']:.2f}", f"{best['validation_loss']:.4f}"]
    ]
    assert len(rows) == len(grid)
    assert sum("not eligible" in r for r in rows) == sum(g["served_rank"] > 14 for g in grid) == 3
    assert "2 history items, held out of every training (36 users, 72 items)" in line_of(text, "items")
    # the stacked LoRA's recipe, chosen on the first 12 anchor-pool users (`make bank`'s --stacking-users 12)
    stacking = extra["stacking_selection"]
    assert m.stacking is not None and m.stacking.model_dump() == stacking["chosen"]
    assert stacking["max_users"] == 12 and 0 < stacking["users"] <= 12
    assert stacking["user_ids"] == [str(u) for u in extra["split"]["anchor_pool"][:12]][: stacking["users"]]
    s = stacking["chosen"]
    assert line_of(stacked, "chosen").split(None, 1)[1] == f"rank {s['rank']}, lr {s['learning_rate']}, {s['epochs']} epochs"
    assert line_of(stacked, "users").split(None, 1)[1] == f"{stacking['users']} (of the first 12 anchor-pool users)"
    assert "not recorded" not in text + stacked


def test_show_json_round_trips_the_manifest_facts(capsys):
    m = read_manifest(DEMO)
    extra = m.extra
    info = json.loads(show(capsys, DEMO, "--json"))

    for key in ("bank_version", "name", "description", "random", "base_model", "lora_init_seed"):
        assert info[key] == getattr(m, key)
    assert info["embedding_model"] == m.embedding_model.model_dump()
    assert info["fusion"] == m.fusion.model_dump() and info["task"] == m.task.model_dump()
    assert [{k: a[k] for k in ("id", "cluster_size", "rank", "target_modules", "lora_path")} for a in info["anchors"]] == [
        a.model_dump() for a in m.anchors
    ]
    for a in info["anchors"]:
        record = extra["anchors"][a["id"]]
        assert {k: a[k] for k in ("user_id", "history_items", "members")} == {
            k: record[k] for k in ("user_id", "history_items", "members")
        }
        assert {**a["training"], **{k: record[k] for k in ("user_id", "history_items", "members")}} == record
    assert info["shared_lora"] == {**m.shared_lora.model_dump(), "training": extra["training"]["shared"]}
    assert info["recipe"] == {k: v for k, v in extra["training"].items() if k != "shared"}
    assert info["fusion_selection"] == extra["fusion_selection"]
    assert info["validation"] == extra["validation"]
    assert info["data"] == extra["data"] and info["clustering"] == extra["clustering"]
    assert info["split"]["anchor_pool"] == extra["split"]["anchor_pool"]
    assert (info["split"]["anchor_pool_size"], info["split"]["held_out_size"]) == (36, 36)
    assert info["size_bytes"] > 1_000_000


def test_show_a_random_bank_says_what_is_not_recorded(make_bank, capsys, tmp_path):
    bank = make_bank("show-random", bank_version="show-random-v1")
    text = show(capsys, bank)
    assert line_of(text, "version").split() == ["version", "show-random-v1"]
    assert line_of(text, "random").startswith("random           YES")
    assert "not recorded (a random bank: its LoRAs are not trained)" in text
    assert f"anchors ({len(THEMES)})" in text
    for anchor in THEMES:
        assert line_of(text, f"{anchor} ").split()[:4] == [anchor, "1", "4", "not"]
        assert line_of(text, f"anchor {anchor}").split()[2:] == ["not", "recorded"]
    for field in ("data", "split", "clustering"):
        assert line_of(text, field).split(None, 1)[1] == "not recorded"
    assert line_of(text, "served").split(None, 1)[1] == "cat, top-2"
    assert line_of(text, "how").split(None, 1)[1] == "not recorded"

    info = json.loads(show(capsys, bank, "--json"))
    assert info["random"] is True and info["shared_lora"] is None
    for key in ("recipe", "split", "validation", "fusion_selection", "data"):
        assert info[key] is None
    assert [a["id"] for a in info["anchors"]] == list(THEMES)
    assert all(a["training"] is None and a["user_id"] is None for a in info["anchors"])

    # its picture: the anchors, and no curves to draw
    out = tmp_path / "random.png"
    mta(["bank", "show", str(bank), "--report", str(out)])
    assert f"report written to {out}" in capsys.readouterr().out
    width, height = png_size(out)
    assert width >= 1000 and height >= 500


def test_show_an_older_or_partial_manifest_never_crashes(tmp_path, capsys):
    """A bank built before validation, --init task and the fusion choice were recorded (the first demo bank's form)."""
    manifest = json.loads((DEMO / "manifest.json").read_text())
    manifest.pop("shared_lora")
    extra = manifest["extra"]
    for key in ("validation", "fusion_selection"):
        extra.pop(key)
    for key in ("init", "shared"):
        extra["training"].pop(key)
    for record in extra["anchors"].values():
        for key in ("validation_examples", "step_losses", "validation_losses", "best_epoch", "fingerprint"):
            record.pop(key)
        record.update(initial_loss=3.5, final_loss=1.25)
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps(manifest))
    text = show(capsys, old)
    assert line_of(text, "init").split(None, 1)[1] == "not recorded"
    for anchor in extra["anchors"]:
        assert line_of(text, f"anchor {anchor}").split()[3:] == ["3.500", "->", "1.250", "(before", "->", "after)", "not", "recorded"]
    assert line_of(text, "served").split(None, 1)[1] == f"linear, top-2, residual scale {manifest['fusion']['residual_scale']}"
    assert "validation\n  not recorded" in text

    # records of unexpected types are shown as missing, not a crash
    broken = copy.deepcopy(manifest)
    broken["extra"] = {"training": "?", "anchors": [1, 2], "split": {"anchor_pool": "?"}, "fusion_selection": {"grid": [None, {}]}}
    (old / "manifest.json").write_text(json.dumps(broken))
    text = show(capsys, old)
    assert "anchors (8)" in text and "? anchor pool" not in text
    assert json.loads(show(capsys, old, "--json"))["recipe"] is None


@pytest.mark.parametrize("kind", ["empty dir", "file", "missing", "bad json", "bad schema"])
def test_show_a_path_that_is_not_a_bank_is_a_one_line_error(tmp_path, capsys, kind):
    path = tmp_path / "x"
    if kind == "empty dir":
        path.mkdir()
    elif kind == "file":
        path.write_text("hello")
    elif kind in ("bad json", "bad schema"):
        path.mkdir()
        (path / "manifest.json").write_text("{not json" if kind == "bad json" else json.dumps({"name": "x"}))
    with pytest.raises(SystemExit) as e:
        mta(["bank", "show", str(path)])
    message = str(e.value.code)
    assert message.startswith(f"mta bank show: bank {path}") and "\n" not in message
    expected = {"empty dir": "missing manifest.json", "file": "not a directory", "missing": "not a directory",
                "bad json": "not valid JSON", "bad schema": "invalid manifest.json"}[kind]  # fmt: skip
    assert expected in message and capsys.readouterr().out == ""


def test_the_mta_command_exits_non_zero_with_one_line_on_stderr(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "server.cli", "bank", "show", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [f"mta bank show: bank {tmp_path}: missing manifest.json"]


# --- the picture -----------------------------------------------------------------------------


def test_report_of_the_demo_bank_draws_its_users_anchors_and_curves(tmp_path, capsys, no_model_loading):
    out = tmp_path / "pictures" / "demo.png"
    before = no_model_loading.calls
    mta(["bank", "show", str(DEMO), "--report", str(out), "--data", str(LAMP_MOVIES)])
    captured = capsys.readouterr()
    assert f"report written to {out}" in captured.out and "note:" not in captured.err
    assert no_model_loading.calls - before == 36  # the anchor-pool users, embedded with the session embedder
    assert out.stat().st_size > 50_000 and out.read_bytes()[:8] == PNG_SIGNATURE
    width, height = png_size(out)
    assert 1000 <= width <= 3000 and 500 <= height <= 1500
    assert not list(out.parent.glob(".*"))  # no temporary file left

    # without the data file: the anchors and curves only, and no embedding at all
    mta(["bank", "show", str(DEMO), "--json", "--report", str(tmp_path / "no-users.png")])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["bank_version"] == read_manifest(DEMO).bank_version  # stdout stays JSON
    assert "report written" in captured.err and no_model_loading.calls - before == 36
    assert png_size(tmp_path / "no-users.png")[0] >= 1000

    with pytest.raises(SystemExit, match="--data is for the users panel"):
        mta(["bank", "show", str(DEMO), "--data", str(LAMP_MOVIES)])
    with pytest.raises(SystemExit, match=r"mta bank show: report not written: .* holds none of the bank's 36 anchor-pool users"):
        other = tmp_path / "other.json"
        other.write_text(json.dumps([{"user_id": 1, "profile": [{"description": "d", "tag": "t"}]}]))
        mta(["bank", "show", str(DEMO), "--report", str(tmp_path / "x.png"), "--data", str(other)])


def test_the_users_are_embedded_as_the_build_embedded_them(cached_embedder):
    m = read_manifest(DEMO)
    ids, embeddings, notes = pool_embeddings(m, LAMP_MOVIES, cached_embedder)
    assert notes == [] and ids == [str(u) for u in m.extra["split"]["anchor_pool"]] and embeddings.shape == (36, 384)
    stored = np.load(DEMO / "anchor_embeddings.npy")
    for row, anchor in zip(stored, m.anchors):  # an anchor is a pool user: the same vector as the bank stores
        assert float(row @ embeddings[ids.index(str(m.extra["anchors"][anchor.id]["user_id"]))]) > 0.9999
    labels, recorded = assign_clusters(m, ids, embeddings, stored)
    assert recorded
    for i, anchor in enumerate(m.anchors):
        assert sorted(ids[j] for j in np.flatnonzero(labels == i)) == sorted(map(str, m.extra["anchors"][anchor.id]["members"]))
    # without recorded members, each user goes to its most similar anchor
    bare = m.model_copy(update={"extra": {}})
    nearest, recorded = assign_clusters(bare, ids, embeddings, stored)
    assert not recorded and np.array_equal(nearest, np.argmax(embeddings @ stored.T, axis=1))


def test_the_projection_keeps_well_separated_clusters_apart():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 64)) * 5
    labels = np.repeat(np.arange(4), 25)
    points = centres[labels] + rng.normal(scale=0.2, size=(100, 64))
    xy, kept = project_2d(points)
    assert xy.shape == (100, 2) and 0.5 < kept <= 1.0
    means = np.stack([xy[labels == c].mean(axis=0) for c in range(4)])
    spread = max(np.linalg.norm(xy[labels == c] - means[c], axis=1).max() for c in range(4))
    gaps = [np.linalg.norm(means[a] - means[b]) for a in range(4) for b in range(a + 1, 4)]
    assert min(gaps) > 2 * spread  # every cluster stays apart from every other
    assert np.array_equal(np.argmin(np.linalg.norm(xy[:, None] - means[None], axis=2), axis=1), labels)

    # deterministic (signs fixed), and exact for data that is already 2-D
    assert np.array_equal(project_2d(points)[0], xy)
    flat = np.zeros((5, 10))
    flat[:, 0], flat[:, 1] = [0, 1, 2, 3, 4], [0, 1, 0, -1, 0]
    xy_flat, kept_flat = project_2d(flat)
    assert kept_flat == pytest.approx(1.0)
    d = np.linalg.norm(flat[:, None] - flat[None], axis=2)
    assert np.allclose(np.linalg.norm(xy_flat[:, None] - xy_flat[None], axis=2), d)
    # degenerate inputs: one point, one dimension
    assert project_2d(np.ones((1, 8)))[0].tolist() == [[0.0, 0.0]]
    assert project_2d(np.arange(3.0).reshape(3, 1))[0].shape == (3, 2)


# --- mta bank build --report ------------------------------------------------------------------


def synthetic_users() -> list[dict]:
    """8 LaMP-format users (not LaMP data): two per theme of conftest.THEMES."""
    users = []
    for t, items in enumerate(THEMES.values()):
        for j in range(2):
            profile = [{"id": f"{t}{j}{i}", **item} for i, item in enumerate(items)]
            users.append({"user_id": 100 + 10 * t + j, "profile": profile[j:] + profile[:j], "query": []})
    return users


def test_bank_build_report_is_written_beside_the_bank(tmp_path, tiny_model_dir, one_torch_thread, no_model_loading, capsys):
    data = tmp_path / "users.json"
    data.write_text(json.dumps(synthetic_users()))
    out = tmp_path / "banks" / "tiny"
    mta(["bank", "build", "--task", "movie_tagging", "--data", str(data), "--out", str(out),
         "--model", str(tiny_model_dir), "--anchors", "2", "--rank", "2", "--epochs", "2", "--lr", "0.01",
         "--max-length", "128", "--holdout-fraction", "0.25", "--meta-data", "cluster", "--init", "task",
         "--task-rank", "2", "--validation-items", "1", "--threads", "1", "--report"])  # fmt: skip
    report = out.with_name("tiny.report.png")
    assert f"report written to {report}" in capsys.readouterr().out
    assert report.read_bytes()[:8] == PNG_SIGNATURE and png_size(report)[0] >= 1000
    assert not list(out.rglob("*.png"))  # the served, shipped bank directory holds no picture

    text = show(capsys, out)
    assert "anchors (2)" in text and "<- chosen" in text and "6 anchor pool / 2 held out" in text
    assert "*" in curve_of(text, "shared task LoRA") and "not recorded" not in text


def test_make_bank_asks_for_the_recipe_the_shipped_demo_bank_records():
    """`make bank` reproduces the shipped bank: its command asks for exactly the settings the
    bank's manifest records (those `mta eval --folds 2` rebuilds fold 2's bank with)."""
    import dataclasses
    import re
    import shlex

    from server.cli import bank_build_config, build_parser
    from server.evaluation.folds import build_config_from_manifest

    (recipe,) = re.findall(r"^bank:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    argv = shlex.split(recipe.replace("\\\n", " ").replace("$(BIN)/", ""))
    assert argv[:3] == ["mta", "bank", "build"]
    args = build_parser().parse_args(argv[1:])
    assert (args.out, args.data) == (Path("bank_artifacts/demo"), Path("bank_artifacts/data/movie_tagging.json"))
    asked = bank_build_config(args)
    recorded = build_config_from_manifest(
        json.loads((DEMO / "manifest.json").read_text()), DEMO, holdout_fraction=args.holdout_fraction
    )
    # the build names the default targets as the model has them (`TrainConfig.with_targets`)
    targets = recorded.train.target_modules
    asked = dataclasses.replace(
        asked,
        train=dataclasses.replace(asked.train, target_modules=targets),
        task_train=dataclasses.replace(asked.task_train, target_modules=targets),
    )
    assert asked == recorded
    assert recorded.stacking_lrs and recorded.refit and recorded.init == "task"
