"""Two front workers (`OSTEOSCREEN_FRONT_WORKERS=2`) share one batcher: the reason it lives in the model service.

A real server with two front worker processes. An HTTP keep-alive connection is pinned to the worker that
accepted it (its access line names the worker and the client's port), so the test opens connections until
it holds the same number on each, and sends one request on every one of them at once. A batcher per front
worker could put at most one worker's requests into a model call; the model's batch-size histogram shows a
call larger than that, so requests of both workers were batched together.

The greedy batcher keeps a batch open while requests keep arriving within one image's model time, up to
the size of the last batch, so a first PredictBatch of 32 lets a burst go to the model in one or two calls.
Arrival at the model service is not in the test's hands (both workers decode on two shared cores), so a
burst may still split along the workers by chance; the test tries up to three bursts. With a batcher per
worker, no number of tries could show a batch larger than one worker's share."""

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

PER_WORKER = 8  # requests per front worker in a burst: together 16, more than one worker sends
WARM_BATCH = 32  # one PredictBatch first: the batcher's last batch, so it gathers up to that many
TRIES = 3
ACCESS = re.compile(r"\[entry_service:osteoscreen:(?P<worker>\d+)\] 127\.0\.0\.1:(?P<port>\d+) "
                    r"\(scheme=https?,method=(?P<method>\w+),path=(?P<path>[^,]+),")


@pytest.fixture(scope="module")
def two_fronts(registered_model, tmp_path_factory):
    srv = ServerProcess(env=registered_model["env"], OSTEOSCREEN_FRONT_WORKERS="2",
                        log_path=tmp_path_factory.mktemp("two-fronts") / "server.log").start()
    try:
        yield srv.wait_ready(600)
    finally:
        srv.stop()


def _log(srv: ServerProcess) -> str:
    return srv.log_tail(100_000_000)


def _access(srv: ServerProcess, since: int, path: str, at_least: int) -> list[re.Match]:
    """The access lines for `path` written after offset `since`, once there are `at_least` of them."""
    def lines() -> list[re.Match]:
        found = [m for m in ACCESS.finditer(_log(srv)[since:]) if m["path"] == path]
        return found if len(found) >= at_least else []

    return wait_until(lines, 30, message=f"fewer than {at_least} access lines for {path}")


def _batch_buckets(srv: ServerProcess) -> dict[float, float]:
    """Cumulative counts of the model's batch-size histogram, by upper bound."""
    text = requests.get(f"{srv.url}/metrics", timeout=30).text
    return {float(m[1]): float(m[2])
            for m in re.finditer(r'^osteoscreen_batch_size_bucket\{le="([^"]+)"\} (\S+)$', text, re.M)}


def _largest_batch_at_least(before: dict[float, float], after: dict[float, float]) -> int:
    """The fewest images the largest model call since `before` can have held: one more than the lower bound
    of the highest histogram bucket that gained a call (0 when none did)."""
    edges = sorted(after)
    new = [after[e] - before.get(e, 0.0) for e in edges]
    if not new or new[-1] <= 0:
        return 0
    highest = next(i for i, n in enumerate(new) if n == new[-1])  # cumulative: the first that holds them all
    return int(edges[highest - 1]) + 1 if highest else 1


def _pinned_connections(srv: ServerProcess) -> dict[str, list[http.client.HTTPConnection]]:
    """PER_WORKER open keep-alive connections on each front worker."""
    by_worker: dict[str, list[http.client.HTTPConnection]] = {}
    for _ in range(6):
        since = len(_log(srv))
        fresh = []
        for _ in range(2 * PER_WORKER):
            conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=120)
            conn.request("GET", "/which-worker")  # 404, access-logged with the worker and the client port
            response = conn.getresponse()
            response.read()
            assert response.status == 404
            fresh.append(conn)
        worker_of = {int(m["port"]): m["worker"] for m in _access(srv, since, "/which-worker", len(fresh))}
        for conn in fresh:
            by_worker.setdefault(worker_of[conn.sock.getsockname()[1]], []).append(conn)
        if len(by_worker) == 2 and all(len(c) >= PER_WORKER for c in by_worker.values()):
            for conns in by_worker.values():
                for extra in conns[PER_WORKER:]:
                    extra.close()
            return {worker: conns[:PER_WORKER] for worker, conns in by_worker.items()}
    pytest.fail(f"connections never reached both front workers: {({w: len(c) for w, c in by_worker.items()})}")


def _burst(srv: ServerProcess, image: bytes) -> tuple[dict[str, int], int]:
    """One request on each pinned connection at once -> (requests answered per worker, the largest model
    call since, at least)."""
    by_worker = _pinned_connections(srv)
    burst = [conn for conns in by_worker.values() for conn in conns]
    before, since = _batch_buckets(srv), len(_log(srv))
    start = threading.Barrier(len(burst))

    def predict(conn: http.client.HTTPConnection) -> int:
        start.wait()
        conn.request("POST", "/predict", body=image, headers={"Content-Type": "image/png"})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response.status

    with cf.ThreadPoolExecutor(len(burst)) as pool:
        statuses = list(pool.map(predict, burst))
    assert statuses == [200] * len(burst)
    answered = _access(srv, since, "/predict", len(burst))
    per_worker = {worker: sum(m["worker"] == worker for m in answered) for worker in by_worker}
    assert sorted(per_worker.values()) == [PER_WORKER, PER_WORKER], per_worker  # the connections stayed pinned
    return per_worker, _largest_batch_at_least(before, _batch_buckets(srv))


def test_requests_through_both_front_workers_share_model_batches(two_fronts, registered_model):
    srv = two_fronts
    image = sorted((registered_model["root"] / "data").glob("*/*.png"))[0].read_bytes()
    with grpc.insecure_channel(srv.grpc_target) as channel:
        warm = pb_grpc.ScreeningStub(channel).PredictBatch(
            pb.PredictBatchRequest(requests=[pb.PredictRequest(image=image)] * WARM_BATCH), timeout=300)
    assert len(warm.responses) == WARM_BATCH
    tries = []
    for _ in range(TRIES):
        per_worker, largest = _burst(srv, image)
        tries.append((per_worker, largest))
        if largest > max(per_worker.values()):
            return  # a model call held more requests than either worker sent: both workers' requests
    pytest.fail(f"no model call larger than one front worker's share in {TRIES} bursts (requests per worker, "
                f"largest call at least): {tries}; the workers' requests were not batched together")
