"""`mta` command line: thin commands over the same services the server uses.

Heavy modules are imported inside the commands so `mta --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.bank.build import BuildConfig


def _settings(**overrides):
    from pydantic import ValidationError

    from server.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        sys.exit(f"mta: invalid settings:\n{e}")


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from server.api.app import create_app

    settings = _settings(host=args.host, port=args.port, bank_path=args.bank, model_path=args.model)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30
    )
    server = uvicorn.Server(config)
    app.state.stop_server = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises SIGINT after a clean shutdown; `uvicorn.run` exits 0 then too
        pass
    if not server.started:
        sys.exit(3)  # startup failed (bad model, bank or store, or the engine cannot start), as `uvicorn.run`
    if code := getattr(app.state, "exit_code", 0):
        sys.exit(code)  # 4: the engine died; a supervisor (compose, Kubernetes) starts a new server


def cmd_worker(args: argparse.Namespace) -> None:
    import asyncio

    from server.worker import run_worker

    settings = _settings(bank_path=args.bank, model_path=args.model)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_worker(settings))


def cmd_model_prepare(args: argparse.Namespace) -> None:
    """Convert the default model and build the LoRA decode kernel, so serving compiles nothing."""
    from server.defaults import resolve_model
    from server.engine_args import served_dtype
    from server.lora_ops import prepare_lora_path

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = _settings(cache_dir=args.cache_dir)
    path, _model_id = resolve_model(settings)
    try:
        lora_path = prepare_lora_path(settings.device, served_dtype(settings, path), settings.fast_cpu_lora_ops)
    except RuntimeError as e:  # KernelBuildError: a compiler is there and failed
        sys.exit(f"mta model prepare: {e}")
    print(f"LoRA path: {lora_path}", file=sys.stderr)
    print(path)


def cmd_bank_random(args: argparse.Namespace) -> None:
    from server.bank.random_bank import write_random_demo_bank
    from server.defaults import resolve_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path, model_id = resolve_model(_settings(model_path=args.model))
    print(write_random_demo_bank(args.out, model_path=path, model_id=model_id, n_anchors=args.anchors))


def _offline_setup(threads: int | None) -> None:
    """Logging and torch threads for the offline trainers (bank build, eval)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if threads:
        import torch

        torch.set_num_threads(threads)


def bank_build_config(args: argparse.Namespace) -> BuildConfig:
    """The `BuildConfig` that `mta bank build`'s arguments ask for (ValueError when they are bad)."""
    import dataclasses

    from server.bank.build import BuildConfig
    from server.bank.manifest import FusionDefaults
    from server.embedding import DEFAULT_EMBEDDING_MODEL
    from server.tasks import make_task
    from server.training import TrainConfig

    task = make_task(args.task, args.history_template, args.prompt_template, args.answer_field)
    train = TrainConfig(
        rank=args.rank,
        alpha=args.alpha or 2 * args.rank,
        target_modules=tuple(args.targets or ()),
        learning_rate=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        max_length=args.max_length,
        bf16_autocast=args.bf16_autocast,
    )
    return BuildConfig(
        task=task,
        n_anchors=args.anchors,
        train=train,
        meta_data=args.meta_data,
        holdout_fraction=args.holdout_fraction,
        kmeans_seed=args.seed,
        dtype=args.dtype,
        embedding_model=args.embedding_model or DEFAULT_EMBEDDING_MODEL,
        fusion=FusionDefaults(mode=args.fusion_mode, top_k=args.top_k, residual_scale=args.residual_scale),
        name=args.name,
        init=args.init,
        task_train=dataclasses.replace(
            train, rank=args.task_rank, alpha=2 * args.task_rank, epochs=args.task_epochs or args.epochs
        ),
        validation_items=args.validation_items,
        patience=args.patience,
        select_fusion=args.select_fusion,
        refit=args.refit,
        stacking_lrs=tuple(args.stacking_lrs or ()),
        stacking_users=args.stacking_users,
    )


