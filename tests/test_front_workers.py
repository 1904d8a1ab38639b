"""Two front workers (`OSTEOSCREEN_FRONT_WORKERS=2`) share one batcher: the reason it lives in the model service.

A real server with two front worker processes. HTTP keep-alive connections are pinned to a worker (the
worker that accepted one answers everything sent on it; its access line names the worker and the client's
port), so the test picks the same number of connections on each. While the model works through batches of
32 (gRPC PredictBatch calls), one request per connection arrives; they queue together for the next batch. A batcher per
front worker could put at most one worker's requests into a batch; the model's batch-size histogram shows a
batch larger than that, so requests of both workers went to the model together."""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import re
import threading

import grpc
import pytest
import requests

from loadtest.server import ServerProcess
from osteoscreen._generated.osteoscreen.v1 import screening_pb2 as pb
from osteoscreen._generated.osteoscreen.v1 import screening_pb2_grpc as pb_grpc
from tests.waiting import wait_until

pytestmark = [pytest.mark.server, pytest.mark.slow]

PER_WORKER = 8  # requests per front worker in the burst: together 16, a batch no single worker could fill
BUSY_BATCH = 32  # the model's largest batch (OSTEOSCREEN_MAX_BATCH): nothing joins it, it keeps the model busy
BUSY_CALLS = 3  # queued one behind the other: the burst has two batches' compute time to arrive in
ACCESS = re.compile(r"\[entry_service:osteoscreen:(?P<worker>\d+)\] 127\.0\.0\.1:(?P<port>\d+) "
                    r"\(scheme=https?,method=(?P<method>\w+),path=(?P<path>[^,]+),")


@pytest.fixture(scope="module")
def two_fronts(registered_model, tmp_path_factory):
    # a queue for the busy batches and the burst together (each front worker admits up to its own limit)
    srv = ServerProcess(env=registered_model["env"], OSTEOSCREEN_FRONT_WORKERS="2",
                        OSTEOSCREEN_MAX_QUEUE=str(BUSY_CALLS * BUSY_BATCH + 2 * PER_WORKER),
                        log_path=tmp_path_factory.mktemp("two-fronts") / "server.log").start()
    try:
        yield srv.wait_ready(600)
    finally:
        srv.stop()


def _access(srv: ServerProcess, since: int, path: str) -> list[re.Match]:
    return [m for m in ACCESS.finditer(srv.log_tail(100_000_000)[since:]) if m["path"] == path]


def _batch_buckets(srv: ServerProcess) -> dict[float, float]:
    """Cumulative counts of the model's batch-size histogram, by upper bound."""
    text = requests.get(f"{srv.url}/metrics", timeout=30).text
    return {float(m[1]): float(m[2]) for m in re.finditer(r'^osteoscreen_batch_size_bucket\{le="([^"]+)"\} (\S+)$',
                                                          text, re.M)}


def _pinned_connections(srv: ServerProcess) -> dict[str, list[http.client.HTTPConnection]]:
    """Keep-alive connections by the front worker that accepted them, at least PER_WORKER on each."""
    by_worker: dict[str, list[http.client.HTTPConnection]] = {}
    for _ in range(6):
        since = len(srv.log_tail(100_000_000))
        fresh = []
        for _ in range(2 * PER_WORKER):
            conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=120)
            conn.request("GET", "/which-worker")  # 404, access-logged with the worker and the client port
            response = conn.getresponse()
            response.read()
            assert response.status == 404
            fresh.append(conn)
        lines = wait_until(lambda s=since, n=len(fresh): (found := _access(srv, s, "/which-worker")) and
                           len(found) >= n and found, 30, message="the probes' access lines never appeared")
        worker_of = {int(m["port"]): m["worker"] for m in lines}
        for conn in fresh:
            by_worker.setdefault(worker_of[conn.sock.getsockname()[1]], []).append(conn)
        if len(by_worker) == 2 and all(len(c) >= PER_WORKER for c in by_worker.values()):
            return by_worker
    pytest.fail(f"connections never reached both front workers: {({w: len(c) for w, c in by_worker.items()})}")


def test_requests_through_both_front_workers_share_model_batches(two_fronts, registered_model):
    srv = two_fronts
    image = sorted((registered_model["root"] / "data").glob("*/*.png"))[0].read_bytes()
    by_worker = _pinned_connections(srv)
    assert len(by_worker) == 2, by_worker
    burst = [conn for conns in by_worker.values() for conn in conns[:PER_WORKER]]
    before, since = _batch_buckets(srv), len(srv.log_tail(100_000_000))
    start = threading.Barrier(len(burst))

    def predict(conn: http.client.HTTPConnection) -> int:
        start.wait()
        conn.request("POST", "/predict", body=image, headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        response.read()
        return response.status

    with grpc.insecure_channel(srv.grpc_target) as channel, cf.ThreadPoolExecutor(len(burst) + BUSY_CALLS) as pool:
        request = pb.PredictBatchRequest(requests=[pb.PredictRequest(image=image)] * BUSY_BATCH)
        busy = [pool.submit(pb_grpc.ScreeningStub(channel).PredictBatch, request, timeout=300) for _ in range(BUSY_CALLS)]
        # all of them at the model service (BentoML counts its calls in flight): it is computing the first
        wait_until(lambda: _in_flight_at_model(srv) >= BUSY_CALLS or any(b.done() for b in busy), 120, 0.02,
                   "the busy batches never reached the model")
        statuses = list(pool.map(predict, burst))
        assert [len(b.result().responses) for b in busy] == [BUSY_BATCH] * BUSY_CALLS
    assert statuses == [200] * len(burst)
    for conn in burst:
        conn.close()

    answered = wait_until(lambda: (found := _access(srv, since, "/predict")) and len(found) >= len(burst) and found,
                          30, message="the burst's access lines never appeared")
    per_worker = {w: sum(m["worker"] == w for m in answered) for w in by_worker}
    assert sorted(per_worker.values()) == [PER_WORKER, PER_WORKER], per_worker  # the connections stayed pinned

    after = _batch_buckets(srv)
    edges = sorted(after)
    new = {e: after[e] - before.get(e, 0.0) for e in edges}  # batches since `before`, cumulative by size
    assert new[edges[-1]] >= BUSY_CALLS + 1, new  # the busy batches and at least one more
    # the busy batches went alone (nothing fits beside 32 images); set them aside, then the largest other batch
    # lies in the highest bucket that still has one: it held more images than that bucket's lower bound
    others = {e: n - (BUSY_CALLS if e >= BUSY_BATCH else 0) for e, n in new.items()}
    highest = next(i for i, e in enumerate(edges) if others[e] == others[edges[-1]])
    at_least = int(edges[highest - 1]) + 1 if highest else 1
    assert at_least > max(per_worker.values()), (
        f"no model batch larger than one front worker's {max(per_worker.values())} requests (largest: at least "
        f"{at_least}; batch-size histogram since the burst: {others}): the workers' requests were not batched together")


def _in_flight_at_model(srv: ServerProcess) -> float:
    text = requests.get(f"{srv.url}/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("bentoml_service_request_in_progress{") and 'endpoint="/infer"' in line)
