"""The `osteoscreen` command line: every command is declared here, the application layer on top of the
runtime packages and `training` (`tests/test_layout.py`).

Each subcommand imports its module lazily, so that `osteoscreen synth` or `osteoscreen predict --help`
do not pay TensorFlow's start-up cost.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from osteoscreen.model.precision import CHOICES as PRECISION_CHOICES
from osteoscreen.model.precision import RUNTIME_CHOICES
from osteoscreen.model.specs import BACKBONE_NAMES, DEFAULT_BACKBONE

PRECISION_HELP = ("extractor compute precision, int8 on OpenVINO only (default: $OSTEOSCREEN_PRECISION, else auto: "
                  "the fastest the hardware runs natively)")
RUNTIME_HELP = "extractor runtime (default: $OSTEOSCREEN_RUNTIME, else auto: the fastest natively run combination)"
FORCE_PRECISION_HELP = ("run the runtime and precision asked for even where the model's numerics gate refuses them, "
                        "marked so in the output (comparisons only, never for screening)")


def _cmd_weights(args: argparse.Namespace) -> int:
    from osteoscreen.model import weights

    info = weights.provision(args.backbone, source_file=args.from_file)
    print(info.describe())
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from training import phantom

    from osteoscreen.errors import DataError

    if args.site not in phantom.SITES:
        raise DataError(f"unknown site {args.site!r}; the phantom has sites {', '.join(sorted(phantom.SITES))}")
    manifest = phantom.generate_dataset(Path(args.out), n=args.n, seed=args.seed, config=phantom.SITES[args.site])
    print(f"wrote {args.n} synthetic radiographs (site {args.site}); manifest: {manifest}")
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
        force=args.force,
        precision=args.precision,
        runtime=args.runtime,
    )
    print(tag)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from training import compare

    table = compare.run(Path(args.data), reports=Path(args.reports), seed=args.seed, precision=args.precision)
    print(table)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.site import evaluate

    evaluate.run(Path(args.data), model_tag=args.model, reports=Path(args.reports),
                 skip_unreadable=args.skip_unreadable, seed=args.seed, force=args.force)
    print(Path(args.reports) / "evaluation.md")
    return 0


def _cmd_recalibrate(args: argparse.Namespace) -> int:
    from training.site import recalibrate

    print(recalibrate.run(Path(args.data), model_tag=args.model, reports=Path(args.reports), holdout=args.holdout,
                          method=args.method, seed=args.seed, skip_unreadable=args.skip_unreadable, force=args.force,
                          confidence=args.confidence))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from osteoscreen.cli import predict

    if (args.cert is None) != (args.key is None):
        print("osteoscreen predict: error: --cert and --key go together (mutual TLS)", file=sys.stderr)
        return 2
    return predict.run(args.files, model_tag=args.model, server=args.server, tls=args.tls, ca=args.ca,
                       cert=args.cert, key=args.key, server_name=args.server_name, force=args.force,
                       dicom_out=args.dicom_out, precision=args.precision, runtime=args.runtime,
                       force_precision=args.force_precision)


def _cmd_explain(args: argparse.Namespace) -> int:
    from osteoscreen.cli import explain

    if args.out is None and args.dicom_out is None:
        print("osteoscreen explain: give --out DIR (overlay PNGs), --dicom-out DIR (DICOM results) or both",
              file=sys.stderr)
        return 2
    return explain.run(args.files, Path(args.out) if args.out else None, model_tag=args.model, server=args.server,
                     tls=args.tls, dicom_out=Path(args.dicom_out) if args.dicom_out else None)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.decode:
        from osteoscreen.imaging.bench import run_decode

        print(run_decode(args.decode))
        return 0
    if args.j2k_reduce:
        from osteoscreen.imaging.bench import run_jpeg2000_reduce

        print(run_jpeg2000_reduce(args.j2k_reduce))
        return 0
    from osteoscreen.model import bench

    print(bench.run_raw(backbone=args.backbone, model_tag=args.model, batch_sizes=args.batch_sizes,
                        precisions=args.precision, runtime=args.runtime, force=args.force_precision))
    return 0


def _cmd_screen(args: argparse.Namespace) -> int:
    from osteoscreen.screening.pipeline import Job, run

    job = Job(args.source, Path(args.out), model_tag=args.model, results_to=args.results_to,
              ray_address=args.ray_address, since=args.since, until=args.until, precision=args.precision,
              actors=args.actors, cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
              batch_size=args.batch_size, max_requests_per_s=args.max_requests_per_s, concurrency=args.concurrency,
              metrics_port=args.metrics_port)
    if args.bench:
        from osteoscreen.screening.bench import run_bench

        print(run_bench(job))
        return 0
    print(json.dumps(run(job)))
    return 0


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


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
    p.add_argument("--site", default="A",
                   help="scanner and population: A is the demo training site, B a shifted one (site validation)")
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
    p.add_argument("--force", action="store_true",
                   help="train on DICOM files whose header says another body part, view or modality too "
                        "(research use only)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None, help=PRECISION_HELP)
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default=None, help=RUNTIME_HELP)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("compare", help="every backbone + RF on the same split, as one markdown table")
    p.add_argument("--data", required=True)
    p.add_argument("--reports", default="reports")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None, help=PRECISION_HELP)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("evaluate", help="site validation: a registered model, unchanged, on your labelled images")
    p.add_argument("--data", required=True, help="labelled folder (normal/, osteoporosis/, optional manifest.csv)")
    p.add_argument("--model", default=None, help="model tag (default: the latest registered)")
    p.add_argument("--reports", default="reports", help="where evaluation.json, evaluation.md and plots go")
    p.add_argument("--skip-unreadable", action="store_true", help="validate without files that cannot be read")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--force", action="store_true",
                   help="evaluate images outside the model's intended use too (research use; default: left out)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("recalibrate", help="fit a new calibrator and threshold on part of your labelled images, "
                                           "check them on the rest, register a new version")
    p.add_argument("--data", required=True, help="labelled folder (normal/, osteoporosis/, optional manifest.csv)")
    p.add_argument("--model", required=True, help="the parent model tag")
    p.add_argument("--reports", default="reports", help="where recalibration.json, recalibration.md and plots go")
    p.add_argument("--holdout", type=float, default=0.5, help="share of patients held out to report on")
    p.add_argument("--method", choices=["sigmoid", "isotonic"], default="sigmoid")
    p.add_argument("--skip-unreadable", action="store_true", help="use only the files that can be read")
    p.add_argument("--seed", type=int, default=0, help="split and bootstrap seed")
    p.add_argument("--force", action="store_true",
                   help="keep images outside the model's intended use too (research use; by default they are "
                        "left out, as evaluate and serving leave them out)")
    p.add_argument("--confidence", type=float, default=0.95,
                   help="the threshold keeps sensitivity >= the parent's target with this probability (one-sided "
                        "Clopper-Pearson lower bound on the fitting positives)")
    p.set_defaults(func=_cmd_recalibrate)

    p = sub.add_parser("predict", help="predict files locally (or against a server with --server)")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default=None, help="model tag (default: the latest registered)")
    p.add_argument("--server", default=None, help="HOST:PORT of a running OsteoScreen gRPC server")
    p.add_argument("--tls", action="store_true", help="use TLS to reach --server (system CAs unless --ca)")
    p.add_argument("--ca", default=None, help="PEM CA file to verify the server with (implies --tls)")
    p.add_argument("--cert", default=None, help="PEM client certificate for mutual TLS (with --key)")
    p.add_argument("--key", default=None, help="PEM client key for mutual TLS (with --cert)")
    p.add_argument("--server-name", default=None, help="name to check the server certificate against")
    p.add_argument("--dicom-out", type=Path, default=None, metavar="DIR",
                   help="DICOM inputs only: also write the DICOM results a PACS stores (the SR) into DIR")
    p.add_argument("--force", action="store_true",
                   help="predict images outside the intended use too, flagged (research use only; local only)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                   help=PRECISION_HELP + "; the model's numerics gate applies (local prediction only)")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default=None, help=RUNTIME_HELP + " (local prediction only)")
    p.add_argument("--force-precision", action="store_true", help=FORCE_PRECISION_HELP)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("explain", help="explanation overlays (PNG) of files, locally or against --server")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default=None, help="folder for the overlays (FILE's name with .png)")
    p.add_argument("--dicom-out", default=None, metavar="DIR",
                   help="also write each DICOM input's results here: the SR and the overlay as a DICOM Secondary "
                        "Capture it references (DICOM inputs only)")
    p.add_argument("--model", default=None, help="model tag (default: the latest registered)")
    p.add_argument("--server", default=None, help="HOST:PORT of a running OsteoScreen gRPC server")
    p.add_argument("--tls", action="store_true", help="use TLS to reach --server")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("bench", help="raw model throughput (images/s) at several batch sizes, as JSON")
    p.add_argument("--backbone", choices=BACKBONE_NAMES, default=DEFAULT_BACKBONE)
    p.add_argument("--model", default=None, help="bench a registered model (extractor + RF) instead")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--precision", choices=PRECISION_CHOICES, nargs="+", default=None,
                   help="one or more precisions, measured back to back in this process with ratios to the first "
                        "(default: $OSTEOSCREEN_PRECISION, else auto); e.g. --precision float32 auto; float32 means "
                        "the TensorFlow float32 reference unless --runtime says otherwise")
    p.add_argument("--runtime", choices=RUNTIME_CHOICES, default=None,
                   help=RUNTIME_HELP + "; applies to the precisions other than float32 (the reference)")
    p.add_argument("--force-precision", action="store_true", help=FORCE_PRECISION_HELP + " (with --model)")
    p.add_argument("--decode", type=Path, nargs="+", metavar="FILE",
                   help="instead: time decoding these files to model input (ms per file), as JSON")
    p.add_argument("--j2k-reduce", type=Path, nargs="+", metavar="FILE",
                   help="instead: JPEG 2000 DICOMs decoded in full vs at reduced resolution (CPU ms, model-input "
                        "difference in grey levels), as JSON")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("screen", help="screen an archive on Ray into DIR: results (Parquet), summary, referral list")
    p.add_argument("source", help="a folder (recursive: DICOM, PNG, JPEG), a CSV/Parquet manifest with `path`, or a "
                                  "DICOMweb archive dicomweb+http(s)://host/path (QIDO-RS, then WADO-RS)")
    p.add_argument("--out", required=True, help="results folder, created mode 0700 (it holds patient identifiers); "
                                                "a rerun into it resumes")
    p.add_argument("--model", default=None, help="model tag (default: the latest registered, pinned for the run)")
    p.add_argument("--results-to", default=None, metavar="dicom://AET@host:port|https://host/path",
                   help="also store each screened DICOM instance's SR there (deterministic UIDs)")
    p.add_argument("--ray-address", default=None, help="a Ray cluster (default: start a local Ray)")
    p.add_argument("--since", type=_date, default=None, help="only studies on or after this date (YYYY-MM-DD)")
    p.add_argument("--until", type=_date, default=None, help="only studies on or before this date (YYYY-MM-DD)")
    p.add_argument("--actors", type=int, default=1, help="most model actors (the pool starts at one)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=None, help="model batch (default: $OSTEOSCREEN_MAX_BATCH)")
    p.add_argument("--max-requests-per-s", type=float, default=None,
                   help="DICOMweb: requests per second to the archive, for the whole job (default: no limit)")
    p.add_argument("--concurrency", type=int, default=4, help="DICOMweb: retrieves in flight at most")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="the local Ray's metrics export port, for Prometheus (default: Ray picks one; with "
                        "--ray-address the cluster's own)")
    p.add_argument("--bench", action="store_true",
                   help="also measure: pipeline images/s against raw model images/s in this run, as JSON (new --out)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None, help=PRECISION_HELP)
    p.set_defaults(func=_cmd_screen)

    p = sub.add_parser("model-exists", help="exit 0 when a model is registered in the BentoML store")
    p.add_argument("--model", default=None)
    p.set_defaults(func=_cmd_model_exists)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from osteoscreen import settings
    from osteoscreen.errors import OsteoScreenError
    from osteoscreen.security.dicom_values import withhold_values

    withhold_values()  # DICOM inputs' values stay out of the output, as on the server

    try:
        settings.current()  # every setting validated before any work: a bad one is this command's one error line
        return args.func(args)
    except OsteoScreenError as exc:
        print(f"osteoscreen {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