def cmd_bank_build(args: argparse.Namespace) -> None:
    from server.bank.build import build_bank
    from server.defaults import resolve_model
    from server.lamp_data import DataError

    _offline_setup(args.threads)
    try:
        config = bank_build_config(args)
    except ValueError as e:
        sys.exit(f"mta bank build: {e}")
    path, model_id = resolve_model(_settings(model_path=args.model))
    try:
        report = build_bank(
            args.data, args.out, config, model_dir=path, model_id=model_id, work_dir=args.work_dir, keep_work=args.keep_work
        )
    except DataError as e:  # BankBuildError is one
        sys.exit(f"mta bank build: {e}")
    size = sum(f.stat().st_size for f in report.path.rglob("*") if f.is_file())
    print(f"bank {report.manifest.bank_version} written to {report.path} ({size / 1e6:.1f} MB)")
    extra = report.manifest.extra
    shared = extra["training"].get("shared")
    for name, rec in ([("shared task LoRA", shared)] if shared else []) + [
        (f"anchor {a.id}: cluster of {a.cluster_size}", extra["anchors"][a.id]) for a in report.manifest.anchors
    ]:
        if "validation_losses" in rec:
            fit = f"validation loss by epoch {rec['validation_losses']}, kept epoch {rec['best_epoch']}"
        else:
            fit = f"loss {rec['initial_loss']:.3f} -> {rec['final_loss']:.3f}"
        print(f"  {name}, {rec['examples']} examples, {fit}")
    if "chosen" in extra.get("fusion_selection", {}):
        print(f"fusion defaults chosen on the anchor pool: {extra['fusion_selection']['chosen']}")
    if report.manifest.stacking is not None:
        print(f"stacking recipe chosen on the anchor pool: {report.manifest.stacking.model_dump()}")
    print(f"trained {len(report.trained)}, reused {len(report.skipped)} LoRAs in {report.seconds:.0f} s")
    if args.report is not None:  # beside the bank, never inside it (the bank directory is served and shipped)
        out = Path(args.report) if args.report else report.path.with_name(f"{report.path.name}.report.png")
        _bank_report(report.path, out, args.data, "mta bank build", f"(the bank {report.path} is written)")


