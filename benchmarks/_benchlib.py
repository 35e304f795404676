"""Helpers shared by the benchmark modules (and importable by spawned workers)."""

from __future__ import annotations

import itertools
import json
import os
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
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


def versus(inter: Interleaved, num: str, den: str, target_max: float, *, unit: str = "ms",
           ratio_key: str = "ratio", extra_key: str | None = None) -> dict:
    """What a summary of variant ``num`` against its floor ``den`` starts with: the ratio of the
    pooled medians (``ratio_key``), the median of the per-round ratios, the target and whether it
    was met, both medians in ``unit`` ("ms" or "us") as ``<variant>_median_<unit>``, and the
    samples per variant; with ``extra_key``, also the difference of the medians in ``unit``."""
    scale = {"ms": 1e3, "us": 1e6}[unit]
    pooled = inter.samples
    num_med, den_med = median(pooled[num]), median(pooled[den])
    overall = ratio(num_med, den_med)
    paired = inter.paired_ratios(num, den)
    out = {
        ratio_key: overall,
        "target_max": target_max,
        "within_target": overall is not None and overall <= target_max,
        "paired_round_ratio_median": statistics.median(paired) if paired else None,
        f"{num}_median_{unit}": num_med and num_med * scale,
        f"{den}_median_{unit}": den_med and den_med * scale,
        "samples_per_variant": {k: len(v) for k, v in pooled.items()},
    }
    if extra_key is not None:
        out[extra_key] = (num_med - den_med) * scale if num_med and den_med else None
    return out


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


def bucket_breakdown(rounds: list[tuple[float, dict, dict]], other: str,
                     calls_key: str = "calls") -> dict:
    """Instrumented rounds ``(total seconds, Buckets.excl, Buckets.calls)`` as median exclusive
    milliseconds per bucket (with the last round's call count under ``calls_key``), plus ``other``:
    the total less every bucket; largest first."""
    names = sorted({k for _, ex, _ in rounds for k in ex})
    out = {}
    for k in names:
        ms = [ex.get(k, 0.0) * 1e3 for _, ex, _ in rounds]
        out[k] = {"median_ms": round(statistics.median(ms), 2),
                  calls_key: rounds[-1][2].get(k, 0)}
    totals = [t * 1e3 for t, _, _ in rounds]
    accounted = [sum(ex.values()) * 1e3 for _, ex, _ in rounds]
    out[other] = {"median_ms": round(statistics.median(t - a for t, a in zip(totals, accounted)),
                                     2),
                  calls_key: None}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["median_ms"]))


def fs_of(path: Path) -> str | None:
    """The file system ``path`` is on, as "<type> at <mount point>" (from /proc/mounts)."""
    try:
        best = ("", "?")
        with open("/proc/mounts") as fh:
            for line in fh:
                _dev, mnt, fstype, *_ = line.split()
                if str(path).startswith(mnt) and len(mnt) >= len(best[0]):
                    best = (mnt, fstype)
        return f"{best[1]} at {best[0]}"
    except OSError:
        return None


# --------------------------------------------------------------------------- ceremonies
@dataclass
class Case:
    """What a group's module fixture hands its benchmarks: the bench (its variants' state), the
    interleaved variants, rounds per benchmark, and the facts that go into the summary."""
    bench: object
    inter: Interleaved
    rounds: int
    info: dict

    def run(self, benchmark, variant: str, num: str, den: str) -> dict:
        """Benchmark ``variant`` for ``rounds`` rounds; keep in ``info["per_benchmark_ratio"]``
        the ``num / den`` ratio of this benchmark's own rounds next to those of the group's
        earlier benchmarks, and return them all."""
        this_run = self.inter.run(benchmark, variant, self.rounds)
        self.info["per_benchmark_ratio"] = {
            **self.info.get("per_benchmark_ratio", {}),
            variant: ratio(median(this_run[num]), median(this_run[den]))}
        return self.info["per_benchmark_ratio"]


def make_bench_kit(tmp_path_factory, bench_token_factory, name: str, regions):
    """``tests.ceremony_kit.make_kit`` under a new temporary directory ``name``, on the
    benchmark session's tokens; returns (directory, kit, seconds it took: RSA-4096 keygen)."""
    import sys

    repo = str(Path(__file__).resolve().parent.parent)
    if repo not in sys.path:  # tests/ is a package at the repository root
        sys.path.insert(0, repo)
    from tests.ceremony_kit import make_kit

    t0 = perf_counter()
    root = tmp_path_factory.mktemp(name)
    kit = make_kit(root, lambda prefix: bench_token_factory(prefix), regions=regions)
    return root, kit, perf_counter() - t0


