"""Where a worker's time goes on a cache-hit ``POST /v1/dek``, against ``GET /healthz``.

Diagnostic script, not a benchmark test (pytest does not collect it)::

    python3 benchmarks/service_breakdown.py [SECONDS] [sqlite|postgresql]

It makes its own SoftHSM2 token, ceremony and TLS material in a temporary directory, starts one
``kms serve`` with one worker (audit on) on the store named (SQLite by default), creates 8 orgs,
and drives it with the benchmark's own cheap clients (``_service_load``: 4 processes, pre-built
requests on kept-alive mTLS connections). While the load runs, ``py-spy`` samples the worker
(``pip install py-spy``; it needs ptrace rights on the worker). Two runs: ``/healthz`` (the
floor), then DEK fetches. The table gives, per bucket of the worker's stack, the share of the
worker's samples each load spends there (inclusive: a frame counts in the first bucket, top
down, it matches) and µs per request (share x worker CPU / requests). ``BREAKDOWN_RAW=DIR``
keeps py-spy's raw samples (``healthz.txt``, ``dek.txt``) there, to look below a bucket.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (bucket, substrings of "function (file)" in a stack frame): the first bucket whose pattern
# occurs in a sample's stack, scanning buckets in this order, takes the sample.
# Patterns are "function@file-suffix" (either part may be empty; a method matches by its name).
BUCKETS = [
    ("audit on the event loop: queue the record, hand the batch over, wake its requests",
     ("append@kms/server/audit.py", "commit@kms/server/audit.py", "commit@kms/server/app.py",
      "_flush@kms/server/audit.py", "_settle@kms/server/audit.py")),
    ("audit writer thread (chain, HSM-sign, O_DSYNC write)", ("_run@kms/server/audit.py",)),
    ("store read (pool lease, SELECT, row check)", ("@kms/store/",)),
    ("DEK cache hit (lock, AES-GCM decrypt)", ("@kms/dek_cache.py",)),
    ("node (cached_dek_for_encrypt, dek_for_encrypt)", ("@kms/node/node.py", "@kms/node/rowcache.py")),
    ("request JSON (read body, parse, checks)", ("_json@kms/server/app.py",)),
    ("authorisation (policy decide)", ("authorise@kms/server/app.py",)),
    ("response (JSON encode, base64)", ("_ok@kms/server/app.py", "b64encode@")),
    ("rest of the handler", ("dek@kms/server/app.py", "healthz@kms/server/app.py")),
    ("metrics (prometheus client)", ("@prometheus_client/",)),
    ("middleware (ids, admission, timeout)", ("_frame@kms/server/app.py",)),
    ("aiohttp (HTTP parse, response write)", ("@aiohttp/",)),
    ("TLS (ssl read/write)", ("@sslproto.py", "@ssl.py")),
    ("event loop (select, callbacks)", ("@asyncio/",)),
]
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def bucket_of(stack: str) -> str:
    frames = []
    for frame in stack.split(";"):
        m = _FRAME.match(frame)
        frames.append((m.group(1), m.group(2)) if m else (frame, ""))
    for name, patterns in BUCKETS:
        for p in patterns:
            func, _, where = p.partition("@")
            if any((not func or f.rsplit(".", 1)[-1] == func) and (not where or where in path)
                   for f, path in frames):
                return name
    return "other"


def profile(pid: int, seconds: float, out: Path) -> collections.Counter:
    """py-spy's raw (collapsed) samples of ``pid`` over ``seconds``, counted per bucket."""
    pyspy = Path(sys.executable).with_name("py-spy")
    subprocess.run([str(pyspy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                    "--rate", "500", "--format", "raw", "--threads", "--nonblocking", "--gil",
                    "--output", str(out)], check=True, capture_output=True)
    keep = os.environ.get("BREAKDOWN_RAW")    # a directory: keep py-spy's raw samples there
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / out.name).write_bytes(out.read_bytes())
    counts: collections.Counter = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if "(idle)" in stack or stack.endswith("wait (threading.py:")\
                or "select (selectors.py" in stack.split(";")[-1]:
            counts["idle"] += int(n)
            continue
        counts[bucket_of(stack)] += int(n)
    return counts


def main(seconds: float, store_kind: str) -> None:
    base = Path(tempfile.mkdtemp(prefix="kms-breakdown-"))
    from hsm.softhsm import write_config
    os.environ["SOFTHSM2_CONF"] = str(write_config(base / "softhsm2.conf", base / "tokens"))
    from hsm import module as modules
    from hsm.testing import new_softhsm_token
    from tests.service_kit import make_service_kit
    from _service_load import LoadPool, http_request
    mod = modules.load(modules.DEFAULT_MODULE)
    kit = make_service_kit(base / "svc", lambda prefix: new_softhsm_token(mod, prefix=prefix))
    server = None
    if store_kind == "postgresql":
        from tests import pg
        server = pg.start()
        store = server.create_database("breakdown")
    else:
        store = str(base / "breakdown.db")
    node = kit.start(kit.config(store=store, audit=True, max_concurrent_per_client=256,
                               requests_per_second_per_client=100_000,
                               max_connections_per_client=256, max_concurrent=256), workers=1)
    orgs = [f"org-{i}" for i in range(8)]
    for org in orgs:
        assert node.call("POST", "/v1/tenants", {"org": org}, who="admin")[0] == 201
    cert, key = kit.tls.clients["data"]
    pool = LoadPool(4, cert, key, kit.tls.ca, connections=8)
    loads = {"healthz": [http_request("GET", "/healthz")],
             "dek": [http_request("POST", "/v1/dek", json.dumps(
                 {"org": o, "purpose": "encrypt"}).encode()) for o in orgs]}
    rows = {}
    try:
        for name, requests in loads.items():
            pool.run("127.0.0.1", node.port, requests, 1.0)        # warm
            import threading
            result = {}
            t = threading.Thread(target=lambda: result.update(
                block=pool.run("127.0.0.1", node.port, requests, seconds + 1)))
            cpu0 = _cpu(node.proc.pid)
            t.start()
            time.sleep(0.5)
            counts = profile(node.proc.pid, seconds, base / f"{name}.txt")
            t.join()
            cpu = _cpu(node.proc.pid) - cpu0
            block = result["block"]
            n = block.rps * (seconds + 1)
            rows[name] = (counts, cpu / n * 1e6, block)
    finally:
        pool.close()
        node.stop()
        kit.close()
        if server is not None:
            server.stop()
    print(f"store {store_kind}; worker CPU per request: " + ", ".join(
        f"{k} {v[1]:.0f} µs ({v[2].rps:.0f} req/s, clients {v[2].client_cpu_us_per_request:.0f}"
        " µs/req)" for k, v in rows.items()))
    names = [b for b, _ in BUCKETS] + ["other"]
    print(f"{'bucket':52} {'healthz µs':>10} {'dek µs':>8} {'dek %':>6}")
    for b in names:
        cells = []
        for k in loads:
            counts, us, _ = rows[k]
            busy = sum(v for kk, v in counts.items() if kk != "idle") or 1
            cells.append((counts[b] / busy * us, 100 * counts[b] / busy))
        print(f"{b:52} {cells[0][0]:10.0f} {cells[1][0]:8.0f} {cells[1][1]:6.1f}")


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 8.0,
         sys.argv[2] if len(sys.argv) > 2 else "sqlite")
