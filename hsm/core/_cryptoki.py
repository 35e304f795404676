"""The few raw Cryptoki calls python-pkcs11 does not make the way we need, through ctypes.

python-pkcs11 calls ``C_Initialize(NULL)``. With NULL arguments SoftHSM2 turns its own locking off
while python-pkcs11 releases the GIL around every call, so two threads crash the token. We therefore
initialise the module ourselves with ``CKF_OS_LOCKING_OK`` (and, for NSS softokn, its parameter
string in ``pReserved``) before python-pkcs11 ever sees it. The same ctypes function list also gives
us ``C_GetSessionInfo`` (to validate pooled sessions) and ``C_CloseSession``/``C_Finalize``.

Key policy needs ctypes too: python-pkcs11 0.10 cannot encode attribute-array attributes
(``CKA_ALLOWED_MECHANISMS``, ``CKA_UNWRAP_TEMPLATE``), and they can only be set when a key is
created. So keys that carry a policy are generated, unwrapped and created here
(:meth:`RawModule.generate_key`, ``generate_key_pair``, ``unwrap_key``, ``create_object``) from an
:class:`Template` that encodes booleans, integers, byte strings, mechanism lists and nested
templates; python-pkcs11 then finds the new objects by label and CKA_ID as usual.

dlopen() of the same path returns the same handle, so the module state initialised here is the
state python-pkcs11 uses later.
"""

from __future__ import annotations

import ctypes
from typing import Any

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
_C_InitPIN = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_char_p, CK_ULONG)

class CK_ATTRIBUTE(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", CK_VOID_P), ("ulValueLen", CK_ULONG)]


class CK_MECHANISM(ctypes.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", CK_VOID_P), ("ulParameterLen", CK_ULONG)]


class CK_RSA_PKCS_OAEP_PARAMS(ctypes.Structure):
    _fields_ = [("hashAlg", CK_ULONG), ("mgf", CK_ULONG), ("source", CK_ULONG),
                ("pSourceData", CK_VOID_P), ("ulSourceDataLen", CK_ULONG)]


class CK_RSA_AES_KEY_WRAP_PARAMS(ctypes.Structure):
    _fields_ = [("ulAESKeyBits", CK_ULONG), ("pOAEPParams", ctypes.POINTER(CK_RSA_PKCS_OAEP_PARAMS))]

class CK_GCM_PARAMS(ctypes.Structure):
    # PKCS#11 v2.40 layout (SoftHSM2 2.6.1 reads ulIvBits too).
    _fields_ = [("pIv", CK_VOID_P), ("ulIvLen", CK_ULONG), ("ulIvBits", CK_ULONG),
                ("pAAD", CK_VOID_P), ("ulAADLen", CK_ULONG), ("ulTagBits", CK_ULONG)]


def handle(obj: Any) -> int:
    """The Cryptoki handle of a python-pkcs11 session or object, for the raw calls here. The
    Cython classes carry it; python-pkcs11's published types (``pkcs11.types``) do not declare
    it, so this is the one place that reaches for it untyped."""
    return obj.handle


def gcm_params(iv: bytes, aad: bytes = b"") -> tuple[CK_GCM_PARAMS, list]:
    """CK_GCM_PARAMS with a 128-bit tag; also the buffers that must outlive the call."""
    iv_buf = ctypes.create_string_buffer(iv, len(iv))
    aad_buf = ctypes.create_string_buffer(aad, max(len(aad), 1))
    params = CK_GCM_PARAMS(ctypes.cast(iv_buf, CK_VOID_P), len(iv), 8 * len(iv),
                           ctypes.cast(aad_buf, CK_VOID_P) if aad else None, len(aad), 128)
    return params, [iv_buf, aad_buf]


_P_ATTR = ctypes.POINTER(CK_ATTRIBUTE)
_P_MECH = ctypes.POINTER(CK_MECHANISM)
_P_ULONG = ctypes.POINTER(CK_ULONG)
_C_CreateObject = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, _P_ATTR, CK_ULONG, _P_ULONG)
_C_CopyObject = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, _P_ATTR, CK_ULONG, _P_ULONG)
_C_ObjectCall = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG)
_C_AttributeValue = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, _P_ATTR, CK_ULONG)
_C_GenerateKey = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, _P_MECH, _P_ATTR, CK_ULONG, _P_ULONG)
_C_GenerateKeyPair = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, _P_MECH, _P_ATTR, CK_ULONG, _P_ATTR,
                                      CK_ULONG, _P_ULONG, _P_ULONG)
