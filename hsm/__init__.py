"""The PKCS#11 driver layer: the only package of this project that imports ``pkcs11``.

Entry points: :class:`hsm.token.Token` (open a token, login once, pooled sessions),
:mod:`hsm.ops` (operations by key label), :mod:`hsm.provision` (primary/regional HSMs),
:mod:`hsm.profile` (what a token can do), :mod:`hsm.testing` (pytest fixtures).
"""
