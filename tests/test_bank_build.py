"""Building a meta-LoRA bank (MTA stage 1) from LaMP data with the tiny model, and serving it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from server.adapters import fuse, load_adapter
from server.adapters.targets import ModelTargets
from server.bank.build import REFIT_DIR, SHARED_LORA_DIR, BankBuildError, BuildConfig, build_bank, choose_anchors
from server.bank.loader import load_bank
from server.cli import main as mta
from server.evaluation.folds import build_config_from_manifest
from server.lamp_data import DataError, User, heldout_examples, leave_one_out_examples, load_users, split_items, split_users
from server.prompts import render_item
from server.tasks import TASKS, TaskError, make_task
from server.training import TrainConfig, load_base_model, load_tokenizer, mean_loss

from .conftest import server_env
from .server_process import ServerProcess

LAMP_MOVIES = Path(__file__).resolve().parents[1] / "bank_artifacts" / "data" / "movie_tagging.json"
TASK = TASKS["movie_tagging"]
TRAIN = TrainConfig(rank=4, alpha=8, learning_rate=1e-2, epochs=3, max_length=256)
HISTORY_LENGTHS = [2, 5, 3, 5, 4, 2, 3, 4]  # distinct per user so "longest history" matters


def short(item: dict) -> dict:
    return {**item, "description": item["description"][:60]}


def write_lamp(path: Path, users: list[dict]) -> Path:
    path.write_text(json.dumps(users))
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny model gains nothing from threads, and on a busy machine they cost 10x."""


@pytest.fixture(scope="module")
def lamp_users() -> list[dict]:
    """8 real LaMP-2M users with shortened descriptions and histories of different lengths."""
    users = json.loads(LAMP_MOVIES.read_text())[:8]
    return [
        {
            "user_id": u["user_id"],
            "profile": [short(i) for i in u["profile"][:n]],
            "query": [{**q, "input": q["input"][: q["input"].index(" description: ") + 75]} for q in u["query"]],
        }
        for u, n in zip(users, HISTORY_LENGTHS)
    ]


@pytest.fixture(scope="module")
def lamp_file(tmp_path_factory, lamp_users) -> Path:
    return write_lamp(tmp_path_factory.mktemp("lamp") / "movies.json", lamp_users)


CONFIG = BuildConfig(task=TASK, n_anchors=3, train=TRAIN, holdout_fraction=0.25)


def build_kept(root: Path, lamp_file: Path, config: BuildConfig, tiny_model_dir: Path, embedder):
    """A bank built into root/bank, its work directory kept in root/work."""
    report = build_bank(
        lamp_file, root / "bank", config, model_dir=tiny_model_dir, work_dir=root / "work", keep_work=True,
        embedder=embedder, progress=False,
    )  # fmt: skip
    return report, root


@pytest.fixture(scope="module")
def built(tmp_path_factory, lamp_file, tiny_model_dir, embedder):
    return build_kept(tmp_path_factory.mktemp("built"), lamp_file, CONFIG, tiny_model_dir, embedder)


def test_the_bank_loads_and_records_its_build(built, tiny_model_dir, tiny_model_targets, lamp_users, embedder):
    report, root = built
    bank = load_bank(
        report.path, model_id=tiny_model_dir.name, targets=tiny_model_targets, embedding_dim=384, max_lora_rank=16
    )
    m = bank.manifest
    assert report.seconds < 120 and report.skipped == [] and len(report.trained) == 3
    assert not m.random and m.base_model == tiny_model_dir.name and m.lora_init_seed == 0
    assert (m.fusion.mode, m.fusion.top_k) == ("linear", 2)
    assert m.task.history_template == TASK.history_template
    assert [a.rank for a in m.anchors] == [4, 4, 4] and len(bank.loras) == 3
    assert not (root / "bank").with_name(".bank.build").exists()  # work dir was given explicitly
    split = m.extra["split"]
    assert len(split["held_out"]) == 2 and len(split["anchor_pool"]) == 6
    assert sorted(split["held_out"] + split["anchor_pool"]) == sorted(u["user_id"] for u in lamp_users)
    assert sum(a.cluster_size for a in m.anchors) == 6
    # the bank's embeddings are the anchor users' embeddings
    by_id = {u["user_id"]: u for u in lamp_users}
    stored = np.load(report.path / "anchor_embeddings.npy")
    for row, anchor in zip(stored, m.anchors):
        user = by_id[m.extra["anchors"][anchor.id]["user_id"]]
        expected = embedder.embed_user([render_item(i, TASK.history_template) for i in user["profile"]])
        assert np.allclose(row, expected, atol=1e-5)


