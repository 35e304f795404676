"""The few raw Cryptoki calls python-pkcs11 does not make the way we need, through ctypes.

python-pkcs11 calls ``C_Initialize(NULL)``. With NULL arguments SoftHSM2 turns its own locking off
while python-pkcs11 releases the GIL around every call, so two threads crash the token. We therefore
initialise the module ourselves with ``CKF_OS_LOCKING_OK`` (and, for NSS softokn, its parameter
string in ``pReserved``) before python-pkcs11 ever sees it. The same ctypes function list also gives
us ``C_GetSessionInfo`` (to validate pooled sessions) and ``C_CloseSession``/``C_Finalize``.

dlopen() of the same path returns the same handle, so the module state initialised here is the
state python-pkcs11 uses later.
"""

from __future__ import annotations

import ctypes

CK_ULONG = ctypes.c_ulong
CK_RV = CK_ULONG
CK_VOID_P = ctypes.c_void_p

CKF_OS_LOCKING_OK = 0x00000002
CKR_OK = 0x0
CKR_GENERAL_ERROR = 0x5
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKR_USER_ALREADY_LOGGED_IN = 0x100

# Session states (CK_STATE), PKCS#11 v2.40 §5.6.
CKS_RO_PUBLIC_SESSION = 0
CKS_RO_USER_FUNCTIONS = 1
CKS_RW_PUBLIC_SESSION = 2
CKS_RW_USER_FUNCTIONS = 3
CKS_RW_SO_FUNCTIONS = 4
LOGGED_IN_STATES = frozenset({CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS})


class CK_VERSION(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class CK_C_INITIALIZE_ARGS(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", CK_VOID_P),
        ("DestroyMutex", CK_VOID_P),
        ("LockMutex", CK_VOID_P),
        ("UnlockMutex", CK_VOID_P),
        ("flags", CK_ULONG),
        ("pReserved", CK_VOID_P),
    ]


class CK_MECHANISM_INFO(ctypes.Structure):
    _fields_ = [("ulMinKeySize", CK_ULONG), ("ulMaxKeySize", CK_ULONG), ("flags", CK_ULONG)]


class CK_SESSION_INFO(ctypes.Structure):
    _fields_ = [
        ("slotID", CK_ULONG),
        ("state", CK_ULONG),
        ("flags", CK_ULONG),
        ("ulDeviceError", CK_ULONG),
    ]


_C_Initialize = ctypes.CFUNCTYPE(CK_RV, ctypes.POINTER(CK_C_INITIALIZE_ARGS))
_C_Finalize = ctypes.CFUNCTYPE(CK_RV, CK_VOID_P)
_C_SessionCall = ctypes.CFUNCTYPE(CK_RV, CK_ULONG)
_C_GetSessionInfo = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(CK_SESSION_INFO))
_C_CloseAllSessions = ctypes.CFUNCTYPE(CK_RV, CK_ULONG)
_C_InitToken = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_char_p, CK_ULONG, ctypes.c_char_p)
_C_GetMechanismInfo = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG,
                                      ctypes.POINTER(CK_MECHANISM_INFO))
_C_Login = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG)

# CK_FUNCTION_LIST: a CK_VERSION followed by function pointers in the order of the standard.
# We only call the first sixteen; the rest are declared as opaque pointers to keep the layout.
_FUNCTION_ORDER = (
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo", "C_InitToken",
    "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession", "C_CloseAllSessions",
    "C_GetSessionInfo", "C_GetOperationState", "C_SetOperationState", "C_Login", "C_Logout",
)
_TYPED = {
    "C_Initialize": _C_Initialize,
    "C_Finalize": _C_Finalize,
    "C_CloseSession": _C_SessionCall,
    "C_CloseAllSessions": _C_CloseAllSessions,
    "C_GetSessionInfo": _C_GetSessionInfo,
    "C_Login": _C_Login,
    "C_InitToken": _C_InitToken,
    "C_GetMechanismInfo": _C_GetMechanismInfo,
    "C_Logout": _C_SessionCall,
}
CKU_SO = 0
CKU_USER = 1


class CK_FUNCTION_LIST(ctypes.Structure):
    _fields_ = [("version", CK_VERSION)] + [
        (name, _TYPED.get(name, CK_VOID_P)) for name in _FUNCTION_ORDER
    ]


class RawModule:
    """A dlopen()ed PKCS#11 module and the handful of functions we call directly."""

    def __init__(self, path: str):
        self.path = path
        # RTLD_GLOBAL is not needed; the handle is kept alive for the life of the process
        # because python-pkcs11 holds its own dlopen() reference to the same library.
        self._dll = ctypes.CDLL(path)
        get_list = self._dll.C_GetFunctionList
        get_list.restype = CK_RV
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(CK_FUNCTION_LIST))]
        self._flist_ptr = ctypes.POINTER(CK_FUNCTION_LIST)()
        rv = get_list(ctypes.byref(self._flist_ptr))
        if rv != CKR_OK:
            raise OSError(f"C_GetFunctionList failed in {path} with 0x{rv:x}")
        self._f = self._flist_ptr.contents

    def initialize(self, parameters: str | None = None) -> int:
        """C_Initialize with OS locking; return the CKR code (ALREADY_INITIALIZED is tolerated)."""
        args = CK_C_INITIALIZE_ARGS()
        args.flags = CKF_OS_LOCKING_OK
        # The parameter buffer must outlive the call only; NSS copies what it needs.
        self._param_buf = ctypes.create_string_buffer(parameters.encode()) if parameters else None
        args.pReserved = ctypes.cast(self._param_buf, CK_VOID_P) if self._param_buf else None
        return int(self._f.C_Initialize(ctypes.byref(args)))

    def finalize(self) -> int:
        return int(self._f.C_Finalize(None))

    def mechanism_info(self, slot_id: int, mechanism: int) -> tuple[int, CK_MECHANISM_INFO]:
        """C_GetMechanismInfo into a zeroed struct. SoftHSM2 2.6.1 ORs its flags into whatever
        the struct held, and python-pkcs11 0.10 passes an uninitialised one: garbage flags."""
        info = CK_MECHANISM_INFO()
        rv = int(self._f.C_GetMechanismInfo(slot_id, mechanism, ctypes.byref(info)))
        return rv, info

    def session_info(self, handle: int) -> tuple[int, CK_SESSION_INFO]:
        info = CK_SESSION_INFO()
        rv = int(self._f.C_GetSessionInfo(handle, ctypes.byref(info)))
        return rv, info

    def login(self, handle: int, pin: bytes, user_type: int = CKU_USER) -> int:
        """C_Login on an existing session: python-pkcs11 can only log in while opening one,
        and leaks that session when the PIN is wrong."""
        return int(self._f.C_Login(handle, user_type, pin, len(pin)))

    def init_token(self, slot_id: int, so_pin: bytes, label: str) -> int:
        """C_InitToken: python-pkcs11 0.10 has no binding for it. Label is blank-padded to 32."""
        padded = label.encode("utf-8").ljust(32, b" ")
        if len(padded) > 32:
            raise ValueError("token label longer than 32 bytes")
        return int(self._f.C_InitToken(slot_id, so_pin, len(so_pin), padded))

    def logout(self, handle: int) -> int:
        return int(self._f.C_Logout(handle))

    def close_session(self, handle: int) -> int:
        return int(self._f.C_CloseSession(handle))

    def close_all_sessions(self, slot_id: int) -> int:
        return int(self._f.C_CloseAllSessions(slot_id))
