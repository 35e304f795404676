"""The driver core: everything between a caller and the PKCS#11 module, and nothing about keys.

Bottom up: :mod:`._cryptoki` (the ctypes route for what python-pkcs11 cannot say),
:mod:`.errors` (CKR codes to the token's errors), :mod:`.module` (one load per process with
OS-locking ``C_Initialize``, re-initialised after fork), :mod:`.softhsm` and :mod:`.nss` (the two
modules' set-up and quirks), :mod:`.pin` and :mod:`.uri` (PIN sources, RFC 7512 URIs),
:mod:`.token` (one login per token, pooled sessions, recovery of lost ones), :mod:`.profile`
(what the token really does and enforces) and :mod:`.ops` (operations by key label).
"""
