"""An opened token: one login, a bounded pool of worker sessions, cached key objects.

PKCS#11 login state belongs to the application, not the session: ``C_Logout`` on any session logs
every session out, and a second ``C_Login`` fails. So each token is logged in exactly once, on an
*anchor* session this object keeps for its whole life; worker sessions are opened without a PIN
and share that login. The anchor also owns session objects that must outlive a worker lease.

Sessions can die behind our back (another library calls ``C_CloseAllSessions``, a network HSM
drops the link). Every operation runs through :meth:`Token.run`, which replaces a session the
token reports as invalid or logged out, logs in again if needed, and retries a bounded number of
times. Sessions idle for longer than ``validate_after`` seconds are checked with
``C_GetSessionInfo`` before reuse; a hot session is not, because the call costs as much as the
wrapper it guards (the retry catches what the check would have).
"""

from __future__ import annotations

import collections
import hmac
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import pkcs11
from pkcs11 import Attribute, ObjectClass

from . import _cryptoki
from . import module as modules
from . import pin as pins_mod
from .errors import (SESSION_LOST, STALE_HANDLE, HsmError, ObjectNotFound, PinError, SessionLost,
                     TokenNotFound, from_pkcs11, from_rv, translated)
from .pin import Pin

if TYPE_CHECKING:    # profile.py imports this module
    from .profile import Profile

T = TypeVar("T")

_registry: dict[tuple, "Token"] = {}
_profiles: dict[tuple, Profile] = {}
_registry_lock = threading.Lock()


class KeyRef(NamedTuple):
    """How the layer names a key: its label and object class (and optionally its CKA_ID).

    A NamedTuple rather than a dataclass: it is the key of the per-session object cache on the
    hot path, and tuple hashing is done in C.
    """

    label: str
    object_class: ObjectClass
    id: bytes | None = None

    def template(self) -> dict:
        tpl = {Attribute.LABEL: self.label, Attribute.CLASS: self.object_class}
        if self.id is not None:
            tpl[Attribute.ID] = self.id
        return tpl


class Lease:
    """A worker session handed to one thread at a time, with its own key-object cache.

    python-pkcs11 binds every object to the session it was found on, so the cache is per session:
    a key is looked up (a linear search in SoftHSM2) at most once per pooled session.
    """

    __slots__ = ("session", "objects", "generation", "last_used")

    def __init__(self, session: pkcs11.Session, generation: int):
        self.session = session
        self.objects: dict[KeyRef, pkcs11.Object] = {}
        self.generation = generation
        self.last_used = time.monotonic()

    def key(self, ref: KeyRef):
        obj = self.objects.get(ref)
        if obj is None:
            obj = self._find(ref)
            self.objects[ref] = obj
        return obj

    def _find(self, ref: KeyRef):
        found = list(self.session.get_objects(ref.template()))
        if not found:
            raise ObjectNotFound(f"no {ref.object_class.name.lower()} object labelled "
                                 f"{ref.label!r}", object_label=ref.label,
                                 hint="`hsm info --token LABEL --objects` lists the objects")
        if len(found) > 1:
            raise HsmError(f"{len(found)} {ref.object_class.name.lower()} objects share the label "
                           f"{ref.label!r}", object_label=ref.label,
                           hint="labels must be unique; select by id as well")
        return found[0]


