"""Serving benchmark and overload check: what the server delivers compared with the raw model.

    python -m loadtest.bench bench     [--duration 15] [--concurrency 1 8 32] [--out reports/bench]
    python -m loadtest.bench overload  [--factor 4] [--duration 30] [--deadline 10] [--out reports/bench]

`bench` (what `make bench` runs), in one run:

1. *Raw*: the registered model (grayscale extractor + calibrated Random Forest, `osteoscreen.model.bench.measure`) on
   ready 224x224 tensors at batch 1, 8 and 32, with no server: images/s and the median call time. It runs in
   one separate process, loaded once (`raw --interactive`), which has the same cores and thread settings as
   the server's model process (BentoML sets no thread limits for `@bentoml.service` classes, so TensorFlow
   sees every core in both; nothing is pinned). Fairness on a shared machine: the full raw measurement runs
   while no server process exists (before the server starts and after it stops), and the yardstick of each
   served level is re-measured right before and right after that level's block while the server is idle;
   `ratio_to_raw` divides by the mean of those two, so slow drifts of other load on the machine cancel out
   (`ratio_to_raw_best` divides by the best raw rate of the whole run). On a 2-core machine the front
   worker's decoding shares the cores with the model, which is part of what serving costs.
2. *Served*: a closed loop of C concurrent clients (C = 1, 8, 32) per API (HTTP `POST /predict`, gRPC
   `osteoscreen.v1.Screening/Predict`, Open Inference Protocol v2 `ModelInfer`), each client sending the
   next image as soon as the last one is answered, for `--warmup` + `--duration` seconds; latencies and
   throughput are taken from the requests that complete after the warm-up. Levels run concurrency-major
   (every API at C=1, then at C=8, ...), and a last C=1 level right after the highest concurrency shows how
   long low-load latency stays raised after a burst (BentoML's batcher adapts its hold time to the
   recent batches). Throughput is C / mean latency x the answered share (Little's law, exact for a
   closed loop; the completions-per-second count is reported beside it but is lumpy when one batch of 32
   takes seconds). Inputs: phantom radiographs (PNG and JPEG, the
   same mix for every API), so decoding is cheap and the ratio measures serving, not JPEG 2000 decoding.
3. *Mutual TLS* (unless `--no-tls`): a second server with mutual TLS and an allow-list (certificates made
   for the run with `cryptography`, `loadtest/certs.py`), each API at the highest concurrency, its own raw
   yardstick before and after; the target compares its ratio to raw with the plaintext row's (>= 0.95:
   TLS costs at most 5% of throughput).
4. *Outside the model call* (`loadtest/overhead.py`): CPU milliseconds per image that every server process
   spends beyond the model call, for phantom PNGs on every API and pydicom-data's real CR radiographs (RG1
   JPEG 2000, RG3 uncompressed and JPEG 2000) over gRPC, and the ceiling in images/s per core it implies;
   and the start-up: `bentoml serve` to ready, with the model service's phases (spawn, load, warm-up).
   The raw model and the server use the same `OSTEOSCREEN_PRECISION` (and the bundle's numerics gate).
4. A markdown table on stdout and `bench_serving.json` / `bench_serving.md` in `--out`, with the ratios
   served/raw and the targets (throughput at C=32 >= 0.85x raw; p50 at C=1 <= 1.25x raw batch-1 call
   + 20 ms). Targets are reported, never asserted: timings on a shared machine are noisy.

`overload`: open-loop (Poisson) arrivals at `--factor` x the measured capacity over every API, each
request with a deadline (gRPC timeout; HTTP client timeout), using the load test's input mix (DICOM
included, the largest inputs). Every request must get an answer within its deadline: a prediction or a fast
refusal (HTTP 503, gRPC RESOURCE_EXHAUSTED / UNAVAILABLE). Reports the outcome counts, refusal latency,
the server's resident memory (all its processes) before/peak/after, and whether it still answers
afterwards; exits 1 when a request missed its deadline or the server did not survive.

Nothing here imports TensorFlow except the `raw` subcommand (run as a subprocess), so the image mix and the
server helper are safe to import from the Locust process (`loadtest/locustfile.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from loadtest.clients import PROTOCOL_TITLES, PROTOCOLS, Clients
from loadtest.images import DEFAULT_MIX, build_mix
from loadtest.measure import closed_loop
from loadtest.overhead import batches, mean_batch, measure_overhead, startup_phases
from loadtest.overload import run_overload
from loadtest.raw import RawWorker
from loadtest import dicom_sr
from loadtest.server import REPO, ServerProcess, machine


def _rate_at(results: list[dict], batch: int) -> dict | None:
    return next((r for r in results if r["batch"] == batch), None)


def _fmt(value: object, spec: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _spread(row: dict) -> str:
    rounds = row.get("rounds_ratio_to_raw") or []
    return f"; {len(rounds)} rounds {min(rounds):.2f}-{max(rounds):.2f}" if len(rounds) > 1 else ""


def bench_report(result: dict) -> str:
    raw = result["raw"]
    lines = [f"## OsteoScreen serving benchmark ({result['machine']})", "",
             f"Model `{result['model']}`, extractor in {result.get('precision')} ({result.get('precision_reason')}); "
             f"inputs: {result['inputs']}.", "",
             "| path | concurrency / batch | images/s | p50 ms | p95 ms | x raw adjacent | x raw best | requests (ok) "
             "| mean batch |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in raw["full"]:
        for row in run["results"]:
            lines.append(f"| raw model, {run['when']} | batch {row['batch']} | {row['images_per_s']:.2f} | "
                         f"{row['median_call_ms']:.0f} (call) | - | - | {row['images_per_s'] / raw['best_images_per_s']:.2f} | "
                         f"{row['calls']} calls | {row['batch']} |")
    for row in result["served"]:
        level = f"{row['concurrency']} ({row['note']})" if row.get("note") else row["concurrency"]
        lines.append(f"| {PROTOCOL_TITLES[row['protocol']]} | {level} | {row['images_per_s']:.2f} | "
                     f"{_fmt(row['p50_ms'], '.0f')} | {_fmt(row['p95_ms'], '.0f')} | {row['ratio_to_raw']:.2f} "
                     f"(raw {row['raw_adjacent_images_per_s']:.2f}){_spread(row)} | {row['ratio_to_raw_best']:.2f} | "
                     f"{row['requests']} ({row['ok']}) | {_fmt(row.get('mean_batch'), '.1f')} |")
    lines += ["", "| target | protocol | measured | goal | met |", "| --- | --- | --- | --- | --- |"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['protocol']} | {_fmt(t['measured'], '.3g')} | {t['goal']} | "
                     f"{'yes' if t['met'] else 'no'} |")
    if result.get("dicom_sr"):
        lines += ["", dicom_sr.note(result["dicom_sr"])]
    if result.get("overhead"):
        lines += ["", "CPU per image outside the model call (all server processes' CPU time minus the model service's "
                      "CPU inside model calls, over a fixed number of requests; CPU time is little moved by other load):",
                  "", "| input | protocol | images | front ms | model service ms (outside call) | supervisor ms | "
                      "outside total ms | model call ms | ceiling images/s per core |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for o in result["overhead"]:
            lines.append(f"| {o['input']} | {o['protocol']} | {o['images']} | {o['front_cpu_ms']:.1f} | "
                         f"{o['model_service_outside_call_cpu_ms']:.1f} | {o['supervisor_cpu_ms']:.1f} | "
                         f"{o['outside_model_cpu_ms']:.1f} | {o['model_call_cpu_ms']:.1f} | "
                         f"{_fmt(o['ceiling_images_per_s_per_core'], '.1f')} |")
    if result.get("startup"):
        st = result["startup"]
        lines += ["", f"Start-up: `bentoml serve` to ready {st['to_ready_s']:.1f} s (model service: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in st["model_service_phases"].items()) + ")."]
    lines += ["", f"Raw yardstick next to each block (server idle; batch 1 / batch {raw['best_batch']} images/s): "
              + "; ".join(f"{cp['when']}: " + " / ".join(f"{r['images_per_s']:.2f}" for r in cp["results"])
                          for cp in raw["checkpoints"])]
    return "\n".join(lines)


def median_rounds(rows: list[dict]) -> list[dict]:
    """One row per level: the round with the median ratio to raw, carrying every round's ratio. On a shared
    2-core machine one 12 s level varies by about +-0.04 from run to run, enough to swap the order of the
    protocols; the spread of several rounds shows which differences are real."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["concurrency"], row["protocol"], row.get("note"), row.get("tls", False)), []).append(row)
    merged = []
    for group in groups.values():
        ordered = sorted(group, key=lambda r: r["ratio_to_raw"])
        row = dict(ordered[(len(ordered) - 1) // 2])  # the lower median: two rounds do not round up
        row["rounds_ratio_to_raw"] = [r["ratio_to_raw"] for r in group]
        merged.append(row)
    return merged


def _tls_targets(served: list[dict], max_concurrency: int) -> list[dict]:
    out = []
    for row in served:
        if not row.get("tls"):
            continue
        plain = next((r for r in served if r["protocol"] == row["protocol"] and r["concurrency"] == max_concurrency
                      and not r.get("note")), None)
        if plain and plain["ratio_to_raw"]:
            ratio = round(row["ratio_to_raw"] / plain["ratio_to_raw"], 3)
            out.append({"target": f"mutual TLS / plaintext throughput at C={max_concurrency} (each / adjacent raw)",
                        "protocol": row["protocol"], "measured": ratio, "goal": ">= 0.95", "met": ratio >= 0.95})
    return out


def _targets(served: list[dict], max_concurrency: int) -> list[dict]:
    out = []
    for protocol in sorted({r["protocol"] for r in served}):
        rows = {r["concurrency"]: r for r in served if r["protocol"] == protocol and not r.get("note")}
        top = rows.get(max_concurrency)
        if top:
            ratio = top["ratio_to_raw"]
            out.append({"target": f"throughput at C={max_concurrency} / raw (adjacent)", "protocol": protocol,
                        "measured": ratio, "goal": ">= 0.85 (goal 0.95)", "met": ratio >= 0.85})
        one = rows.get(1)
        if one and one["p50_ms"] is not None:
            limit = 1.25 * one["raw_adjacent_batch1_ms"] + 20
            out.append({"target": "p50 at C=1, ms", "protocol": protocol, "measured": one["p50_ms"],
                        "goal": f"<= {limit:.0f} (1.25 x raw batch-1 {one['raw_adjacent_batch1_ms']:.0f} + 20)",
                        "met": one["p50_ms"] <= limit})
    return out


def _tls_server(args: argparse.Namespace, env: dict[str, str], out: Path):
    """The same server with mutual TLS and an allow-list, on certificates made for this run; and the files."""
    from loadtest.certs import client_context, localhost_pki

    pki = localhost_pki(out / "tls", client_name="bench-client")
    server = ServerProcess(log_path=out / "server-tls.log", env=env, service=args.service, workdir=args.service_dir,
                           client_ssl=client_context(pki.ca, pki.client_cert, pki.client_key),
                           **pki.server_env(mutual=True, allowed="bench-client"),
                           **({"OSTEOSCREEN_MODEL_TAG": args.model} if args.model else {}))
    return server, pki
def overhead_inputs(mix, n: int) -> list[tuple[str, list, tuple[str, ...], int]]:
    """What the overhead is measured on: phantom PNGs, and the served levels' whole mix, over every API; the
    real CR radiographs of pydicom-data
    (RG1 chest in JPEG 2000, RG3 tibia uncompressed and JPEG 2000) over gRPC, fewer of them, but at least 8: CPU
    time moves in 10 ms ticks, so 8 images read it to 1.25 ms each."""
    from loadtest.images import _real_dicoms

    kinds = [("phantom PNG", mix.by_format.get("png", []), PROTOCOLS, n)]
    if len(mix.all()) > len(kinds[0][1]):  # what the served levels send (by default, half of it JPEG)
        kinds.append(("the served mix", mix.all(), PROTOCOLS, n))
    dicoms = {s.name: s for s in _real_dicoms(64 * 1024 * 1024)}
    for name, label in (("RG1_J2KR.dcm", "RG1 CR chest, JPEG 2000"), ("RG3_UNCR.dcm", "RG3 CR tibia, uncompressed"),
                        ("RG3_J2KR.dcm", "RG3 CR tibia, JPEG 2000")):
        if name in dicoms:
            kinds.append((label, [dicoms[name]], ("grpc",), max(8, n // 2)))
    return [k for k in kinds if k[1]]


def run_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mix = build_mix(args.data, args.mix, seed=args.seed)
    samples = mix.all()
    print(f"inputs: {mix.describe()}", file=sys.stderr)
    env = os.environ.copy()
    levels = [(c, p, "") for c in args.concurrency for p in args.protocols]
    if args.after_burst and 1 in args.concurrency and max(args.concurrency) > 1:
        levels.append((1, args.protocols[0], f"after C={max(args.concurrency)}"))
    blocks: list[list[tuple[int, str, str]]] = []
    for level in levels:  # one block per concurrency (and one for the after-burst level)
        if blocks and (blocks[-1][0][0], blocks[-1][0][2]) == (level[0], level[2]):
            blocks[-1].append(level)
        else:
            blocks.append([level])

    worker = RawWorker(args.model, env, log_path=out / "raw.log")
    server = ServerProcess(log_path=out / "server.log", env=env, service=args.service, workdir=args.service_dir,
                           **({"OSTEOSCREEN_MODEL_TAG": args.model} if args.model else {}))
    servers = [server]
    full: list[dict] = []
    checkpoints: list[dict] = []
    served: list[dict] = []
    overhead: list[dict] = []
    startup: dict = {}
    try:
        worker.start()
        print("raw model, no server running ...", file=sys.stderr)
        full.append({"when": "before the server started", "results": worker.measure(args.batch_sizes, args.raw_seconds)})
        best_batch = max(full[0]["results"], key=lambda r: r["images_per_s"])["batch"]
        check_sizes = sorted({1, best_batch})

        def checkpoint(label: str) -> None:
            results = worker.measure(check_sizes, args.raw_seconds)
            checkpoints.append({"when": label, "results": results})
            print(f"  raw ({label}, server idle): " + ", ".join(
                f"batch {r['batch']} {r['images_per_s']:.2f} img/s" for r in results), file=sys.stderr)

        launched = time.perf_counter()
        server.start().wait_ready(args.ready_timeout)
        startup = {"to_ready_s": round(time.perf_counter() - launched, 2), "model_service_phases": startup_phases(server.url)}
        print(f"server ready: {server.url}, gRPC {server.grpc_target}; start-up {startup}", file=sys.stderr)

        async def serve_all() -> None:
            async with Clients(server.url, server.grpc_target) as clients:
                for sample in samples[:2]:  # first requests (connection set-up, first batch) are not measured
                    for protocol in args.protocols:
                        await clients.call(protocol)(sample, 120.0)
                # Concurrency-major order: every API sees the server in the same state at each level (BentoML's
                # batcher adapts its hold time to recent batches, so a level run after a burst is slower).
                for block in blocks:
                    checkpoint(f"before C={block[0][0]}{' ' + block[0][2] if block[0][2] else ''}")
                    for c, protocol, note in (level for _ in range(args.rounds) for level in block):
                        images, calls = batches(server)
                        row = await closed_loop(clients.call(protocol), samples, c, args.warmup, args.duration,
                                                seed=args.seed)
                        row.update(protocol=protocol, note=note, checkpoint=len(checkpoints) - 1,
                                   mean_batch=mean_batch(batches(server), (images, calls)))
                        served.append(row)
                        print(f"  {protocol:5} C={c:3}{' ' + note if note else ''}: {row['images_per_s']:.2f} img/s, "
                              f"p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms, mean batch {row['mean_batch']}, "
                              f"outcomes {row['outcomes']}", file=sys.stderr)
                checkpoint("after the last level")
                if args.overhead_images:
                    for kind, kind_samples, protocols, n in overhead_inputs(mix, args.overhead_images):
                        for protocol in protocols:
                            o = (await measure_overhead(server, clients, kind, kind_samples, protocol, n,
                                                        concurrency=args.overhead_concurrency)).row()
                            overhead.append(o)
                            print(f"  outside the model, {kind} over {protocol}: {o['outside_model_cpu_ms']} CPU ms/image "
                                  f"(front {o['front_cpu_ms']}, model service {o['model_service_outside_call_cpu_ms']}); "
                                  f"ceiling {o['ceiling_images_per_s_per_core']} img/s per core", file=sys.stderr)

        asyncio.run(serve_all())
        server.stop()
        if args.raw_after:
            print("raw model, server stopped ...", file=sys.stderr)
            full.append({"when": "after the server stopped", "results": worker.measure(args.batch_sizes, args.raw_seconds)})
        if args.tls:
            tls_server, pki = _tls_server(args, env, out)
            servers.append(tls_server)
            tls_server.start().wait_ready(args.ready_timeout)
            print(f"mutual TLS server ready: {tls_server.url}, gRPC {tls_server.grpc_target}", file=sys.stderr)
            top = max(args.concurrency)

            async def serve_tls() -> None:
                async with Clients(tls_server.url, tls_server.grpc_target,
                                   tls=(str(pki.ca), str(pki.client_cert), str(pki.client_key))) as clients:
                    for sample in samples[:2]:
                        for protocol in args.protocols:
                            await clients.call(protocol)(sample, 120.0)
                    checkpoint(f"before mutual TLS C={top}")
                    for protocol in args.protocols * args.rounds:
                        images, calls = batches(tls_server)
                        row = await closed_loop(clients.call(protocol), samples, top, args.warmup, args.duration,
                                                seed=args.seed)
                        row.update(protocol=protocol, note="mutual TLS", tls=True, checkpoint=len(checkpoints) - 1,
                                   mean_batch=mean_batch(batches(tls_server), (images, calls)))
                        served.append(row)
                        print(f"  {protocol:5} C={top:3} mutual TLS: {row['images_per_s']:.2f} img/s, "
                              f"p50 {row['p50_ms']} ms, outcomes {row['outcomes']}", file=sys.stderr)
                    checkpoint("after mutual TLS")

            asyncio.run(serve_tls())
            tls_server.stop()
    finally:
        for each in servers:
            each.stop()
        worker.stop()

    best = max(r["images_per_s"] for run in full for r in run["results"])
    for row in served:
        # the yardstick next to this level: the raw model just before and just after its block, server idle
        around = [checkpoints[row["checkpoint"]], checkpoints[row["checkpoint"] + 1]]
        local = statistics.fmean(_rate_at(cp["results"], best_batch)["images_per_s"] for cp in around)
        local_b1 = statistics.fmean(_rate_at(cp["results"], 1)["median_call_ms"] for cp in around)
        row.update(raw_adjacent_images_per_s=round(local, 3), raw_adjacent_batch1_ms=round(local_b1, 1),
                   ratio_to_raw=round(row["images_per_s"] / local, 3), ratio_to_raw_best=round(row["images_per_s"] / best, 3))
    served = median_rounds(served)
    result = {"machine": machine(), "model": worker.info.get("model"), "inputs": mix.describe(),
              "precision": worker.info.get("precision"), "precision_reason": worker.info.get("precision_reason"),
              "overhead": overhead, "startup": startup,
              "raw": {"full": full, "checkpoints": checkpoints, "best_images_per_s": best, "best_batch": best_batch},
              "served": served,
              "targets": _targets(served, max(args.concurrency)) + _tls_targets(served, max(args.concurrency)),
              "settings": {"warmup_s": args.warmup, "duration_s": args.duration, "concurrency": args.concurrency,
                           "raw_seconds": args.raw_seconds, "service": args.service, "rounds": args.rounds,
                           "fairness": "raw = the registered bundle on ready 224x224 tensors in one separate process "
                                       "(same cores, same default thread settings as the model service); measured "
                                       "with no server process (before start, after stop) and, as the yardstick of "
                                       "each level, right before and after that level's block while the server "
                                       "is idle; ratio_to_raw uses the mean of those two, ratio_to_raw_best the "
                                       "best raw rate of the whole run"}}
    result["dicom_sr"] = dicom_sr.measure()
    (out / "bench_serving.json").write_text(json.dumps(result, indent=2))
    report = bench_report(result)
    (out / "bench_serving.md").write_text(report + "\n")
    print(report)
    print(f"\nwrote {out / 'bench_serving.json'} and {out / 'bench_serving.md'}", file=sys.stderr)
    return 0


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _protocols(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PROTOCOLS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"protocols are a comma list of {', '.join(PROTOCOLS)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, mix: str) -> None:
        p.add_argument("--model", default=os.environ.get("OSTEOSCREEN_MODEL_TAG"), help="model tag (default: latest)")
        p.add_argument("--data", default=os.environ.get("OSTEOSCREEN_LOADTEST_DATA"),
                       help="folder of PNG/JPEG/DICOM files to send (default: phantoms + pydicom-data)")
        p.add_argument("--mix", default=mix, help=f"format weights (default {mix})")
        p.add_argument("--protocols", type=_protocols, default=list(PROTOCOLS))
        p.add_argument("--out", default="reports/bench")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--ready-timeout", type=float, default=600.0)
        p.add_argument("--service", default="service:Screening", help="what `bentoml serve` serves (e.g. a bento tag)")
        p.add_argument("--service-dir", default=str(REPO), help="the folder `bentoml serve` runs in")

    p = sub.add_parser("bench", help="raw model vs served throughput and latency")
    common(p, "png=2,jpeg=1")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--warmup", type=float, default=6.0, help="seconds per level before measuring")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per level")
    p.add_argument("--raw-seconds", type=float, default=4.0, help="minimum seconds per raw batch size")
    p.add_argument("--no-raw-after", dest="raw_after", action="store_false",
                   help="skip the full raw measurement after the server stopped")
    p.add_argument("--no-tls", dest="tls", action="store_false",
                   help="skip the mutual TLS block (a second server, each API at the highest concurrency)")
    p.add_argument("--overhead-images", type=int, default=48,
                   help="requests per protocol for the CPU-outside-the-model measurement (0 skips it)")
    p.add_argument("--overhead-concurrency", type=_at_least_one, default=4,
                   help="clients in flight during the CPU-outside-the-model measurement (32: as under full load)")
    p.add_argument("--no-after-burst", dest="after_burst", action="store_false",
                   help="skip the last level: C=1 on the first API right after the highest concurrency")
    p.add_argument("--rounds", type=_at_least_one, default=1,
                   help="measure each level this many times, protocols interleaved; report the median round")
    p.set_defaults(func=run_bench)

    p = sub.add_parser("overload", help="offered load well past capacity: answers within deadline, bounded memory")
    common(p, DEFAULT_MIX)
    p.add_argument("--factor", type=float, default=4.0, help="offered load as a multiple of capacity")
    p.add_argument("--capacity", type=float, default=0.0, help="images/s (default: measured first, gRPC C=32)")
    p.add_argument("--capacity-seconds", type=float, default=15.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--deadline", type=float, default=10.0, help="per-request deadline, seconds")
    p.add_argument("--fast", type=float, default=1.0, help="a refusal slower than this (s) is not 'fast'")
    p.set_defaults(func=run_overload)


    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