def test_anchors_are_the_longest_history_members(built, lamp_users):
    report, _ = built
    lengths = {u["user_id"]: len(u["profile"]) for u in lamp_users}
    for anchor in report.manifest.anchors:
        record = report.manifest.extra["anchors"][anchor.id]
        members = record["members"]
        assert len(members) == anchor.cluster_size
        best = min(members, key=lambda uid: (-lengths[uid], uid))
        assert record["user_id"] == best and anchor.id == str(best)
        assert record["history_items"] == max(lengths[uid] for uid in members)


def test_anchor_ties_go_to_the_lowest_user_id():
    users = [User(30, ({},) * 3), User(7, ({},) * 3), User(12, ({},) * 2), User(5, ({},) * 1)]
    clusters = choose_anchors(users, np.eye(4, dtype=np.float32), np.array([0, 0, 0, 1]))
    assert [c.anchor.user_id for c in clusters] == [5, 7]  # sorted by anchor id
    assert [u.user_id for u in clusters[1].members] == [7, 12, 30]
    assert np.array_equal(clusters[1].embedding, np.eye(4)[1])


def test_a_meta_lora_lowers_the_loss_on_its_own_examples(built, tiny_model_dir, lamp_users):
    report, _ = built
    bank = load_bank(
        report.path,
        model_id=tiny_model_dir.name,
        targets=ModelTargets.from_checkpoint(tiny_model_dir),
        embedding_dim=384,
        max_lora_rank=16,
    )
    model, tok = load_base_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    by_id = {u["user_id"]: u for u in lamp_users}
    for anchor in report.manifest.anchors:
        record = report.manifest.extra["anchors"][anchor.id]
        user = User(record["user_id"], tuple(by_id[record["user_id"]]["profile"]))
        examples = leave_one_out_examples(user, TASK)
        base = mean_loss(model, tok, examples, max_length=TRAIN.max_length)
        trained = mean_loss(model, tok, examples, adapter=bank.loras[anchor.id], max_length=TRAIN.max_length)
        assert base > 8.0, base  # the random tiny model does not know LaMP tags
        assert trained < base - 2.0, (anchor.id, base, trained)
        # the recorded losses were measured as trained (bf16 autocast); these in float32
        assert record["initial_loss"] == pytest.approx(base, rel=0.03)
        assert record["final_loss"] == pytest.approx(trained, rel=0.03)


def test_leave_one_out_prompts_carry_the_top1_other_item(lamp_users):
    user = User(1, tuple(lamp_users[1]["profile"]))
    examples = leave_one_out_examples(user, TASK)
    assert len(examples) == len(user.profile)
    for item, ex in zip(user.profile, examples):
        assert ex.answer == item["tag"]
        assert ex.prompt.startswith("### User History:\nDescription: ")
        history, instruction = ex.prompt.split("\n\n### User Instruction:\n")
        assert instruction == TASK.instruction(item)
        assert render_item(item, TASK.history_template) not in history  # never its own item


def test_movie_tagging_instruction_is_lamp_query_style():
    for user in json.loads(LAMP_MOVIES.read_text())[:5]:
        query = user["query"][0]["input"]
        description = query.split(" description: ", 1)[1]
        assert TASK.instruction({"description": description}) == query


