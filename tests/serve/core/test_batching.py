"""The batcher with a controllable stand-in for the runtime: it records every batch it is given."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from shipyard.errors import InvalidInputError, OverloadedError
from shipyard.serve.core.batching import Batcher
from shipyard.serve.observe.metrics import ServerMetrics
from shipyard.serve.observe.stats import ModelStats


class GatedModel:
    """Doubles its input; while `gate` is clear, every run waits (an instance kept busy)."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.batches.append(len(feeds["x"]))
        self.started.set()
        await self.gate.wait()
        return [feeds["x"] * 2]


def _batcher(model: GatedModel, **kw: Any) -> Batcher:
    options = {"max_batch_size": 8, "max_queue_delay_s": 0.0, "preferred_sizes": [], "max_queue_size": 100,
               "instances": 1, **kw}  # fmt: skip
    batcher = Batcher(model.run, ModelStats("m", 1, ServerMetrics()), **options)
    batcher.start()
    return batcher


def _x(value: float, rows: int = 1, width: int = 2) -> dict[str, np.ndarray]:
    return {"x": np.full((rows, width), value, dtype=np.float32)}


async def _with_timeout(coro: Any) -> Any:
    return await asyncio.wait_for(coro, timeout=10)


async def test_a_lone_request_runs_at_once_even_with_a_long_queue_delay() -> None:
    model = GatedModel()
    batcher = _batcher(model, max_queue_delay_s=3600.0)  # a wait would hang the test
    out = await _with_timeout(batcher.submit(_x(1.5), 1))
    assert out[0].tolist() == [[3.0, 3.0]]
    assert model.batches == [1]
    await batcher.stop()


async def test_requests_queued_behind_a_busy_instance_form_one_batch() -> None:
    model = GatedModel()
    batcher = _batcher(model)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(_x(0), 1))
    await model.started.wait()
    rest = [asyncio.create_task(batcher.submit(_x(i), 1)) for i in range(1, 7)]
    await asyncio.sleep(0)
    model.gate.set()
    results = await _with_timeout(asyncio.gather(first, *rest))
    assert model.batches == [1, 6]
    assert [r[0][0, 0] for r in results] == [0, 2, 4, 6, 8, 10, 12]  # each caller gets its own rows back
    await batcher.stop()


async def test_max_batch_size_and_preferred_sizes_are_honoured() -> None:
    model = GatedModel()
    batcher = _batcher(model, preferred_sizes=[4])
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(_x(0), 1))
    await model.started.wait()
    rest = [asyncio.create_task(batcher.submit(_x(i, rows=1), 1)) for i in range(11)]
    await asyncio.sleep(0)
    model.gate.set()
    await _with_timeout(asyncio.gather(first, *rest))
    assert model.batches == [1, 4, 4, 3]  # 11 queued: preferred 4, 4, then the 3 left over
    await batcher.stop()


async def test_requests_with_different_shapes_are_not_mixed() -> None:
    model = GatedModel()
    batcher = _batcher(model)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(_x(0), 1))
    await model.started.wait()
    wide = [asyncio.create_task(batcher.submit(_x(1, width=5), 1)) for _ in range(2)]
    narrow = [asyncio.create_task(batcher.submit(_x(2), 1)) for _ in range(2)]
    await asyncio.sleep(0)
    model.gate.set()
    results = await _with_timeout(asyncio.gather(first, *wide, *narrow))
    assert sorted(model.batches) == [1, 2, 2]
    assert [r[0].shape for r in results] == [(1, 2), (1, 5), (1, 5), (1, 2), (1, 2)]
    await batcher.stop()


