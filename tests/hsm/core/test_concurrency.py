"""Threads and processes against one token, on each backend (SoftHSM2 and NSS softokn, via the
plugin's ``hsm_token``): the reason the layer pre-initialises the module with CKF_OS_LOCKING_OK
(python-pkcs11's C_Initialize(NULL) crashes here), and forked children re-initialise it."""

from __future__ import annotations

import contextlib
import os
import threading

from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from hsm.core import ops
from hsm.core.token import KeyRef
from hsm.testing import unique_label
from tests.helpers import run_threads, start_threads

THREADS = 16
ROUNDS = 60


def test_sixteen_threads_of_mixed_operations_make_no_error(hsm_token):
    token = hsm_token.token
    names = {n: unique_label(n) for n in ("mac", "kek", "payload")}
    ops.generate_session_key(token, KeyType.GENERIC_SECRET, 256, names["mac"], MechanismFlag.SIGN)
    ops.generate_session_key(token, KeyType.AES, 256, names["kek"],
                             MechanismFlag.WRAP | MechanismFlag.UNWRAP)
    ops.generate_session_key(token, KeyType.AES, 256, names["payload"], MechanismFlag.ENCRYPT,
                             extractable=True)
    mac, kek, payload = (ops.secret(names[n]) for n in ("mac", "kek", "payload"))
    before = token.run("count", lambda lease: sum(
        1 for _ in lease.session.get_objects({Attribute.TOKEN: False})))
    expected_mac = ops.hmac_sha256(token, mac, b"message")
    wrapped = ops.aes_wrap(token, kek, payload)
    assert wrapped.mechanism == "AES_KEY_WRAP_KWP" and len(wrapped.data) == 40
    _, mech = token.profile.aes_wrap_choice()
    expected_block = token.run("ecb", lambda lease: lease.key(payload).encrypt(
        bytes(16), mechanism=Mechanism.AES_ECB))

    counts = {"mac": 0, "wrap": 0, "unwrap": 0, "keygen": 0}
    lock = threading.Lock()
    start = threading.Barrier(THREADS, timeout=60)

    def unwrap_and_check(lease):
        obj = lease.key(kek).unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped.data,
                                        mechanism=mech, store=False,
                                        capabilities=MechanismFlag.ENCRYPT,
                                        template={Attribute.SENSITIVE: True,
                                                  Attribute.EXTRACTABLE: False})
        try:
            return obj.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)
        finally:
            obj.destroy()

    def keygen(lease):
        obj = lease.session.generate_key(KeyType.AES, 256, store=False,
                                         capabilities=MechanismFlag.ENCRYPT)
        try:
            return obj[Attribute.SENSITIVE] is not None
        finally:
            obj.destroy()

    def worker(n: int) -> None:
        start.wait()
        for i in range(ROUNDS):
            kind = (n + i) % 4
            if kind == 0:
                assert ops.hmac_sha256(token, mac, b"message") == expected_mac
                key = "mac"
            elif kind == 1:
                again = ops.aes_wrap(token, kek, payload)
                # KWP is deterministic: the same key under the same KEK wraps identically.
                assert again.data == wrapped.data
                key = "wrap"
            elif kind == 2:
                # The unwrapped copy is the same key: same AES-ECB block as the original.
                assert token.run("unwrap", unwrap_and_check) == expected_block
                key = "unwrap"
            else:
                assert token.run("keygen", keygen)
                key = "keygen"
            with lock:
                counts[key] += 1

    run_threads(THREADS, worker, timeout=300)  # none left running; every error re-raised
    assert sum(counts.values()) == THREADS * ROUNDS
    assert all(v == THREADS * ROUNDS // 4 for v in counts.values())
    stats = token.stats()
    assert stats["open_sessions"] <= token.pool_size
    # No session objects leaked by the unwrap/keygen rounds: only the three keys remain.
    remaining = token.run("count", lambda lease: sum(
        1 for _ in lease.session.get_objects({Attribute.TOKEN: False})))
    assert remaining == before


def test_pool_is_bounded_and_waiters_are_served(hsm_token):
    token = hsm_token.token
    with _pool_of(token, 2):
        inside = []
        peak = []
        lock = threading.Lock()
        release = threading.Event()

        def hold(lease):
            with lock:
                inside.append(1)
                peak.append(len(inside))
            release.wait(5)
            with lock:
                inside.pop()
            return lease.session.handle

        holding = start_threads(6, lambda i: token.run("hold", hold))
        threading.Timer(0.3, release.set).start()
        handles = holding.join(30)  # every waiter was served, none failed
        assert max(peak) == 2 and len(peak) == 6
        assert len(set(handles)) <= 2  # six holds, on the pool's two sessions
        assert token.stats()["open_sessions"] == 2


@contextlib.contextmanager
def _pool_of(token, size: int):
    """The token with an empty pool bounded to ``size`` worker sessions, then its old bound (the
    NSS token is the session's shared one, with the idle sessions earlier tests left)."""
    old = token.pool_size
    while token._idle:  # nobody holds a lease now: close the idle ones, as a dead one would be
        token._discard(token._idle.pop())
    assert token.stats()["open_sessions"] == 0
    token.pool_size = size
    try:
        yield token
    finally:
        token.pool_size = old


def test_forked_child_reinitialises_and_uses_the_token(hsm_token):
    token = hsm_token.token
    # A token object survives the child's re-initialisation; session objects would not.
    label = unique_label("fork-mac")
    with token.anchor() as anchor:
        anchor.session.generate_key(KeyType.GENERIC_SECRET, 256, label=label, store=True,
                                    capabilities=MechanismFlag.SIGN,
                                    template={Attribute.SENSITIVE: True,
                                              Attribute.EXTRACTABLE: False})
    ref = KeyRef(label, ObjectClass.SECRET_KEY)
    recoveries = token.stats()["recoveries"]
    parent_mac = ops.hmac_sha256(token, ref, b"from the parent")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not touch the parent's sessions; re-login happens inside run()
        status = 1
        try:
            os.close(read_fd)
            child_mac = ops.hmac_sha256(token, ref, b"from the parent")
            os.write(write_fd, child_mac)
            status = 0 if token.stats()["recoveries"] == recoveries else 2
        finally:
            os._exit(status)
    os.close(write_fd)
    child_mac = os.read(read_fd, 64)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_mac == parent_mac
    # The parent's pool and login are untouched by whatever the child did.
    assert ops.hmac_sha256(token, ref, b"from the parent") == parent_mac
    assert token.stats()["recoveries"] == recoveries


def test_forked_children_in_parallel(hsm_token):
    """Several forked workers, each initialising its own module copy, all succeed."""
    import multiprocessing

    token = hsm_token.token
    label = unique_label("pool-mac")
    with token.anchor() as anchor:
        anchor.session.generate_key(KeyType.GENERIC_SECRET, 256, label=label, store=True,
                                    capabilities=MechanismFlag.SIGN)
    ref = KeyRef(label, ObjectClass.SECRET_KEY)
    expected = ops.hmac_sha256(token, ref, b"x")
    ctx = multiprocessing.get_context("fork")
    _INHERITED["token"] = token  # a Token holds ctypes handles: inherited by fork, not pickled
    try:
        with ctx.Pool(2) as pool:
            results = pool.map(_child_mac, [ref] * 4)
    finally:
        _INHERITED.clear()
    assert results == [expected] * 4


_INHERITED: dict = {}


def _child_mac(ref):
    return ops.hmac_sha256(_INHERITED["token"], ref, b"x")


def test_a_forked_child_cannot_open_the_token_with_a_wrong_pin(hsm_token):
    from hsm.core.errors import PinError
    from hsm.core.pin import Pin
    from hsm.core.token import Token
    token = hsm_token.token
    ops.hmac_sha256(token, _make_token_key(token), b"x")
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            try:
                Token.open(hsm_token.label, module=hsm_token.module_path,
                           parameters=hsm_token.parameters, pin=Pin("definitely-wrong"))
                status = 3  # accepted: the bug
            except PinError:
                status = 0
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _make_token_key(token):
    label = unique_label("fork-pin-mac")
    with token.anchor() as anchor:
        anchor.session.generate_key(KeyType.GENERIC_SECRET, 256, label=label,
                                    store=True, capabilities=MechanismFlag.SIGN)
    return KeyRef(label, ObjectClass.SECRET_KEY)
