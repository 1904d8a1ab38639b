"""Which front worker runs the PACS node (`osteoscreen/serving/dicom/owner.py`): the one holding the outbox lock;
another takes over when it stops (as when the kernel drops a SIGKILLed holder's lock). Fake nodes, no network."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys

from osteoscreen import settings
from osteoscreen.serving.dicom.owner import NodeOwner, OutboxLock


class FakeOutbox:
    def close(self) -> None:
        pass


class FakeNode:
    def __init__(self, started: list) -> None:
        self.started, self.outbox = started, FakeOutbox()

    async def start(self, host: str, port: int) -> int:
        self.started.append(self)
        return 11112

    async def stop(self) -> None:
        self.started.remove(self)


def test_one_owner_at_a_time_and_the_other_takes_over(tmp_path):
    s = settings.Settings(dicom_port=0, outbox_dir=tmp_path / "outbox",
                          results_destination="dicom://ORTHANC@127.0.0.1:4242")
    started: list = []

    async def scenario() -> None:
        a = NodeOwner(None, s, retry_s=0.05, make_node=lambda: FakeNode(started))
        b = NodeOwner(None, s, retry_s=0.05, make_node=lambda: FakeNode(started))
        await a.start()
        await b.start()
        await asyncio.sleep(0.2)
        assert a.node is not None and b.node is None and len(started) == 1
        await a.stop()
        for _ in range(100):
            if b.node is not None:
                break
            await asyncio.sleep(0.02)
        assert b.node is not None and len(started) == 1
        await b.stop()
        assert started == []

    asyncio.run(scenario())
    assert stat.S_IMODE(os.stat(tmp_path / "outbox" / "owner.lock").st_mode) == 0o600


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from osteoscreen.serving.dicom.owner import "
                               "OutboxLock; assert OutboxLock(sys.argv[1]).acquire(); print('held', flush=True); "
                               "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = OutboxLock(tmp_path)
        assert not lock.acquire()
    finally:
        holder.kill()
        holder.wait()
    assert lock.acquire() and lock.held
    lock.release()