@contextmanager
def primary_pins(kit):
    """HSM_PIN and HSM_SO_PIN set to a ceremony kit's primary PINs in ``os.environ`` (as an
    in-process ``Runner`` reads them), restored as they were afterwards."""
    saved = {k: os.environ.get(k) for k in ("HSM_PIN", "HSM_SO_PIN")}
    os.environ["HSM_PIN"] = kit.primary.user_pin.reveal()
    os.environ["HSM_SO_PIN"] = kit.primary.so_pin.reveal()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_ceremony(plan, env, officer_keys: dict, officers=("alice", "bob")) -> None:
    """One ceremony in this process, as ``ceremony open``, the officers' ``approve`` and
    ``ceremony run`` would do it: ``Runner.open()``, each officer's ``approvals.sign`` of the nonce
    written to the output directory, ``Runner.run()``. (Functions are looked up at call time, so an
    instrumentation's patches apply.)"""
    from ceremony import approvals, runner as runner_mod

    runner = runner_mod.Runner(plan, env, log=_quiet)
    nonce = runner.open()
    folder = plan.output_dir / runner_mod.APPROVALS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for officer in officers:
        ap = approvals.sign(plan, nonce, officer, officer_keys[officer])
        (folder / f"{officer}.json").write_text(ap.to_json())
    runner.run()


def _quiet(_msg: str) -> None:
    pass


# --------------------------------------------------------------------------- profiles
def profile_top(prof, sort: str, n: int = 15) -> list[dict]:
    """The ``n`` top functions of a cProfile.Profile by ``sort``, as JSON-ready rows."""
    import pstats

    st = pstats.Stats(prof)
    st.sort_stats(sort)
    rows = []
    for func in st.fcn_list[:n]:
        _cc, nc, tt, ct, _callers = st.stats[func]
        filename, line, fname = func
        where = fname if filename == "~" else \
            f"{'/'.join(Path(filename).parts[-2:])}:{line}({fname})"
        rows.append({"function": where, "ncalls": nc, "tottime_ms": round(tt * 1e3, 2),
                     "cumtime_ms": round(ct * 1e3, 2)})
    return rows


# --------------------------------------------------------------------------- worker processes
def serve_trials(index: int, commands, results, barrier, work: dict[str, Callable[[int], None]]
                 ) -> None:
    """A worker's command loop (in the spawned child, after its own setup): says "ready", then
    runs each ``(kind, trial, n, together)`` command, ``work[kind](n)`` or "spin" (a pure-Python
    loop, no token: the control for how many cores the machine gives), started on the shared
    barrier when ``together``, and reports its start and end on CLOCK_MONOTONIC (system-wide on
    Linux, so the parent can take the wall span across workers). "stop" ends it."""
    import time

    results.put(("ready", index, os.getpid()))
    while True:
        cmd = commands.get()
        if cmd[0] == "stop":
            return
        kind, trial, n, together = cmd
        if together:
            barrier.wait(timeout=120)
        t0 = time.monotonic()
        if kind == "spin":
            x = 0
            for i in range(n):
                x += i
        else:
            work[kind](n)
        t1 = time.monotonic()
        results.put(("done", index, trial, n, t0, t1))


def run_worker(index: int, label: str, pin_value: str, softhsm_conf: str, commands, results,
               barrier, key_prefix: str, setup) -> None:
    """The body of a :class:`WorkerPool` target (in the spawned child): point SoftHSM2 at the
    parent's token directory before anything loads it (it reads its configuration once, in
    C_Initialize), open the token as its own PKCS#11 application, generate a session HMAC key
    ``<key_prefix>-<index>-<pid>``, let ``setup(token, key_ref)`` warm up and return the work
    (``{kind: fn(n)}``), then :func:`serve_trials`. Any failure is reported to the parent on
    ``results``, then raised (the process dies with it)."""
    os.environ["SOFTHSM2_CONF"] = softhsm_conf
    try:
        from pkcs11 import KeyType, MechanismFlag

        from hsm.core import ops
        from hsm.core.pin import Pin
        from hsm.core.token import Token

        token = Token.open(label, pin=Pin(pin_value))
        del pin_value
        key_label = f"{key_prefix}-{index}-{os.getpid()}"
        ops.generate_session_key(token, KeyType.GENERIC_SECRET, 256, key_label,
                                 capabilities=MechanismFlag.SIGN)
        work = setup(token, ops.secret(key_label))
        serve_trials(index, commands, results, barrier, work)
        token.close()
    except BaseException as exc:
        results.put(("error", index, f"{type(exc).__name__}: {exc}"))
        raise


@contextmanager
def process_trials(tt, target, args: tuple, *, kind: str, units: int, spin_units: int,
                   processes=(1, 2), name: str, pool_name: str):
    """A :class:`WorkerPool` of ``max(processes)`` workers and, interleaved, its trials: for each
    worker count ``w``, ``<kind>-<w>`` (``units`` of ``kind`` per worker) and ``cpu-<w>`` (the
    pure-Python control, ``spin_units`` per worker); warmed up once. Yields (Interleaved, pool);
    the pool is closed afterwards."""
    pool = WorkerPool(tt, max(processes), target, args, name=pool_name)
    try:
        variants = {}
        for w in processes:
            variants[f"{kind}-{w}"] = lambda w=w: pool.trial(kind, w, units)
            variants[f"cpu-{w}"] = lambda w=w: pool.trial("spin", w, spin_units)
        inter = Interleaved(name, variants)
        inter.warmup(1)
        yield inter, pool
    finally:
        pool.close()