def test_same_seed_gives_an_identical_bank_and_resume_skips_trained_anchors(built, lamp_file, tiny_model_dir, embedder):
    report, root = built
    again = build_bank(
        lamp_file, root / "again", CONFIG, model_dir=tiny_model_dir, work_dir=root / "work2", embedder=embedder,
        progress=False,
    )  # fmt: skip
    assert (again.path / "manifest.json").read_bytes() == (report.path / "manifest.json").read_bytes()
    for anchor in report.manifest.anchors:
        one = (report.path / anchor.lora_path / "adapter_model.safetensors").read_bytes()
        assert one == (again.path / anchor.lora_path / "adapter_model.safetensors").read_bytes()
    assert not (root / "work2").exists()  # removed after success

    # an interrupted build: one anchor's record is missing from the work directory
    work = root / "work-resume"
    shutil.copytree(root / "work", work)
    lost = report.manifest.anchors[1].id
    (work / "records" / f"loras__{lost}.json").unlink()
    resumed = build_bank(
        lamp_file, root / "resumed", CONFIG, model_dir=tiny_model_dir, work_dir=work, embedder=embedder, progress=False
    )
    assert resumed.trained == [lost] and len(resumed.skipped) == 2
    assert (resumed.path / "manifest.json").read_bytes() == (report.path / "manifest.json").read_bytes()

    # another seed: another shared init and another bank version
    other = build_bank(
        lamp_file, root / "other", BuildConfig(task=TASK, n_anchors=3, train=TrainConfig(**{**TRAIN.__dict__, "seed": 1}),
        holdout_fraction=0.25), model_dir=tiny_model_dir, embedder=embedder, progress=False,
    )  # fmt: skip
    assert other.manifest.lora_init_seed == 1 and other.manifest.bank_version != report.manifest.bank_version


def test_more_anchors_than_users_is_a_clear_error(lamp_file, tiny_model_dir, tmp_path, capsys):
    with pytest.raises(BankBuildError, match=r"--anchors 7 is more than the 6 users of the anchor pool"):
        build_bank(lamp_file, tmp_path / "b", BuildConfig(task=TASK, n_anchors=7, holdout_fraction=0.25),
                   model_dir=tiny_model_dir, progress=False)  # fmt: skip
    with pytest.raises(SystemExit, match=r"mta bank build: --anchors 9 is more than the 8 users"):
        mta(["bank", "build", "--task", "movie_tagging", "--data", str(lamp_file), "--out", str(tmp_path / "c"),
             "--model", str(tiny_model_dir), "--anchors", "9", "--holdout-fraction", "0"])  # fmt: skip
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"users": []}, r"not a LaMP user file: expected a non-empty JSON list"),
        ("not json", r"is not JSON"),
        ([], r"not a LaMP user file"),
        ("BAD_ITEM", r"record 2 \(user_id 8000004\) profile\[1\] lacks field\(s\) \['tag'\]"),
        ("NO_PROFILE", r"record 1 \(user_id 8000003\) has no profile"),
        ("DUPLICATE", r"record 3 \(user_id 8000002\) repeats a user_id"),
        ("NEWS", r"record 0 \(user_id 302738\) profile\[0\] lacks field\(s\) \['description', 'tag'\]"),
    ],
)
def test_a_file_that_is_not_lamp_is_a_clear_error_naming_the_first_bad_record(tmp_path, lamp_users, data, message):
    users = [dict(u) for u in lamp_users]
    if data == "BAD_ITEM":
        users[2]["profile"] = [users[2]["profile"][0], {"description": "no tag here", "id": "1"}]
        users[5]["profile"] = []  # a later bad record is not the one reported
    elif data == "NO_PROFILE":
        del users[1]["profile"]
    elif data == "DUPLICATE":
        users[3] = {**users[3], "user_id": users[0]["user_id"]}
    elif data == "NEWS":
        users = json.loads((LAMP_MOVIES.parent / "news_headline_dev.json").read_text())
    path = tmp_path / "users.json"
    path.write_text(
        data if isinstance(data, str) and data == "not json" else json.dumps(users if isinstance(data, str) else data)
    )
    with pytest.raises(DataError, match=message):
        load_users(path, TASK)


def test_the_split_depends_only_on_user_ids(lamp_users):
    users = [User(u["user_id"], tuple(u["profile"])) for u in lamp_users]
    pool, held = split_users(users, 0.25)
    pool2, held2 = split_users(list(reversed(users)), 0.25)
    assert (pool, held) == (pool2, held2) and len(held) == 2
    assert [u.user_id for u in pool] == sorted(u.user_id for u in pool)
    assert split_users(users, 0.0) == (sorted(users, key=lambda u: u.user_id), [])


