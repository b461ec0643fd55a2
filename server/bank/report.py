"""What a bank holds (`mta bank show`) and a picture of it (`--report`).

`describe_bank` reads the manifest (validated by `read_manifest`) into one plain dict, the
machine form (`--json`): the manifest's own fields, the anchors with their training records,
the recipe, the shared task LoRA of a `--init task` bank, the fusion defaults and how they
were chosen, the validation set and the split. Facts the manifest does not hold (a random
bank, a bank built before a record existed) are `None` there and "not recorded" in
`format_bank`, the human form.

`write_report` draws the bank: left, the anchor-pool users and the anchors in a 2-D PCA
projection of the embedding space, coloured by cluster; right, every LoRA's loss curve (step
losses, and the validation loss by epoch with the kept epoch marked). The users' embeddings
are not stored in a bank: they are recomputed with the bank's embedding model from the LaMP
file the bank was built from, as `server.bank.build` computes them (the normalised mean of the
user's rendered history items). Without the data file only the anchors are drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.bank.loader import BankError, read_manifest
from server.bank.manifest import BankManifest

NOT_RECORDED = "not recorded"
_RECORD_KEYS = ("user_id", "history_items", "members")  # an anchor record's facts about its user, not its training


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- the machine form ------------------------------------------------------------------------


def _bank_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe_bank(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything `mta bank show` reports, as plain JSON-able data; raises BankError for a non-bank."""
    path = Path(path)
    manifest = read_manifest(path)
    extra = _dict(manifest.extra)
    training = _dict(extra.get("training"))
    records = _dict(extra.get("anchors"))

    anchors = []
    for spec in manifest.anchors:
        record = _dict(records.get(spec.id))
        anchors.append(
            {
                **spec.model_dump(),
                **{key: record.get(key) for key in _RECORD_KEYS},
                "training": {k: v for k, v in record.items() if k not in _RECORD_KEYS} or None,
            }
        )
    shared = None
    if manifest.shared_lora is not None:
        shared = {**manifest.shared_lora.model_dump(), "training": _dict(training.get("shared")) or None}

    split = _dict(extra.get("split"))
    if split:
        pool, held = split.get("anchor_pool"), split.get("held_out")
        split = {
            **split,
            "anchor_pool_size": len(pool) if isinstance(pool, list) else None,
            "held_out_size": len(held) if isinstance(held, list) else None,
        }
    return {
        "path": str(path),
        "size_bytes": _bank_size(path),
        **manifest.model_dump(exclude={"extra", "anchors", "shared_lora"}),
        "builder": extra.get("builder"),
        "data": _dict(extra.get("data")) or None,
        "split": split or None,
        "clustering": _dict(extra.get("clustering")) or None,
        # a stored shared LoRA's training goes with it; a `--init continue` bank's task LoRA stays in the recipe
        "recipe": {k: v for k, v in training.items() if k != "shared" or shared is None} or None,
        "shared_lora": shared,
        "anchors": anchors,
        "validation": _dict(extra.get("validation")) or None,
        "fusion_selection": _dict(extra.get("fusion_selection")) or None,
        "stacking_selection": _dict(extra.get("stacking_selection")) or None,
    }


# --- curves ---------------------------------------------------------------------------------


