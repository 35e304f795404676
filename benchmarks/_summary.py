"""The last thing `make bench` prints: every ratio this run measured against its target.

pytest-benchmark's tables show times, which swing 2x between runs on a shared machine; the
figures this project judges are the ratios in ``var/bench/*.json``. This reads the summaries the
run rewrote and prints one line per ratio with its target and whether it was met.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


# Targets recorded under their own names (the rest use target_max / target_min next to a
# "...ratio..." value): target key -> (the measured value's key path, bound, unit).
NAMED: dict[str, tuple[tuple[str, ...], str, str]] = {
    "target_ratio_vs_floor": (("ratio_vs_floor",), "<=", "x"),
    "target_ratio_vs_pykmip": (("ratio_vs_pykmip",), ">=", "x"),
    "target": (("ratio_remote_vs_local",), "<=", "x"),
    "target_ours_over_bare_max": (("ratio_ours_over_bare",), "<=", "x"),
    "target_throughput_over_esdk_unsigned_min": (("throughput_ours_over_esdk_unsigned",), ">=",
                                                 "x"),
    "target_ms": (("refused_on_b_ms", "median"), "<=", " ms"),
}


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _ratio(entry: dict) -> float | None:
    for key, value in entry.items():
        if "ratio" in key and "paired" not in key and _number(value) is not None:
            return _number(value)
    return None


def _get(entry: dict, path: tuple[str, ...]):
    for key in path:
        entry = entry.get(key) if isinstance(entry, dict) else None
    return _number(entry)


def measured(entry: dict) -> Iterator[tuple[str, float | None, str, float, str]]:
    """(what, value, bound, limit, unit) for each target in one dict of a summary."""
    for key, limit in entry.items():
        limit = _number(limit)
        if limit is None:
            continue
        if key in ("target_max", "target_min"):
            yield "", _ratio(entry), "<=" if key == "target_max" else ">=", limit, "x"
        elif key in NAMED:
            path, bound, unit = NAMED[key]
            if _get(entry, path) is not None or key != "target":
                yield "/".join(path), _get(entry, path), bound, limit, unit


def _walk(data, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict]]:
    if isinstance(data, dict):
        yield path, data
        for key, value in data.items():
            yield from _walk(value, (*path, str(key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _walk(value, (*path, str(i)))


def lines(files: list[Path]) -> list[str]:
    out = []
    for path in sorted(files):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for where, entry in _walk(data.get("results", data) if isinstance(data, dict) else data):
            for what, value, bound, limit, unit in measured(entry):
                name = "/".join(filter(None, ["/".join(where), what])) or "-"
                if value is None:
                    verdict, shown = "?", "n/a"
                else:
                    ok = value <= limit if bound == "<=" else value >= limit
                    verdict, shown = ("met" if ok else "MISSED"), f"{value:.2f}{unit}"
                out.append(f"{path.stem}: {name}: {shown} (target {bound} {limit:g}{unit}) "
                           f"{verdict}")
    return out
