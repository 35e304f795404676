"""Load each PKCS#11 module once per process, thread-safe, and fork-safe.

Why not ``pkcs11.lib(path)``: it calls ``C_Initialize(NULL)``, which tells SoftHSM2 that the
application is single-threaded, and concurrent calls then corrupt its state. We pre-initialise with
``CKF_OS_LOCKING_OK`` through ctypes and hand python-pkcs11 a ``lib`` subclass whose
``initialize()`` is a no-op. After ``fork()`` the child must not use the parent's sessions: we drop
every cached object in the child and initialise the module afresh on first use.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
from dataclasses import dataclass

import pkcs11
from pkcs11 import _pkcs11

from . import _cryptoki
from .errors import ModuleLoadError

# Where Debian installs the modules this project knows; other modules are given by path.
KNOWN_MODULES = {
    "softhsm2": "/usr/lib/softhsm/libsofthsm2.so",
    "nss": "/usr/lib/x86_64-linux-gnu/libsoftokn3.so",
    "opensc": "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
}
DEFAULT_MODULE = KNOWN_MODULES["softhsm2"]


class _PreInitialisedLib(_pkcs11.lib):
    """python-pkcs11's lib, minus its C_Initialize(NULL): we initialised the module already.

    Leaving ``initialized`` False also keeps python-pkcs11 from calling C_Finalize when the object
    is collected; finalisation is ours to decide.
    """

    def initialize(self):  # noqa: D102 - deliberately empty, see class docstring
        return None


@dataclass
class LoadedModule:
    path: str
    parameters: str | None
    raw: _cryptoki.RawModule
    lib: _pkcs11.lib
    pid: int

    @property
    def description(self) -> str:
        return f"{self.lib.manufacturer_id} {self.lib.library_description}".strip()


_lock = threading.RLock()
_modules: dict[str, LoadedModule] = {}
fork_epoch = 0  # incremented in every forked child; objects compare it to notice a fork


def loaded_paths() -> set[str]:
    """Real paths of the modules initialised in this process."""
    return {path for path, mod in _modules.items() if mod.pid == os.getpid()}


def resolve(path: str) -> str:
    path = KNOWN_MODULES.get(path, path)
    if not os.path.exists(path):
        raise ModuleLoadError(
            f"PKCS#11 module {path!r} does not exist",
            hint="install it (SoftHSM2: `apt-get install softhsm2`) or give --module PATH")
    return os.path.realpath(path)


def _softhsm_config_missing(real: str) -> ModuleLoadError | None:
    """SoftHSM2 answers a missing configuration file with a bare CKR_GENERAL_ERROR (0x5): name
    the file instead."""
    if "softhsm" not in os.path.basename(real):
        return None
    conf = os.environ.get("SOFTHSM2_CONF") or "/etc/softhsm/softhsm2.conf"
    if os.path.isfile(conf):
        return None
    where = "SOFTHSM2_CONF names" if os.environ.get("SOFTHSM2_CONF") else "SoftHSM2 reads"
    return ModuleLoadError(f"{where} {conf}, which does not exist",
                           hint="point SOFTHSM2_CONF at the configuration file (the demo's: "
                                "var/softhsm2.conf, after `make demo`)")


def load(path: str = DEFAULT_MODULE, parameters: str | None = None) -> LoadedModule:
    """Return the process-wide loaded module for ``path``, initialising it on first use.

    ``parameters`` is the module-specific init string put in ``pReserved`` (NSS softokn needs
    ``configdir='sql:DIR' ...``). A module can only be initialised once per process, so asking
    for the same module with different parameters is an error rather than a silent surprise.
    """
    real = resolve(path)
    with _lock:
        mod = _modules.get(real)
        if mod is not None and mod.pid == os.getpid():
            if parameters is not None and mod.parameters != parameters:
                raise ModuleLoadError(
                    f"module {real} is already initialised with other parameters in this process",
                    hint="a PKCS#11 module is initialised once per process; use one parameter "
                         "string (NSS: one database) per process")
            return mod
        try:
            raw = _cryptoki.RawModule(real)
        except OSError as exc:
            raise ModuleLoadError(f"cannot load PKCS#11 module {real}: {exc}") from exc
        rv = raw.initialize(parameters)
        if rv == _cryptoki.CKR_CRYPTOKI_ALREADY_INITIALIZED and mod is not None:
            # Forked child of a process that had initialised the module: the inherited state
            # belongs to the parent. Finalise our copy and start again.
            raw.finalize()
            rv = raw.initialize(parameters)
        if rv not in (_cryptoki.CKR_OK, _cryptoki.CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise _softhsm_config_missing(real) or ModuleLoadError(
                f"C_Initialize of {real} failed with CKR 0x{rv:x}",
                hint="NSS softokn needs its parameter string (configdir=...)"
                if rv == 0x7 else None)
        if mod is not None:
            # Same dlopen handle and function list; only the state was reset. python-pkcs11
            # Session objects inherited from the parent never close themselves when collected,
            # so dropping them cannot close a session this child opens later.
            lib = mod.lib
        else:
            try:
                lib = _PreInitialisedLib(real)
            except pkcs11.PKCS11Error as exc:
                raise ModuleLoadError(f"python-pkcs11 cannot use {real}: {exc}") from exc
            # Never let python-pkcs11 dlclose() the module during interpreter teardown (its
            # dealloc runs in arbitrary order with ours); _finalize_at_exit ends it cleanly.
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(lib))
        mod = LoadedModule(real, parameters, raw, lib, os.getpid())
        _modules[real] = mod
        return mod


def rescan(path: str) -> None:
    """Finalise ``path`` so the next :func:`load` initialises it again, and with it re-reads
    the token directory (SoftHSM2 reads it only in C_Initialize). Every session this process
    had on the module is gone afterwards: callers use it only where none can exist yet."""
    real = resolve(path)
    with _lock:
        mod = _modules.get(real)
        if mod is not None and mod.pid == os.getpid():
            mod.raw.finalize()
            mod.pid = -1


def _after_fork_in_child() -> None:
    # Runs in the child only. Locks may have been held by other parent threads at fork time,
    # so replace them rather than acquire them.
    global _lock, fork_epoch
    _lock = threading.RLock()
    fork_epoch += 1
    for mod in _modules.values():
        mod.pid = -1  # forces re-initialisation on the next load()


def _finalize_at_exit() -> None:
    """C_Finalize every module this process initialised, so tokens see an orderly end."""
    for mod in list(_modules.values()):
        if mod.pid == os.getpid():
            mod.raw.finalize()
            mod.pid = -1


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_finalize_at_exit)
