"""Readiness follows the model service (issue 17, item 6): a dead, restarting or hung model process turns the
replica not ready within seconds (gRPC health NOT_SERVING, requests refused as retryable), and its next
answer turns it ready again. Fake model service here; tests/test_service.py kills the real one."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from osteoscreen.errors import ModelUnavailableError
from osteoscreen.intended_use.policy import Policy
from osteoscreen.serving.inference import InferencePath
from osteoscreen.serving.model_client import remote_infer, remote_info
from osteoscreen.serving.readiness import ModelWatch, WatchSettings
from tests.inputs import good_png
from tests.test_grpc_api import Running, health_status, spb, spb_grpc, wait_for_health

pytestmark = pytest.mark.timeout(60)
INFO = {"name": "fake", "version": "1", "backbone": "vgg16", "threshold": 0.5}
FAST = WatchSettings(interval_s=0.05, timeout_s=0.2, hung_after=2)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class FakeModelService:
    """`info` and `infer` of a model service that is up, dead (connection refused: nothing listens, as while
    it restarts or shuts down) or hung."""

    def __init__(self) -> None:
        self.state = "up"
        self.infer_calls = 0

    async def _transport(self) -> None:
        if self.state == "dead":
            raise aiohttp.ClientConnectorError(None, OSError(111, "Connection refused"))  # type: ignore[arg-type]
        if self.state == "hung":
            await asyncio.sleep(3600)

    async def info(self) -> dict:
        await self._transport()
        return dict(INFO)

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        self.infer_calls += 1
        await self._transport()
        n = len(batch)
        return np.stack([np.full(n, 0.7), np.full(n, 0.01), np.full(n, n)], axis=1)


def watched(model: FakeModelService, settings: WatchSettings = FAST) -> tuple[InferencePath, ModelWatch]:
    path = InferencePath(remote_infer(model.infer), policy=Policy.FLAG)
    return path, ModelWatch(path, remote_info(model.info), settings)


def test_a_dead_model_is_not_ready_at_once_and_ready_again_when_it_answers() -> None:
    async def main() -> None:
        model = FakeModelService()
        path, watch = watched(model)
        model.state = "dead"
        assert not await watch.check() and not path.is_ready()  # never ready before the first answer
        model.state = "up"
        assert await watch.check() and path.is_ready() and path.model_name == "fake"
        model.state = "dead"
        assert not await watch.check()
        assert not path.is_ready(), "one refused connection: the process is gone"
        assert "cannot be reached" in path.down_reason
        model.state = "up"
        assert await watch.check() and path.is_ready()

    asyncio.run(main())


def test_a_starting_model_is_found_ready_soon_after_it_answers_not_one_interval_later() -> None:
    """Start-up (issue 11): with checks every 10 s once ready, a model that comes up while the watch runs
    is found within `down_interval_s` (0.25 s by default), not up to 10 s later."""

    async def main() -> None:
        model = FakeModelService()
        model.state = "dead"
        path, watch = watched(model, WatchSettings(interval_s=10.0, timeout_s=0.2))
        task = asyncio.get_running_loop().create_task(watch.run())
        try:
            await asyncio.sleep(0.3)
            assert not path.is_ready()
            model.state = "up"
            for _ in range(40):  # up to 2 s
                if path.is_ready():
                    break
                await asyncio.sleep(0.05)
            assert path.is_ready(), "still not ready 2 s after the model answered"
        finally:
            task.cancel()

    asyncio.run(main())


def test_a_hung_model_is_not_ready_after_consecutive_timeouts_not_after_one() -> None:
    async def main() -> None:
        model = FakeModelService()
        path, watch = watched(model)
        await watch.check()
        model.state = "hung"
        assert not await watch.check()
        assert path.is_ready(), "one slow answer on a loaded node must not take the replica out"
        assert not await watch.check()
        assert not path.is_ready() and "no answer" in path.down_reason
        model.state = "up"
        assert await watch.check() and path.is_ready()

    asyncio.run(main())


def test_a_failed_call_takes_the_path_out_before_the_next_check_and_later_calls_are_refused_fast() -> None:
    async def main() -> None:
        model = FakeModelService()
        path, watch = watched(model)
        await watch.check()
        assert [p.probability for p in await path.predict([good_png(0)], timeout=5.0)] == [0.7]
        model.state = "dead"
        with pytest.raises(ModelUnavailableError, match="cannot be reached"):
            await path.predict([good_png(1)], timeout=5.0)
        assert not path.is_ready()
        calls = model.infer_calls
        with pytest.raises(ModelUnavailableError, match="not available"):
            await path.predict([good_png(2)], timeout=5.0)
        assert model.infer_calls == calls, "refused at the door while the model is known to be down"
        model.state = "up"
        await watch.check()
        assert len(await path.predict([good_png(3)], timeout=5.0)) == 1
        assert path.queued == 0

    asyncio.run(main())


def hold_calls(model: FakeModelService, path: InferencePath) -> asyncio.Event:
    """The model holds every call it gets until the returned event is set: calls provably in flight."""
    release = asyncio.Event()
    real_infer = model.infer

    async def held(batch: np.ndarray) -> np.ndarray:
        await release.wait()
        return await real_infer(batch)

    path._infer = remote_infer(held)
    return release


def test_a_model_shutting_down_refuses_new_calls_but_finishes_those_in_flight() -> None:
    """On SIGTERM the model service stops listening (refused) while it finishes the calls it holds: the path is
    not ready, but those calls are answered, not cut (the drain after SIGTERM depends on it)."""
    async def main() -> None:
        model = FakeModelService()
        path, watch = watched(model)
        await watch.check()
        release = hold_calls(model, path)
        busy = asyncio.create_task(path.predict([good_png(0)], timeout=60.0))
        await asyncio.sleep(0.05)
        model.state = "dead"
        assert not await watch.check() and not path.is_ready()
        model.state = "up"  # the calls already accepted still run to the end
        release.set()
        assert len(await busy) == 1

    asyncio.run(main())


def test_a_slow_health_check_does_not_cut_calls_in_flight() -> None:
    """Two slow health checks mark the path not ready, nothing more: the call in flight is still answered."""
    async def main() -> None:
        model = FakeModelService()
        path, watch = watched(model)
        await watch.check()
        release = hold_calls(model, path)
        busy = asyncio.create_task(path.predict([good_png(0)], timeout=60.0))
        await asyncio.sleep(0.05)
        model.state = "hung"
        await watch.check()
        await watch.check()
        assert not path.is_ready()
        model.state = "up"
        release.set()
        assert len(await busy) == 1, "a slow model's call in flight must still be answered"

    asyncio.run(main())


def test_a_request_that_was_decoding_when_the_model_went_down_never_reaches_it(monkeypatch) -> None:
    """Sent after the crash, it would wait on the restarting model's socket until its deadline (a 504)."""
    import threading

    import osteoscreen.serving.inference as inference

    decoding, finish = threading.Event(), threading.Event()
    real_load = inference.decode

    def slow_load(data: bytes, hint: str | None = None):
        decoding.set()
        finish.wait(10)
        return real_load(data, hint)

    async def main() -> None:
        model = FakeModelService()
        path, watch = watched(model)
        await watch.check()
        monkeypatch.setattr(inference, "decode", slow_load)
        request = asyncio.create_task(path.predict([good_png(0)], timeout=30.0))
        await asyncio.to_thread(decoding.wait, 10)
        model.state = "dead"
        await watch.check()  # the model is known to be down while the request still decodes
        finish.set()
        with pytest.raises(ModelUnavailableError, match="not available"):
            await request
        assert model.infer_calls == 0 and path.queued == 0

    asyncio.run(main())


def test_grpc_health_follows_the_model_service_and_predictions_resume() -> None:
    model = FakeModelService()
    path, watch = watched(model)

    async def start_watch() -> asyncio.Task:
        return asyncio.create_task(watch.run())

    assert asyncio.run(watch.check())  # ready before the server starts, which waits for SERVING
    srv = Running(path)  # type: ignore[arg-type]  # the real InferencePath, not the fake predictor
    task = srv.call(start_watch())
    try:
        stub = spb_grpc.ScreeningStub(srv.channel)
        assert stub.Predict(spb.PredictRequest(image=good_png(0)), timeout=10).probability == pytest.approx(0.7)
        model.state = "dead"
        wait_for_health(srv.channel, NOT_SERVING, timeout=5)
        assert health_status(srv.channel, "osteoscreen.v1.Screening") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(spb.PredictRequest(image=good_png(1)), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        model.state = "hung"
        wait_for_health(srv.channel, NOT_SERVING, timeout=5)
        model.state = "up"
        wait_for_health(srv.channel, SERVING, timeout=5)
        assert stub.Predict(spb.PredictRequest(image=good_png(2)), timeout=10).probability == pytest.approx(0.7)
    finally:
        srv.loop.call_soon_threadsafe(task.cancel)
        srv.close()
