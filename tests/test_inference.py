"""The shared inference path without a server: greedy batching and deadline-aware admission, over a fake model
whose speed and answers the tests control."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from osteoscreen.serving.batching import GreedyBatcher
from osteoscreen.errors import ImageDecodeError, OverloadedError
from osteoscreen.intended_use.policy import Policy
from osteoscreen.serving.inference import InferencePath, ModelInfo
from osteoscreen.types import InferFn
from tests.inputs import good_png


class FakeModel:
    """Answers each image with its first pixel as the probability, plus the batch's compute seconds
    (`seconds_per_image` x N, reported) and size, as the model service does. It sleeps `sleep_per_image` x N
    and holds every call until `release` is set, so tests can make requests pile up."""

    def __init__(self, seconds_per_image: float = 0.01, sleep_per_image: float = 0.0) -> None:
        self.seconds_per_image = seconds_per_image
        self.sleep_per_image = sleep_per_image
        self.batches: list[int] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail_next: Exception | None = None

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        self.batches.append(n)
        await self.release.wait()
        await asyncio.sleep(self.sleep_per_image * n)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        first = images.reshape(n, -1)[:, 0].astype(np.float64)
        return np.stack([first, np.full(n, self.seconds_per_image * n), np.full(n, n)], axis=1)


def images(*values: float) -> np.ndarray:
    return np.stack([np.full((224, 224, 1), v, np.float32) for v in values])


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def busy_batcher(max_batch: int,
                       model: FakeModel | None = None) -> tuple[FakeModel, GreedyBatcher, asyncio.Task]:
    """A batcher whose model holds a first one-image request until `model.release` is set."""
    model = model or FakeModel()
    model.release.clear()
    batcher = GreedyBatcher(model, max_batch=max_batch)
    first = asyncio.create_task(batcher(images(0.0)))
    await settle()
    return model, batcher, first


def test_a_lone_request_goes_at_once_and_alone() -> None:
    async def main() -> None:
        model = FakeModel()
        out = await GreedyBatcher(model, max_batch=8)(images(0.25))
        assert model.batches == [1]
        assert out[:, 0].tolist() == [0.25]

    asyncio.run(main())


def test_requests_that_wait_for_a_busy_model_go_as_one_batch_and_each_gets_its_own_rows() -> None:
    async def main() -> None:
        model, batcher, first = await busy_batcher(32)
        rest = [asyncio.create_task(batcher(images(i, i + 0.5))) for i in range(1, 6)]
        await settle()
        assert model.batches == [1]  # the others wait while the model works
        model.release.set()
        answers = await asyncio.gather(first, *rest)
        assert model.batches == [1, 10]
        assert [a[:, 0].tolist() for a in answers] == [[0.0]] + [[i, i + 0.5] for i in range(1, 6)]

    asyncio.run(main())


def run_in_virtual_time(main, monkeypatch) -> None:
    """Run `main()` with the event loop on a virtual clock that moves only while every task waits
    (aiotools.VirtualClock), and let the batcher time the model on that clock too: arrival gaps and model
    times are then exact, whatever else the machine is doing (on a busy CI core a 20 ms gap between
    arrivals could stretch past the model's 50 ms per image)."""
    import aiotools

    from osteoscreen.serving import batching

    clock = aiotools.VirtualClock()
    monkeypatch.setattr(batching, "time", SimpleNamespace(perf_counter=clock.virtual_time))

    async def virtual() -> None:
        with clock.patch_loop():
            await main()

    asyncio.run(virtual())


def test_after_a_large_batch_the_next_waits_briefly_for_as_many_and_then_settles_back(monkeypatch) -> None:
    async def main() -> None:
        model, batcher, blocker = await busy_batcher(8, FakeModel(sleep_per_image=0.05))  # 0.05 s per image
        first = [asyncio.create_task(batcher(images(i))) for i in range(4)]
        await settle()
        model.release.set()
        await asyncio.gather(blocker, *first)
        assert model.batches == [1, 4]
        assert batcher.seconds_per_image == pytest.approx(0.05)

        async def arrive(delay: float, value: float) -> np.ndarray:
            await asyncio.sleep(delay)
            return await batcher(images(value))

        # the closed-loop pattern: the first resent request must not find the model free and go alone;
        # the others come 0.02 s apart, faster than the model's 0.05 s per image
        answers = await asyncio.gather(*(arrive(0.02 * i, i) for i in range(4)))
        assert model.batches == [1, 4, 4]
        assert [a[:, 0].tolist() for a in answers] == [[0.0], [1.0], [2.0], [3.0]]
        # requests slower than the model per image do not hold the batch open for the whole gather time
        answers = await asyncio.gather(*(arrive(0.3 * i, i) for i in range(4)))
        assert model.batches[3:] == [1, 1, 1, 1]
        # load gone: one short wait (one image's model time), then lone requests go at once
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher(images(9))
        assert loop.time() - started <= 2 * 0.05 + 1e-6  # at most one image's wait, plus its own model time
        started = loop.time()
        await batcher(images(9))
        assert loop.time() - started == pytest.approx(0.05)  # no wait at all
        assert model.batches[7:] == [1, 1]

    run_in_virtual_time(main, monkeypatch)


def test_batches_stay_within_max_batch_except_a_single_larger_request() -> None:
    async def main() -> None:
        model, batcher, blocker = await busy_batcher(4)
        tasks = [asyncio.create_task(batcher(images(*([1.0] * n)))) for n in (3, 2, 6, 1)]
        await settle()
        model.release.set()
        await asyncio.gather(blocker, *tasks)
        assert model.batches == [1, 3, 2, 6, 1]

    asyncio.run(main())


def test_a_caller_that_gave_up_never_reaches_the_model() -> None:
    async def main() -> None:
        model, batcher, blocker = await busy_batcher(32)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await batcher(images(7, 7, 7))
        kept = asyncio.create_task(batcher(images(3)))
        await settle()
        model.release.set()
        assert (await kept)[:, 0].tolist() == [3.0]
        await blocker
        assert model.batches == [1, 1]

    asyncio.run(main())


def test_a_model_error_reaches_that_batch_only_and_the_batcher_keeps_serving() -> None:
    async def main() -> None:
        model = FakeModel()
        batcher = GreedyBatcher(model, max_batch=8)
        model.fail_next = ConnectionError("model service went away")
        with pytest.raises(ConnectionError, match="went away"):
            await batcher(images(1))
        assert (await batcher(images(2)))[:, 0].tolist() == [2.0]

    asyncio.run(main())


def test_a_malformed_model_answer_is_an_error_not_a_wrong_row() -> None:
    async def short(batch: np.ndarray) -> np.ndarray:
        return np.zeros((len(batch) - 1, 3))

    async def main() -> None:
        with pytest.raises(RuntimeError, match="answered"):
            await GreedyBatcher(short, max_batch=8)(images(1, 2))

    asyncio.run(main())


def ready_path(model: InferFn, max_queue: int = 64) -> InferencePath:
    # flag: these tests are about batching and admission (the fake model has no content check);
    # tests/test_intended_use.py covers the refuse policy
    path = InferencePath(model, max_queue=max_queue, policy=Policy.FLAG)
    path.set_model(ModelInfo(name="fake", version="1", backbone="vgg16", threshold=0.5))
    return path


def test_a_request_the_queue_would_keep_past_its_deadline_is_refused_at_once() -> None:
    async def main() -> None:
        model = FakeModel(seconds_per_image=0.5)
        path = ready_path(model)
        await path.predict([good_png(0)], timeout=10.0)  # the path learns 0.5 s per image
        model.release.clear()
        busy = [asyncio.create_task(path.predict([good_png(i)], timeout=60.0)) for i in range(4)]
        while len(model.batches) < 5:  # all four at the model
            await asyncio.sleep(0.01)
        # 4 queued + this one = 5 images x 0.5 s = 2.5 s: more than a 2 s deadline, less than a 10 s one
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(OverloadedError, match="deadline"):
            await path.predict([good_png(9)], timeout=2.0)
        assert loop.time() - started < 1.0  # refused, not timed out
        with pytest.raises(TimeoutError, match="shorter than the model"):  # not busy: too short for any server
            await path.predict([good_png(9)], timeout=0.3)
        admitted = asyncio.create_task(path.predict([good_png(9)], timeout=10.0))
        await settle()
        model.release.set()
        assert len(await admitted) == 1
        assert len(await asyncio.gather(*busy)) == 4
        assert path.queued == 0

    asyncio.run(main())


def test_the_image_limit_refuses_whatever_the_deadline() -> None:
    async def main() -> None:
        model = FakeModel()
        model.release.clear()
        path = ready_path(model, max_queue=3)
        busy = asyncio.create_task(path.predict([good_png(0), good_png(1)], timeout=None))
        while path.queued < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError, match="limit 3"):
            await path.predict([good_png(2), good_png(3)], timeout=None)
        model.release.set()
        assert len(await busy) == 2

    asyncio.run(main())