_C_OperationInit = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, _P_MECH, CK_ULONG)
# One-shot data calls (C_Sign, C_Decrypt, C_Digest...): session, in, in-len, out, out-len*.
_C_Data = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_char_p, CK_ULONG, ctypes.c_char_p, _P_ULONG)
_C_DigestInit = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, _P_MECH)
_C_DigestFinal = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.c_char_p, _P_ULONG)
_C_WrapKey = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, _P_MECH, CK_ULONG, CK_ULONG, ctypes.c_char_p,
                              _P_ULONG)
_C_UnwrapKey = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, _P_MECH, CK_ULONG, ctypes.c_char_p, CK_ULONG,
                                _P_ATTR, CK_ULONG, _P_ULONG)

# CK_FUNCTION_LIST: a CK_VERSION followed by function pointers in the order of the standard
# (PKCS#11 v2.40). Functions we do not call are declared as opaque pointers to keep the layout.
_FUNCTION_ORDER = (
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo", "C_InitToken",
    "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession", "C_CloseAllSessions",
    "C_GetSessionInfo", "C_GetOperationState", "C_SetOperationState", "C_Login", "C_Logout",
    "C_CreateObject", "C_CopyObject", "C_DestroyObject", "C_GetObjectSize",
    "C_GetAttributeValue", "C_SetAttributeValue", "C_FindObjectsInit", "C_FindObjects",
    "C_FindObjectsFinal", "C_EncryptInit", "C_Encrypt", "C_EncryptUpdate", "C_EncryptFinal",
    "C_DecryptInit", "C_Decrypt", "C_DecryptUpdate", "C_DecryptFinal", "C_DigestInit",
    "C_Digest", "C_DigestUpdate", "C_DigestKey", "C_DigestFinal", "C_SignInit", "C_Sign",
    "C_SignUpdate", "C_SignFinal", "C_SignRecoverInit", "C_SignRecover", "C_VerifyInit",
    "C_Verify", "C_VerifyUpdate", "C_VerifyFinal", "C_VerifyRecoverInit", "C_VerifyRecover",
    "C_DigestEncryptUpdate", "C_DecryptDigestUpdate", "C_SignEncryptUpdate",
    "C_DecryptVerifyUpdate", "C_GenerateKey", "C_GenerateKeyPair", "C_WrapKey", "C_UnwrapKey",
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
    "C_InitPIN": _C_InitPIN,
    "C_CreateObject": _C_CreateObject,
    "C_CopyObject": _C_CopyObject,
    "C_DestroyObject": _C_ObjectCall,
    "C_GetAttributeValue": _C_AttributeValue,
    "C_SetAttributeValue": _C_AttributeValue,
    "C_GenerateKey": _C_GenerateKey,
    "C_GenerateKeyPair": _C_GenerateKeyPair,
    "C_UnwrapKey": _C_UnwrapKey,
    "C_WrapKey": _C_WrapKey,
    "C_EncryptInit": _C_OperationInit,
    "C_DecryptInit": _C_OperationInit,
    "C_SignInit": _C_OperationInit,
    "C_Sign": _C_Data,
    "C_Decrypt": _C_Data,
    "C_Encrypt": _C_Data,
    "C_DigestInit": _C_DigestInit,
    "C_DigestKey": _C_ObjectCall,
    "C_DigestFinal": _C_DigestFinal,
}
CKU_SO = 0
CKU_USER = 1


CK_TRUE = 1
CK_UNAVAILABLE_INFORMATION = CK_ULONG(-1).value


def encode_value(value) -> bytes:
    """The bytes a token stores for a scalar or mechanism-list attribute value (host order)."""
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        return bytes(CK_ULONG(value))
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (list, tuple)):
        return bytes((CK_ULONG * len(value))(*[int(v) for v in value]))
    raise TypeError(f"cannot encode attribute value of type {type(value).__name__}")


