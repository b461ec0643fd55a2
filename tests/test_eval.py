"""`mta eval`: LaMP's metric code against hand-computed values, and a smoke run on the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from server.lamp_data import User
from server.evaluation.methods import parse_methods
from server.evaluation.metrics import (
    accuracy,
    bootstrap_ci,
    macro_f1,
    normalize_label,
    paired_difference,
    rating_errors,
    rouge,
    score,
)
from server.evaluation.protocol import eval_users
from server.evaluation.report import reading
from server.tasks import TASKS, scoring

from .test_bank_build import LAMP_MOVIES, short

TAGS = scoring("movie_tagging").labels


def test_labels_are_compared_as_lamp_does():
    assert normalize_label('  "Sci-Fi."\nmore text') == "sci-fi"
    assert normalize_label("comedy") == normalize_label("Comedy!") == "comedy"
    assert normalize_label("") == ""
    assert accuracy(["comedy", "Action.", "romance"], ["comedy", "action", "classic"]) == pytest.approx(2 / 3)


def test_macro_f1_by_hand():
    preds = ["comedy", "comedy", "action", "funny", "drama"]
    golds = ["comedy", "action", "action", "romance", "action"]
    # comedy: tp 1, fp 1 -> P 1/2, R 1 -> F1 2/3; action: tp 1, fn 2 -> P 1, R 1/3 -> F1 1/2;
    # romance: its one point answered off-list -> 0. The 12 tags with no gold and no
    # prediction count 0 each in the macro average over all 15 tags.
    expected = (2 / 3 + 1 / 2 + 0) / len(TAGS)
    assert macro_f1(preds, golds, TAGS) == pytest.approx(expected)
    assert macro_f1(golds, golds, ["comedy", "action", "romance"]) == pytest.approx(1.0)


def test_macro_f1_is_sklearns():
    import random

    from sklearn.metrics import f1_score

    rng = random.Random(0)
    norm = [normalize_label(t) for t in TAGS]
    for n in range(1, 60, 3):
        preds = [rng.choice([*TAGS, "drama", "Comedy.", "", "sci-fi\nmore"]) for _ in range(n)]
        golds = [rng.choice(TAGS[:6]) for _ in range(n)]
        expected = f1_score([normalize_label(g) for g in golds], [normalize_label(p) for p in preds], labels=norm, average="macro", zero_division=0)
        assert macro_f1(preds, golds, TAGS) == pytest.approx(expected)


def test_rouge_by_hand_with_stemming():
    # 2 of 3 unigrams shared both ways -> F 2/3; the LCS "the cat" also has 2 tokens -> 2/3.
    assert rouge(["the cat sat"], ["the cat ran"]) == pytest.approx({"rouge1": 2 / 3, "rougeL": 2 / 3})
    # Porter stemming: "cats running" and "cat runs" are the same two stems.
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(1.0)
    # Word order: unigrams all match, the longest common subsequence is 1 of 2.
    assert rouge(["world hello"], ["hello world"]) == pytest.approx({"rouge1": 1.0, "rougeL": 0.5})


def test_rating_errors_by_hand():
    # errors: 4-5 = -1, 3-3 = 0, no number -> farthest end for gold 2 = 5 -> +3
    out = rating_errors(["4", "It is a 3.", "great"], ["5", "3", "2"])
    assert out["mae"] == pytest.approx(4 / 3)
    assert out["rmse"] == pytest.approx(math.sqrt((1 + 0 + 9) / 3))
    assert score("rating", ["9"], ["5"]) == {"mae": 0.0, "rmse": 0.0}  # clipped to the 1..5 scale


def test_bootstrap_resamples_users_not_points():
    def metric(p, g):
        return {"accuracy": accuracy(p, g)}

    # Every user scores 1/2: any resample of users scores 1/2, however many points each has.
    users = [(["a", "x"], ["a", "b"]), (["a", "x", "a", "x"], ["a", "b", "a", "b"])]
    assert bootstrap_ci(users, metric, resamples=200)["accuracy"] == pytest.approx((0.5, 0.5))
    # One perfect user and one wrong user: the interval spans (nearly) all of [0, 1].
    lo, hi = bootstrap_ci([(["a"], ["a"]), (["x"], ["a"])], metric, resamples=400)["accuracy"]
    assert lo == 0.0 and hi == 1.0


def test_paired_differences_resample_the_same_users_for_both_methods():
    def metric(p, g):
        return {"accuracy": accuracy(p, g), "mae": 1 - accuracy(p, g)}

    # Users differ wildly in difficulty, but the first method is right on exactly one more point
    # than the second for every user: unpaired intervals overlap; the paired one excludes 0.
    easy = (["a", "a", "a", "a"], ["a", "a", "a", "a"])
    hard = (["x", "x", "x", "x"], ["a", "a", "a", "a"])
    first = [(["a", "a", "a", "a"], ["a"] * 4), (["a", "x", "x", "x"], ["a"] * 4)] * 5
    second = [(["a", "a", "a", "x"], ["a"] * 4), hard] * 5
    diff = paired_difference(first, second, metric, resamples=300)
    point, lo, hi = diff["accuracy"]
    assert point == pytest.approx(0.25) and 0 < lo <= point <= hi
    assert diff["mae"][0] == pytest.approx(-0.25)
    a_lo, a_hi = bootstrap_ci(first, metric, resamples=300)["accuracy"]
    b_lo, b_hi = bootstrap_ci(second, metric, resamples=300)["accuracy"]
    assert a_lo < b_hi  # the methods' own intervals overlap
    same = paired_difference([easy, hard], [easy, hard], metric, resamples=100)["accuracy"]
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same users"):
        paired_difference([easy], [easy, hard], metric)
    assert reading("accuracy", 0.25, 0.1, 0.4) == "ahead beyond noise"
    assert reading("mae", 0.25, 0.1, 0.4) == "behind beyond noise"  # lower is better
    assert reading("accuracy", -0.02, -0.05, 0.01).startswith("level within noise (behind")


def test_protocol_splits_few_shot_and_points():
    task = TASKS["movie_tagging"]
    profile = tuple({"description": f"movie {i} about {'space' if i % 2 else 'love'}", "tag": "sci-fi" if i % 2 else "romance", "id": str(i)} for i in range(7))
    queries = {1: [{"id": "q", "input": task.instruction({"description": "a space trip"}), "gold": "sci-fi"}]}
    (user,) = eval_users([User(1, profile), User(2, profile[:3])], queries, task, n_few_shot=5)  # user 2: no points
    assert user.few_shot == profile[:5] and len(user.points) == 3
    assert [p.gold for p in user.points] == ["sci-fi", "romance", "sci-fi"]
    query = user.points[-1]
    assert "space" in query.context and "Tag: sci-fi" in query.context  # BM25 over the few-shot set only
    assert user.prompt(query, with_context=False) == query.instruction
    assert user.prompt(query, with_context=True).startswith("### User History:\n")
    assert user.copy_retrieved(query, task) == "sci-fi"
    assert user.majority_label(task) == "romance"  # 3 romance, 2 sci-fi among items 0..4
    assert len(user.training_examples(task)) == 5


def test_unknown_or_misapplied_methods_are_refused():
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("rag,telepathy", classification=True)
    with pytest.raises(ValueError, match="only apply to classification"):
        parse_methods("rag,majority", classification=False)


def test_the_default_methods_fit_the_task():
    """`mta eval --task news_headline` without --methods runs (it refused its own default list)."""
    generation = [m.name for m in parse_methods(None, classification=False)]
    assert "majority" not in generation and "copy_retrieved" not in generation and "mta_stack" in generation
    assert {"majority", "copy_retrieved"} <= {m.name for m in parse_methods(None, classification=True)}


@pytest.fixture(scope="module")
def lamp_file(tmp_path_factory) -> Path:
    """4 real LaMP-2M users, 7 shortened profile items each (2 pool, 2 held out by the sha split)."""
    users = json.loads(LAMP_MOVIES.read_text())[:4]
    data = [
        {
            "user_id": u["user_id"],
            "profile": [short(i) for i in u["profile"][:7]],
            "query": [{**q, "input": q["input"][: q["input"].index(" description: ") + 75]} for q in u["query"]],
        }
        for u in users
    ]
    path = tmp_path_factory.mktemp("eval") / "movies.json"
    path.write_text(json.dumps(data))
    return path


def eval_cmd(data: Path, model: Path, bank: Path, out: Path, methods: str, *extra: str) -> list[str]:
    """`mta eval` on the tiny model: float32, one thread, a short bootstrap."""
    return [
        sys.executable, "-m", "server.cli", "eval", "--task", "movie_tagging", "--data", str(data),
        "--bank", str(bank), "--model", str(model), "--methods", methods, "--out", str(out),
        "--dtype", "float32", "--resamples", "50", "--threads", "1", *extra,
    ]  # fmt: skip


def test_smoke_run_writes_every_output(tmp_path, lamp_file, tiny_model_dir, tiny_bank):
    out = tmp_path / "eval"
    cmd = eval_cmd(lamp_file, tiny_model_dir, tiny_bank, out, "rag,mta_stack,majority", "--user-epochs", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["task"] == "movie_tagging" and result["n_users"] == 2
    assert result["n_points"] == 2 * (7 - 5 + 1)  # the 2 profile items past the few-shot set + the query
    assert set(result["methods"]) == {"rag", "mta_stack", "majority"}
    for row in result["methods"].values():
        for metric in ("accuracy", "f1"):
            lo, hi = row[metric + "_ci"]
            assert 0 <= lo <= row[metric] <= hi <= 1
    assert result["per_user_bytes"]["rag"] == 0 < result["per_user_bytes"]["mta_stack"]
    # The metric in results.json is the metric of the predictions written beside it.
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == result["n_points"]
    for name in result["methods"]:
        assert result["methods"][name]["accuracy"] == pytest.approx(accuracy([p[name] for p in preds], [p["gold"] for p in preds]))
    assert "| mta_stack |" in (out / "results.md").read_text()
    # mta_stack vs majority, paired on the same users: the difference of the two rows' scores
    (row,) = result["comparisons"]
    assert (row["first"], row["second"]) == ("mta_stack", "majority")
    for metric in ("accuracy", "f1"):
        diff, lo, hi = row[metric]
        assert diff == pytest.approx(result["methods"]["mta_stack"][metric] - result["methods"]["majority"][metric])
        assert lo <= diff <= hi
    assert "| `mta_stack` - `majority` |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run reuses the trained adapters (cached in out/work) and reproduces the scores.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "adapters: mta_stack" in again.stderr
    assert json.loads((out / "results.json").read_text())["methods"] == result["methods"]


def test_mta_methods_without_a_bank_are_a_clear_error(tmp_path, lamp_file, tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "eval", "--task", "movie_tagging", "--data", str(lamp_file),
         "--model", str(tiny_model_dir), "--methods", "mta_fuse", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "the mta_* methods need --bank" in proc.stderr


@pytest.fixture(scope="module")
def built_bank(tmp_path_factory, lamp_file, tiny_model_dir, embedder, one_torch_thread) -> Path:
    """A bank built by `mta bank build`'s code on the 4 users: 2 anchor-pool users, 2 held out, 1 anchor,
    a residual over a shared task LoRA, with one validation item per pool user."""
    from server.bank.build import BuildConfig, build_bank
    from server.training import TrainConfig

    train = TrainConfig(rank=4, alpha=8, epochs=1, max_length=256, target_modules=("q_proj", "v_proj"))
    config = BuildConfig(
        task=TASKS["movie_tagging"], n_anchors=1, holdout_fraction=0.5, dtype="bf16", meta_data="cluster",
        train=train, init="task", task_train=train, validation_items=1,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("built") / "bank"
    return build_bank(lamp_file, out, config, model_dir=tiny_model_dir, embedder=embedder, progress=False).path


def test_two_folds_evaluate_every_user_once_with_both_banks(tmp_path, lamp_file, tiny_model_dir, built_bank):
    from server.evaluation.config import EvalConfig
    from server.evaluation.folds import (
        build_config_from_manifest,
        fold2_build_config,
        make_folds,
        read_manifest_json,
    )

    out = tmp_path / "eval"
    cmd = eval_cmd(
        lamp_file, tiny_model_dir, built_bank, out, "task_lora,mta_fuse,majority", "--task-epochs", "1", "--folds", "2"
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    split = read_manifest_json(built_bank)["extra"]["split"]
    fold1, fold2 = result["folds"]
    # Every user is evaluated exactly once: fold 1 the bank's held-out users, fold 2 its anchor pool.
    assert sorted(fold1["users"]) == sorted(split["held_out"]) and sorted(fold2["users"]) == sorted(split["anchor_pool"])
    assert result["n_users"] == 4 == fold1["n_users"] + fold2["n_users"]
    assert result["n_points"] == 4 * (7 - 5 + 1) == fold1["n_points"] + fold2["n_points"]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    by_fold = {(p["user_id"], p["fold"]) for p in preds}
    assert len(preds) == result["n_points"] and len(by_fold) == 4 == len({u for u, _ in by_fold})
    # Both banks: fold 2's is built on fold 1's held-out users with the given bank's settings.
    bank2 = out / "work" / "fold2-bank"
    assert fold1["bank"] == str(built_bank) and fold2["bank"] == str(bank2)
    assert fold1["bank_version"] != fold2["bank_version"]
    assert read_manifest_json(bank2)["extra"]["split"]["anchor_pool"] == sorted(split["held_out"])
    recorded = build_config_from_manifest(read_manifest_json(bank2), bank2, holdout_fraction=0.0)
    assert recorded == fold2_build_config(built_bank)  # the given bank's settings (cluster data, bf16, rank 4, ...)
    assert (recorded.init, recorded.validation_items, recorded.task_train.rank) == ("task", 1, 4)  # the warm start too
    assert read_manifest_json(bank2)["shared_lora"]["lora_path"] == "shared"
    # task_lora is trained per fold, on that fold's anchor pool.
    assert (out / "work" / "task_lora" / "_shared").is_dir() and (out / "work" / "fold2" / "task_lora" / "_shared").is_dir()
    # The format: one merged table (intervals over all users) plus per-fold scores, and timings.
    assert set(result["methods"]) == set(fold1["methods"]) == {"task_lora", "mta_fuse", "majority"}
    for row in result["methods"].values():
        lo, hi = row["accuracy_ci"]
        assert 0 <= lo <= row["accuracy"] <= hi <= 1
    for name in result["methods"]:
        assert result["methods"][name]["accuracy"] == pytest.approx(accuracy([p[name] for p in preds], [p["gold"] for p in preds]))
    timings = result["timings"]
    assert {"fold2_bank", "generation", "scoring", "total"} <= set(timings) and set(timings["train"]) == {"task_lora", "mta_fuse"}
    assert "timings: fold2_bank" in proc.stdout and "over 2 folds" in (out / "results.md").read_text()

    # A second run's folds reuse the cached fold-2 bank (same settings, same data) instead of rebuilding it.
    from server.lamp_data import load_users

    before = (bank2 / "manifest.json").stat().st_mtime_ns
    cfg = EvalConfig(
        task=TASKS["movie_tagging"], data=lamp_file, out=out, methods=tuple(parse_methods("mta_fuse", classification=True)),
        model_dir=tiny_model_dir, model_id=tiny_model_dir.name, bank=built_bank, folds=2,
    )  # fmt: skip
    folds, built = make_folds(cfg, load_users(lamp_file, TASKS["movie_tagging"]))
    assert not built and folds[1].bank == bank2 and (bank2 / "manifest.json").stat().st_mtime_ns == before
    # ...but not one whose fusion defaults an earlier rule chose (they are chosen again, from the cached LoRAs)
    from server.evaluation.folds import FOLD2_DATA, _is_current

    args = (bank2, fold2_build_config(built_bank), out / "work" / FOLD2_DATA, tiny_model_dir.name)
    assert _is_current(*args)
    manifest = read_manifest_json(bank2)
    chosen = {"mode": "linear", "top_k": 1, "residual_scale": 1.0}
    manifest["extra"]["fusion_selection"] = {**manifest["extra"]["fusion_selection"], "chosen": chosen}
    (bank2 / "manifest.json").write_text(json.dumps(manifest))
    assert not _is_current(*args)


def test_two_folds_need_a_bank_that_records_its_build_settings(tiny_bank):
    from server.bank.build import BankBuildError
    from server.evaluation.folds import fold2_build_config

    with pytest.raises(BankBuildError, match="does not record the setting `extra.training.config`"):
        fold2_build_config(tiny_bank)  # a random demo bank: nothing to rebuild it with


def test_mta_stack_trains_with_each_folds_bank_recipe_unless_given(tmp_path, tiny_bank, tiny_model_dir):
    """As the server's fine-tune: the command line's values, else the fold's bank's recorded
    choice (`--stacking-lrs`), else the defaults; fold 2's bank records its own pool's choice."""
    import dataclasses
    import shutil

    from server.evaluation.config import EvalConfig
    from server.evaluation.runner import AdapterBuilder
    from server.settings import Settings
    from server.stacking import stack_config

    chosen = tmp_path / "bank"
    shutil.copytree(tiny_bank, chosen)
    manifest = json.loads((chosen / "manifest.json").read_text())
    manifest["stacking"] = {"rank": 3, "learning_rate": 0.0123, "epochs": 4}
    (chosen / "manifest.json").write_text(json.dumps(manifest))
    cfg = EvalConfig(
        task=TASKS["movie_tagging"], data=tmp_path / "users.json", out=tmp_path, methods=(),
        model_dir=tiny_model_dir, model_id=tiny_model_dir.name, bank=chosen,
    )  # fmt: skip

    def recipe(config: EvalConfig) -> tuple:
        train = AdapterBuilder(config, tmp_path / "work", []).stack_train
        return train.rank, train.alpha, train.learning_rate, train.epochs

    assert recipe(cfg) == (3, 6, 0.0123, 4)
    given = dataclasses.replace(
        cfg, stack_train=stack_config(Settings.model_construct(), learning_rate=0.5), stack_given=frozenset({"learning_rate"})
    )
    assert recipe(given) == (3, 6, 0.5, 4)
    default = cfg.stack_train
    assert recipe(dataclasses.replace(cfg, bank=tiny_bank)) == (default.rank, default.alpha, default.learning_rate, default.epochs)
