"""The continuous-batching scheduler in process: stop strings, deadlines, a full queue, unloading mid-way,
and the key/value cache written in place."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shipyard.artifact.manifest import GenerationRecord
from shipyard.errors import InvalidInputError, OverloadedError, UnavailableError
from shipyard.kvcache import CacheSlots, StepRunner
from shipyard.onnxrt import session
from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.serve.core.decoder import Decoder, Generation
from shipyard.serve.core.sampling import Options, Sampler
from shipyard.serve.core.scheduler import MIN_CHUNK, Scheduler, Sequence
from shipyard.spec import load_spec
from tests._helpers import WORDS, causal_spec, make_hf_causal, write_spec

PROMPT = "the ship sails"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LocalRegistry]:
    folder = tmp_path_factory.mktemp("scheduler")
    make_hf_causal(folder / "hf", context=512)
    registry = LocalRegistry(folder / "registry")
    spec = causal_spec(max_new_tokens=400, max_running=2, max_waiting=2, prefill_pace=1.0)
    build(load_spec(write_spec(folder, spec)), registry)
    return folder, registry


@pytest.fixture
def decoder(built: tuple[Path, LocalRegistry]) -> Iterator[Decoder]:
    registry = built[1]
    record = registry.resolve("lm")
    loaded = Decoder(registry.path(record), registry.manifest(record))
    loaded.attach(session(registry.path(record) / "model.onnx", threads=1))
    yield loaded
    loaded.detach()


async def _text(generation: Generation, deadline: float | None = None) -> str:
    generation.submit(deadline)
    return "".join([piece async for piece in generation.run()])


def test_a_stop_string_ends_the_text_before_it(decoder: Decoder) -> None:
    whole = asyncio.run(_text(decoder.start(PROMPT, Options(max_tokens=12))))
    words = whole.split()
    stop = f" {words[3]}"  # the fourth word and what follows never reach the client
    cut = asyncio.run(_text(generation := decoder.start(PROMPT, Options(max_tokens=12, stop=[stop]))))
    assert cut == whole[: whole.index(stop)]
    assert generation.finish_reason == "stop"
    assert generation.usage.completion_tokens < 12


def test_stop_strings_across_tokens_overlapping_and_several(decoder: Decoder) -> None:
    whole = asyncio.run(_text(decoder.start(PROMPT, Options(max_tokens=12))))
    words = whole.split()

    def cut(*stop: str) -> str:
        return asyncio.run(_text(decoder.start(PROMPT, Options(max_tokens=12, stop=list(stop)))))

    spanning = f"{words[2][1:]} {words[3]} {words[4][:1]}"  # starts and ends inside a token
    assert cut(spanning) == whole[: whole.index(spanning)]
    # The one that is complete first wins, whichever is listed first; a near miss that shares a prefix stops nothing.
    stops = (f" {words[5]}", spanning, "zzz")
    first = min((whole.index(stop) + len(stop), stop) for stop in stops if stop in whole)[1]
    assert cut(*stops) == whole[: whole.index(first)]
    assert cut(f"{words[1]} {words[2]} qqq", f"{words[0]}{words[0]}") == whole
    # A stop string that overlaps itself is found where it first ends, and what precedes it is sent.
    assert _released(decoder, [*"ababaababab", "x"], "ababab") == ("ababa", True)
    assert _released(decoder, ["aba", "bab", "ac"], "ababac") == ("ab", True)
    assert _released(decoder, ["aba", "b", "x"], "ababac") == ("ababx", False)


def _released(decoder: Decoder, pieces: list[str], stop: str) -> tuple[str, bool]:
    """What the detokenizer's stop check lets out of text that arrives in these pieces."""
    from shipyard.serve.core.decoder import _Detokenizer

    matcher = _Detokenizer(decoder, (stop,))
    sent = ""
    for piece in pieces:
        out, stopped = matcher._release(matcher.held + piece)
        sent += out
        if stopped:
            return sent, True
    return sent + matcher.held, False


def test_a_prompt_with_an_id_beyond_the_vocabulary_is_refused_before_batching(decoder: Decoder) -> None:
    """A tokenizer that knows more tokens than the graph (the build refuses one; this guards the server)."""
    from tokenizers import AddedToken

    decoder.tokenizer.add_tokens([AddedToken("<beyond>", special=False)])
    with pytest.raises(InvalidInputError, match="outside this model's vocabulary"):
        decoder.start(f"{PROMPT} <beyond>", Options(max_tokens=4))
    assert asyncio.run(_text(decoder.start(PROMPT, Options(max_tokens=4)))) != ""