def scaling_summary(inter: Interleaved, pool, kind: str, target_min: float, rate_key: str) -> dict:
    """What a :func:`process_trials` summary starts with: 2 worker processes against 1 for
    ``kind`` (pooled medians of units/s, and per block) with its target, the same for the CPU
    control (how much the machine let two processes scale at the same moments: if well under 2,
    the cores were not free and ``kind``'s ratio cannot be either), the two ratios' ratio, and
    the machine's state."""
    pooled = {k: median(v) for k, v in inter.samples.items()}
    kind_ratio = ratio(pooled[f"{kind}-2"], pooled[f"{kind}-1"])
    cpu_ratio = ratio(pooled["cpu-2"], pooled["cpu-1"])
    paired = inter.paired_ratios(f"{kind}-2", f"{kind}-1")
    paired_cpu = inter.paired_ratios("cpu-2", "cpu-1")
    return {
        "ratio_2_over_1": kind_ratio,
        "target_min": target_min,
        "within_target": kind_ratio is not None and kind_ratio >= target_min,
        rate_key: {"1_process": pooled[f"{kind}-1"], "2_processes": pooled[f"{kind}-2"]},
        "paired_block_ratio_median": median(paired),
        "paired_block_ratios": [round(r, 3) for r in paired],
        "cpu_control_ratio_2_over_1": cpu_ratio,
        "cpu_control_paired_block_ratio_median": median(paired_cpu),
        "cpu_control_paired_block_ratios": [round(r, 3) for r in paired_cpu],
        f"{kind}_ratio_relative_to_cpu_control": ratio(kind_ratio, cpu_ratio),
        "blocks": len(paired),
        "cpu_count": os.cpu_count(),
        "loadavg_after": list(os.getloadavg()),
        "last_start_skew_ms": round(pool.last_skew * 1e3, 3),
    }


class WorkerPool:
    """Worker processes (spawn) that each opened the token themselves; runs timed trials.

    ``target(index, label, pin, softhsm_conf, commands, results, barrier, *args)`` runs in each
    child: it opens the token, sets up, and hands over to :func:`serve_trials`; on an error it
    puts ``("error", index, text)`` on ``results`` (the parent raises it). The PIN travels in the
    pickled Process arguments over spawn's pipe (not argv/env).
    """

    def __init__(self, tt, workers: int, target, args: tuple = (), name: str = "worker",
                 start_timeout: float = 120.0):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(workers)]
        self.barrier = ctx.Barrier(workers)
        self.procs = []
        self._trial = 0
        self._alone = 0
        self.last_skew = 0.0
        for i in range(workers):
            proc = ctx.Process(target=target, name=f"{name}-{i}", daemon=True,
                               args=(i, tt.label, tt.user_pin.reveal(), tt.env["SOFTHSM2_CONF"],
                                     self.commands[i], self.results, self.barrier, *args))
            proc.start()
            self.procs.append(proc)
        for _ in range(workers):
            msg = self._get(start_timeout)
            if msg[0] != "ready":
                raise RuntimeError(f"worker {msg[1]} sent {msg!r} while starting")

    def _get(self, timeout: float):
        import queue

        try:
            msg = self.results.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no answer from the workers within {timeout:.0f} s "
                               f"(alive: {[p.is_alive() for p in self.procs]})") from None
        if msg[0] == "error":
            self.barrier.abort()
            raise RuntimeError(f"worker {msg[1]} failed: {msg[2]}")
        return msg

    def trial(self, kind: str, workers: int, n: int) -> float:
        """Aggregate units/s of ``workers`` workers doing ``n`` units of ``kind`` each, started
        together (one worker: each in turn runs alone)."""
        self._trial += 1
        if workers == 1:  # alternate which worker runs alone
            chosen = [self._alone % len(self.procs)]
            self._alone += 1
        else:
            chosen = list(range(workers))
        together = len(chosen) > 1
        if together and len(chosen) != len(self.procs):
            raise ValueError("a concurrent trial uses every worker (the barrier's party count)")
        for i in chosen:
            self.commands[i].put((kind, self._trial, n, together))
        done = [self._get(600) for _ in chosen]
        starts, ends = [m[4] for m in done], [m[5] for m in done]
        self.last_skew = max(starts) - min(starts)
        return sum(m[3] for m in done) / (max(ends) - min(starts))

    def close(self) -> None:
        for q in self.commands:
            q.put(("stop",))
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
