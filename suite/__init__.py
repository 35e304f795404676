"""What every package of the suite shares and none needs a token for: the error base
(:mod:`suite.errors`), the strict TOML reader (:mod:`suite.tomlfile`), create-only file writes
(:mod:`suite.files`), fingerprints for officers to read aloud (:mod:`suite.fingerprint`), the
signature algorithm identifiers of certificates and bundles (:mod:`suite.signatures`) and the
commands' shared error handling (:mod:`suite.cli`).

It imports no ``pkcs11`` and nothing of ``hsm``, so an encryption service that imports only the
SDK (``kms.caller.sdk``) or the client (``kms.caller.client``), or a verifier that reads bundles
(``release``),
never loads the token layer and installs without python-pkcs11 (``tests/test_token_free.py``).
``hsm`` keeps these modules at their old paths (``hsm.errors.SuiteError``, ``hsm.tomlfile``,
``hsm.files``, ``hsm.fingerprint``, ``hsm.cliutil``: :mod:`hsm._old_paths`) until the next release.
"""
