"""The `osteoscreen` command line.

Each subcommand imports its module lazily, so that `osteoscreen synth` or `osteoscreen predict --help`
do not pay TensorFlow's start-up cost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from osteoscreen.model.specs import BACKBONE_NAMES, DEFAULT_BACKBONE


def _cmd_weights(args: argparse.Namespace) -> int:
    from osteoscreen.model import weights

    info = weights.provision(args.backbone, source_file=args.from_file)
    print(info.describe())
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from osteoscreen import phantom

    manifest = phantom.generate_dataset(Path(args.out), n=args.n, seed=args.seed)
    print(f"wrote {args.n} synthetic radiographs; manifest: {manifest}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from training import train

    tag = train.run(
        Path(args.data),
        backbone=args.backbone,
        reports=Path(args.reports),
        random_weights=args.random_weights,
        seed=args.seed,
        register=not args.no_register,
        augment_rounds=args.augment_rounds,
        search_iterations=args.search_iterations,
    )
    print(tag)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from training import compare

    table = compare.run(Path(args.data), reports=Path(args.reports), seed=args.seed)
    print(table)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from osteoscreen import predict

    return predict.run(args.files, model_tag=args.model, server=args.server, tls=args.tls)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.decode:
        from osteoscreen.imaging.bench import run_decode

        print(run_decode(args.decode))
        return 0
    from osteoscreen.model import bench

    print(bench.run_raw(backbone=args.backbone, model_tag=args.model, batch_sizes=args.batch_sizes))
    return 0


def _cmd_model_exists(args: argparse.Namespace) -> int:
    from osteoscreen.model.bundle import find_model

    return 0 if find_model(args.model) is not None else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osteoscreen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("weights", help="make ImageNet weights available offline and verify them")
    p.add_argument("--backbone", choices=BACKBONE_NAMES, default=DEFAULT_BACKBONE)
    p.add_argument("--from", dest="from_file", type=Path, help="a Keras .h5/.weights.h5 file to use")
    p.set_defaults(func=_cmd_weights)

    p = sub.add_parser("synth", help="write a labelled synthetic lumbar-spine radiograph set")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="extract features, fit and evaluate the RF, register the model")
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", choices=BACKBONE_NAMES, default=DEFAULT_BACKBONE)
    p.add_argument("--reports", default="reports")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-weights", action="store_true",
                   help="use randomly initialised backbone weights (ablation only; never for screening)")
    p.add_argument("--no-register", action="store_true", help="evaluate only; do not touch the model store")
    p.add_argument("--augment-rounds", type=int, default=2, help="augmented copies of each training image")
    p.add_argument("--search-iterations", type=int, default=12, help="Random Forest settings tried by grouped CV")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compare", help="every backbone + RF on the same split, as one markdown table")
    p.add_argument("--data", required=True)
    p.add_argument("--reports", default="reports")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("predict", help="predict files locally (or against a server with --server)")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default=None, help="model tag (default: the latest registered)")
    p.add_argument("--server", default=None, help="HOST:PORT of a running OsteoScreen gRPC server")
    p.add_argument("--tls", action="store_true", help="use TLS to reach --server")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("bench", help="raw model throughput (images/s) at several batch sizes, as JSON")
    p.add_argument("--backbone", choices=BACKBONE_NAMES, default=DEFAULT_BACKBONE)
    p.add_argument("--model", default=None, help="bench a registered model (extractor + RF) instead")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--decode", type=Path, nargs="+", metavar="FILE",
                   help="instead: time decoding these files to model input (ms per file), as JSON")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("model-exists", help="exit 0 when a model is registered in the BentoML store")
    p.add_argument("--model", default=None)
    p.set_defaults(func=_cmd_model_exists)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from osteoscreen.errors import OsteoScreenError

    try:
        return args.func(args)
    except OsteoScreenError as exc:
        print(f"osteoscreen {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
