"""The XKS proxy: Encrypt and Decrypt through a real node against its floor and the raw token.

One ``kms --config XKS.toml serve`` (1 worker) on a fresh SoftHSM2 token with one XKS key.
Variants, interleaved block by block (each block: BLOCK requests of one variant per client):

* ``health``: a signed ``GetHealthStatus`` - TLS, the HTTP stack, SigV4 verification, quota,
  audit, the JSON answer; answered from the cached deep check, so **no token call** (the floor);
* ``encrypt``: a signed ``Encrypt`` of 32 bytes (a data key) with 64 bytes of AAD, no CDIV;
* ``encrypt_cdiv``: the same with a CDIV (the hash plus a decrypt round trip in the token);
* ``decrypt``: a signed ``Decrypt`` of one such ciphertext.

Load: CLIENTS client threads in this process, each on its own kept-alive TLS connection, closed
loop (the next request when the answer came); each request is signed by botocore *before* its
clock starts, so latency is send-to-answer. Reported per variant: p50 and p99 latency (ms) and
the requests/s reached at that load; ratios encrypt/health and decrypt/health (p50).

``raw_token``: ``hsm.xks.encrypt`` + ``decrypt`` of the same 32 bytes in this process (IV from
``C_GenerateRandom``, ``C_Encrypt``, ``C_Decrypt``): what the token costs without the proxy.

AWS KMS times a proxy call out after 250 ms and asks for a network round trip of 35 ms or less:
the p99 here is the proxy's share (loopback, no network). Figures in ``var/bench/xks.json``.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import statistics
import threading
import time

import pytest

from _benchlib import scaled

CLIENTS = 2
BLOCK = 50


@pytest.fixture(scope="module")
def node(tmp_path_factory, bench_token_factory):
    from hsm import xks as xkeys
    from tests import xks_kit as kit
    tt = bench_token_factory(prefix="xks-bench")
    xkeys.create(tt.token, "bench", encrypt=True, decrypt=True)
    root = tmp_path_factory.mktemp("xks-bench")
    tls = kit.make_tls(root / "tls")
    env = {**os.environ, **tt.env, "HSM_PIN": tt.user_pin.reveal()}
    cred = kit.file_cred(root)
    config = kit.write_config(root, tt.label, tls, [
        {"name": "bench", "path_prefix": "/bench", "region": kit.REGION, "keys": ["bench"],
         "requests_per_second": 1_000_000, "credentials": [cred]}])
    n = kit.start(config, tls, env)
    yield n, cred, tt
    n.stop()


def _bodies():
    from kms.xks.client import request_metadata
    aad = base64.b64encode(os.urandom(64)).decode()
    enc = {"requestMetadata": request_metadata("GenerateDataKey"), "encryptionAlgorithm": "AES_GCM",
           "plaintext": base64.b64encode(os.urandom(32)).decode(),
           "additionalAuthenticatedData": aad}
    return aad, enc


def test_xks_latency_against_floor_and_raw_token(benchmark, node, bench_reports):
    from hsm import xks as xkeys
    from kms.xks.client import signed_headers
    from tests import xks_kit as kit
    n, cred, tt = node
    aad, enc_doc = _bodies()
    client = n.client("/bench", cred)
    status, encrypted = client.encrypt("bench", base64.b64decode(enc_doc["plaintext"]),
                                       base64.b64decode(aad))
    client.close()
    assert status == 200
    from kms.xks.client import request_metadata
    dec_doc = {"requestMetadata": request_metadata("Decrypt"), "encryptionAlgorithm": "AES_GCM",
               "additionalAuthenticatedData": aad,
               **{k: encrypted[k] for k in ("ciphertext", "initializationVector",
                                            "authenticationTag")}}
    docs = {"health": ("/health", {"requestMetadata": {"kmsRequestId": "b",
                                                       "kmsOperation": "KmsHealthCheck"}}),
            "encrypt": ("/keys/bench/encrypt", enc_doc),
            "encrypt_cdiv": ("/keys/bench/encrypt",
                             {**enc_doc, "ciphertextDataIntegrityValueAlgorithm": "SHA_256"}),
            "decrypt": ("/keys/bench/decrypt", dec_doc)}
    base = n.base("/bench")
    samples: dict[str, list[float]] = {k: [] for k in docs}
    elapsed: dict[str, float] = {k: 0.0 for k in docs}
    ctx = n.tls.context()

    def client_loop(variant: str, out: list[float]) -> None:
        path, doc = docs[variant]
        body = json.dumps(doc).encode()
        conn = http.client.HTTPSConnection("localhost", n.port, context=ctx)
        try:
            for _ in range(BLOCK):
                hdrs = signed_headers("POST", base + path, body, cred.access_key_id,
                                      cred.secret, kit.REGION)
                t0 = time.perf_counter()
                conn.request("POST", "/bench/kms/xks/v1" + path, body=body, headers=hdrs)
                resp = conn.getresponse()
                resp.read()
                out.append(time.perf_counter() - t0)
                assert resp.status == 200
        finally:
            conn.close()

    def block(variant: str) -> None:
        outs: list[list[float]] = [[] for _ in range(CLIENTS)]
        threads = [threading.Thread(target=client_loop, args=(variant, o)) for o in outs]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed[variant] += time.perf_counter() - t0
        for o in outs:
            samples[variant].extend(o)

    key = xkeys.describe(tt.token, "bench")
    plaintext, raw_aad = os.urandom(32), os.urandom(64 + 3)
    raw: list[float] = []

    def raw_block() -> None:
        for _ in range(BLOCK):
            t0 = time.perf_counter()
            iv, ct, tag = xkeys.encrypt(tt.token, key, plaintext, raw_aad)
            xkeys.decrypt(tt.token, key, iv, ct, tag, raw_aad)
            raw.append(time.perf_counter() - t0)

    rounds = scaled(10)
    order = list(docs)

    def run() -> None:
        for variant in order:          # warm-up: connections, handles, caches
            block(variant)
        for v in samples:
            samples[v].clear()
            elapsed[v] = 0.0
        for i in range(rounds):
            for variant in order[i % len(order):] + order[:i % len(order)]:
                block(variant)
            raw_block()
    benchmark.pedantic(run, rounds=1, iterations=1)

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
    result: dict = {"clients": CLIENTS, "requests_per_variant": {k: len(v) for k, v in
                                                                  samples.items()},
                    "load": f"{CLIENTS} closed-loop clients on kept-alive TLS connections, "
                            "1 worker, loopback"}
    for v, values in samples.items():
        result[v] = {"p50_ms": pct(values, 0.5), "p99_ms": pct(values, 0.99),
                     "rps": len(values) / elapsed[v] if elapsed[v] else None}
    result["raw_token_encrypt_plus_decrypt"] = {"p50_ms": pct(raw, 0.5), "p99_ms": pct(raw, 0.99)}
    for v in ("encrypt", "encrypt_cdiv", "decrypt"):
        result[f"{v}_over_floor_p50"] = result[v]["p50_ms"] / result["health"]["p50_ms"]
    result["aws_kms_timeout_ms"] = 250
    result["worst_p99_ms"] = max(result[v]["p99_ms"] for v in docs)
    result["mean_ms"] = {v: statistics.fmean(values) * 1e3 for v, values in samples.items()}
    benchmark.extra_info.update(result)
    bench_reports("xks").record("latency", result)
    print(json.dumps(result, indent=2))
