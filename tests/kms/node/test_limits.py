"""Every number of a node configuration has a finite range that says why (``kms.node.limits``),
checked at load with ``file:line`` - through the real ``kms`` command, before any token or store
is touched."""

from __future__ import annotations

import pytest

from tests.helpers import run_cli

BASE = ('region = "eu"\ntoken = "regional-eu"\nprimary_certificate = "p.pem"\n'
        'bundle_dir = "bundles"\nstore = "kms.db"\n')
SERVICE = ('\n[service]\ncertificate = "s.pem"\nprivate_key = "s.key"\nclient_ca = "ca.pem"\n')
# A node pins its officers (it refuses to load without them); last, so the line numbers of the
# cases above stay what they say.
OFFICERS = ('\n[[officers]]\nfrom_release = "1"\nm = 1\nkeys = { alice = "' + "ab" * 32 + '" }\n')

CASES = {
    # name: (top-level lines, [service] lines, line number, words in the message)
    "iterations-a-trillion": ("pbkdf2_iterations = 1000000000000\n", None, 6,
                              "pbkdf2_iterations = 1,000,000,000,000 is outside 1 to 100,000"),
    "flush-hours-inf": ("cache_flush_hours = inf\n", None, 6,
                        "cache_flush_hours = inf is not a finite number"),
    "flush-hours-nan": ("cache_flush_hours = nan\n", None, 6,
                        "cache_flush_hours = nan is not a finite number"),
    "flush-hours-a-year": ("cache_flush_hours = 8760\n", None, 6, "72 h"),
    "cache-entries-huge": ("cache_max_entries = 1000000000\n", None, 6, "outside 1 to"),
    "request-timeout-1e12": ("", "request_timeout_seconds = 1e12\n", 11,
                             "service.request_timeout_seconds = 1e+12 is outside 0.1 to 3,600"),
    "idle-timeout-inf": ("", "idle_timeout_seconds = inf\n", 11,
                         "service.idle_timeout_seconds = inf is not a finite number"),
    "executor-threads-100000": ("", "executor_threads = 100000\n", 11,
                                "service.executor_threads = 100,000 is outside 1 to 64"),
    "audit-batch-a-day": ("", "audit_batch_ms = 86400000\n", 11, "in memory"),
    "per-client-rate-inf": ("", "requests_per_second_per_client = inf\n", 11,
                            "is not a finite number"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_number_out_of_its_range_is_refused_at_load_with_file_and_line(name, tmp_path):
    """Each case through kms.node.config.load (what every command calls first); the first also
    through the real command, which answers it in one line before any store exists."""
    from kms.node import config as configs
    from kms.errors import ConfigError
    top, service, line, words = CASES[name]
    path = tmp_path / "node.toml"
    path.write_text(BASE + top + (SERVICE + service if service is not None else "") + OFFICERS)
    with pytest.raises(ConfigError) as refused:
        configs.load(path)
    assert str(refused.value).startswith(f"{path}:{line}: "), refused.value
    assert words in str(refused.value) and "\n" not in str(refused.value)
    if name != sorted(CASES)[0]:
        return
    proc = run_cli("kms", "--config", path, "status", env={"PATH": "/usr/bin:/bin"})
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err == f"kms: error: {refused.value}", err
    assert not (tmp_path / "kms.db").exists()  # refused before any store was made


def test_the_ranges_keep_the_values_the_project_uses(tmp_path):
    """The defaults and the values the tests and the demo set stay loadable."""
    from kms.node import config as configs
    from kms.node import limits
    path = tmp_path / "node.toml"
    path.write_text(BASE + "pbkdf2_iterations = 40000\ncache_flush_hours = 72\n"
                    + SERVICE + "idle_timeout_seconds = 1.0\nexecutor_threads = 8\n" + OFFICERS)
    cfg = configs.load(path)
    assert (cfg.pbkdf2_iterations, cfg.cache_flush_hours) == (40000, 72)
    assert all(r.low < r.high and r.why for r in [*limits.NODE.values(),
                                                  *limits.SERVICE.values()])
    # Every number [service] takes has its range here (a new limit must get one too).
    from kms.server import settings
    assert set(settings._LIMITS) <= set(limits.SERVICE), set(settings._LIMITS) - set(
        limits.SERVICE)
