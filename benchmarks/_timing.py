"""The timing primitives the benchmark scripts share (not an asv benchmark: a helper module,
its name starts with ``_`` and none of its names starts with ``time_``, ``track_`` or
``peakmem_``).

The machines are shared and noisy, so the scripts compare methods that *take turns*: round
after round, each method in order, so that call i of every method sees about the same load,
and ratios can be taken pair by pair (``paired_ratios``). The pieces:

- ``timer(f, ...)``: a sampler, a function of no arguments that times ``f`` once (after a
  pause and some untimed calls, if asked) and returns the time per call, in the clock's unit;
- ``turns(samplers, rounds)``: the samplers take turns; ``{name: [sample per round]}``;
- ``warm_up``, ``consecutive``, ``best_of``, ``block_steps``: the rest of the scripts' loops;
- ``median``, ``paired_ratios``, ``median_ratio``: the statistics they report;
- ``synced(sync)``: a clock that waits for a GPU's queue first (``gpu_check.py``);
- ``timed_rounds``: the paired-call method of ``cpu_targets.py``, ``dp_step.py`` and
  ``attribution.py``;
- ``utc_now``, ``machine``, ``load``: pieces of the header lines the scripts print.

Every clock is a function of no arguments (``time.perf_counter`` by default;
``time.perf_counter_ns``, ``time.process_time`` or a fake in tests); times come back in its unit.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np

Clock = Callable[[], float]


def timer(
    f: Callable, *, clock: Clock = time.perf_counter, settle: int = 0, pause: float = 0.0, calls: int = 1
) -> Callable[[], float]:
    """A sampler of ``f``: sleeps ``pause`` seconds, calls ``f`` ``settle`` times untimed (to
    refill the caches the previous method took), then times ``calls`` consecutive calls and
    returns the time per call (the bare clock difference when ``calls`` is 1)."""

    def sample():
        if pause:
            time.sleep(pause)
        for _ in range(settle):
            f()
        t0 = clock()
        for _ in range(calls):
            f()
        t = clock() - t0
        return t if calls == 1 else t / calls

    return sample


def synced(sync: Callable[[], object], clock: Clock = time.perf_counter) -> Clock:
    """A clock that first waits for ``sync()`` (a GPU's queue): a timing with it brackets the work the
    timed call queued, as ``sync(); t0; f(); sync(); t1`` does."""

    def now():
        sync()
        return clock()

    return now


def turns(samplers: dict[str, Callable], rounds: int) -> dict[str, list]:
    """``{name: [sample of each round]}``: every round, each sampler once, in the dict's order.
    A sampler returns its own sample: a time (``timer``) or anything else, e.g. a timeline."""
    out = {name: [] for name in samplers}
    for _ in range(rounds):
        for name, sample in samplers.items():
            out[name].append(sample())
    return out


def warm_up(calls: Iterable[Callable], rounds: int = 1, each: int = 1) -> None:
    """``rounds`` times, each call ``each`` times in a row (the order the scripts warm up in:
    ``rounds=5`` takes turns; ``each=2`` calls the first twice, then the second twice, ...)."""
    calls = list(calls)
    for _ in range(rounds):
        for f in calls:
            for _ in range(each):
                f()


def consecutive(f: Callable, n: int, *, warmup: int = 0, clock: Clock = time.perf_counter) -> list:
    """Times of ``n`` back-to-back calls of ``f``, after ``warmup`` untimed ones."""
    warm_up([f], each=warmup)
    sample = timer(f, clock=clock)
    return [sample() for _ in range(n)]


def best_of(f: Callable, n: int, *, clock: Clock = time.perf_counter) -> float:
    """The fastest of ``n`` back-to-back calls of ``f``: what the machine reaches."""
    return min(consecutive(f, n, clock=clock))


def block_steps(
    f: Callable, seconds: float, *, warmup: int = 3, most: int = 200, clock: Clock = time.perf_counter
) -> int:
    """How many consecutive calls of ``f`` take about ``seconds`` (1 to ``most``), from one
    call timed after ``warmup`` untimed ones."""
    warm_up([f], each=warmup)
    one = timer(f, clock=clock)()
    return max(1, min(most, round(seconds / max(one, 1e-6))))


def median(xs: Iterable) -> float:
    return float(statistics.median(list(xs)))


def paired_ratios(a: Iterable, b: Iterable) -> list[float]:
    """``a[i] / b[i]``: the ratio within each round (the same load for both)."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired ratios need as many samples of each: {len(a)} and {len(b)}")
    return [x / y for x, y in zip(a, b)]


def median_ratio(a: Iterable, b: Iterable) -> float:
    """The median of the per-round ratios ``a[i] / b[i]`` (not the ratio of the medians)."""
    return median(paired_ratios(a, b))


def timed_rounds(methods: dict, rounds: int, reps: int, *, clock: Clock = time.perf_counter) -> dict:
    """{name: (median ms, best ms, per-call ms)}: after a warm-up of each, the methods take
    turns, ``rounds * reps`` times, each turn two untimed calls (so no method pays for the
    caches the previous one evicted) and one timed call; call i of every method sees the
    same load on a shared machine, so ratios can be taken pair by pair. (``clock`` in seconds.)"""
    warm_up(methods.values(), each=2)
    samplers = {
        # the pause lets the previous library's worker threads go idle; two untimed calls refill
        # the caches (and pages) the previous method took: with one, the method after
        # torch.func's vmap still ran 10 % slow
        name: timer(f, clock=clock, settle=2, pause=0.01)
        for name, f in methods.items()
    }
    times = turns(samplers, rounds * reps)
    times = {name: 1e3 * np.array(t) for name, t in times.items()}
    return {name: (float(np.median(t)), float(np.min(t)), t) for name, t in times.items()}


def utc_now() -> str:
    """``YYYY-MM-DD HH:MM UTC``, as the scripts' headers print the time."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"


def machine() -> str:
    """The processor as ``platform`` names it (its architecture where it names none)."""
    return platform.processor() or platform.machine()


def load() -> tuple[float, float, float]:
    """The load averages over 1, 5 and 15 minutes."""
    return os.getloadavg()