def test_predictions_carry_the_model_and_its_threshold() -> None:
    async def main() -> None:
        path = ready_path(FakeModel())
        with pytest.raises(ImageDecodeError, match="no image"):
            await path.predict([])
        [prediction] = await path.predict([good_png(0)])
        assert prediction.label == ("osteoporosis" if prediction.probability >= 0.5 else "normal")
        assert (prediction.model, prediction.version, prediction.threshold) == ("fake", "1", 0.5)

    asyncio.run(main())


def test_an_unreachable_model_service_is_retryable_and_its_own_errors_are_not() -> None:
    import aiohttp
    from bentoml.exceptions import InternalServerError

    from osteoscreen.errors import ModelUnavailableError
    from osteoscreen.serving.grpc.server import status_for
    from osteoscreen.serving.model_client import remote_infer

    async def refused(batch: np.ndarray) -> np.ndarray:
        raise aiohttp.ServerDisconnectedError("the model process died")

    async def broken(batch: np.ndarray) -> np.ndarray:
        raise InternalServerError("model crashed on this batch")

    async def main() -> None:
        path = ready_path(remote_infer(refused))
        with pytest.raises(ModelUnavailableError, match="cannot be reached") as unavailable:
            await path.predict([good_png(0)], timeout=5.0)
        assert status_for(unavailable.value)[0].name == "UNAVAILABLE"
        with pytest.raises(InternalServerError):
            await ready_path(remote_infer(broken)).predict([good_png(0)], timeout=5.0)

    asyncio.run(main())


