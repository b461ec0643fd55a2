"""Choose the stacked LoRA's default recipe (rank, lr, epochs) on a bank's own anchor pool.

Every anchor-pool user plays a new user the way `mta eval` treats a held-out one: its first
`--few-shot` training items are its fine-tune set (and embed it), its fused adapter leaves its
own cluster's anchor out (that meta-LoRA saw its data), a stacked LoRA is trained over the
fused adapter with each candidate recipe, and the candidate is scored by the answer loss on
the user's validation items (held out of every training of the bank, the shared task LoRA
included). An OPPU-style LoRA (rank 8 over the shared task LoRA) is scored beside them as
the reference. Nothing here reads a held-out user. Used for the server's `MTA_FINETUNE_*`
defaults (docs/results.md, "Stacking recipe").

    python scripts/choose_stacking_recipe.py --bank bank_artifacts/demo \
        --data bank_artifacts/data/movie_tagging.json --out stacking_recipe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from server.adapters import fuse, load_adapter, stack
from server.bank.build import User, heldout_examples, leave_one_out_examples, load_users, split_items
from server.bank.selection import WEIGHT_ROUND_STEP, _neighbours
from server.defaults import resolve_model
from server.settings import Settings
from server.tasks import make_task
from server.embedding import Embedder, resolve_embedding_model
from server.fusion import anchor_weights
from server.training import TrainConfig, load_base_model, load_tokenizer, mean_losses, train_lora

# (rank, learning rate, epochs); rank <= 2 keeps a stacked LoRA at <= 1/4 of OPPU's bytes.
# About 30 s per training on LaMP-2M prompts here: the grid is kept small.
CANDIDATES = [(2, 2e-4, 3), (2, 5e-4, 3), (2, 1e-3, 3)]
OPPU = TrainConfig(rank=8, alpha=16, epochs=3, batch_size=2)  # mta eval's oppu recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bank", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--few-shot", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--users", type=int, default=None, help="only the first N anchor-pool users (by id)")
    args = p.parse_args()

    manifest = json.loads((args.bank / "manifest.json").read_text())
    task = make_task(manifest["task"]["name"], None, None, None)
    pool_ids = set(manifest["extra"]["split"]["anchor_pool"])
    n_val = manifest["extra"]["validation"]["items_per_user"]
    cluster_of = {m: a for a, rec in manifest["extra"]["anchors"].items() for m in rec["members"]}
    fusion = manifest["fusion"]
    model_dir = resolve_model(Settings())[0]
    model, tok = load_base_model(model_dir), load_tokenizer(model_dir)
    embedder = Embedder(resolve_embedding_model(manifest["embedding_model"]["name"]))
    embeddings = np.load(args.bank / manifest["embeddings_file"])
    anchors = {a["id"]: (embeddings[i], load_adapter(args.bank / a["lora_path"])) for i, a in enumerate(manifest["anchors"])}
    shared = load_adapter(args.bank / manifest["shared_lora"]["lora_path"]) if manifest.get("shared_lora") else None

    users = sorted((u for u in load_users(args.data, task) if u.user_id in pool_ids), key=lambda u: u.sort_key)
    users = users[: args.users]
    rows: dict[str, list[float]] = {"fused only": [], "oppu (rank 8 over the task LoRA)": []}
    rows.update({f"stack r{r} lr{lr:g} {e} ep": [] for r, lr, e in CANDIDATES})
    started = time.perf_counter()
    for user in tqdm(users, desc="anchor-pool users", unit="user"):
        train_user, val_items = split_items(user, n_val)
        few = User(user.user_id, train_user.profile[: args.few_shot])
        validation = heldout_examples(few, val_items, task)
        examples = leave_one_out_examples(few, task)
        if not validation or not examples:
            continue
        emb = embedder.embed_user([task.render(i) for i in few.profile])
        ids, sims = _neighbours(emb, anchors, str(cluster_of[user.user_id]), fusion["top_k"])
        weights = anchor_weights(sims, None, WEIGHT_ROUND_STEP)
        kept = [(a, w) for a, w in zip(ids, weights) if w > 0]
        fused = fuse(fusion["mode"], [anchors[a][1] for a, _ in kept], [w for _, w in kept], shared=shared,
                     residual_scale=fusion.get("residual_scale", 1.0))
        jobs = [(validation, fused)]
        oppu = train_lora(model, tok, examples, OPPU, base_adapter=shared, report_loss=False).lora
        jobs.append((validation, stack(shared, oppu)))
        for r, lr, e in CANDIDATES:
            cfg = TrainConfig(rank=r, alpha=2 * r, learning_rate=lr, epochs=e, batch_size=args.batch_size)
            lora = train_lora(model, tok, examples, cfg, base_adapter=fused, report_loss=False).lora
            jobs.append((validation, stack(fused, lora)))
        for name, loss in zip(rows, mean_losses(model, tok, jobs)):
            rows[name].append(loss)

    table = {name: {"mean_validation_loss": float(np.mean(v)), "users": len(v)} for name, v in rows.items()}
    eligible = [n for n in table if n.startswith("stack r2 ")]
    chosen = min(eligible, key=lambda n: table[n]["mean_validation_loss"])
    result = {"bank": manifest["bank_version"], "criterion": __doc__.split("\n\n")[1].replace("\n", " "),
              "table": table, "chosen": chosen, "seconds": time.perf_counter() - started}
    args.out.write_text(json.dumps(result, indent=2))
    for name, row in table.items():
        print(f"{name:40s} {row['mean_validation_loss']:.4f}  ({row['users']} users){'  <- chosen' if name == chosen else ''}")


if __name__ == "__main__":
    main()