def test_generic_tasks_come_from_templates():
    task = make_task("reviews", "Review: {text} Score: {score}", "Score this review: {text}")
    assert task.answer_field == "score"
    item = {"text": "Great!", "score": 5}
    assert (task.render(item), task.instruction(item), task.answer(item)) == (
        "Review: Great! Score: 5",
        "Score this review: Great!",
        "5",
    )
    assert make_task("news_headline").answer_field == "title"
    with pytest.raises(TaskError, match="give --history-template and --prompt-template"):
        make_task("reviews")
    with pytest.raises(TaskError, match="give --answer-field"):
        make_task("x", "A: {a} B: {b} C: {c}", "Q: {a}")
    with pytest.raises(TaskError, match="shows the answer field"):
        make_task("x", "A: {a} B: {b}", "Q: {a} {b}", answer_field="b")


def serve_and_generate(report, user: dict, tmp_path: Path, tiny_model_dir: Path, **env: str) -> dict:
    """A real server on the built bank: the user's profile, then one /generate with its first query."""
    proc = ServerProcess(tmp_path, server_env(tmp_path, tiny_model_dir, report.path, **env)).start()
    try:
        with proc.client() as c:
            r = c.put(f"/users/{user['user_id']}/profile", json={"items": user["profile"]})
            assert r.status_code == 200, r.text
            assert r.json()["bank_version"] == report.manifest.bank_version
            r = c.post(
                "/generate",
                json={"user_id": str(user["user_id"]), "prompt": user["query"][0]["input"], "max_tokens": 8},
            )
            assert r.status_code == 200, r.text
            return r.json()
    finally:
        proc.stop()


def test_the_real_server_serves_the_built_bank(built, tiny_model_dir, tmp_path, lamp_users):
    report, _ = built
    held_out = report.manifest.extra["split"]["held_out"]
    user = next(u for u in lamp_users if u["user_id"] == held_out[0])
    body = serve_and_generate(report, user, tmp_path, tiny_model_dir)
    anchors = {a.id for a in report.manifest.anchors}
    assert body["personalized"] is True and body["fusion_mode"] == "linear"
    assert len(body["anchors"]) == 2 and {a["id"] for a in body["anchors"]} <= anchors
    assert body["adapter"]["rank"] == 4 and body["bank_version"] == report.manifest.bank_version
    assert body["token_ids"]


# --- warm-started banks: residual meta-LoRAs over a shared task LoRA, validation, fusion choice ---