class Token:
    """A token selected by label or serial, logged in once, with a bounded session pool."""

    def __init__(self, mod: modules.LoadedModule, p11token: pkcs11.Token, pin: Pin | None, *,
                 pool_size: int = 8, rw: bool = True, validate_after: float = 5.0,
                 retries: int = 3, acquire_timeout: float = 30.0, so: bool = False):
        self._module = mod
        self._p11token = p11token
        self.label: str = p11token.label
        self.serial: str = p11token.serial.decode("ascii", "replace")
        self.slot_id: int = p11token.slot.slot_id
        self._pin = pin
        # SO sessions exist for the few objects only the SO may create (CKA_TRUSTED keys).
        self._user_type = _cryptoki.CKU_SO if so else _cryptoki.CKU_USER
        self._rw = rw or so
        self.pool_size = pool_size
        self.validate_after = validate_after
        self.retries = retries
        self.acquire_timeout = acquire_timeout
        self._generation = 0
        self._fresh_pool()
        self._anchor: Lease | None = None
        self._closed = False
        self._profile: Profile | None = None
        self.recoveries = 0  # how many times a lost session or login was restored
        self._recovery_hooks: list[Callable[[], None]] = []
        self._refs = 1
        self._login()

    # ----------------------------------------------------------------- opening and login
    @classmethod
    def open(cls, label: str | None = None, *, serial: str | None = None,
             module: str = modules.DEFAULT_MODULE, parameters: str | None = None,
             pin: Pin | None = None, **kwargs) -> Token:
        """Open the token with this label (or serial) in ``module`` and log in with ``pin``."""
        if label is None and serial is None:
            raise TokenNotFound("no token label or serial given",
                                hint="select tokens by label or serial, never by slot number")
        mod = modules.load(module, parameters)
        p11token = find_token(mod, label=label, serial=serial)
        # Serial alone is not unique everywhere (both NSS softokn tokens report 0000000000000000).
        # No pid in the key: a forked child shares its inherited instance too, so a wrong PIN
        # is refused there as well (the module would just say "already logged in").
        key = (mod.path, p11token.label, p11token.serial, bool(kwargs.get("so")))
        with _registry_lock:
            # Login is per application: a second Token for the same token in this process
            # would find itself "already logged in" whatever PIN it was given. Share the
            # instance instead, and make the second caller prove the same PIN.
            shared = _registry.get(key)
            if shared is not None and not shared._closed:
                if not _same_pin(pin, shared._pin):
                    raise PinError("C_Login failed: the PIN does not match the one this process "
                                   "is logged in with", operation="C_Login", token=shared.label,
                                   ckr="CKR_PIN_INCORRECT", ckr_value=0xA0,
                                   hint=pins_mod.wrong_pin_hint(shared.label,
                                                                so=bool(kwargs.get("so"))))
                shared._refs += 1
                return shared
            token = cls(mod, p11token, pin, **kwargs)
            _registry[key] = token
            return token

    @property
    def module(self) -> modules.LoadedModule:
        return self._module

    def _login(self) -> None:
        """Open the anchor session and log in on it (or confirm we are already logged in)."""
        with translated("C_OpenSession", self.label):
            anchor = self._p11token.open(rw=self._rw)
        if self._pin is not None:
            try:
                _login_on(self._module, anchor, self._pin, self.label, self._user_type)
            except HsmError:
                _close_quietly(self._module, anchor)
                raise
        self._anchor = Lease(anchor, self._generation)

    def _reset_after_fork(self) -> None:
        """In a forked child: forget the parent's sessions (never close them) and log in anew."""
        path, parameters = self._module.path, self._module.parameters
        self._generation += 1
        self._fresh_pool()
        for attempt in range(_FORK_SCAN_ATTEMPTS):
            self._module = modules.load(path, parameters)
            try:
                self._p11token = find_token(self._module, label=self.label, serial=self.serial)
                break
            except TokenNotFound:
                # SoftHSM2 2.6.1 reads the token directory once, in C_Initialize, and a read
                # that meets a token file another process holds locked skips that token (seen:
                # 1 in 3 when two forked children initialise at once). This child has no
                # session yet, so it can finalise and read the directory again.
                if attempt == _FORK_SCAN_ATTEMPTS - 1:
                    raise
                modules.rescan(path)
                time.sleep(0.005 * (attempt + 1) + random.random() * 0.01)
        self.slot_id = self._p11token.slot.slot_id
        self._login()

    def _fresh_pool(self) -> None:
        """New locks and an empty pool, owned by this process (at start and after a fork)."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._anchor_lock = threading.RLock()
        self._idle: collections.deque[Lease] = collections.deque()
        self._open = 0
        self._waiters = 0
        self._pid = os.getpid()
        self._epoch = modules.fork_epoch  # bumped in a forked child: cheaper than getpid()

    def _session_alive(self, session: pkcs11.Session, need_login: bool) -> bool:
        rv, info = self._module.raw.session_info(_cryptoki.handle(session))
        if rv != _cryptoki.CKR_OK:
            return False
        if not need_login:
            return True
        if self._user_type == _cryptoki.CKU_SO:
            return info.state == _cryptoki.CKS_RW_SO_FUNCTIONS
        return info.state in _cryptoki.LOGGED_IN_STATES

    def logged_in(self) -> bool:
        """Is the anchor session still logged in (one C_GetSessionInfo)?"""
        return self._logged_in()

    def _logged_in(self) -> bool:
        anchor = self._anchor
        if self._pin is None:
            return True
        return anchor is not None and self._session_alive(anchor.session, True)

    def _recover(self) -> None:
        """After a session-lost error: restore the anchor and the login, invalidate caches."""
        with self._anchor_lock:
            anchor = self._anchor.session if self._anchor is not None else None
            if anchor is not None and self._session_alive(anchor, self._pin is not None):
                pass
            elif anchor is not None and self._session_alive(anchor, False) and self._pin:
                _login_on(self._module, anchor, self._pin, self.label, self._user_type)
            else:
                self._login()
            with self._lock:
                # Object handles may not survive a lost login on every token: drop them all.
                self._generation += 1
                idle, self._idle = list(self._idle), collections.deque()
            # Whatever killed one session (C_CloseAllSessions, a lost link) likely killed the
            # idle ones too: check them now instead of failing one retry on each.
            for lease in idle:
                if self._session_alive(lease.session, False):
                    self._release(lease)
                else:
                    self._discard(lease)
            self.recoveries += 1
            for hook in list(self._recovery_hooks):
                hook()

    def on_recovery(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call ``hook()`` after every recovery of a lost session or login (session objects,
        which die with the login, are gone then). It runs on the recovering thread with the
        anchor held: it must only take note (set a flag), never call the token. Returns the
        function that unregisters it."""
        self._recovery_hooks.append(hook)

        def unregister() -> None:
            if hook in self._recovery_hooks:
                self._recovery_hooks.remove(hook)
        return unregister

    def forget_objects(self) -> None:
        """Drop every session's cached object handles, after a token object that others may
        have cached was destroyed: a token may give its handle to another object (SoftHSM2
        does), and a stale handle would then name the wrong key."""
        with self._lock:
            self._generation += 1

    # ----------------------------------------------------------------- the pool
    def _new_lease(self) -> Lease:
        with translated("C_OpenSession", self.label):
            session = self._p11token.open(rw=self._rw)
        return Lease(session, self._generation)

    def _acquire(self) -> Lease:
        if self._epoch != modules.fork_epoch:
            self._reset_after_fork()
        try:
            lease = self._idle.pop()  # deque.pop is atomic: the common path takes no lock
        except IndexError:
            lease = self._acquire_slow()
        if lease.generation != self._generation:
            lease.objects.clear()
            lease.generation = self._generation
        now = time.monotonic()
        if now - lease.last_used > self.validate_after and \
                not self._session_alive(lease.session, False):
            self._discard(lease)
            return self._acquire()
        lease.last_used = now  # start of this use: close enough, and one clock read per call
        return lease

    def _acquire_slow(self) -> Lease:
        if self._closed:
            raise HsmError("token is closed", token=self.label)
        deadline = time.monotonic() + self.acquire_timeout
        with self._cond:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._open < self.pool_size:
                    self._open += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HsmError(f"no session free after {self.acquire_timeout:.0f} s "
                                   f"(pool of {self.pool_size})", token=self.label,
                                   hint="raise pool_size or hold sessions for shorter")
                self._waiters += 1
                try:
                    # _release appends without the lock, so a wake-up can slip between our
                    # check of _idle and this wait: poll briefly rather than trust notify().
                    self._cond.wait(min(remaining, 0.01))
                finally:
                    self._waiters -= 1
        try:
            return self._new_lease()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _release(self, lease: Lease) -> None:
        self._idle.append(lease)  # atomic; the lock is only taken when someone is waiting
        if self._waiters:
            with self._cond:
                self._cond.notify()

    def _discard(self, lease: Lease) -> None:
        """Forget a dead session. It is closed without C_Logout (it was opened without a PIN)."""
        _close_quietly(self._module, lease.session)
        with self._cond:
            self._open -= 1
            self._cond.notify()

    @contextmanager
    def lease(self) -> Iterator[Lease]:
        """A worker session for a sequence of calls (no automatic retry: use :meth:`run`)."""
        lease = self._acquire()
        try:
            yield lease
        finally:
            self._release(lease)

    def run(self, operation: str, fn: Callable[..., T], object_label: str | None = None,
            *args) -> T:
        """Run ``fn(lease, *args)`` on a pooled session; replace lost sessions, retry (bounded).

        ``args`` let hot callers pass a module-level function instead of a fresh closure.
        """
        stale_retried = login_retried = False
        for _attempt in range(self.retries + 1):
            lease = self._acquire()
            try:
                result = fn(lease, *args)
            except SESSION_LOST:
                self._discard(lease)
                self._recover()
                continue
            except STALE_HANDLE as exc:
                # A cached object handle went stale: the object was destroyed, or the login
                # was lost and private objects became invisible (SoftHSM2 then says
                # OBJECT_HANDLE_INVALID, not USER_NOT_LOGGED_IN). Forget this session's cache,
                # restore the login if that was it, and retry; a real absence then surfaces
                # as ObjectNotFound on the fresh lookup.
                lease.objects.clear()
                self._release(lease)
                if not self._logged_in():
                    self._recover()
                elif stale_retried:
                    raise from_pkcs11(exc, operation=operation, token=self.label,
                                      object_label=object_label) from exc
                stale_retried = True
                continue
            except pkcs11.PKCS11Error as exc:
                self._release(lease)
                # Not every token says USER_NOT_LOGGED_IN when the login was lost behind our
                # back: NSS softokn 3.87 answers C_Sign on the now-hidden key with
                # CKR_KEY_SIZE_RANGE. Any failure while the anchor session is no longer logged
                # in is therefore a lost login: restore it and retry, once.
                if not login_retried and not self._logged_in():
                    login_retried = True
                    self._recover()
                    continue
                raise from_pkcs11(exc, operation=operation, token=self.label,
                                  object_label=object_label) from exc
            except BaseException:
                self._release(lease)
                raise
            self._release(lease)
            return result
        raise SessionLost(f"{operation}: the token reported the session lost "
                          f"{self.retries + 1} times in a row", operation=operation,
                          token=self.label, object_label=object_label,
                          hint="check the token's connection and logs")

    @contextmanager
    def anchor(self) -> Iterator[Lease]:
        """The logged-in anchor session (as a Lease), serialised between threads.

        For objects that must outlive a worker lease: session objects die with the session
        that created them, and the anchor lives as long as the Token.
        """
        if self._epoch != modules.fork_epoch:
            self._reset_after_fork()
        with self._anchor_lock:
            if self._anchor is None or not self._session_alive(self._anchor.session,
                                                               self._pin is not None):
                self._recover()
            anchor = self._anchor
            assert anchor is not None
            if anchor.generation != self._generation:
                anchor.objects.clear()
                anchor.generation = self._generation
            yield anchor

    def run_on_anchor(self, operation: str, fn: Callable[[Lease], T],
                      object_label: str | None = None) -> T:
        """Like :meth:`run`, on the anchor session (for session objects that must persist)."""
        for _attempt in range(self.retries + 1):
            with self.anchor() as anchor:
                try:
                    return fn(anchor)
                except SESSION_LOST:
                    continue  # anchor() re-validates and recovers on the next pass
                except pkcs11.PKCS11Error as exc:
                    raise from_pkcs11(exc, operation=operation, token=self.label,
                                      object_label=object_label) from exc
        raise SessionLost(f"{operation}: the anchor session kept being lost", operation=operation,
                          token=self.label, object_label=object_label)

    # ----------------------------------------------------------------- information
    @property
    def profile(self):
        """The token's capability profile, probed once per process (see :mod:`hsm.core.profile`)."""
        if self._profile is None:
            from .profile import probe
            key = (self._module.path, self.label, self.serial)
            with self._anchor_lock:
                if self._profile is None:
                    # Probing generates an RSA key: once per token per process, not per open.
                    cached = _profiles.get(key)
                    self._profile = cached if cached is not None else probe(self)
                    _profiles[key] = self._profile
        return self._profile

    @property
    def p11token(self) -> pkcs11.Token:
        return self._p11token

    def stats(self) -> dict:
        return {"open_sessions": self._open, "idle": len(self._idle),
                "recoveries": self.recoveries, "pool_size": self.pool_size}

    def close(self, logout: bool = True) -> None:
        """Release this handle; the last one closes the pool and, if asked, logs out."""
        with _registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            _registry.pop((self._module.path, self._p11token.label, self._p11token.serial,
                           self._user_type == _cryptoki.CKU_SO), None)
        with self._cond:
            self._closed = True
            idle, self._idle = list(self._idle), collections.deque()
            self._open -= len(idle)
        for lease in idle:
            _close_quietly(self._module, lease.session)
        if self._anchor is not None and self._pid == os.getpid():
            if logout and self._pin is not None:
                self._module.raw.logout(_cryptoki.handle(self._anchor.session))  # the caller asked for it
            _close_quietly(self._module, self._anchor.session)
        self._anchor = None

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Token label={self.label!r} serial={self.serial!r} slot={self.slot_id}>"