def test_bytes_in_flight_are_bounded_not_only_the_image_count() -> None:
    """Issue 17, item 7: a queue of a few huge images is refused by their bytes, while small ones still fit."""
    async def main() -> None:
        model = FakeModel()
        model.release.clear()
        path = InferencePath(model, max_queue=64, max_inflight_bytes=100_000, policy=Policy.FLAG)
        path.set_model(ModelInfo(name="fake", version="1", backbone="vgg16", threshold=0.5))
        big = good_png(0) + b"\0" * (60_000 - len(good_png(0)))  # trailing bytes after IEND: still a valid PNG
        first = asyncio.create_task(path.predict([big], timeout=None))
        while path.queued_bytes == 0:
            await asyncio.sleep(0.01)
        assert path.queued_bytes == len(big)
        with pytest.raises(OverloadedError, match="MiB of images in flight"):  # 2 of 64 by count, refused by bytes
            await asyncio.wait_for(path.predict([big], timeout=None), 5)  # (a TimeoutError: it was queued)
        small = asyncio.create_task(path.predict([good_png(1)], timeout=None))
        await settle()
        model.release.set()
        assert len(await first) == 1 and len(await small) == 1
        assert path.queued_bytes == 0 and path.queued == 0
        lone = InferencePath(model, max_inflight_bytes=1_000, policy=Policy.FLAG)  # a lone request larger than the budget still goes
        lone.set_model(ModelInfo(name="fake", version="1", backbone="vgg16", threshold=0.5))
        assert len(await lone.predict([big], timeout=None)) == 1

    asyncio.run(main())


def test_decodes_run_at_most_decode_threads_at_once(monkeypatch) -> None:
    """Issue 17, items 7 and 8: each decode of a big image costs up to ~366 MiB, so their number is bounded."""
    import threading

    import osteoscreen.serving.inference as inference

    lock, running, peak = threading.Lock(), [0], [0]
    real_load = inference.decode

    def counting_load(data: bytes, hint: str | None = None):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            threading.Event().wait(0.05)
            return real_load(data, hint)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(inference, "decode", counting_load)

    async def main() -> None:
        path = InferencePath(FakeModel(), decode_threads=2, policy=Policy.FLAG)
        path.set_model(ModelInfo(name="fake", version="1", backbone="vgg16", threshold=0.5))
        results = await asyncio.gather(*(path.predict([good_png(i), good_png(i + 10)]) for i in range(6)))
        assert sum(len(r) for r in results) == 12
        assert peak[0] == 2, f"{peak[0]} decodes at once with decode_threads=2"

    asyncio.run(main())
