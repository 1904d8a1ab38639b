"""What `make bench` reads from a real server about precision and serving cost: the served precision (log line,
`osteoscreen_model_info`), the model-call CPU counter, start-up phases, and the CPU per image outside the
model call (`loadtest/overhead.py`). No timing is asserted: only that the figures exist and add up."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request

import pytest

from loadtest.clients import Clients
from loadtest.images import build_mix
from loadtest.bench import median_rounds
from loadtest.overhead import batches, cpu_by_role, mean_batch, measure_overhead, role, startup_phases


def test_processes_are_told_apart_by_their_command_line():
    worker = ["python", "-m", "_bentoml_impl.worker.service", "service:Screening"]
    assert role([*worker, "--service-name", "osteoscreen-model", "--fd", "3"]) == "model"
    assert role([*worker, "--fd", "7", "--service-name", "osteoscreen", "--backlog", "2048"]) == "front"
    assert role(["/venv/bin/bentoml", "serve", "service:Screening"]) == "supervisor"


@pytest.mark.server
def test_served_precision_cost_and_startup_are_reported(server, registered_model):
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    info = re.search(r'osteoscreen_model_info\{[^}]*precision="(float32|bfloat16|int8)",runtime="(tensorflow|openvino)"'
                     r'[^}]*\} 1\.0', text)
    assert info, text[-2000:]
    card = json.loads((registered_model["root"] / "reports" / "metrics.json").read_text())
    assert card["precision"] in ("float32", "bfloat16", "int8")  # what training computed in
    served = f"{info.group(2)}/{info.group(1)}"  # the start-up log line names the choice, runtime and precision
    assert f"extractor {served} (" in server.log_tail(200_000)

    phases = startup_phases(server.url)
    # the explanation model is built after ready, in the background: its phase is there once it finished
    assert set(phases) - {"explainer_background"} == {"spawn", "import", "load", "warmup"}
    assert all(v > 0 for v in phases.values())

    mix = build_mix(None, "png=1", n_phantoms=2)
    roles = cpu_by_role(server.processes())
    assert roles["front"] > 0 and roles["model"] > 0

    async def run():
        async with Clients(server.url, server.grpc_target) as clients:
            return await measure_overhead(server, clients, "phantom PNG", mix.by_format["png"], "grpc", 6, concurrency=2)

    before = _settled(server)  # the server is shared: calls earlier tests gave up on may still be finishing
    o = asyncio.run(run())
    after = batches(server)
    assert after[0] - before[0] == 6  # every image went through one model call, counted once
    assert 1.0 <= mean_batch(after, before) <= 2.0  # two clients: batches of one or two
    assert mean_batch(after, after) is None
    assert o.images == 6 and o.model_call_ms > 0 and o.front_ms > 0  # the counter moved; the front worked
    row = o.row()
    assert row["ceiling_images_per_s_per_core"] == round(1000 / o.outside_ms, 1)


def _settled(server) -> tuple[float, float]:
    """`batches(server)` once it has stopped moving (two readings 0.25 s apart agree)."""
    reading = batches(server)
    for _ in range(40):
        time.sleep(0.25)
        again, reading = reading, batches(server)
        if again == reading:
            break
    return reading


def test_rounds_report_the_median_round_and_the_spread():
    def row(protocol, ratio, **extra):
        return {"concurrency": 32, "protocol": protocol, "note": "", "ratio_to_raw": ratio, **extra}

    rows = [row("http", 0.79), row("grpc", 0.88), row("http", 0.87), row("grpc", 0.84), row("http", 0.83),
            row("grpc", 0.86), row("http", 0.80, note="mutual TLS", tls=True), row("http", 0.90, note="mutual TLS", tls=True)]
    merged = median_rounds(rows)
    assert [(r["protocol"], r.get("tls", False)) for r in merged] == [("http", False), ("grpc", False), ("http", True)]
    http, grpc, tls = merged
    assert http["ratio_to_raw"] == 0.83 and http["rounds_ratio_to_raw"] == [0.79, 0.87, 0.83]
    assert grpc["ratio_to_raw"] == 0.86
    assert tls["ratio_to_raw"] == 0.80  # two rounds: the lower one, never a flattering round-up
    assert median_rounds([row("v2", 0.9)])[0]["rounds_ratio_to_raw"] == [0.9]