async def test_a_full_queue_refuses_at_once() -> None:
    model = GatedModel()
    batcher = _batcher(model, max_queue_size=2)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(_x(0), 1))
    await model.started.wait()
    queued = [asyncio.create_task(batcher.submit(_x(1), 1)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError, match="queue is full"):
        await batcher.submit(_x(2), 1)
    model.gate.set()
    await _with_timeout(asyncio.gather(first, *queued))
    await batcher.stop()


async def test_oversized_batch_is_invalid() -> None:
    batcher = _batcher(GatedModel())
    with pytest.raises(InvalidInputError, match="exceeds the model's max_batch_size 8"):
        await batcher.submit(_x(0, rows=9), 9)
    await batcher.stop()


async def test_stop_finishes_queued_requests_then_refuses_new_ones() -> None:
    model = GatedModel()
    batcher = _batcher(model)
    model.gate.clear()
    pending = [asyncio.create_task(batcher.submit(_x(i), 1)) for i in range(5)]
    await model.started.wait()
    stopping = asyncio.create_task(batcher.stop())
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError, match="being unloaded"):
        await batcher.submit(_x(9), 1)
    model.gate.set()
    await _with_timeout(stopping)
    assert all(t.done() and not t.exception() for t in pending)


async def test_queue_delay_under_load_waits_for_a_fuller_batch() -> None:
    model = GatedModel()
    batcher = _batcher(model, max_queue_delay_s=0.2, instances=2)
    model.gate.clear()
    first = asyncio.create_task(batcher.submit(_x(0), 1))
    await model.started.wait()  # one instance busy: load is present
    late = [asyncio.create_task(batcher.submit(_x(1), 1))]
    await asyncio.sleep(0.01)
    late += [asyncio.create_task(batcher.submit(_x(2), 1)) for _ in range(3)]
    model.gate.set()
    await _with_timeout(asyncio.gather(first, *late))
    assert model.batches == [1, 4]  # the second instance waited and took all four
    await batcher.stop()


class InlineModel:
    """A synchronous model for inline mode: records batch sizes, doubles its input."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.batches.append(len(feeds["x"]))
        return [feeds["x"] * 2]


async def _never_called(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    raise AssertionError("inline batchers must not use the async path")


def _inline_batcher(model: InlineModel, **kw: Any) -> Batcher:
    options = {"max_batch_size": 8, "max_queue_delay_s": 0.0, "preferred_sizes": [], "max_queue_size": 100,
               "instances": 1, **kw}  # fmt: skip
    batcher = Batcher(_never_called, ModelStats("m", 1, ServerMetrics()), **options)
    batcher.use_inline(model.run)
    batcher.start()
    return batcher


async def test_inline_requests_of_one_loop_turn_form_one_batch() -> None:
    model = InlineModel()
    batcher = _inline_batcher(model)
    alone = await _with_timeout(batcher.submit(_x(1), 1))
    assert alone[0].tolist() == [[2.0, 2.0]]
    results = await _with_timeout(asyncio.gather(*(batcher.submit(_x(i), 1) for i in range(11))))
    assert model.batches == [1, 8, 3]  # max_batch_size 8, then the rest
    assert [r[0][0, 0] for r in results] == [2 * i for i in range(11)]
    await batcher.stop()


async def test_inline_preferred_sizes_and_errors() -> None:
    model = InlineModel()
    batcher = _inline_batcher(model, preferred_sizes=[2, 4])
    await _with_timeout(asyncio.gather(*(batcher.submit(_x(i), 1) for i in range(7))))
    assert model.batches == [4, 2, 1]

    def broken(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("kernel exploded at 0x7f00")

    failing = Batcher(_never_called, ModelStats("m", 2, ServerMetrics()), max_batch_size=8, max_queue_delay_s=0.0,
                      preferred_sizes=[], max_queue_size=10, instances=1)  # fmt: skip
    failing.use_inline(broken)
    failing.start()
    with pytest.raises(Exception, match=r"inference failed \(see the server log\)") as info:
        await _with_timeout(failing.submit(_x(0), 1))
    assert "0x7f00" not in str(info.value)  # internals stay in the log
    await failing.stop()
    await batcher.stop()
