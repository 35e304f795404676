"""Project exceptions: every token failure names the operation, token, object and CKR code.

python-pkcs11 raises one exception class per CKR code but drops the numeric code; we map the class
back to its CKR name and value so a message is something an operator can look up. PINs are never
passed to these constructors: messages are built from labels and codes only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pkcs11.exceptions as p11x

from suite import errors as _suite
from suite.errors import SuiteError  # the base of every error: re-exported at its old path

# CKR codes (PKCS#11 v2.40 §11.1) for the python-pkcs11 exception classes.
CKR_BY_EXCEPTION: dict[type, tuple[str, int]] = {
    p11x.AttributeTypeInvalid: ("CKR_ATTRIBUTE_TYPE_INVALID", 0x12),
    p11x.AttributeValueInvalid: ("CKR_ATTRIBUTE_VALUE_INVALID", 0x13),
    p11x.AttributeReadOnly: ("CKR_ATTRIBUTE_READ_ONLY", 0x10),
    p11x.AttributeSensitive: ("CKR_ATTRIBUTE_SENSITIVE", 0x11),
    p11x.ArgumentsBad: ("CKR_ARGUMENTS_BAD", 0x7),
    p11x.DataInvalid: ("CKR_DATA_INVALID", 0x20),
    p11x.DataLenRange: ("CKR_DATA_LEN_RANGE", 0x21),
    p11x.DomainParamsInvalid: ("CKR_DOMAIN_PARAMS_INVALID", 0x130),
    p11x.DeviceError: ("CKR_DEVICE_ERROR", 0x30),
    p11x.DeviceMemory: ("CKR_DEVICE_MEMORY", 0x31),
    p11x.DeviceRemoved: ("CKR_DEVICE_REMOVED", 0x32),
    p11x.EncryptedDataInvalid: ("CKR_ENCRYPTED_DATA_INVALID", 0x40),
    p11x.EncryptedDataLenRange: ("CKR_ENCRYPTED_DATA_LEN_RANGE", 0x41),
    p11x.FunctionCancelled: ("CKR_FUNCTION_CANCELED", 0x50),
    p11x.FunctionFailed: ("CKR_FUNCTION_FAILED", 0x6),
    p11x.FunctionRejected: ("CKR_FUNCTION_REJECTED", 0x200),
    p11x.FunctionNotSupported: ("CKR_FUNCTION_NOT_SUPPORTED", 0x54),
    p11x.KeyHandleInvalid: ("CKR_KEY_HANDLE_INVALID", 0x60),
    p11x.KeyIndigestible: ("CKR_KEY_INDIGESTIBLE", 0x67),
    p11x.KeyNeeded: ("CKR_KEY_NEEDED", 0x66),
    p11x.KeyNotNeeded: ("CKR_KEY_NOT_NEEDED", 0x64),
    p11x.KeySizeRange: ("CKR_KEY_SIZE_RANGE", 0x62),
    p11x.KeyNotWrappable: ("CKR_KEY_NOT_WRAPPABLE", 0x69),
    p11x.KeyTypeInconsistent: ("CKR_KEY_TYPE_INCONSISTENT", 0x63),
    p11x.KeyUnextractable: ("CKR_KEY_UNEXTRACTABLE", 0x6A),
    p11x.GeneralError: ("CKR_GENERAL_ERROR", 0x5),
    p11x.HostMemory: ("CKR_HOST_MEMORY", 0x2),
    p11x.MechanismInvalid: ("CKR_MECHANISM_INVALID", 0x70),
    p11x.MechanismParamInvalid: ("CKR_MECHANISM_PARAM_INVALID", 0x71),
    p11x.ObjectHandleInvalid: ("CKR_OBJECT_HANDLE_INVALID", 0x82),
    p11x.OperationActive: ("CKR_OPERATION_ACTIVE", 0x90),
    p11x.OperationNotInitialized: ("CKR_OPERATION_NOT_INITIALIZED", 0x91),
    p11x.PinExpired: ("CKR_PIN_EXPIRED", 0xA3),
    p11x.PinIncorrect: ("CKR_PIN_INCORRECT", 0xA0),
    p11x.PinInvalid: ("CKR_PIN_INVALID", 0xA1),
    p11x.PinLenRange: ("CKR_PIN_LEN_RANGE", 0xA2),
    p11x.PinLocked: ("CKR_PIN_LOCKED", 0xA4),
    p11x.PublicKeyInvalid: ("CKR_PUBLIC_KEY_INVALID", 0x1B9),
    p11x.RandomNoRNG: ("CKR_RANDOM_NO_RNG", 0x121),
    p11x.SessionClosed: ("CKR_SESSION_CLOSED", 0xB0),
    p11x.SessionCount: ("CKR_SESSION_COUNT", 0xB1),
    p11x.SessionHandleInvalid: ("CKR_SESSION_HANDLE_INVALID", 0xB3),
    p11x.SessionReadOnly: ("CKR_SESSION_READ_ONLY", 0xB5),
    p11x.SessionExists: ("CKR_SESSION_EXISTS", 0xB6),
    p11x.SessionReadOnlyExists: ("CKR_SESSION_READ_ONLY_EXISTS", 0xB7),
    p11x.SessionReadWriteSOExists: ("CKR_SESSION_READ_WRITE_SO_EXISTS", 0xB8),
    p11x.SignatureInvalid: ("CKR_SIGNATURE_INVALID", 0xC0),
    p11x.SignatureLenRange: ("CKR_SIGNATURE_LEN_RANGE", 0xC1),
    p11x.TemplateIncomplete: ("CKR_TEMPLATE_INCOMPLETE", 0xD0),
    p11x.TemplateInconsistent: ("CKR_TEMPLATE_INCONSISTENT", 0xD1),
    p11x.SlotIDInvalid: ("CKR_SLOT_ID_INVALID", 0x3),
    p11x.TokenNotPresent: ("CKR_TOKEN_NOT_PRESENT", 0xE0),
    p11x.TokenNotRecognised: ("CKR_TOKEN_NOT_RECOGNIZED", 0xE1),
    p11x.TokenWriteProtected: ("CKR_TOKEN_WRITE_PROTECTED", 0xE2),
    p11x.UnwrappingKeyHandleInvalid: ("CKR_UNWRAPPING_KEY_HANDLE_INVALID", 0xF0),
    p11x.UnwrappingKeySizeRange: ("CKR_UNWRAPPING_KEY_SIZE_RANGE", 0xF1),
    p11x.UnwrappingKeyTypeInconsistent: ("CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT", 0xF2),
    p11x.UserAlreadyLoggedIn: ("CKR_USER_ALREADY_LOGGED_IN", 0x100),
    p11x.UserNotLoggedIn: ("CKR_USER_NOT_LOGGED_IN", 0x101),
    p11x.UserPinNotInitialized: ("CKR_USER_PIN_NOT_INITIALIZED", 0x102),
    p11x.AnotherUserAlreadyLoggedIn: ("CKR_USER_ANOTHER_ALREADY_LOGGED_IN", 0x104),
    p11x.UserTooManyTypes: ("CKR_USER_TOO_MANY_TYPES", 0x105),
    p11x.WrappedKeyInvalid: ("CKR_WRAPPED_KEY_INVALID", 0x110),
    p11x.WrappedKeyLenRange: ("CKR_WRAPPED_KEY_LEN_RANGE", 0x112),
    p11x.WrappingKeyHandleInvalid: ("CKR_WRAPPING_KEY_HANDLE_INVALID", 0x113),
    p11x.WrappingKeySizeRange: ("CKR_WRAPPING_KEY_SIZE_RANGE", 0x114),
    p11x.WrappingKeyTypeInconsistent: ("CKR_WRAPPING_KEY_TYPE_INCONSISTENT", 0x115),
}

# Exceptions that mean "this session is gone, open another" rather than "this operation failed".
SESSION_LOST = (p11x.SessionHandleInvalid, p11x.SessionClosed, p11x.UserNotLoggedIn,
                p11x.DeviceRemoved)

# Exceptions that may only mean a cached object handle is stale.
STALE_HANDLE = (p11x.ObjectHandleInvalid, p11x.KeyHandleInvalid)

_HINTS = {
    "CKR_PIN_INCORRECT": "the PIN is wrong; check where it came from (the command's PIN source, "
                         "HSM_PIN_<LABEL> or HSM_PIN; for the SO: HSM_SO_PIN_<LABEL> or "
                         "HSM_SO_PIN) - each failure counts towards the token's lock-out",
    "CKR_PIN_LOCKED": "the PIN is locked after too many failures; the security officer must "
                      "reset it (softhsm2-util cannot unlock: re-initialise a SoftHSM2 token)",
    "CKR_USER_PIN_NOT_INITIALIZED": "the user PIN was never set; initialise the token with "
                                    "`hsm init-token`",
    "CKR_MECHANISM_INVALID": "the token does not offer this mechanism; `hsm info --token LABEL` "
                             "lists what it does offer",
    "CKR_MECHANISM_PARAM_INVALID": "the token rejects these mechanism parameters; "
                                   "`hsm info --token LABEL` shows the supported variants",
    "CKR_ARGUMENTS_BAD": "the token rejected the arguments (often unsupported mechanism "
                         "parameters such as an OAEP hash); see `hsm info --token LABEL`",
    "CKR_KEY_NOT_WRAPPABLE": "the key may only be wrapped by a trusted key (CKA_WRAP_WITH_TRUSTED)",
    "CKR_KEY_UNEXTRACTABLE": "the key is not extractable",
    "CKR_TOKEN_WRITE_PROTECTED": "the token is write-protected",
    "CKR_SESSION_READ_ONLY": "a read-write session is needed",
    "CKR_ACTION_PROHIBITED": "the object's policy forbids this (CKA_MODIFIABLE, CKA_COPYABLE or "
                             "CKA_DESTROYABLE is false)",
    "CKR_TEMPLATE_INCONSISTENT": "the template contradicts the key's policy (for an unwrap: the "
                                 "unwrapping key's CKA_UNWRAP_TEMPLATE)",
}


class HsmError(SuiteError):
    """An error of the hsm layer: a token, module, PIN or key failed, or bad input reached it.
    The message names the operation, token, object and CKR code where there is one."""

    def __init__(self, message: str, *, operation: str | None = None, token: str | None = None,
                 object_label: str | None = None, ckr: str | None = None,
                 ckr_value: int | None = None, hint: str | None = None):
        self.operation = operation
        self.token = token
        self.object_label = object_label
        self.ckr = ckr
        self.ckr_value = ckr_value
        where = []
        if operation:
            where.append(f"operation={operation}")
        if token:
            where.append(f"token={token!r}")
        if object_label:
            where.append(f"object={object_label!r}")
        if ckr:
            where.append(f"{ckr} (0x{ckr_value:x})" if ckr_value is not None else ckr)
        super().__init__(f"{message} [{', '.join(where)}]" if where else message, hint=hint)


class TokenNotFound(HsmError):
    pass


class ModuleLoadError(HsmError):
    pass


class PinError(HsmError):
    """Wrong, locked or unavailable PIN."""


class MechanismUnsupported(HsmError):
    pass


class ObjectExists(HsmError):
    pass


class ObjectNotFound(HsmError):
    pass


class KeyPolicyViolation(HsmError):
    """A key read back from the token does not have the attributes its role requires."""


class DecryptionFailed(HsmError):
    """An authenticated decryption (AES-GCM) was refused: wrong key, altered ciphertext, tag or
    associated data."""


class SessionLost(HsmError):
    """The token kept reporting the session invalid after the bounded number of retries."""


class UsageError(HsmError, _suite.UsageError):
    """Bad input for the token layer (malformed URI, bad file, unusable parameter), detected
    before a token is touched: an :class:`HsmError` and a :class:`suite.errors.UsageError`
    (hence a ``ValueError`` too, like every misuse error of the suite)."""


def _class_for(ckr: str) -> type[HsmError]:
    if ckr in ("CKR_PIN_INCORRECT", "CKR_PIN_LOCKED", "CKR_PIN_INVALID", "CKR_PIN_LEN_RANGE",
               "CKR_PIN_EXPIRED", "CKR_USER_PIN_NOT_INITIALIZED"):
        return PinError
    if ckr in ("CKR_MECHANISM_INVALID", "CKR_MECHANISM_PARAM_INVALID"):
        return MechanismUnsupported
    if ckr in ("CKR_SESSION_HANDLE_INVALID", "CKR_SESSION_CLOSED"):
        return SessionLost
    return HsmError


# Codes python-pkcs11 0.10 has no exception class for (PKCS#11 v2.40 values).
_EXTRA_CKR = {"CKR_ACTION_PROHIBITED": 0x1B, "CKR_KEY_FUNCTION_NOT_PERMITTED": 0x68}
CKR_BY_VALUE = {value: name for name, value in [*CKR_BY_EXCEPTION.values(), *_EXTRA_CKR.items()]}
_EXCEPTION_BY_VALUE = {value: klass for klass, (_, value) in CKR_BY_EXCEPTION.items()}


class RawCallFailed(p11x.PKCS11Error):
    """A ctypes Cryptoki call (hsm.core._cryptoki) returned a code python-pkcs11 has no class for."""

    def __init__(self, rv: int):
        super().__init__(CKR_BY_VALUE.get(rv, f"CKR 0x{rv:x}"))
        self.rv = rv


def check_rv(rv: int) -> None:
    """Raise for a failed ctypes call the way python-pkcs11 would, so :meth:`Token.run` retries
    a lost session and :func:`from_pkcs11` names the code, whichever route made the call."""
    if rv == 0:
        return
    klass = _EXCEPTION_BY_VALUE.get(rv)
    raise klass() if klass is not None else RawCallFailed(rv)


def from_rv(rv: int, *, operation: str, token: str | None = None,
            object_label: str | None = None, hint: str | None = None) -> HsmError:
    """The project exception for a raw CKR value returned by a ctypes call."""
    ckr = CKR_BY_VALUE.get(rv, f"CKR 0x{rv:x}")
    return _class_for(ckr)(f"{operation} failed", operation=operation, token=token,
                           object_label=object_label, ckr=ckr, ckr_value=rv,
                           hint=hint or _HINTS.get(ckr))


def from_pkcs11(exc: BaseException, *, operation: str, token: str | None = None,
                object_label: str | None = None, hint: str | None = None) -> HsmError:
    """Turn a python-pkcs11 exception into the project exception with its CKR code and a hint."""
    ckr, value = None, None
    if isinstance(exc, RawCallFailed):
        ckr, value = CKR_BY_VALUE.get(exc.rv, f"CKR 0x{exc.rv:x}"), exc.rv
    elif type(exc) is p11x.PKCS11Error and str(exc).startswith("Unmapped error code 0x"):
        # python-pkcs11 0.10 has no class for some codes (CKR_ACTION_PROHIBITED among them).
        value = int(str(exc).rsplit("0x", 1)[1], 16)
        ckr = CKR_BY_VALUE.get(value, f"CKR 0x{value:x}")
        exc = p11x.PKCS11Error("")
    for klass in () if ckr else type(exc).__mro__:
        if klass in CKR_BY_EXCEPTION:
            ckr, value = CKR_BY_EXCEPTION[klass]
            break
    detail = str(exc).strip()
    message = f"{operation} failed" + (f": {detail}" if detail else "")
    if ckr is None:
        return HsmError(message, operation=operation, token=token, object_label=object_label,
                        hint=hint)
    return _class_for(ckr)(message, operation=operation, token=token,
                           object_label=object_label, ckr=ckr, ckr_value=value,
                           hint=hint or _HINTS.get(ckr))


@contextlib.contextmanager
def translated(operation: str, token: str | None = None,
               object_label: str | None = None) -> Iterator[None]:
    """Re-raise python-pkcs11 errors inside the block as HsmError naming the operation."""
    try:
        yield
    except p11x.PKCS11Error as exc:
        raise from_pkcs11(exc, operation=operation, token=token,
                          object_label=object_label) from exc
