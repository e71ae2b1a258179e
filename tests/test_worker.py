"""The worker: padding, softmax, the model threads' scheduling policy, and exit with a hung run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from batcher.model.tokenization import Encoded
from batcher.worker import pad_batch, softmax
from tests.conftest import FakeModel, MakeBatcher, row

ROOT = Path(__file__).resolve().parent.parent


def test_pad_batch_pads_to_the_longest_row() -> None:
    ids, mask, types = pad_batch([Encoded([1, 2], [0, 0]), Encoded([1, 2, 3, 4], [0, 0, 1, 1])], pad_id=0)
    assert ids.tolist() == [[1, 2, 0, 0], [1, 2, 3, 4]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert types.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1]]


def test_softmax_rows_sum_to_one() -> None:
    probs = softmax(np.array([[1000.0, 1000.0], [0.0, np.log(3)]], dtype=np.float32))
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.25, 0.75]], rtol=1e-6)


HUNG_RUN = """
import asyncio, threading
from batcher.queue import Pending
from batcher.model.tokenization import Encoded, Text
from batcher.worker import Worker

class Hangs:
    provider = "test"
    def run(self, *inputs):
        print("running", flush=True)
        threading.Event().wait()  # never returns

async def main():
    loop = asyncio.get_running_loop()
    encode = lambda texts: [Encoded([1, 2], [0, 0]) for _ in texts]
    worker = Worker(Hangs(), encode=encode, instances=1, pad_id=0, num_labels=2)
    worker.start()
    entry = Pending(Text("你好", 4), 0.0, 1.0, loop.create_future(), 0.0)
    worker.run([entry], lambda batch, outcome: None)
    await asyncio.sleep(0.5)
    worker.close()

asyncio.run(main())
print("exiting", flush=True)
"""


def test_a_hung_model_run_does_not_keep_the_process_from_exiting() -> None:
    result = subprocess.run([sys.executable, "-c", HUNG_RUN], capture_output=True, text=True, timeout=20, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["running", "exiting"]


class PolicyProbe(FakeModel):
    """Records the scheduling policy and niceness of the thread each run executes on."""

    def __init__(self) -> None:
        super().__init__(num_labels=4)
        self.seen: list[tuple[int, int]] = []

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        self.seen.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return super().run(input_ids, attention_mask, token_type_ids)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
async def test_model_threads_run_under_sched_idle_and_the_loop_does_not(make_batcher: MakeBatcher) -> None:
    model = PolicyProbe()
    batcher, _, _ = make_batcher(model=model)
    await batcher.submit(row(3))
    assert model.seen and all(policy == os.SCHED_IDLE for policy, _ in model.seen)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the loop's thread is left alone


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="niceness per thread is Linux-only")
async def test_without_sched_idle_the_model_threads_are_niced(make_batcher: MakeBatcher) -> None:
    model = PolicyProbe()
    batcher, _, _ = make_batcher(model=model, worker_sched_idle=False, worker_nice=7)
    await batcher.submit(row(3))
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert model.seen and all(policy == os.SCHED_OTHER and nice == min(19, base + 7) for policy, nice in model.seen)
