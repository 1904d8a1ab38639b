"""`make loadtest`: start a server, run Locust headless against it, write the reports, gate on the SLOs.

    python -m loadtest.run [--users 6] [--spawn-rate 6] [--run-time 60s] [--protocols http,grpc,v2]
                           [--slo loadtest/slo.yaml] [--reports reports/loadtest]
                           [--target-rps R | --rate-per-user R] [--mix png=6,jpeg=3,dicom=1] [--data DIR]
                           [--host http://127.0.0.1:PORT --grpc-target 127.0.0.1:PORT]   (an already running server)

Without --host it serves the registered model (`OSTEOSCREEN_MODEL_TAG`, default the latest) with
`bentoml serve service:Screening` on free loopback ports, waits until /readyz answers, runs Locust, and stops the
server. Reports in --reports: `report.html`, `locust_stats.csv`, `locust_stats_history.csv`,
`locust_failures.csv`, `locust_exceptions.csv`, `locust_slo.json` (the verdict), `server.log`.
`--target-rps R` spreads an offered load of R requests/s over the users (each paced at R/users), e.g. 80 % of
the capacity `make bench` measured, for a soak run. Exit code: Locust's, i.e. 0 when every SLO holds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USER_CLASSES = {"http": "HttpPredictUser", "grpc": "GrpcPredictUser", "v2": "V2InferUser"}


def locust_command(host: str, grpc_target: str, args: argparse.Namespace, reports: Path) -> list[str]:
    cmd = [str(BIN / "locust"), "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time, "--stop-timeout", "30",
           "--host", host, "--grpc-target", grpc_target, "--slo", args.slo,
           "--csv", str(reports / "locust"), "--csv-full-history", "--html", str(reports / "report.html"),
           "--mix", args.mix, "--request-timeout", str(args.request_timeout), "--only-summary"]
    rate = args.rate_per_user or (args.target_rps / args.users if args.target_rps else 0.0)
    if rate:
        cmd += ["--rate-per-user", f"{rate:.6g}"]
    if args.data:
        cmd += ["--data", args.data]
    if getattr(args, "tls_files", None):
        ca, cert, key = args.tls_files
        cmd += ["--server-ca", ca, "--client-cert", cert, "--client-key", key]
    return cmd + [USER_CLASSES[p] for p in args.protocols]


def served_capacity(bench_json: str | os.PathLike) -> float:
    """The best served throughput (images/s) that `make bench` measured, over every API and concurrency."""
    import json

    path = Path(bench_json)
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run `make bench` first, or give LOADTEST_TARGET_RPS")
    return max(row["images_per_s"] for row in json.loads(path.read_text())["served"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=int(os.environ.get("LOADTEST_USERS", 6)))
    parser.add_argument("--spawn-rate", type=float, default=float(os.environ.get("LOADTEST_SPAWN_RATE", 6)))
    parser.add_argument("--run-time", default=os.environ.get("LOADTEST_RUN_TIME", "60s"))
    parser.add_argument("--protocols", default=os.environ.get("LOADTEST_PROTOCOLS", "http,grpc,v2"),
                        help="comma list of http, grpc, v2")
    parser.add_argument("--slo", default=os.environ.get("LOADTEST_SLO", str(REPO / "loadtest" / "slo.yaml")))
    parser.add_argument("--reports", default=os.environ.get("LOADTEST_REPORTS", "reports/loadtest"))
    parser.add_argument("--target-rps", type=float, default=float(os.environ.get("LOADTEST_TARGET_RPS") or 0),
                        help="offered load in requests/s, spread over the users (0: closed loop)")
    parser.add_argument("--rate-per-user", type=float, default=0.0)
    parser.add_argument("--capacity-from", default="",
                        help="a bench_serving.json (make bench): offer --load x its best served images/s")
    parser.add_argument("--load", type=float, default=0.8, help="with --capacity-from: the fraction of capacity")
    parser.add_argument("--mix", default=os.environ.get("LOADTEST_MIX", "png=6,jpeg=3,dicom=1"))
    parser.add_argument("--data", default=os.environ.get("OSTEOSCREEN_LOADTEST_DATA", ""))
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--tls", action="store_true",
                        help="serve with mutual TLS on certificates made for the run, and load-test over TLS")
    parser.add_argument("--host", default="", help="an already running server's HTTP URL (no server is started)")
    parser.add_argument("--grpc-target", default="", help="with --host: its gRPC HOST:PORT")
    args = parser.parse_args(argv)
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = [p for p in args.protocols if p not in USER_CLASSES]
    if unknown or not args.protocols:
        parser.error(f"--protocols takes a comma list of {', '.join(USER_CLASSES)}")

    if args.capacity_from:
        capacity = served_capacity(args.capacity_from)
        args.target_rps = args.load * capacity
        print(f"capacity {capacity:.2f} images/s (from {args.capacity_from}); offering {args.target_rps:.2f} "
              f"requests/s over {args.users} users", file=sys.stderr)

    reports = Path(args.reports).resolve()
    reports.mkdir(parents=True, exist_ok=True)
    if args.host:
        if not args.grpc_target:
            parser.error("--host needs --grpc-target")
        return subprocess.call(locust_command(args.host, args.grpc_target, args, reports), cwd=REPO)

    from loadtest.server import ServerProcess

    extra: dict = {}
    if args.tls:
        from loadtest.certs import client_context, localhost_pki

        pki = localhost_pki(reports / "tls", client_name="loadtest-client")
        args.tls_files = (str(pki.ca), str(pki.client_cert), str(pki.client_key))
        extra = {"client_ssl": client_context(pki.ca, pki.client_cert, pki.client_key),
                 **pki.server_env(mutual=True, allowed="loadtest-client")}
    server = ServerProcess(log_path=reports / "server.log", **extra)
    try:
        print(f"starting the server (HTTP {server.url}, gRPC {server.grpc_target}); log: {server.log_path}",
              file=sys.stderr)
        server.start().wait_ready()
        code = subprocess.call(locust_command(server.url, server.grpc_target, args, reports), cwd=REPO)
    finally:
        server.stop()
    print(f"reports: {reports}/report.html, {reports}/locust_stats.csv, {reports}/locust_slo.json "
          f"({'SLOs met' if code == 0 else 'SLO broken or Locust failed: exit ' + str(code)})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