def _bank_report(bank: Path, out: Path, data: Path | None, command: str, context: str = "", stream=None) -> None:
    from server.bank.loader import BankError
    from server.bank.report import write_report

    try:
        path, notes = write_report(bank, out, data=data)
    except (BankError, ValueError, OSError) as e:
        sys.exit(f"{command}: report not written" + (f" {context}" if context else "") + f": {e}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"report written to {path}", file=stream or sys.stdout)


def cmd_bank_show(args: argparse.Namespace) -> None:
    import json

    from server.bank.loader import BankError
    from server.bank.report import describe_bank, format_bank

    if args.data is not None and args.report is None:
        sys.exit("mta bank show: --data is for the users panel of --report OUT.png")
    try:
        info = describe_bank(args.bank)
    except BankError as e:
        sys.exit(f"mta bank show: {e}")
    print(json.dumps(info, indent=2) if args.json else format_bank(info))
    if args.report is not None:
        _bank_report(args.bank, args.report, args.data, "mta bank show", stream=sys.stderr if args.json else None)


def cmd_eval(args: argparse.Namespace) -> None:
    import dataclasses

    from server.defaults import resolve_model
    from server.evaluation.config import EvalConfig
    from server.evaluation.methods import parse_methods
    from server.evaluation.report import markdown_table
    from server.evaluation.runner import format_timings, run
    from server.settings import Settings
    from server.stacking import OPPU_TRAIN, RECIPE_FIELDS, stack_config
    from server.tasks import make_task, scoring
    from server.training import TrainConfig

    _offline_setup(args.threads)
    try:
        task = make_task(args.task, args.history_template, args.prompt_template, args.answer_field)
        known = scoring(task.name)
        kind = args.metric or known.metric
        methods = parse_methods(args.methods, classification=kind == "classification")
        if args.bank is None and any(m.bank for m in methods):
            raise ValueError("the mta_* methods need --bank")
        path, model_id = resolve_model(_settings(model_path=args.model))
        config = EvalConfig(
            task=task,
            data=args.data,
            out=args.out,
            methods=tuple(methods),
            model_dir=path,
            model_id=model_id,
            bank=args.bank,
            kind=kind,
            labels=known.labels,
            n_few_shot=args.few_shot,
            max_users=args.max_users,
            holdout_fraction=args.holdout_fraction,
            max_new_tokens=args.max_new_tokens or known.max_new_tokens,
            dtype=args.dtype,
            task_train=TrainConfig(epochs=args.task_epochs),
            oppu_train=dataclasses.replace(OPPU_TRAIN, learning_rate=args.user_lr, epochs=args.user_epochs),
            stack_train=stack_config(
                Settings.model_construct(), rank=args.stack_rank, learning_rate=args.stack_lr, epochs=args.stack_epochs
            ),
            stack_given=frozenset(
                k for k, v in zip(RECIPE_FIELDS, (args.stack_rank, args.stack_lr, args.stack_epochs)) if v is not None
            ),
            resamples=args.resamples,
            folds=args.folds,
        )
        result = run(config)
    except (ValueError, OSError) as e:  # bad data, settings or banks (DataError, BankBuildError)
        sys.exit(f"mta eval: {e}")
    print(markdown_table(result))
    print(f"timings: {format_timings(result['timings'])}")
    print(f"wrote {args.out}/results.json, results.md, results.png, predictions.jsonl in {result['seconds']:.0f} s")


def cmd_bench(args: argparse.Namespace) -> None:
    import importlib
    import json

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from server.bench import BENCHMARKS

    from server.bench import harness

    result = harness.run(importlib.import_module(BENCHMARKS[args.name]).SCENARIO, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    from server.bench.common import float_list

    p = argparse.ArgumentParser(prog="mta", description="MTA personalization server (settings: MTA_* variables)")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--bank", type=Path, help="bank directory (MTA_BANK_PATH)")
    serve.add_argument("--model", type=Path, help="model directory (MTA_MODEL_PATH)")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run fine-tune jobs from the shared store (Redis) queue")
    worker.add_argument("--bank", type=Path, help="bank directory (MTA_BANK_PATH)")
    worker.add_argument("--model", type=Path, help="model directory (MTA_MODEL_PATH)")
    worker.set_defaults(func=cmd_worker)

    model = sub.add_parser("model", help="base model helpers").add_subparsers(dest="model_command", required=True)
    prep = model.add_parser("prepare", help="convert the packaged SmolLM2-135M-Instruct once into the cache")
    prep.add_argument("--cache-dir", type=Path)
    prep.set_defaults(func=cmd_model_prepare)

    bank = sub.add_parser("bank", help="meta-LoRA banks").add_subparsers(dest="bank_command", required=True)
    rnd = bank.add_parser("random", help="write a RANDOM demo bank (real LaMP anchors, untrained LoRAs)")
    rnd.add_argument("--out", type=Path, required=True)
    rnd.add_argument("--model", type=Path)
    rnd.add_argument("--anchors", type=int, default=8)
    rnd.set_defaults(func=cmd_bank_random)
    build = bank.add_parser(
        "build",
        help="train a meta-LoRA bank (MTA stage 1) from a LaMP-format user file",
        description="Split users into anchor pool / held-out, embed and cluster the pool, train one meta-LoRA "
        "per cluster anchor (longest history) from one shared init, write the bank atomically. Resumable.",
    )
    build.add_argument("--task", required=True, help="movie_tagging, news_headline, or a name for a generic task")
    build.add_argument("--data", type=Path, required=True, help="LaMP per-user JSON file")
    build.add_argument("--out", type=Path, required=True, help="bank directory to write (replaced atomically)")
    build.add_argument("--model", type=Path, help="base model directory (default: the server's default model)")
    build.add_argument("--anchors", type=int, default=8, help="k: number of clusters / meta-LoRAs")
    build.add_argument("--rank", type=int, default=8)
    build.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    build.add_argument("--targets", nargs="+", metavar="MODULE", help="LoRA target modules (default: every linear layer of the model's decoder layers)")
    build.add_argument("--epochs", type=int, default=2)
    build.add_argument("--lr", type=float, default=2e-4)
    build.add_argument("--batch-size", type=int, default=4)
    build.add_argument("--max-length", type=int, default=512, help="tokens per training example")
    build.add_argument("--no-bf16-autocast", dest="bf16_autocast", action="store_false")
    build.add_argument("--seed", type=int, default=0, help="LoRA A init (shared by all anchors), order, k-means")
    build.add_argument("--meta-data", choices=["anchor", "cluster"], default="anchor",
                       help="train on the anchor's history (paper) or on all cluster members' histories")
    build.add_argument("--holdout-fraction", type=float, default=0.2, help="users held out of the bank")
    build.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32", help="stored adapter dtype")
    build.add_argument("--history-template", help="history item template, e.g. 'Description: {description} Tag: {tag}'")
    build.add_argument("--prompt-template", help="instruction for a left-out item, e.g. 'Tag this movie: {description}'")
    build.add_argument("--answer-field", help="item field to predict (default: from the templates)")
    build.add_argument("--embedding-model", help="name or directory (default: all-MiniLM-L6-v2, shipped)")
    build.add_argument("--fusion-mode", choices=["linear", "cat"], default="linear", help="bank default")
    build.add_argument("--top-k", type=int, default=2, help="bank default anchors fused per user")
    build.add_argument("--residual-scale", type=float, default=1.0, help="bank default factor on the fused residuals")
    build.add_argument("--init", choices=["zero", "task", "continue"], default="zero",
                       help="zero: meta-LoRAs from scratch (paper); task: residuals over a shared task LoRA "
                       "trained first on the whole anchor pool (stored once); continue: each meta-LoRA continues "
                       "that task LoRA's own A and B (its rank; --rank is not used)")
    build.add_argument("--task-rank", type=int, default=8, help="--init task|continue: the task LoRA's rank")
    build.add_argument("--task-epochs", type=int, help="--init task|continue: the task LoRA's (most) epochs (default: --epochs)")
    build.add_argument("--validation-items", type=int, default=0,
                       help="hold out each anchor-pool user's last N items: early stopping and the fusion defaults' choice")
    build.add_argument("--patience", type=int, default=1, help="epochs without a better validation loss before stopping")
    build.add_argument("--refit", action="store_true",
                       help="after validation chose every LoRA's epochs and the fusion defaults, retrain each LoRA "
                       "on all of its items (validation items included) for its chosen epochs; the bank ships those")
    build.add_argument("--stacking-lrs", type=float_list, metavar="LR,LR,...",
                       help="choose the stacked LoRA's learning rate among these on the anchor pool's validation "
                       "items (before --refit) and record it as the bank's fine-tune default (needs --validation-items)")
    build.add_argument("--stacking-users", type=int, default=0, metavar="N",
                       help="--stacking-lrs: choose on the first N anchor-pool users only (default 0: all); each "
                       "costs one training per learning rate")
    build.add_argument("--no-select-fusion", dest="select_fusion", action="store_false",
                       help="keep --fusion-mode/--top-k/--residual-scale instead of choosing them on the validation items")
    build.add_argument("--name", help="bank name (default: the task)")
    build.add_argument("--work-dir", type=Path, help="trained meta-LoRAs for resuming (default: .<out>.build)")
    build.add_argument("--keep-work", action="store_true", help="keep the work directory after success")
    build.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is faster on a busy machine)")
    build.add_argument("--report", nargs="?", const="", metavar="PNG",
                       help="also draw the bank (users and anchors in 2-D, loss curves) into PNG "
                       "(default: <out>.report.png, beside the bank)")
    build.set_defaults(func=cmd_bank_build)
    show = bank.add_parser(
        "show",
        help="what a bank holds: anchors, recipe, training curves, fusion defaults, split",
        description="Print a bank's manifest as aligned text (--json: the machine form); facts the manifest "
        "does not hold are 'not recorded'. --report draws the bank into a PNG.",
    )
    show.add_argument("bank", type=Path, help="bank directory")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.add_argument("--report", type=Path, metavar="PNG", help="also draw the bank into this PNG")
    show.add_argument("--data", type=Path, help="the LaMP file the bank was built from: draw its anchor-pool users")
    show.set_defaults(func=cmd_bank_show)

    from server.evaluation.methods import DEFAULT_METHODS

    ev = sub.add_parser(
        "eval",
        help="LaMP evaluation: MTA against its baselines on the same held-out users, one run",
        description="Held-out users only (the bank's recorded split); each user's first --few-shot profile items are "
        "the few-shot set, the rest of the profile plus the query are the evaluation points. Writes results.json, "
        "results.md, results.png and predictions.jsonl to --out; trained adapters are cached in --out/work. "
        "--folds 2 evaluates every user: fold 2 swaps anchor pool and held-out users, with a second bank built "
        "with the given bank's recorded settings (cached in --out/work/fold2-bank).",
    )
    ev.add_argument("--task", required=True, help="movie_tagging, news_headline, or a generic task (give templates)")
    ev.add_argument("--data", type=Path, required=True, help="LaMP per-user JSON file (queries with `gold`)")
    ev.add_argument("--bank", type=Path, help="meta-LoRA bank (needed by the mta_* methods)")
    ev.add_argument(
        "--methods",
        help=f"comma-separated; see docs/results.md (default: {','.join(DEFAULT_METHODS)}; majority and"
        " copy_retrieved only for classification tasks)",
    )
    ev.add_argument("--out", type=Path, required=True, help="output directory")
    ev.add_argument("--model", type=Path, help="base model directory (default: the server's default model)")
    ev.add_argument("--few-shot", type=int, default=5, help="profile items per user used as its few-shot set")
    ev.add_argument("--max-users", type=int, help="evaluate only the first N held-out users (of each fold)")
    ev.add_argument("--folds", type=int, choices=[1, 2], default=1,
                    help="2: also evaluate the anchor-pool users, with a second bank built on the held-out users "
                    "(same build settings, read from the bank's manifest) and task_lora per fold; one results.json")
    ev.add_argument("--holdout-fraction", type=float, default=0.5, help="split when the bank records none")
    ev.add_argument("--max-new-tokens", type=int, help="default: 10 (tags), 50 (headlines)")
    ev.add_argument("--metric", choices=["classification", "generation", "rating"], help="default: from the task")
    ev.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="vLLM inference dtype")
    ev.add_argument("--task-epochs", type=int, default=2, help="task_lora epochs over the anchor pool")
    ev.add_argument("--user-epochs", type=int, default=3, help="oppu epochs over the few-shot set")
    ev.add_argument("--user-lr", type=float, default=2e-4, help="oppu learning rate")
    ev.add_argument("--stack-lr", type=float, help="mta_stack learning rate (default: the bank's recorded choice, else the server's MTA_FINETUNE_LEARNING_RATE)")
    ev.add_argument("--stack-epochs", type=int, help="mta_stack epochs (default: the bank's recorded choice, else the server's MTA_FINETUNE_EPOCHS)")
    ev.add_argument("--stack-rank", type=int, help="mta_stack rank (default: the bank's recorded choice, else the server's MTA_FINETUNE_RANK, 2; oppu: 8)")
    ev.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of users")
    ev.add_argument("--threads", type=int, help="torch CPU threads for training")
    ev.add_argument("--history-template", help="generic tasks: history item template")
    ev.add_argument("--prompt-template", help="generic tasks: instruction template")
    ev.add_argument("--answer-field", help="generic tasks: the field to predict")
    ev.set_defaults(func=cmd_eval)

    from server.bench import BENCHMARKS

    bench = sub.add_parser("bench", help="benchmarks (ratios against baselines, JSON results)")
    bench_sub = bench.add_subparsers(dest="name", required=True)
    for name, module_path in BENCHMARKS.items():
        b = bench_sub.add_parser(name)
        b.add_argument("--out", type=Path, help="write JSON results here")
        b.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
        b.set_defaults(func=cmd_bench, module_path=module_path)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