def steps_per_epoch(record: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> float | None:
    """Optimizer steps per epoch of a LoRA's training record.

    With a validation curve (measured before training and after every epoch run), the steps
    divided by the epochs run; else ceil(examples / batch size) from the training config.
    """
    steps = record.get("steps") if _is_num(record.get("steps")) else len(_list(record.get("step_losses"))) or None
    val = _list(record.get("validation_losses"))
    if steps and len(val) >= 2:
        return steps / (len(val) - 1)
    batch = _dict(config).get("batch_size")
    if _is_num(record.get("examples")) and _is_num(batch) and batch > 0:
        return float(math.ceil(record["examples"] / batch))
    return None


def epoch_means(record: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> list[float]:
    """The mean step loss of each epoch trained (empty when the record cannot tell the epochs apart)."""
    losses = [float(x) for x in _list(record.get("step_losses")) if _is_num(x)]
    per = steps_per_epoch(record, config)
    if not losses or not per:
        return []
    per_int = max(1, round(per))
    return [float(np.mean(losses[i : i + per_int])) for i in range(0, len(losses), per_int)]


# --- the human form -------------------------------------------------------------------------


def _table(rows: Sequence[Sequence[str]], right: set[int] = frozenset(), indent: str = "  ") -> list[str]:
    """Aligned columns; the first row is the header; columns in `right` are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def _fields(pairs: Sequence[tuple[str, str]], indent: str = "") -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"{indent}{k.ljust(width)}  {v}" for k, v in pairs]


def _str(value: Any) -> str:
    return NOT_RECORDED if value is None else str(value)


def _losses(values: Sequence[Any], best: Any = None, digits: int = 3) -> str:
    """`0.790 0.713 0.658* 0.663`: `*` marks the kept epoch."""
    return " ".join(
        (f"{v:.{digits}f}" if _is_num(v) else "?") + ("*" if i == best else "") for i, v in enumerate(values)
    )


def _config_text(config: Mapping[str, Any]) -> str:
    if not config:
        return NOT_RECORDED
    parts = []
    for key, label in (("rank", "rank"), ("alpha", "alpha"), ("learning_rate", "lr"), ("epochs", "epochs <="),
                       ("batch_size", "batch"), ("warmup_ratio", "warm-up"), ("max_length", "max length"),
                       ("seed", "seed")):  # fmt: skip
        if key in config:
            parts.append(f"{label} {config[key]:g}" if _is_num(config[key]) else f"{label} {config[key]}")
    if config.get("bf16_autocast"):
        parts.append("bf16 autocast")
    targets = _list(config.get("target_modules"))
    if targets:
        parts.append(f"{len(targets)} modules ({','.join(map(str, targets))})")
    return ", ".join(parts)


def _curve_row(name: str, record: Mapping[str, Any] | None, config: Mapping[str, Any] | None) -> list[str]:
    if not record:
        return [name, "", NOT_RECORDED, ""]
    steps = _str(record.get("steps"))
    by_epoch = epoch_means(record, config)
    if "validation_losses" in record:
        train = _losses(by_epoch) if by_epoch else NOT_RECORDED
        val = _losses(_list(record.get("validation_losses")), record.get("best_epoch"))
        if record.get("best_epoch") is None:
            val += " (kept epoch not recorded)"
        return [name, steps, train, val]
    if _is_num(record.get("initial_loss")) and _is_num(record.get("final_loss")):
        train = f"{record['initial_loss']:.3f} -> {record['final_loss']:.3f} (before -> after)"
    else:
        train = _losses(by_epoch) if by_epoch else NOT_RECORDED
    return [name, steps, train, NOT_RECORDED]


def format_bank(info: Mapping[str, Any]) -> str:
    """`describe_bank`'s dict as aligned plain text."""
    lines: list[str] = []
    emb = _dict(info.get("embedding_model"))
    task = _dict(info.get("task"))
    fusion = _dict(info.get("fusion"))
    data = _dict(info.get("data"))
    split = _dict(info.get("split"))
    clustering = _dict(info.get("clustering"))
    recipe = _dict(info.get("recipe"))
    shared = info.get("shared_lora")
    # a `--init continue` bank's task LoRA: the meta-LoRAs' start, recorded but not stored
    task_lora = _dict(recipe.get("shared")) if recipe.get("init") == "continue" else {}
    selection = _dict(info.get("fusion_selection"))
    validation = _dict(info.get("validation"))
    anchors = _list(info.get("anchors"))

    data_text = NOT_RECORDED
    if data:
        data_text = f"{data.get('file', '?')}, {_str(data.get('users'))} users"
        if data.get("sha256"):
            data_text += f" (sha256 {str(data['sha256'])[:12]}...)"
    split_text = NOT_RECORDED
    if split:
        split_text = (
            f"{_str(split.get('anchor_pool_size'))} anchor pool / {_str(split.get('held_out_size'))} held out"
            f" (holdout fraction {_str(split.get('holdout_fraction'))})"
        )
    clustering_text = NOT_RECORDED
    if clustering:
        clustering_text = (
            f"k-means, k {_str(clustering.get('k'))}, seed {_str(clustering.get('seed'))}, "
            f"{_str(clustering.get('restarts'))} restarts; anchor: {_str(clustering.get('anchor_rule'))}"
        )
    lines += _fields(
        [
            ("bank", _str(info.get("path"))),
            ("name", _str(info.get("name"))),
            ("version", _str(info.get("bank_version"))),
            ("random", "YES: random LoRAs, not trained (serving tests only)" if info.get("random") else "no"),
            ("base model", _str(info.get("base_model"))),
            ("embedding model", f"{emb.get('name', '?')} (dim {emb.get('dim', '?')})"),
            ("task", f"{task.get('name', '?')}: {task.get('history_template') or 'items as key: value pairs'}"),
            ("size", f"{info['size_bytes'] / 1e6:.1f} MB on disk" if _is_num(info.get("size_bytes")) else "?"),
            ("description", _str(info.get("description") or None)),
            ("data", data_text),
            ("split", split_text),
            ("clustering", clustering_text),
        ]
    )

    # the recipe
    lines += ["", "recipe"]
    if not recipe:
        lines.append(f"  {NOT_RECORDED}" + (" (a random bank: its LoRAs are not trained)" if info.get("random") else ""))
    else:
        init = recipe.get("init")
        init_text = {
            "task": "task: residual meta-LoRAs over a shared task LoRA trained first on the whole anchor pool",
            "zero": "zero: every meta-LoRA from scratch (the paper's recipe)",
            "continue": "continue: every meta-LoRA continues the A and B of a task LoRA trained first on the whole anchor pool",
        }.get(init, _str(init))
        meta = recipe.get("meta_data")
        meta_text = {"cluster": "cluster: each meta-LoRA on its cluster's members' histories",
                     "anchor": "anchor: each meta-LoRA on its anchor's history"}.get(meta, _str(meta))  # fmt: skip
        pairs = [
            ("init", init_text),
            ("meta-data", meta_text),
            ("meta-LoRAs", _config_text(_dict(recipe.get("config")))),
        ]
        if shared is not None or init == "task":
            shared_training = _dict(_dict(shared).get("training"))
            text = _config_text(_dict(shared_training.get("config")))
            if shared is not None:
                counts = ""
                if _is_num(shared_training.get("examples")):
                    n_val = _str(shared_training.get("validation_examples"))
                    counts = f" on {shared_training['examples']} examples ({n_val} validation)"
                text = f"stored in {shared.get('lora_path')}/, rank {shared.get('rank')}; trained{counts} with {text}"
                refit = _dict(shared_training.get("refit"))
                if refit:
                    text += f"; refit: {refit.get('epochs')} epoch(s) on {refit.get('examples')} examples"
            pairs.append(("shared task LoRA", text))
        if task_lora:
            pairs.append(("task LoRA", f"not stored (the meta-LoRAs' start); trained with {_config_text(_dict(task_lora.get('config')))}"))
        if validation.get("items_per_user"):  # a refit needs validation to have chosen the epochs
            pairs.append(("refit", _str(recipe.get("refit") or "no: the bank ships the validated LoRAs")))
        pairs += [
            ("examples", _str(recipe.get("examples"))),
            ("adapter dtype", _str(recipe.get("adapter_dtype"))),
            ("LoRA init seed", _str(info.get("lora_init_seed"))),
        ]
        lines += _fields(pairs, indent="  ")

    # the anchors
    lines += ["", f"anchors ({len(anchors)})"]
    rows = [["id", "cluster size", "rank", "user", "history items", "train examples", "validation examples", "refit"]]
    for a in anchors:
        training = _dict(a.get("training"))
        refit = _dict(training.get("refit"))
        rows.append(
            [
                str(a.get("id")),
                _str(a.get("cluster_size")),
                _str(a.get("rank")),
                _str(a.get("user_id")),
                _str(a.get("history_items")),
                _str(training.get("examples")),
                _str(training.get("validation_examples")),
                f"{refit['epochs']} epoch(s) on {refit['examples']}" if refit else "-",
            ]
        )
    lines += _table(rows, right={1, 2, 4, 5, 6})

    # the training curves
    lines += ["", "training curves (epoch 0 = before training; * = the epoch kept)"]
    rows = [["LoRA", "steps", "train loss by epoch (mean of steps)", "validation loss by epoch"]]
    if shared is not None:
        shared_training = _dict(shared.get("training"))
        rows.append(_curve_row("shared task LoRA", shared_training, _dict(shared_training.get("config"))))
    elif task_lora:
        rows.append(_curve_row("task LoRA (start)", task_lora, _dict(task_lora.get("config"))))
    for a in anchors:
        rows.append(_curve_row(f"anchor {a.get('id')}", a.get("training"), _dict(recipe.get("config"))))
    lines += _table(rows, right={1})

    # the validation set
    lines += ["", "validation"]
    if not validation or not validation.get("items_per_user"):
        lines.append(f"  {NOT_RECORDED}" if not validation else "  none (built without --validation-items)")
    else:
        users = _dict(validation.get("users"))
        n_items = sum(v for v in users.values() if _is_num(v))
        lines += _fields(
            [
                ("items", f"each anchor-pool user's last {validation.get('items_per_user')} history items, "
                          f"held out of every training ({len(users)} users, {n_items} items)"),
                ("patience", f"{_str(validation.get('patience'))} epoch(s) without a better validation loss"),
            ],
            indent="  ",
        )  # fmt: skip

    # the fusion defaults
    lines += ["", "fusion defaults"]
    fusion_text = f"{fusion.get('mode', '?')}, top-{fusion.get('top_k', '?')}"
    if shared is not None or fusion.get("residual_scale") != 1.0:
        fusion_text += f", residual scale {fusion.get('residual_scale', '?')}"
    chosen = _dict(selection.get("chosen"))
    if chosen:
        how = "chosen on the anchor pool's validation items (leave-one-cluster-out)"
    elif selection.get("enabled") is False:
        how = "given at build time (--no-select-fusion)"
    elif selection.get("enabled") is True:
        how = "given at build time (no validation items to choose them on)"
    else:
        how = NOT_RECORDED
    pairs = [("served", fusion_text), ("how", how)]
    requested = _dict(selection.get("requested"))
    if chosen and requested:
        text = f"{requested.get('mode')}, top-{requested.get('top_k')}, residual scale {requested.get('residual_scale')}"
        pairs.append(("requested", text))
    if chosen:
        pairs += [
            ("criterion", _str(selection.get("criterion"))),
            ("rule", _str(selection.get("rule") or "lowest mean (before the noise rule was recorded)")),
            ("users", _str(selection.get("users"))),
            ("max fused rank", _str(selection.get("max_fused_rank"))),
        ]
    lines += _fields(pairs, indent="  ")
    grid = [_dict(r) for r in _list(selection.get("grid"))]
    if grid:
        max_rank = selection.get("max_fused_rank")
        paired = next((k for k in ("vs_shared", "vs_reference") if any(k in r for r in grid)), None)
        against = {"vs_shared": "vs shared alone [95%]", "vs_reference": "vs task LoRA [95%]"}
        rows = [["mode", "top_k", "residual_scale", "validation_loss", "served_rank", *([against[paired]] if paired else []), ""]]
        for r in grid:
            mark = ""
            if chosen and all(r.get(k) == chosen.get(k) for k in ("mode", "top_k", "residual_scale")):
                mark = "<- chosen"
            elif _is_num(max_rank) and _is_num(r.get("served_rank")) and r["served_rank"] > max_rank:
                mark = "(over the max fused rank: not eligible)"
            loss = r.get("validation_loss")
            rows.append(
                [
                    _str(r.get("mode")),
                    _str(r.get("top_k")),
                    f"{r['residual_scale']:.2f}" if _is_num(r.get("residual_scale")) else _str(r.get("residual_scale")),
                    f"{loss:.4f}" if _is_num(loss) else _str(loss),
                    _str(r.get("served_rank")),
                    *([_interval(r.get(paired))] if paired else []),
                    mark,
                ]
            )
        lines += [""] + _table(rows, right={1, 2, 3, 4, 5} if paired else {1, 2, 3, 4}, indent="    ")
        reference = _dict(selection.get("reference"))
        if _is_num(reference.get("validation_loss")):
            lines.append(f"    task LoRA alone (not served): validation_loss {reference['validation_loss']:.4f}")
    lines += _stacking_lines(info)
    return "\n".join(lines)


def _stacking_lines(info: Mapping[str, Any]) -> list[str]:
    """The stacked LoRA's recipe: the bank's choice and its table, or the server's defaults."""
    chosen, selection = _dict(info.get("stacking")), _dict(info.get("stacking_selection"))
    lines = ["", "Stacked LoRA (fine-tune defaults)"]
    if not chosen:
        return lines + ["  none recorded: the server's MTA_FINETUNE_* defaults (mta bank build --stacking-lrs chooses one)"]
    text = f"rank {chosen.get('rank')}, lr {chosen.get('learning_rate')}, {chosen.get('epochs')} epochs"
    users = _str(selection.get("users"))
    if selection.get("max_users"):
        users += f" (of the first {selection['max_users']} anchor-pool users)"
    lines += _fields(
        [("chosen", text), ("rule", _str(selection.get("rule"))), ("users", users),
         ("criterion", _str(selection.get("criterion")))],
        indent="  ",
    )  # fmt: skip
    rows = [["candidate", "validation_loss", "vs fused alone [95%]", ""]]
    for r in (_dict(r) for r in _list(selection.get("table"))):
        loss = r.get("validation_loss")
        mark = "<- chosen" if r.get("candidate") == f"lr {chosen.get('learning_rate'):g}" else ""
        rows.append([_str(r.get("candidate")), f"{loss:.4f}" if _is_num(loss) else _str(loss), _interval(r.get("vs_fused")), mark])
    return lines + [""] + _table(rows, right={1, 2}, indent="    ")


def _interval(values: Any) -> str:
    """A paired difference as `-0.0219 [-0.0559, +0.0088]`; `-` for the baseline row itself."""
    v = _list(values)
    if len(v) != 3 or not all(_is_num(x) for x in v):
        return "-"
    return f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]"


# --- the projection ------------------------------------------------------------------------------


def project_2d(points: np.ndarray) -> tuple[np.ndarray, float]:
    """(the [n, 2] PCA projection of `points` [n, dim], the fraction of the variance it keeps).

    Deterministic: each component's sign makes its largest loading positive. Fewer than two
    distinct points project to the origin.
    """
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected a non-empty [n, dim] array, got shape {x.shape}")
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[:2]
    for row in components:
        if row[np.argmax(np.abs(row))] < 0:
            row *= -1
    coords = centred @ components.T
    if coords.shape[1] < 2:  # one dimension in, or a single point
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    total = float((s**2).sum())
    kept = float((s[:2] ** 2).sum() / total) if total > 0 else 1.0
    return coords, kept


# --- the users ------------------------------------------------------------------------------


def pool_embeddings(
    manifest: BankManifest, data: str | os.PathLike[str], embedder: Any
) -> tuple[list[str], np.ndarray, list[str]]:
    """(user ids, their embeddings [n, dim], notes): the bank's anchor-pool users, embedded as the build did.

    The users are those of the recorded split found in `data` (every user of the file when
    no split is recorded); each is the normalised mean embedding of its rendered history items.
    Notes say when the file is not the one the bank was built from.
    """
    from server.bank.build import sha256_file
    from server.lamp_data import read_json
    from server.prompts import render_item

    data = Path(data)
    records = read_json(data)  # DataError is a ValueError
    if not isinstance(records, list) or not all(isinstance(r, dict) and "user_id" in r for r in records):
        raise ValueError(f"{data} is not a LaMP user file (a JSON list of {{user_id, profile, ...}} objects)")
    extra = _dict(manifest.extra)
    notes = []
    recorded = _dict(extra.get("data")).get("sha256")
    if recorded and recorded != sha256_file(data):
        notes.append(f"{data.name} is not the file the bank was built from (sha256 differs from the manifest's)")
    pool = _list(_dict(extra.get("split")).get("anchor_pool"))
    wanted = {str(u) for u in pool} if pool else None
    users = [r for r in records if wanted is None or str(r["user_id"]) in wanted]
    if wanted is not None and len(users) < len(wanted):
        notes.append(f"{len(wanted) - len(users)} of the {len(wanted)} anchor-pool users are not in {data.name}")
    if not users:
        raise ValueError(f"{data} holds none of the bank's {len(wanted or ())} anchor-pool users")
    template = manifest.task.history_template
    ids, rows = [], []
    for r in users:
        items = [i for i in _list(r.get("profile")) if isinstance(i, dict)]
        if not items:
            notes.append(f"user {r['user_id']} has no history items: left out")
            continue
        ids.append(str(r["user_id"]))
        rows.append(embedder.embed_user([render_item(i, template) for i in items]))
    if not rows:
        raise ValueError(f"{data}: no anchor-pool user has history items")
    return ids, np.stack(rows).astype(np.float32), notes


def assign_clusters(
    manifest: BankManifest, user_ids: Sequence[str], embeddings: np.ndarray, anchor_embeddings: np.ndarray
) -> tuple[np.ndarray, bool]:
    """(each user's cluster as an index into the anchors, whether every one came from the recorded members).

    A user not recorded as a member of a cluster goes to its most similar anchor (cosine), as
    retrieval would send it.
    """
    records = _dict(_dict(manifest.extra).get("anchors"))
    member_of = {}
    for i, spec in enumerate(manifest.anchors):
        for member in _list(_dict(records.get(spec.id)).get("members")):
            member_of[str(member)] = i
    labels = np.zeros(len(user_ids), dtype=np.int64)
    recorded = True
    if len(user_ids):
        anchors = anchor_embeddings / np.maximum(np.linalg.norm(anchor_embeddings, axis=1, keepdims=True), 1e-12)
        nearest = np.argmax(np.asarray(embeddings) @ anchors.T, axis=1)
        for j, uid in enumerate(user_ids):
            if uid in member_of:
                labels[j] = member_of[uid]
            else:
                labels[j], recorded = nearest[j], False
    return labels, recorded


# --- the picture -------------------------------------------------------------------------------


def _colours(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _plot_curve(ax: Any, record: Mapping[str, Any], config: Mapping[str, Any] | None, colour: Any, label: str) -> bool:
    """One LoRA's step losses (thin) and validation losses by epoch (markers, the kept one a star); x in epochs."""
    losses = [float(x) if _is_num(x) else np.nan for x in _list(record.get("step_losses"))]
    val = [float(x) if _is_num(x) else np.nan for x in _list(record.get("validation_losses"))]
    if not losses and not val:
        return False
    per = steps_per_epoch(record, config) or max(len(losses), 1)
    if losses:
        ax.plot(np.arange(1, len(losses) + 1) / per, losses, color=colour, lw=0.8, alpha=0.35)
    if val:
        ax.plot(range(len(val)), val, color=colour, lw=1.6, marker="o", ms=4, label=label)
        best = record.get("best_epoch")
        if isinstance(best, int) and 0 <= best < len(val):
            ax.plot([best], [val[best]], marker="*", ms=13, color=colour, mec="black", mew=0.7, zorder=5)
    elif losses:
        ax.lines[-1].set_label(label)
        ax.lines[-1].set_alpha(0.9)
    return True


def write_report(
    bank: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    embedder: Any = None,
) -> tuple[Path, list[str]]:
    """Draw the bank into the PNG `out`; returns (out, notes). See the module doc.

    `data` is the LaMP file the bank was built from (the users panel); `embedder` reuses a
    loaded `Embedder` of the bank's embedding model.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    bank, out = Path(bank), Path(out)
    manifest = read_manifest(bank)
    info = describe_bank(bank)
    emb_file = bank / manifest.embeddings_file
    try:
        anchor_emb = np.load(emb_file, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as e:
        raise BankError(f"bank {bank}: cannot read {manifest.embeddings_file}: {e}") from e
    if anchor_emb.ndim != 2 or len(anchor_emb) != len(manifest.anchors):
        raise BankError(
            f"bank {bank}: {manifest.embeddings_file} has shape {anchor_emb.shape}, the manifest has "
            f"{len(manifest.anchors)} anchors"
        )

    notes: list[str] = []
    user_ids: list[str] = []
    user_emb = np.zeros((0, anchor_emb.shape[1]), dtype=np.float32)
    if data is not None:
        if embedder is None:
            from server.embedding import Embedder, resolve_embedding_model

            embedder = Embedder(resolve_embedding_model(manifest.embedding_model.name))
        user_ids, user_emb, notes = pool_embeddings(manifest, data, embedder)
        if user_emb.shape[1] != anchor_emb.shape[1]:
            raise ValueError(
                f"the embedding model gives dim {user_emb.shape[1]}, the bank's anchors have {anchor_emb.shape[1]}"
            )
    labels, recorded = assign_clusters(manifest, user_ids, user_emb, anchor_emb)
    coords, kept = project_2d(np.concatenate([user_emb, anchor_emb]))
    users_xy, anchors_xy = coords[: len(user_ids)], coords[len(user_ids) :]

    colours = _colours(len(manifest.anchors))
    fig = plt.figure(figsize=(14, 6))
    has_shared = _dict(info.get("shared_lora")).get("training") is not None
    grid = fig.add_gridspec(
        2 if has_shared else 1, 2, width_ratios=(1, 1.15), height_ratios=(1, 2) if has_shared else None
    )
    ax_map = fig.add_subplot(grid[:, 0])

    # left: users and anchors
    for i, spec in enumerate(manifest.anchors):
        mine = labels == i
        if mine.any():
            ax_map.scatter(users_xy[mine, 0], users_xy[mine, 1], s=28, color=colours[i], alpha=0.75, edgecolors="none")
        size = f"{spec.cluster_size} user{'s' * (spec.cluster_size != 1)}"
        ax_map.scatter(anchors_xy[i, 0], anchors_xy[i, 1], s=260, marker="*", color=colours[i], edgecolors="black",
                       linewidths=0.8, zorder=4, label=f"{spec.id} ({size})")  # fmt: skip
        ax_map.annotate(spec.id, anchors_xy[i], xytext=(6, 5), textcoords="offset points", fontsize=7)
    who = (
        f"{len(user_ids)} anchor-pool users (dots; "
        + ("clusters as recorded" if recorded else "colour: cluster, or nearest anchor when not recorded")
        + ") and "
        if user_ids
        else "no users drawn (give the data file); "
    )
    ax_map.set_title(
        f"{who}{len(manifest.anchors)} anchors (stars)\nPCA of the embedding space, {kept:.0%} of the variance", fontsize=9
    )
    ax_map.set_xlabel("PC 1")
    ax_map.set_ylabel("PC 2")
    ax_map.legend(title="anchor (cluster size)", fontsize=7, title_fontsize=8, loc="best", framealpha=0.8)
    ax_map.grid(alpha=0.2)
    ax_map.margins(0.12)  # room for the anchors' labels

    # right: the loss curves
    recipe = _dict(info.get("recipe"))
    axes = []
    if has_shared:
        ax_shared = fig.add_subplot(grid[0, 1])
        shared_training = _dict(info["shared_lora"]["training"])
        _plot_curve(ax_shared, shared_training, _dict(shared_training.get("config")), "black", "shared task LoRA")
        ax_shared.set_title("shared task LoRA", fontsize=9)
        axes.append(ax_shared)
    ax_curves = fig.add_subplot(grid[1 if has_shared else 0, 1])
    drawn = 0
    for i, anchor in enumerate(info["anchors"]):
        record = _dict(anchor.get("training"))
        drawn += _plot_curve(ax_curves, record, _dict(recipe.get("config")), colours[i], f"anchor {anchor['id']}")
    ax_curves.set_title("meta-LoRAs" + (" (residuals over the shared task LoRA)" if has_shared else ""), fontsize=9)
    if not drawn:
        ax_curves.text(0.5, 0.5, f"no training curves recorded{' (random bank)' if manifest.random else ''}",
                       ha="center", va="center", transform=ax_curves.transAxes)  # fmt: skip
    axes.append(ax_curves)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.2)
    if drawn or has_shared:
        ax_curves.legend(
            handles=[
                Line2D([], [], color="grey", lw=0.8, alpha=0.6, label="training loss per step"),
                Line2D([], [], color="grey", lw=1.6, marker="o", ms=4, label="validation loss by epoch (0 = before)"),
                Line2D([], [], color="grey", lw=0, marker="*", ms=11, mec="black", label="epoch kept"),
            ],
            fontsize=7, loc="upper right", framealpha=0.8,
        )  # fmt: skip
    fig.suptitle(f"bank {manifest.bank_version}" + (" (RANDOM LoRAs)" if manifest.random else "")
                 + f": {manifest.base_model}, {manifest.embedding_model.name}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out, notes
