"""`mta` command line: thin commands over the same services the server uses.

Heavy modules are imported inside the commands so `mta --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


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
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )  # exits with status 3 when startup fails (bad model, bank or store, or the engine cannot start)


def cmd_model_prepare(args: argparse.Namespace) -> None:
    from server.defaults import resolve_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path, model_id = resolve_model(_settings(cache_dir=args.cache_dir))
    print(path)


def cmd_bank_random(args: argparse.Namespace) -> None:
    from server.bank.random_bank import write_random_demo_bank
    from server.defaults import resolve_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path, model_id = resolve_model(_settings(model_path=args.model))
    print(write_random_demo_bank(args.out, model_path=path, model_id=model_id, n_anchors=args.anchors))


def cmd_bench(args: argparse.Namespace) -> None:
    import importlib
    import json

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from server.bench import BENCHMARKS

    module = importlib.import_module(BENCHMARKS[args.name])
    result = module.run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mta", description="MTA personalization server (settings: MTA_* variables)")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--bank", type=Path, help="bank directory (MTA_BANK_PATH)")
    serve.add_argument("--model", type=Path, help="model directory (MTA_MODEL_PATH)")
    serve.set_defaults(func=cmd_serve)

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
