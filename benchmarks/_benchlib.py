"""Helpers shared by the benchmark modules (and importable by spawned workers)."""

from __future__ import annotations

import itertools
import json
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from time import perf_counter

# HSM_BENCH_SCALE=0.2 for a quick smoke run, 3 for a steadier (slower) one.
SCALE = float(os.environ.get("HSM_BENCH_SCALE", "1"))


def scaled(n: int, minimum: int = 3) -> int:
    return max(minimum, int(round(n * SCALE)))


# --------------------------------------------------------------------------- interleaving
class Interleaved:
    """Several variants of one workload, measured in alternation so noise hits all of them.

    Each variant is a callable that performs one measurement and returns one sample (seconds per
    operation, or operations per second). :meth:`run` hands pytest-benchmark one variant as the
    timed ``target`` and measures every *other* variant in pedantic's untimed ``setup`` (in an order
    that rotates from round to round), so each round is a complete block: one sample of every
    variant, taken back to back. Samples are timed by the variant callables themselves (the same
    code for every variant) and pooled per variant; the lists stay index-aligned by round, so
    ``samples[a][i]`` and ``samples[b][i]`` come from the same block.

    ``cleanup`` (optional) is called outside every timed region: between the measurements of a
    setup block and after the benchmark (e.g. to destroy unwrapped objects).
    """

    def __init__(self, name: str, variants: dict[str, Callable[[], float]],
                 cleanup: Callable[[], None] | None = None):
        self.name = name
        self.variants = variants
        self.samples: dict[str, list[float]] = {k: [] for k in variants}
        self.cleanup = cleanup or (lambda: None)

    def measure(self, variant: str) -> None:
        self.samples[variant].append(self.variants[variant]())

    def warmup(self, rounds: int = 2) -> None:
        for _ in range(rounds):
            for variant in self.variants:
                self.cleanup()
                self.measure(variant)
        self.cleanup()
        for samples in self.samples.values():
            samples.clear()

    def run(self, benchmark, variant: str, rounds: int) -> dict[str, list[float]]:
        """Benchmark ``variant``; return the samples of every variant taken during this call."""
        others = [k for k in self.variants if k != variant]
        start = {k: len(v) for k, v in self.samples.items()}
        block = itertools.count()

        def setup():
            shift = next(block) % len(others) if others else 0
            for other in others[shift:] + others[:shift]:
                self.cleanup()
                self.measure(other)
            self.cleanup()
            # returns None: pedantic then calls the target without arguments

        self.cleanup()
        benchmark.pedantic(lambda: self.measure(variant), setup=setup, rounds=rounds)
        self.cleanup()
        return {k: v[start[k]:] for k, v in self.samples.items()}

    def paired_ratios(self, num: str, den: str) -> list[float]:
        """Per-block ratios ``num / den`` (both samples from the same round)."""
        return [a / b for a, b in zip(self.samples[num], self.samples[den]) if b]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(num: float | None, den: float | None) -> float | None:
    if not num or not den:
        return None
    return num / den


# --------------------------------------------------------------------------- JSON summaries
class Report:
    """A JSON summary under var/bench/, rewritten whole after every update (partial runs too)."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data: dict = {"meta": meta, "results": {}}

    def record(self, key: str, value: dict) -> None:
        self.data["results"][key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.path)


def package_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # noqa: BLE001 - metadata only
        return None


class Buckets:
    """Exclusive wall time per named bucket: a wrapped call pauses the bucket it was called from."""

    def __init__(self):
        self.excl: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()
        self._stack: list[list] = []

    def wrap(self, name, fn):
        stack, excl, calls = self._stack, self.excl, self.calls

        def wrapper(*args, **kwargs):
            label = name(*args, **kwargs) if callable(name) else name
            now = perf_counter()
            if stack:
                excl[stack[-1][0]] += now - stack[-1][1]
            stack.append([label, now])
            calls[label] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                end = perf_counter()
                lab, start = stack.pop()
                excl[lab] += end - start
                if stack:
                    stack[-1][1] = end
        wrapper.__wrapped__ = fn
        return wrapper