def _same_pin(a: Pin | None, b: Pin | None) -> bool:
    """Constant-time: does a second open present the PIN this process logged in with?"""
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a.reveal().encode(), b.reveal().encode())


def _login_on(mod: modules.LoadedModule, session: pkcs11.Session, pin: Pin, label: str,
              user_type: int = _cryptoki.CKU_USER) -> None:
    """C_Login(CKU_USER) on an existing session; already logged in (by us) counts as success.

    SoftHSM2 2.6.1 answers CKR_GENERAL_ERROR when two processes log in to the same token at the
    same moment (both read the token file while one rewrites it; seen with forked workers). That
    code never counts towards the PIN lock-out, so a short, bounded, jittered retry is safe.
    """
    for attempt in range(_LOGIN_ATTEMPTS):
        rv = mod.raw.login(_cryptoki.handle(session), pin.reveal().encode("utf-8"), user_type)
        if rv in (_cryptoki.CKR_OK, _cryptoki.CKR_USER_ALREADY_LOGGED_IN):
            return
        if rv != _cryptoki.CKR_GENERAL_ERROR or attempt == _LOGIN_ATTEMPTS - 1:
            break
        time.sleep(0.01 * (attempt + 1) + random.random() * 0.02)
    hint = None
    if rv in (0xA0, 0xA1, 0xA2):  # CKR_PIN_INCORRECT / _INVALID / _LEN_RANGE
        hint = pins_mod.wrong_pin_hint(label, so=user_type == _cryptoki.CKU_SO)
    raise from_rv(rv, operation="C_Login", token=label, hint=hint)


