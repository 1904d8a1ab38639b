"""`make overload`: open-loop (Poisson) arrivals past capacity; every request must be answered within its
deadline (a prediction or a fast refusal), memory stays bounded, the server survives.
Run through `python -m loadtest.bench overload` (the options are shared with `bench`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from loadtest.clients import Clients
from loadtest.images import MiB, ImageMix, Sample, build_mix
from loadtest.measure import Record, closed_loop, percentile_ms
from loadtest.server import ServerProcess, http_ok, machine


async def open_loop(clients: Clients, protocols: Sequence[str], mix: ImageMix, rate: float, duration_s: float,
                    deadline_s: float, seed: int = 0, max_outstanding: int = 5000) -> list[Record]:
    """Poisson arrivals at `rate`/s for `duration_s`, round-robin over the protocols, whatever the answers."""
    rng = random.Random(seed)
    records: list[Record] = []
    tasks: set[asyncio.Task] = set()
    skipped = 0

    async def one(protocol: str, sample: Sample) -> None:
        started = time.perf_counter()
        outcome = await clients.call(protocol)(sample, deadline_s)
        records.append(Record(started, time.perf_counter(), outcome, protocol))

    t0 = time.perf_counter()
    next_at, i = t0, 0
    while next_at < t0 + duration_s:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) < max_outstanding:
            task = asyncio.create_task(one(protocols[i % len(protocols)], mix.pick(rng)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        else:
            skipped += 1
        i += 1
        next_at += rng.expovariate(rate)
    if tasks:
        await asyncio.gather(*tasks)
    if skipped:
        print(f"warning: the client skipped {skipped} arrivals (more than {max_outstanding} outstanding)",
              file=sys.stderr)
    return records


def summarize_overload(records: list[Record], deadline_s: float, fast_s: float) -> dict:
    by_outcome = Counter(r.outcome for r in records)
    rejected = [r.latency for r in records if r.outcome == "rejected"]
    ok = [r.latency for r in records if r.outcome == "ok"]
    late = [r for r in records if r.latency > deadline_s + 0.25 or r.outcome == "deadline"]
    per_protocol = {}
    for p in sorted({r.protocol for r in records}):
        rs = [r for r in records if r.protocol == p]
        per_protocol[p] = dict(Counter(r.outcome for r in rs))

    return {
        "requests": len(records),
        "outcomes": dict(by_outcome),
        "per_protocol": per_protocol,
        "answered_within_deadline": len(records) - len(late),
        "missed_deadline": len(late),
        "errors": sum(n for o, n in by_outcome.items() if o.startswith("error")),
        "ok_p50_ms": percentile_ms(ok, 50), "ok_p95_ms": percentile_ms(ok, 95), "ok_max_ms": percentile_ms(ok, 100),
        "rejected_p50_ms": percentile_ms(rejected, 50), "rejected_p95_ms": percentile_ms(rejected, 95),
        "rejected_max_ms": percentile_ms(rejected, 100),
        "rejections_fast": all(x <= fast_s for x in rejected),
    }


def run_overload(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mix = build_mix(args.data, args.mix, seed=args.seed)
    print(f"inputs: {mix.describe()}", file=sys.stderr)
    extra = {"OSTEOSCREEN_MODEL_TAG": args.model} if args.model else {}
    server = ServerProcess(log_path=out / "overload-server.log", service=args.service, workdir=args.service_dir,
                           **extra)
    memory: list[tuple[float, int]] = []
    result: dict = {"machine": machine(), "inputs": mix.describe(), "deadline_s": args.deadline,
                    "protocols": list(args.protocols), "factor": args.factor, "duration_s": args.duration,
                    "server_env": {k: v for k, v in os.environ.items() if k.startswith("OSTEOSCREEN_")}}
    try:
        server.start().wait_ready(args.ready_timeout)

        async def sample_memory(stop: asyncio.Event) -> None:
            t0 = time.perf_counter()
            while not stop.is_set():
                memory.append((round(time.perf_counter() - t0, 2), server.rss_bytes()))
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass

        async def main() -> None:
            async with Clients(server.url, server.grpc_target) as clients:
                warm = mix.all()[0]
                for p in args.protocols:
                    await clients.call(p)(warm, 120.0)
                capacity = args.capacity
                if not capacity:
                    weighted = [mix.pick(random.Random(i)) for i in range(256)]  # the mix's format weights
                    row = await closed_loop(clients.call("grpc"), weighted, 32, 5.0, args.capacity_seconds)
                    capacity = row["images_per_s"]
                    result["capacity_measurement"] = row
                result["capacity_images_per_s"] = capacity
                result["offered_rate_per_s"] = rate = args.factor * capacity
                await asyncio.sleep(2.0)
                result["rss_before_mb"] = round(server.rss_bytes() / MiB, 1)
                print(f"capacity {capacity:.2f} img/s; offering {rate:.1f} req/s for {args.duration:.0f}s, "
                      f"deadline {args.deadline:.1f}s", file=sys.stderr)
                stop = asyncio.Event()
                sampler = asyncio.create_task(sample_memory(stop))
                records = await open_loop(clients, args.protocols, mix, rate, args.duration, args.deadline,
                                          seed=args.seed)
                await asyncio.sleep(2.0)
                stop.set()
                await sampler
                result.update(summarize_overload(records, args.deadline, args.fast))
                result["server_alive_after"] = server.alive() and http_ok(f"{server.url}/livez")
                result["prediction_after"] = await clients.call("grpc")(warm, 60.0)
                result["rss_after_mb"] = round(server.rss_bytes() / MiB, 1)

        asyncio.run(main())
    finally:
        server.stop()
    result["rss_peak_mb"] = round(max((m for _, m in memory), default=0) / MiB, 1)
    result["rss_samples_mb"] = [(t, round(m / MiB, 1)) for t, m in memory]
    result["passed"] = bool(result.get("missed_deadline") == 0 and result.get("errors") == 0
                            and result.get("server_alive_after") and result.get("prediction_after") == "ok")
    (out / "overload.json").write_text(json.dumps(result, indent=2))
    print(overload_report(result))
    print(f"\nwrote {out / 'overload.json'}", file=sys.stderr)
    return 0 if result["passed"] else 1


def overload_report(r: dict) -> str:
    return "\n".join([
        f"## OsteoScreen overload ({r['machine']})", "",
        f"Offered {r['offered_rate_per_s']:.1f} req/s = {r['factor']:g} x capacity ({r['capacity_images_per_s']:.2f} "
        f"img/s) for {r['duration_s']:.0f} s over {', '.join(r['protocols'])}; deadline {r['deadline_s']:g} s.", "",
        "| measure | value |", "| --- | --- |",
        f"| requests | {r['requests']} |",
        f"| outcomes | {r['outcomes']} |",
        f"| per protocol | {r['per_protocol']} |",
        f"| answered within deadline | {r['answered_within_deadline']} / {r['requests']} |",
        f"| ok latency p50 / p95 / max, ms | {r['ok_p50_ms']} / {r['ok_p95_ms']} / {r['ok_max_ms']} |",
        f"| refusal latency p50 / p95 / max, ms | {r['rejected_p50_ms']} / {r['rejected_p95_ms']} / "
        f"{r['rejected_max_ms']} |",
        f"| server RSS before / peak / after, MB | {r['rss_before_mb']} / {r['rss_peak_mb']} / {r['rss_after_mb']} |",
        f"| server alive after, next prediction | {r['server_alive_after']}, {r['prediction_after']} |",
        f"| passed | {r['passed']} |",
    ])
