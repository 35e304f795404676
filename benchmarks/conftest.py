"""Fixtures for the layer benchmarks (helpers live in _benchlib.py).

Run with ``python3 -m pytest benchmarks/ --benchmark-only -q``. Plain ``pytest`` from the repository
root does not collect this directory (pyproject's ``testpaths`` is ``tests``).

SoftHSM2 is only ever loaded through the ``hsm_tokens`` plugin (``softhsm_module``, which goes
through :mod:`hsm.core.module` and its OS-locking ``C_Initialize``); nothing here calls ``pkcs11.lib()``.

Machines running this are shared and noisy, so nothing is judged on absolute time: every result is
a ratio of two (or more) variants measured in alternation within the same run (see
``_benchlib.Interleaved``). Targets are recorded next to the ratios, never asserted.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import pytest

# The helpers next to this file (and the spawned throughput workers) are imported by name whatever
# pytest's --import-mode; spawned children inherit this sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import SCALE, Report, package_version  # noqa: E402

from hsm.testing import TestToken, new_softhsm_token  # noqa: E402



@pytest.fixture(scope="session")
def bench_token_factory(softhsm_module, softhsm_dir):
    """Like the plugin's ``softhsm_token_factory``, but session-scoped.

    The plugin's factory is function-scoped, and pytest does not let a module-scoped fixture (the
    keys shared by a raw/layer pair of benchmarks, or a pool of spawned workers shared by the
    1-worker and 2-worker benchmarks) depend on it. This makes tokens the same way: a fresh token in
    the plugin's temporary SoftHSM2 directory via ``C_InitToken`` on the plugin's
    ``softhsm_module``, random test-only PINs, opened lazily through ``hsm.core.token.Token``.
    """
    made: list[TestToken] = []

    def make(prefix: str = "bench") -> TestToken:
        tt = new_softhsm_token(softhsm_module, prefix=prefix)
        made.append(tt)
        return tt

    yield make
    for tt in made:
        tt.close()


@pytest.fixture(scope="session")
def bench_reports(request, softhsm_module):
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "pytest",
                             *request.config.invocation_params.args]),
        "python": platform.python_version(),
        "python_pkcs11": package_version("python-pkcs11"),
        "module": softhsm_module.path,
        "module_description": softhsm_module.description,
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": list(os.getloadavg()),
        "scale": SCALE,
    }
    out = Path(request.config.rootpath) / "var" / "bench"
    cache: dict[str, Report] = {}

    def get(name: str) -> Report:
        if name not in cache:
            cache[name] = Report(out / f"{name}.json", dict(meta))
        return cache[name]

    return get


# --------------------------------------------------------------------------- the closing summary
def pytest_sessionstart(session):
    session.config._bench_started = time.time()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After pytest-benchmark's tables: each ratio this run wrote, against its target."""
    from _summary import lines
    out = Path(config.rootpath) / "var" / "bench"
    started = getattr(config, "_bench_started", 0.0)
    files = [p for p in out.glob("*.json") if p.stat().st_mtime >= started] \
        if out.is_dir() else []
    found = lines(files)
    if found:
        terminalreporter.section("ratios against their targets (var/bench/*.json)")
        for line in found:
            terminalreporter.write_line(line)