def decode_ulong(raw: bytes) -> int:
    return CK_ULONG.from_buffer_copy(raw.ljust(ctypes.sizeof(CK_ULONG), b"\0")).value


class Template:
    """A CK_ATTRIBUTE array built from ``{attribute: value}``, with every buffer kept alive.

    Values: ``bool`` -> CK_BBOOL; ``int`` -> CK_ULONG; ``bytes``/``str`` -> the bytes (UTF-8);
    a ``list``/``tuple`` of ints -> a CK_MECHANISM_TYPE array (``CKA_ALLOWED_MECHANISMS``); a
    ``dict`` -> a nested attribute array (``CKA_UNWRAP_TEMPLATE``, ``CKA_WRAP_TEMPLATE``).
    """

    def __init__(self, attributes: dict):
        self._keep: list = []
        items = list(attributes.items())
        self.array = (CK_ATTRIBUTE * max(len(items), 1))()
        self.count = len(items)
        for slot, (attr, value) in zip(self.array, items):
            slot.type = int(attr)
            buf, length = self._encode(value)
            slot.pValue = ctypes.cast(buf, CK_VOID_P) if buf is not None else None
            slot.ulValueLen = length

    def _encode(self, value):
        if isinstance(value, dict):
            inner = Template(value)
            self._keep.append(inner)
            return inner.array, ctypes.sizeof(CK_ATTRIBUTE) * inner.count
        raw = encode_value(value)
        if not raw:
            return None, 0
        buf = ctypes.create_string_buffer(raw, len(raw))
        self._keep.append(buf)
        return buf, len(raw)


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

    def init_pin(self, so_session: int, pin: bytes) -> int:
        """C_InitPIN in an SO session: sets the user PIN without it ever touching argv."""
        return int(self._f.C_InitPIN(so_session, pin, len(pin)))

    # ---------------------------------------------------------------- objects with a policy
    def generate_key(self, session: int, mechanism: int, attributes: dict) -> tuple[int, int]:
        """C_GenerateKey; returns (CKR code, object handle)."""
        mech = CK_MECHANISM(mechanism, None, 0)
        tpl = Template(attributes)
        handle = CK_ULONG(0)
        rv = int(self._f.C_GenerateKey(session, ctypes.byref(mech), tpl.array, tpl.count,
                                       ctypes.byref(handle)))
        return rv, handle.value

    def generate_key_pair(self, session: int, mechanism: int, public: dict,
                          private: dict) -> tuple[int, int, int]:
        """C_GenerateKeyPair; returns (CKR code, public handle, private handle)."""
        mech = CK_MECHANISM(mechanism, None, 0)
        pub, priv = Template(public), Template(private)
        h_pub, h_priv = CK_ULONG(0), CK_ULONG(0)
        rv = int(self._f.C_GenerateKeyPair(session, ctypes.byref(mech), pub.array, pub.count,
                                           priv.array, priv.count, ctypes.byref(h_pub),
                                           ctypes.byref(h_priv)))
        return rv, h_pub.value, h_priv.value

    def create_object(self, session: int, attributes: dict) -> tuple[int, int]:
        tpl = Template(attributes)
        handle = CK_ULONG(0)
        rv = int(self._f.C_CreateObject(session, tpl.array, tpl.count, ctypes.byref(handle)))
        return rv, handle.value

    def copy_object(self, session: int, obj: int, attributes: dict) -> tuple[int, int]:
        tpl = Template(attributes)
        handle = CK_ULONG(0)
        rv = int(self._f.C_CopyObject(session, obj, tpl.array, tpl.count, ctypes.byref(handle)))
        return rv, handle.value

    def set_attributes(self, session: int, obj: int, attributes: dict) -> int:
        tpl = Template(attributes)
        return int(self._f.C_SetAttributeValue(session, obj, tpl.array, tpl.count))

    def destroy_object(self, session: int, obj: int) -> int:
        return int(self._f.C_DestroyObject(session, obj))

    def unwrap_key(self, session: int, mechanism: int, parameter: ctypes.Structure | None,
                   unwrapping_key: int, wrapped: bytes, attributes: dict) -> tuple[int, int]:
        """C_UnwrapKey with a full template (attribute arrays included)."""
        mech = CK_MECHANISM(mechanism, None, 0)
        if parameter is not None:
            mech.pParameter = ctypes.cast(ctypes.pointer(parameter), CK_VOID_P)
            mech.ulParameterLen = ctypes.sizeof(parameter)
        tpl = Template(attributes)
        handle = CK_ULONG(0)
        rv = int(self._f.C_UnwrapKey(session, ctypes.byref(mech), unwrapping_key, wrapped,
                                     len(wrapped), tpl.array, tpl.count, ctypes.byref(handle)))
        return rv, handle.value

    def wrap_key(self, session: int, mechanism: int, parameter: ctypes.Structure | None,
                 wrapping_key: int, key: int) -> tuple[int, bytes | None]:
        """C_WrapKey with a parameter struct python-pkcs11 0.10 cannot build (OAEP with a
        chosen hash, CK_RSA_AES_KEY_WRAP_PARAMS). Size query first, then the real call; the
        buffer gets 64 spare bytes because NSS under-reports some wrap lengths."""
        mech = CK_MECHANISM(mechanism, None, 0)
        if parameter is not None:
            mech.pParameter = ctypes.cast(ctypes.pointer(parameter), CK_VOID_P)
            mech.ulParameterLen = ctypes.sizeof(parameter)
        size = CK_ULONG(0)
        rv = int(self._f.C_WrapKey(session, ctypes.byref(mech), wrapping_key, key, None,
                                   ctypes.byref(size)))
        if rv != CKR_OK:
            return rv, None
        size.value += 64
        buf = ctypes.create_string_buffer(size.value)
        rv = int(self._f.C_WrapKey(session, ctypes.byref(mech), wrapping_key, key, buf,
                                   ctypes.byref(size)))
        return rv, buf.raw[:size.value] if rv == CKR_OK else None

    def operation_init(self, function: str, session: int, mechanism: int,
                       parameter: ctypes.Structure | None, key: int) -> int:
        """``C_EncryptInit``, ``C_DecryptInit`` or ``C_SignInit``: where a token decides whether
        a key may be used with a mechanism (the tests use it the way an attacker would, past
        python-pkcs11's own usage checks)."""
        if function not in ("C_EncryptInit", "C_DecryptInit", "C_SignInit"):
            raise ValueError(function)
        mech = CK_MECHANISM(mechanism, None, 0)
        if parameter is not None:
            mech.pParameter = ctypes.cast(ctypes.pointer(parameter), CK_VOID_P)
            mech.ulParameterLen = ctypes.sizeof(parameter)
        return int(getattr(self._f, function)(session, ctypes.byref(mech), key))

    def one_shot(self, function: str, session: int, data: bytes,
                 out_max: int = 8192) -> tuple[int, bytes | None]:
        """``C_Sign``, ``C_Encrypt`` or ``C_Decrypt`` after its *Init: (CKR code, output)."""
        if function not in ("C_Sign", "C_Encrypt", "C_Decrypt"):
            raise ValueError(function)
        out = ctypes.create_string_buffer(out_max)
        n = CK_ULONG(out_max)
        rv = int(getattr(self._f, function)(session, data, len(data), out, ctypes.byref(n)))
        return rv, out.raw[:n.value] if rv == CKR_OK else None

    def digest_key(self, session: int, mechanism: int, key: int) -> tuple[int, bytes | None]:
        """C_DigestInit + C_DigestKey + C_DigestFinal: a hash of a key's value computed in the
        token (the value itself is not returned)."""
        mech = CK_MECHANISM(mechanism, None, 0)
        rv = int(self._f.C_DigestInit(session, ctypes.byref(mech)))
        if rv != CKR_OK:
            return rv, None
        rv = int(self._f.C_DigestKey(session, key))
        out = ctypes.create_string_buffer(64)
        n = CK_ULONG(64)
        final = int(self._f.C_DigestFinal(session, out, ctypes.byref(n)))  # also ends the op
        if rv != CKR_OK:
            return rv, None
        return final, out.raw[:n.value] if final == CKR_OK else None

    def get_attribute(self, session: int, obj: int, attr: int) -> tuple[int, bytes | None]:
        """One attribute's raw bytes (None if the token says it is unavailable)."""
        probe = (CK_ATTRIBUTE * 1)()
        probe[0].type = attr
        rv = int(self._f.C_GetAttributeValue(session, obj, probe, 1))
        if rv != CKR_OK or probe[0].ulValueLen == CK_UNAVAILABLE_INFORMATION:
            return rv, None
        buf = ctypes.create_string_buffer(max(probe[0].ulValueLen, 1))
        probe[0].pValue = ctypes.cast(buf, CK_VOID_P)
        rv = int(self._f.C_GetAttributeValue(session, obj, probe, 1))
        return rv, buf.raw[:probe[0].ulValueLen] if rv == CKR_OK else None

    def get_scalars(self, session: int, obj: int, attrs: list[int]) -> dict[int, bytes | None]:
        """Several fixed-size attributes (booleans, CK_ULONGs) in ONE C_GetAttributeValue: each
        gets a CK_ULONG-sized buffer. An attribute the object lacks (or keeps sensitive) comes
        back as None; PKCS#11 v2.40 §5.7 has the token fill in all the others regardless of the
        error it returns for that one."""
        n = len(attrs)
        arr = (CK_ATTRIBUTE * n)()
        bufs = [ctypes.create_string_buffer(ctypes.sizeof(CK_ULONG)) for _ in attrs]
        for slot, attr, buf in zip(arr, attrs, bufs):
            slot.type, slot.pValue = attr, ctypes.cast(buf, CK_VOID_P)
            slot.ulValueLen = ctypes.sizeof(CK_ULONG)
        self._f.C_GetAttributeValue(session, obj, arr, n)
        return {attr: (None if slot.ulValueLen == CK_UNAVAILABLE_INFORMATION
                       else buf.raw[:slot.ulValueLen])
                for attr, slot, buf in zip(attrs, arr, bufs)}

    def get_mechanism_list(self, session: int, obj: int, attr: int) -> tuple[int, list | None]:
        """A CK_MECHANISM_TYPE array attribute (CKA_ALLOWED_MECHANISMS) as a list of ints."""
        rv, raw = self.get_attribute(session, obj, attr)
        if raw is None:
            return rv, None
        n = len(raw) // ctypes.sizeof(CK_ULONG)
        return rv, list((CK_ULONG * n).from_buffer_copy(raw[:n * ctypes.sizeof(CK_ULONG)]))

    def get_template(self, session: int, obj: int, attr: int) -> tuple[int, dict | None]:
        """An attribute-array attribute (CKA_UNWRAP_TEMPLATE) as ``{type: raw bytes}``.

        Three calls, as PKCS#11 v2.40 §4.1 describes for arrays: the array size, then each
        element's type and length, then the values into buffers we allocate."""
        probe = (CK_ATTRIBUTE * 1)()
        probe[0].type = attr
        rv = int(self._f.C_GetAttributeValue(session, obj, probe, 1))
        if rv != CKR_OK or probe[0].ulValueLen == CK_UNAVAILABLE_INFORMATION:
            return rv, None
        n = probe[0].ulValueLen // ctypes.sizeof(CK_ATTRIBUTE)
        if n == 0:
            return rv, {}
        inner = (CK_ATTRIBUTE * n)()
        probe[0].pValue = ctypes.cast(inner, CK_VOID_P)
        rv = int(self._f.C_GetAttributeValue(session, obj, probe, 1))
        if rv != CKR_OK:
            return rv, None
        bufs = []
        for element in inner:
            buf = ctypes.create_string_buffer(max(element.ulValueLen, 1))
            bufs.append(buf)
            element.pValue = ctypes.cast(buf, CK_VOID_P)
        rv = int(self._f.C_GetAttributeValue(session, obj, probe, 1))
        if rv != CKR_OK:
            return rv, None
        return rv, {int(e.type): b.raw[:e.ulValueLen] for e, b in zip(inner, bufs)}

    def logout(self, handle: int) -> int:
        return int(self._f.C_Logout(handle))

    def close_session(self, handle: int) -> int:
        return int(self._f.C_CloseSession(handle))

    def close_all_sessions(self, slot_id: int) -> int:
        return int(self._f.C_CloseAllSessions(slot_id))
