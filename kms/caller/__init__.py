"""The encryption-service side: what a service that encrypts fields runs, apart from any node.

``sdk`` (``FieldEncryptor``: AES-256-GCM under a versioned header) and ``client``
(``KmsClient`` over mTLS, ``RemoteKeyProvider`` with its encrypted cache). Token-free: nothing
here imports ``hsm`` or ``pkcs11`` (tests/test_token_free.py).
"""