_LOGIN_ATTEMPTS = 6
_FORK_SCAN_ATTEMPTS = 5


def _close_quietly(mod: modules.LoadedModule, session: pkcs11.Session) -> None:
    """C_CloseSession without C_Logout (python-pkcs11's close() would log everybody out)."""
    mod.raw.close_session(_cryptoki.handle(session))


def find_token(mod: modules.LoadedModule, *, label: str | None = None,
               serial: str | None = None) -> pkcs11.Token:
    """The one token matching label and/or serial; a clear error naming the tokens present."""
    with translated("C_GetSlotList", label):
        slots = mod.lib.get_slots(token_present=True)
    present = []
    matches = []
    for slot in slots:
        try:
            tok = slot.get_token()
        except pkcs11.PKCS11Error:
            continue
        if not tok.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
            continue  # SoftHSM2's spare empty slot: not a token anyone can select
        tok_serial = tok.serial.decode("ascii", "replace")
        present.append(f"{tok.label!r} (serial {tok_serial})")
        if label is not None and tok.label != label:
            continue
        if serial is not None and tok_serial != serial:
            continue
        matches.append(tok)
    wanted = " ".join(filter(None, [f"label={label!r}" if label else "",
                                    f"serial={serial!r}" if serial else ""]))
    if not matches:
        raise TokenNotFound(f"no token with {wanted} in {mod.path}", token=label,
                            hint=("tokens present: " + ", ".join(present)) if present else
                            "no initialised token is present; create one with `hsm init-token`")
    if len(matches) > 1:
        raise TokenNotFound(f"{len(matches)} tokens match {wanted}", token=label,
                            hint="select by serial as well: " + ", ".join(present))
    return matches[0]