def test_a_deadline_ends_a_generation_with_timeout(decoder: Decoder) -> None:
    with pytest.raises(TimeoutError):
        asyncio.run(_text(decoder.start(PROMPT, Options(max_tokens=400)), time.monotonic()))  # due at once
    deadline = time.monotonic() + 5
    while decoder.scheduler.stats.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert decoder.scheduler.stats.running == 0


def test_unloading_mid_generation_ends_it_as_unavailable(decoder: Decoder) -> None:
    async def run() -> None:
        generation = decoder.start(PROMPT, Options(max_tokens=400))
        generation.submit()
        pieces = generation.run()
        await pieces.__anext__()  # it is running
        await asyncio.to_thread(decoder.detach)
        async for _ in pieces:
            pass

    with pytest.raises(UnavailableError, match="unloaded while generating"):
        asyncio.run(run())


def test_a_new_prompt_runs_in_pieces_of_about_one_decode_step_while_others_decode(decoder: Decoder) -> None:
    """The runner paced to known costs (a decode step 40 ms, a prompt token 1 ms) and `prefill_pace: 1`:
    once both are measured, a 200-token prompt that arrives while another sequence decodes runs in pieces of
    about 40 tokens, one between two decode steps, instead of stalling the running sequence for its whole
    prefill."""
    runner = decoder.scheduler.runner
    real, prefills = runner.run, []

    def paced(slot: int, ids: np.ndarray, lengths: list[int], every_position: bool = False) -> np.ndarray:
        time.sleep(0.04 if ids.shape[1] == 1 else 0.001 * ids.shape[1])
        if ids.shape[1] > 1:
            prefills.append(ids.shape[1])
        return real(slot, ids, lengths, every_position=every_position)

    runner.run = paced  # type: ignore[method-assign]
    long = " ".join((WORDS[2:] * 40)[:200])

    async def run() -> None:
        await _text(decoder.start(long[: len(long) // 2], Options(max_tokens=1)))  # alone: one piece, measured
        running = decoder.start(PROMPT, Options(max_tokens=30))
        running.submit()
        pieces = running.run()
        await pieces.__anext__()
        prefills.clear()
        await _text(decoder.start(long, Options(max_tokens=1)))
        async for _ in pieces:
            pass

    asyncio.run(run())
    assert len(prefills) >= 3
    assert all(MIN_CHUNK <= width <= 80 for width in prefills[:-1]), prefills  # the last is what remained


def _runner(registry: LocalRegistry, slots: int) -> tuple[StepRunner, GenerationRecord]:
    """The built model's graph over a fresh cache of `slots` slots, and its generation record."""
    record = registry.resolve("lm")
    generation = registry.manifest(record).generation
    assert generation is not None
    cache = CacheSlots(generation, slots, np.dtype(np.float32))
    return StepRunner(session(registry.path(record) / "model.onnx"), cache, np.dtype(np.int64)), generation


def test_a_full_waiting_queue_refuses_at_once(built: tuple[Path, LocalRegistry]) -> None:
    runner, generation = _runner(built[1], 1)
    idle = Scheduler(runner, generation)  # not started: nothing leaves the queue
    places = generation.max_waiting

    async def fill() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(places):
            idle.submit(Sequence([2, 3], 4, Sampler(Options(), {}, [2, 3], frozenset()), loop))
        with pytest.raises(OverloadedError, match="already waiting"):
            idle.submit(Sequence([2, 3], 4, Sampler(Options(), {}, [2, 3], frozenset()), loop))

    asyncio.run(fill())


def test_the_cache_is_written_in_place(built: tuple[Path, LocalRegistry]) -> None:
    """A step's present keys and values land in the preallocated arrays: the next step reads them there."""
    runner, _ = _runner(built[1], 2)
    cache = runner.cache
    addresses = [a.ctypes.data for a in cache.arrays]
    runner.run(1, np.array([[2, 3, 4]]), [3])
    assert [a.ctypes.data for a in cache.arrays] == addresses
    assert all(np.abs(a[1, :, :3]).sum() > 0 for a in cache.arrays)  # slot 1 holds the three positions
    assert all(np.abs(a[1, :, 3:]).sum() == 0 for a in cache.arrays)
    assert all(np.abs(a[0]).sum() == 0 for a in cache.arrays)  # slot 0 untouched