TASK_CONFIG = BuildConfig(
    task=TASK, n_anchors=3, train=TRAIN, holdout_fraction=0.25, meta_data="cluster", init="task",
    task_train=TrainConfig(rank=4, alpha=8, learning_rate=1e-2, epochs=2, max_length=256), validation_items=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def built_task(tmp_path_factory, lamp_file, tiny_model_dir, embedder):
    return build_kept(tmp_path_factory.mktemp("built-task"), lamp_file, TASK_CONFIG, tiny_model_dir, embedder)


def _load(path: Path, tiny_model_dir: Path, **kw):
    targets = ModelTargets.from_checkpoint(tiny_model_dir)
    return load_bank(path, model_id=tiny_model_dir.name, targets=targets, embedding_dim=384, max_lora_rank=16, **kw)


def test_a_task_init_bank_stores_the_shared_lora_once_and_records_its_recipe(built_task, tiny_model_dir):
    report, _ = built_task
    m = report.manifest
    assert m.shared_lora is not None and m.shared_lora.lora_path == SHARED_LORA_DIR and m.shared_lora.rank == 4
    assert (report.path / SHARED_LORA_DIR / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (report.path / "loras").iterdir()) == sorted(a.id for a in m.anchors)
    training = m.extra["training"]
    assert training["init"] == "task" and training["shared"]["config"]["epochs"] == 2
    assert "residual over a rank-4 task LoRA" in m.description
    bank = _load(report.path, tiny_model_dir)
    assert bank.shared is not None and bank.shared.rank == 4
    assert report.trained == ["shared", *(a.id for a in m.anchors)]


def test_validation_items_come_only_from_the_anchor_pool_and_are_never_trained_on(built_task, lamp_users):
    report, _ = built_task
    extra = report.manifest.extra
    pool = {str(u) for u in extra["split"]["anchor_pool"]}
    held_out = {str(u) for u in extra["split"]["held_out"]}
    validated = set(extra["validation"]["users"])
    assert validated and validated <= pool and not validated & held_out
    by_id = {str(u["user_id"]): u for u in lamp_users}
    assert validated == {uid for uid in pool if len(by_id[uid]["profile"]) >= 3}  # users keep >= 2 training items
    # the shared LoRA trained on the training items only: one leave-one-out example per training item
    shared = extra["training"]["shared"]
    assert shared["validation_examples"] == len(validated)
    train_items = sum(len(by_id[uid]["profile"]) - (uid in validated) for uid in pool)
    assert shared["examples"] == train_items == sum(r["examples"] for r in extra["anchors"].values())
    user = User(1, tuple(by_id[next(iter(validated))]["profile"]))
    kept, items = split_items(user, 1)
    assert kept.profile == user.profile[:-1] and items == user.profile[-1:]
    (example,) = heldout_examples(kept, items, TASK)
    assert render_item(items[0], TASK.history_template) not in example.prompt and example.answer == items[0]["tag"]


def test_every_meta_lora_starts_from_the_task_lora_and_keeps_its_best_epoch(built_task, tiny_model_dir, lamp_users):
    """A residual's validation curve starts at the shared LoRA's own loss (residual B = 0)."""
    report, root = built_task
    bank = _load(report.path, tiny_model_dir)
    model, tok = load_base_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    by_id = {u["user_id"]: u for u in lamp_users}
    for anchor in report.manifest.anchors:
        record = report.manifest.extra["anchors"][anchor.id]
        curve, best = record["validation_losses"], record["best_epoch"]
        assert 2 <= len(curve) <= TRAIN.epochs + 1 and curve[best] == min(curve)
        assert len(curve) == TRAIN.epochs + 1 or len(curve) - 1 - best >= TASK_CONFIG.patience  # stopped early
        held = [
            ex
            for uid in record["members"]
            for ex in heldout_examples(*split_items(User(uid, tuple(by_id[uid]["profile"])), 1), TASK)
        ]
        if not held:
            continue
        shared_alone = mean_loss(model, tok, held, adapter=bank.shared, max_length=256, bf16_autocast=True)
        assert curve[0] == pytest.approx(shared_alone, abs=2e-3)
        # the stored residual is the best epoch's (stored in bf16: a small rounding)
        kept = mean_loss(model, tok, held, adapter=bank.loras[anchor.id], base_adapter=bank.shared, max_length=256,
                         bf16_autocast=True)  # fmt: skip
        assert kept == pytest.approx(curve[best], abs=0.05)
        # a meta-LoRA of the bank at residual scale 0 is the task LoRA exactly
        alone = fuse("linear", [bank.loras[anchor.id]], [1.0], shared=bank.shared, residual_scale=0.0)
        for m in bank.shared.modules:
            assert torch.equal(alone.delta(m), bank.shared.delta(m))


def test_the_fusion_defaults_are_chosen_on_the_anchor_pool_and_recorded(built_task, tiny_model_dir):
    report, _ = built_task
    m = report.manifest
    selection = m.extra["fusion_selection"]
    grid = selection["grid"]
    assert selection["users"] == len(m.extra["validation"]["users"])
    assert {(r["mode"], r["top_k"]) for r in grid} == {("linear", 1), ("linear", 2), ("cat", 2)}  # 3 anchors: 2 others
    assert sorted({r["residual_scale"] for r in grid}) == [0.0, 0.25, 0.5, 1.0]
    # the per-user losses are recorded; the grid's means and intervals are theirs
    losses = np.array(selection["user_losses"])
    assert losses.shape == (len(grid), selection["users"]) and len(selection["user_ids"]) == selection["users"]
    assert [r["validation_loss"] for r in grid] == pytest.approx(losses.mean(axis=1).tolist(), abs=1e-4)
    assert grid[0]["residual_scale"] == 0.0 and "vs_shared" not in grid[0]
    for row, user_losses in zip(grid[1:], losses[1:]):
        mean, low, high = row["vs_shared"]
        assert mean == pytest.approx((user_losses - losses[0]).mean(), abs=1e-4) and low <= mean <= high
    # the rule: the lowest mean among the candidates that beat the shared LoRA alone beyond noise, else the shared LoRA
    better = [r for r in grid[1:] if r["served_rank"] <= TASK_CONFIG.max_fused_rank and r["vs_shared"][2] < 0]
    best = min(better, key=lambda r: r["validation_loss"]) if better else grid[0]
    chosen = {k: best[k] for k in ("mode", "top_k", "residual_scale")}
    assert selection["chosen"] == chosen == m.fusion.model_dump()
    served = _load(report.path, tiny_model_dir)
    assert served.residual_scale == chosen["residual_scale"]
    assert _load(report.path, tiny_model_dir, residual_scale=0.5).residual_scale == 0.5  # the server's override


def test_the_shared_lora_alone_is_one_adapter_for_every_user(built_task, tiny_model_dir):
    """At residual scale 0 every user's fused adapter is the shared LoRA: one cache key (one entry,
    one engine slot), whatever the neighbourhood; any other scale keys by the neighbourhood."""
    from server.fusion import build_adapter, plan_fusion

    report, _ = built_task
    embeddings = np.load(report.path / "anchor_embeddings.npy")
    for scale, one_key in ((0.0, True), (0.5, False)):
        bank = _load(report.path, tiny_model_dir, residual_scale=scale)
        plans = [plan_fusion(bank, e, bank_uid="b#1", top_k=1, mode="linear") for e in embeddings[:2]]
        assert plans[0].anchors != plans[1].anchors
        assert (plans[0].key() == plans[1].key()) is one_key
        if one_key:  # one key is right only if the adapters are one
            adapters = [build_adapter(bank, p, 16) for p in plans]
            assert all(torch.equal(adapters[0].delta(m), adapters[1].delta(m)) for m in adapters[0].modules)
            assert all(torch.equal(adapters[0].delta(m), bank.shared.delta(m)) for m in bank.shared.modules)


STACKING_LRS = (1e-3, 3e-2)
STACKING_USERS = 2  # of the anchor pool: the first two


@pytest.fixture(scope="module")
def built_refit(built_task, lamp_file, tiny_model_dir, embedder):
    """The same build with `refit`, in the same work directory (what it reuses is part of the contract)."""
    _, root = built_task
    config = dataclasses.replace(TASK_CONFIG, refit=True, stacking_lrs=STACKING_LRS, stacking_users=STACKING_USERS)
    report = build_bank(
        lamp_file, root / "refit-bank", config, model_dir=tiny_model_dir, work_dir=root / "work", keep_work=True,
        embedder=embedder, progress=False,
    )  # fmt: skip
    return report, root


def test_a_refit_retrains_every_lora_on_all_items_for_its_chosen_epochs(built_task, built_refit, tiny_model_dir):
    (validated, _), (refit, root) = built_task, built_refit
    anchors = [a.id for a in validated.manifest.anchors]
    # the validated runs and the fusion choice are reused, not redone; only the refits train
    assert refit.skipped == ["shared", *anchors] and refit.trained == [f"refit {n}" for n in ["shared", *anchors]]
    m, before = refit.manifest, validated.manifest
    assert m.fusion == before.fusion and m.extra["fusion_selection"] == before.extra["fusion_selection"]
    assert m.bank_version != before.bank_version and m.extra["training"]["refit"]
    for record, was in [
        (m.extra["training"]["shared"], before.extra["training"]["shared"]),
        *((m.extra["anchors"][a], before.extra["anchors"][a]) for a in anchors),
    ]:
        assert record["refit"]["epochs"] == was["best_epoch"]
        assert record["refit"]["examples"] == was["examples"] + was["validation_examples"]  # the validation items too
    # the bank ships the refit LoRAs (in bf16), and they differ from the validated ones
    bank, old = _load(refit.path, tiny_model_dir), _load(validated.path, tiny_model_dir)
    work_shared = load_adapter(root / "work" / REFIT_DIR / SHARED_LORA_DIR)
    for mod in bank.shared.modules:
        assert torch.allclose(bank.shared.b[mod].float(), work_shared.b[mod], rtol=1e-2, atol=1e-3)
        assert not torch.equal(bank.shared.b[mod], old.shared.b[mod])
    # `mta eval --folds 2` builds its second bank with the same recipe
    config = build_config_from_manifest(json.loads((refit.path / "manifest.json").read_text()), refit.path,
                                        holdout_fraction=0.0)  # fmt: skip
    assert config.refit is True and config.stacking_lrs == STACKING_LRS and config.stacking_users == STACKING_USERS
    legacy = json.loads((validated.path / "manifest.json").read_text())
    assert build_config_from_manifest(legacy, validated.path, holdout_fraction=0.0).refit is False


def test_the_stacking_recipe_is_chosen_on_the_anchor_pool_before_the_refit(built_task, built_refit, tiny_model_dir, capsys):
    from server.bank.stacking_choice import FEW_SHOT
    from server.settings import Settings
    from server.stacking import stack_config

    (validated, _), (refit, root) = built_task, built_refit
    assert validated.manifest.stacking is None and "stacking_selection" not in validated.manifest.extra
    m = refit.manifest
    selection = m.extra["stacking_selection"]
    pool = {str(u) for u in m.extra["split"]["anchor_pool"]}
    assert set(selection["user_ids"]) <= pool  # never a held-out user
    # `stacking_users`: the first N anchor-pool users (of a larger pool)
    assert len(pool) > STACKING_USERS and selection["max_users"] == STACKING_USERS
    first = [str(u) for u in m.extra["split"]["anchor_pool"][:STACKING_USERS]]
    assert selection["users"] > 0 and set(selection["user_ids"]) <= set(first)  # those with validation items
    assert selection["learning_rates"] == list(STACKING_LRS) and selection["few_shot"] == FEW_SHOT
    names = [row["candidate"] for row in selection["table"]]
    assert names == ["fused adapter alone", *(f"lr {lr:g}" for lr in STACKING_LRS), "oppu (rank 8 over the shared task LoRA)"]
    losses = np.array(selection["user_losses"])
    assert losses.shape == (len(names), selection["users"])
    assert [row["validation_loss"] for row in selection["table"]] == pytest.approx(losses.mean(axis=1).tolist(), abs=1e-4)
    best = STACKING_LRS[int(np.argmin(losses[1 : 1 + len(STACKING_LRS)].mean(axis=1)))]
    default = stack_config(Settings.model_construct())
    assert selection["chosen"] == {"rank": default.rank, "learning_rate": best, "epochs": default.epochs}
    assert m.stacking is not None and m.stacking.model_dump() == selection["chosen"]
    assert not np.allclose(losses[len(STACKING_LRS)], losses[0])  # a stacked LoRA moves the validation loss
    # chosen over the validated LoRAs, before the refit: the record is the work directory's, computed once
    record = json.loads((root / "work" / "records" / "stacking_selection.json").read_text())
    assert record["record"] == selection
    # the server and `mta eval` train with the bank's choice unless told otherwise
    assert stack_config(Settings.model_construct(), bank=m.stacking).learning_rate == best
    assert stack_config(Settings.model_construct(), learning_rate=0.5, bank=m.stacking).learning_rate == 0.5
    assert stack_config(Settings(finetune_learning_rate=0.25), bank=m.stacking).learning_rate == 0.25
    assert stack_config(Settings(finetune_epochs=7), bank=m.stacking).learning_rate == best
    mta(["bank", "show", str(refit.path)])  # the choice, its table, the chosen row marked
    text = capsys.readouterr().out
    assert f"rank {default.rank}, lr {best}, {default.epochs} epochs" in text
    (row,) = [ln for ln in text.splitlines() if ln.strip().startswith("lr ") and ln.endswith("<- chosen")]
    assert row.split()[:2] == ["lr", f"{best:g}"]
    assert f"{selection['users']} (of the first {STACKING_USERS} anchor-pool users)" in text
    mta(["bank", "show", str(validated.path)])  # built without --stacking-lrs: the server's defaults
    assert "none recorded: the server's MTA_FINETUNE_* defaults" in capsys.readouterr().out


def test_stacking_learning_rates_need_validation_items():
    with pytest.raises(BankBuildError, match="validation items"):
        dataclasses.replace(TASK_CONFIG, stacking_lrs=(1e-3,), validation_items=0)
    with pytest.raises(BankBuildError, match=r"\(0, 1\]"):
        dataclasses.replace(TASK_CONFIG, stacking_lrs=(0.0,))
    with pytest.raises(BankBuildError, match="stacking users"):
        dataclasses.replace(TASK_CONFIG, stacking_lrs=(1e-3,), stacking_users=-1)


def test_a_refit_needs_validation_items():
    with pytest.raises(BankBuildError, match="validation items"):
        dataclasses.replace(TASK_CONFIG, refit=True, validation_items=0)


def test_the_real_server_serves_a_task_init_bank(built_task, tiny_model_dir, tmp_path, lamp_users):
    report, _ = built_task
    user = next(u for u in lamp_users if u["user_id"] == report.manifest.extra["split"]["held_out"][0])
    body = serve_and_generate(report, user, tmp_path, tiny_model_dir, MTA_RESIDUAL_SCALE="0.5", MTA_FUSION_MODE="linear")
    assert body["personalized"] is True and body["bank_version"] == report.manifest.bank_version
    assert body["adapter"]["rank"] == 4 + 4  # the shared task LoRA + the linear-fused residuals


# --- `--init continue`: every meta-LoRA continues the task LoRA's own A and B --------------------

CONTINUE_CONFIG = dataclasses.replace(
    TASK_CONFIG, init="continue", train=dataclasses.replace(TRAIN, rank=2, alpha=4),  # rank 2: not used
    task_train=dataclasses.replace(TASK_CONFIG.task_train, rank=3, alpha=6),
)  # fmt: skip


@pytest.fixture(scope="module")
def built_continue(tmp_path_factory, lamp_file, tiny_model_dir, embedder):
    return build_kept(tmp_path_factory.mktemp("built-continue"), lamp_file, CONTINUE_CONFIG, tiny_model_dir, embedder)


def test_a_continue_bank_starts_every_meta_lora_at_the_task_lora(built_continue, tiny_model_dir, lamp_users, capsys):
    report, root = built_continue
    m = report.manifest
    # the task LoRA is trained first and is every meta-LoRA's start; the bank stores only the meta-LoRAs
    assert report.trained == ["shared", *(a.id for a in m.anchors)]
    assert m.shared_lora is None and not (report.path / SHARED_LORA_DIR).exists()
    assert all(a.rank == 3 for a in m.anchors) and m.extra["training"]["config"]["rank"] == 3  # the task LoRA's shape
    assert m.extra["training"]["init"] == "continue" and m.extra["training"]["shared"]["config"]["rank"] == 3
    assert "continuing the A and B of a task LoRA" in m.description
    task_lora = load_adapter(root / "work" / SHARED_LORA_DIR)
    model, tok = load_base_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    by_id = {u["user_id"]: u for u in lamp_users}
    bank = _load(report.path, tiny_model_dir)
    assert bank.shared is None
    for anchor in m.anchors:
        record = m.extra["anchors"][anchor.id]
        held = [
            ex
            for uid in record["members"]
            for ex in heldout_examples(*split_items(User(uid, tuple(by_id[uid]["profile"])), 1), TASK)
        ]
        curve, best = record["validation_losses"], record["best_epoch"]
        if held:  # epoch 0 is the task LoRA itself
            alone = mean_loss(model, tok, held, adapter=task_lora, max_length=256, bf16_autocast=True)
            assert curve[0] == pytest.approx(alone, abs=2e-3)
        stored = bank.loras[anchor.id]
        same = all(torch.allclose(stored.delta(mod).float(), task_lora.delta(mod), atol=1e-3) for mod in task_lora.modules)
        assert same is (best == 0)  # trained away from the start unless validation kept epoch 0
    # the fusion choice: lowest mean over the pool, each candidate also scored against the task LoRA alone
    selection = m.extra["fusion_selection"]
    grid, reference = selection["grid"], selection["reference"]
    assert selection["rule"] == "lowest mean" and all(r["residual_scale"] > 0 for r in grid)
    losses = np.array(selection["user_losses"])
    ref = np.array(reference["user_losses"])
    assert reference["validation_loss"] == pytest.approx(ref.mean(), abs=1e-4)
    for row, user_losses in zip(grid, losses):
        assert row["vs_reference"][0] == pytest.approx((user_losses - ref).mean(), abs=1e-4)
    eligible = [r for r in grid if r["served_rank"] <= CONTINUE_CONFIG.max_fused_rank]
    best = min(eligible, key=lambda r: r["validation_loss"])
    assert selection["chosen"] == {k: best[k] for k in ("mode", "top_k", "residual_scale")} == m.fusion.model_dump()
    # `mta bank show` says what the bank is; `--folds 2` rebuilds it with the same recipe
    mta(["bank", "show", str(report.path)])
    out = capsys.readouterr().out
    assert "continue: every meta-LoRA continues" in out and "vs task LoRA [95%]" in out and "task LoRA alone" in out
    config = build_config_from_manifest(json.loads((report.path / "manifest.json").read_text()), report.path,
                                        holdout_fraction=0.0)  # fmt: skip
    assert config.init == "continue" and config.task_train.rank == 3
