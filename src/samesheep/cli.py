"""The `samesheep` command: one subcommand per stage, plus `run` and `init`. Thin: parse,
call the stage, print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import pipeline
from .core import config as config_mod
from .core.errors import SamesheepError
from .core.files import write_text
from .core.rundir import report_dir, run_path
from .data.store import open_store


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML config file (default: the built-in defaults)")
    p.add_argument(
        "--preset",
        choices=sorted(config_mod.PRESETS),
        help="start from a named setting (original-study: per-text, last layer, 4x TopK 64, "
        "the whole shipped corpus); --config and --set apply on top",
    )
    p.add_argument(
        "--set",
        "-s",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set corpus.max_tokens=0 --set 'layers=[6, \"2/3\"]'",
    )
    _debug(p)


def _debug(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's flag must not reset `samesheep --debug COMMAND` to False.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="tracebacks")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samesheep",
        description="Do different language models learn the same concepts? Train SAEs on two "
        "models' hidden states and compare them on the same text.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "init",
        help="write a commented config with every setting spelled out",
        description="Write a commented config: the defaults, or --config FILE, with any --set "
        "overrides applied.",
    )
    p.add_argument("path", nargs="?", default="samesheep.toml", help="where to write it")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    _common(p)

    for name, text in [
        ("run", "run every stage (corpus to report), skipping what is up to date"),
        ("corpus", "sample the corpus into the run directory"),
        ("extract", "extract activations of every model and layer into the run directory"),
        ("train", "train and evaluate an SAE per model and layer on the stored activations"),
        ("features", "statistics, exemplars, logit lens and labels of every latent of every SAE"),
        ("compare", "compare every pair of models' SAEs, with floors, nulls and ceilings"),
        ("layers", "compare every layer of each pair of models on held-out hidden states"),
        ("interpret", "explain latents with a language model and score every label"),
        ("causal", "ablate a sample of matched pairs in both models and compare the effects"),
        ("dictionaries", "compare PCA, ICA and NMF dictionaries of each pair as the SAEs are"),
        ("crosscode", "train a crosscoder of each pair on aligned units: shared and own latents"),
        ("report", "write the run's static site (report/index.html) from its files"),
    ]:
        _common(sub.add_parser(name, help=text, description=text))

    p = sub.add_parser("info", help="describe an activation store folder")
    p.add_argument("store", help="a <run>/<model>/layer_<L>/acts folder")
    _debug(p)
    return parser


def _init(args: argparse.Namespace) -> None:
    path = Path(args.path)
    if path.exists() and not args.force:
        raise SamesheepError(f"{path} exists; pass --force to overwrite it")
    write_text(path, config_mod.to_toml(config_mod.load(args.config, args.set, args.preset)))
    print(f"wrote {path}; run it with: samesheep run --config {path}")


def _info(args: argparse.Namespace) -> None:
    store = open_store(args.store)
    m = store.manifest
    print(f"model {m['model']}  layer {m['layer']} of {m['n_layers']}  d_model {m['d_model']}")
    print(f"stored as {m['dtype']} (computed in {m['compute_dtype']} on {m['device']})")
    for split in ("train", "heldout"):
        n = len(store.shard_names(split))
        print(f"{split}: {store.num_tokens(split):,} tokens in {n} shards")
    print("complete" if store.complete else "incomplete: rerun extract to finish it")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `samesheep` command."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "init":
            _init(args)
        elif args.command == "info":
            _info(args)
        else:
            cfg = config_mod.load(args.config, args.set, args.preset)
            stage = {
                "run": pipeline.run,
                "corpus": pipeline.corpus_stage,
                "extract": pipeline.extract_stage,
                "train": pipeline.train_stage,
                "features": pipeline.features_stage,
                "compare": pipeline.compare_stage,
                "layers": pipeline.layers_stage,
                "interpret": pipeline.interpret_stage,
                "causal": pipeline.causal_stage,
                "dictionaries": pipeline.dictionaries_stage,
                "crosscode": pipeline.crosscode_stage,
                "report": pipeline.report_stage,
            }[args.command]
            stage(cfg)
            if args.command in ("run", "report"):
                index = report_dir(run_path(cfg)) / "index.html"
                print(f"report: {index.resolve().as_uri()}")
    except SamesheepError as e:
        if args.debug:
            raise
        print(f"samesheep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("samesheep: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
