"""NSS softokn specifics: its key database, its C_Initialize parameter string, its quirks.

NSS softokn (``libsoftokn3.so``) is a software token whose state lives in an NSS ``sql:`` database
(``cert9.db`` + ``key4.db``). It refuses ``C_Initialize(NULL)``: the database directory comes in
``CK_C_INITIALIZE_ARGS.pReserved`` as a parameter string (:func:`parameters`). It exports
``C_GetFunctionList``, so :class:`hsm.core._cryptoki.RawModule` pre-initialises it unchanged. Being a
PKCS#11 module, it is initialised once per process: one database per process.

Measured on Debian 12, NSS 3.87 (see tests/hsm/core/test_nss.py for the evidence):

- The slot with the database and the login is "NSS User Private Key and Certificate Services",
  token label :data:`TOKEN_LABEL`. The other token ("NSS Generic Crypto Services") has no login
  and is write-protected. Both report serial ``0000000000000000``: select by label, not serial.
- No SO role: ``C_Login(CKU_SO)`` gives ``CKR_USER_TYPE_INVALID``; the database password set by
  ``certutil -N`` is the user PIN. No lock-out after wrong PINs.
- The size query of ``C_WrapKey``/``C_Encrypt`` with ``CKM_AES_KEY_WRAP_KWP`` returns the input
  length, 8-15 bytes short; python-pkcs11 allocates exactly that and fails with
  "Buffer was too small". :func:`wrap_key_kwp` wraps with room to spare. Unwrap is unaffected.
- ``CKM_AES_KEY_WRAP_PAD`` (0x210A) is PKCS#7 padding + RFC 3394 here, not RFC 5649 (SoftHSM2
  uses 0x210A for RFC 5649): use 0x210B for KWP on NSS.
- ``CKA_LOCAL`` reads false even for keys generated on the token; token secret keys are always
  stored sensitive (``CKA_SENSITIVE=False`` is silently ignored); labels need not be unique.
- A failed HMAC ``C_Verify`` returns whatever the thread's last NSS error maps to: in a fresh
  thread ``CKR_DEVICE_ERROR``, not ``CKR_SIGNATURE_INVALID``. Compare MACs on the host.
- A missing or unreadable database fails ``C_Initialize`` with the vendor code 0xCE534351
  (CKR_NSS_CERTDB_FAILED; 0xCE534352 is the key DB).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pkcs11

from . import _cryptoki
from . import module as modules
from .errors import CKR_BY_EXCEPTION, HsmError
from .pin import Pin

MODULE_PATH: str = modules.KNOWN_MODULES["nss"]
# The token in the "NSS User Private Key and Certificate Services" slot: the database and login.
TOKEN_LABEL = "NSS Certificate DB"
CERTUTIL = "certutil"

CKM_AES_KEY_WRAP_KWP = 0x210B  # RFC 5649 / SP 800-38F KWP
KWP_OVERHEAD = 16  # 8-byte integrity block + at most 7 padding bytes, rounded up


def missing() -> str | None:
    """Why NSS softokn cannot be used here (naming the missing piece), or None if it can."""
    if not os.path.exists(MODULE_PATH):
        return f"NSS softokn {MODULE_PATH} is missing (apt-get install libnss3)"
    if shutil.which(CERTUTIL) is None:
        return f"{CERTUTIL} is not on PATH (apt-get install libnss3-tools)"
    return None


def create_database(db_dir: Path, user_pin: Pin) -> None:
    """Create an empty NSS ``sql:`` database in ``db_dir`` protected by ``user_pin``.

    certutil only takes a new password interactively or from a file (``-f``), so the PIN goes
    through a 0600 file in the database directory, removed right after; never argv.
    """
    pin = user_pin.reveal()
    if "\n" in pin or "\r" in pin:
        raise HsmError("an NSS database PIN cannot contain a line break",
                       hint="certutil reads the password file line by line")
    certutil = shutil.which(CERTUTIL)
    if certutil is None:
        raise HsmError(f"{CERTUTIL} not found", hint="apt-get install libnss3-tools")
    db_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (db_dir / "key4.db").exists():
        # certutil -N on an existing database would try to *change* its password.
        raise HsmError(f"an NSS database already exists in {db_dir}")
    fd, pwfile = tempfile.mkstemp(prefix=".pw-", dir=db_dir)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(pin + "\n")
        proc = subprocess.run([certutil, "-N", "-d", f"sql:{db_dir.resolve()}", "-f", pwfile],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
    finally:
        os.unlink(pwfile)
    if proc.returncode != 0 or not (db_dir / "key4.db").exists():
        # certutil does not echo passwords; its first line says what went wrong.
        first = (proc.stderr or proc.stdout).strip().splitlines()[:1]
        raise HsmError(f"certutil could not create an NSS database in {db_dir}: "
                       f"{first[0] if first else 'exit ' + str(proc.returncode)}")


def _quote(value: str) -> str:
    # NSS's parameter parser (NSSUTIL_ArgFetchValue) honours backslash escapes inside quotes.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parameters(db_dir: Path) -> str:
    """The softokn C_Initialize parameter string for the database in ``db_dir``.

    Read-write (no ``readOnly``), key DB on (no ``noKeyDB``: login needs it), no ``forceOpen``
    (a bad path must fail at C_Initialize, not later at C_Login). ``secmod`` is NSS's default
    name; softokn itself does not read it.
    """
    return (f"configdir={_quote('sql:' + str(db_dir.resolve()))} certPrefix='' keyPrefix='' "
            "secmod='secmod.db' flags=")


# ---------------------------------------------------------------- AES-KWP wrap workaround
class _Mechanism(ctypes.Structure):
    _fields_ = [("mechanism", ctypes.c_ulong), ("pParameter", ctypes.c_void_p),
                ("ulParameterLen", ctypes.c_ulong)]


_C_WrapKey = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_Mechanism),
                              ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p,
                              ctypes.POINTER(ctypes.c_ulong))
# Position of C_WrapKey in CK_FUNCTION_LIST's pointers (PKCS#11 v2.40 order, from 0 =
# C_Initialize); hsm.core._cryptoki only declares the first twenty.
_WRAPKEY_INDEX = 60


class _FunctionList(ctypes.Structure):
    _fields_ = [("version", ctypes.c_ubyte * 2),
                ("functions", ctypes.c_void_p * (_WRAPKEY_INDEX + 1))]


@functools.cache
def _wrap_key_fn(path: str):
    # dlopen() returns the handle python-pkcs11 and RawModule use; the list is static in softokn.
    get_list = ctypes.CDLL(path).C_GetFunctionList
    get_list.restype = ctypes.c_ulong
    get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
    flist = ctypes.POINTER(_FunctionList)()
    rv = get_list(ctypes.byref(flist))
    if rv != 0:
        raise OSError(f"C_GetFunctionList failed in {path} with 0x{rv:x}")
    return _C_WrapKey(flist.contents.functions[_WRAPKEY_INDEX])


_EXC_BY_RV = {value: klass for klass, (_name, value) in CKR_BY_EXCEPTION.items()}


def wrap_key_kwp(session: pkcs11.Session, wrapping_key: pkcs11.SecretKey, key: pkcs11.Key,
                 module_path: str = MODULE_PATH) -> bytes:
    """``C_WrapKey`` with ``CKM_AES_KEY_WRAP_KWP`` (default IV), sized right on NSS softokn.

    Failures raise the python-pkcs11 exception for the CKR code, so :meth:`Token.run` translates
    them and retries lost sessions exactly as for python-pkcs11's own calls.
    """
    fn = _wrap_key_fn(os.path.realpath(module_path))
    mech = _Mechanism(CKM_AES_KEY_WRAP_KWP, None, 0)
    length = ctypes.c_ulong(0)
    rv = fn(_cryptoki.handle(session), ctypes.byref(mech), wrapping_key.handle, key.handle, None,
            ctypes.byref(length))
    if rv == 0:
        length.value += KWP_OVERHEAD  # NSS reports the unwrapped length; see module docstring
        buf = ctypes.create_string_buffer(length.value)
        rv = fn(_cryptoki.handle(session), ctypes.byref(mech), wrapping_key.handle, key.handle, buf,
                ctypes.byref(length))
    if rv != 0:
        klass = _EXC_BY_RV.get(rv)
        raise klass() if klass else pkcs11.PKCS11Error(f"C_WrapKey returned CKR 0x{rv:x}")
    return buf.raw[:length.value]
