"""The SHA-256 variants of the cloud formats on NSS softokn, the token here that does RSA-OAEP
with SHA-256 (SoftHSM2 2.6.1 refuses them: test_export)."""

from __future__ import annotations

import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsm.cloud import providers, wrap
from hsm.core.token import KeyRef
from hsm.testing import unique_label
from tests import cloud_kit as ck

SHA256_DIRECT = [(p.name, a.name) for p in providers.PROVIDERS.values() for a in p.algorithms
                 if a.hash == "sha256" and not a.rsa_aes]
SHA256_RSA_AES = [(p.name, a.name) for p in providers.PROVIDERS.values() for a in p.algorithms
                  if a.hash == "sha256" and a.rsa_aes]


def _objects(token, bits: int, private_key):
    """An extractable AES key and the provider's RSA public key as session objects (NSS has
    no SO, so neither can carry CKA_TRUSTED / CKA_WRAP_WITH_TRUSTED meaningfully)."""
    numbers = private_key.public_key().public_numbers()
    key_label, pub_label = unique_label("cloud-nss-key"), unique_label("cloud-nss-import")

    def make(lease):
        lease.session.generate_key(KeyType.AES, 256, label=key_label, store=False, template={
            Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True, Attribute.SIGN: True})
        lease.session.create_object({
            Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.TOKEN: False, Attribute.WRAP: True, Attribute.ENCRYPT: True,
            Attribute.LABEL: pub_label,
            Attribute.MODULUS: numbers.n.to_bytes(bits // 8, "big"),
            Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01"})
    token.run_on_anchor("setup", make)
    return KeyRef(key_label, ObjectClass.SECRET_KEY), KeyRef(pub_label, ObjectClass.PUBLIC_KEY)


@pytest.mark.parametrize("provider,algorithm", SHA256_DIRECT, ids=[a for _, a in SHA256_DIRECT])
def test_oaep_sha256_wrap_in_nss_unwraps_at_the_provider(nss_token, provider, algorithm):
    token = nss_token.token
    assert "sha256" in token.profile.oaep_hashes
    alg = providers.provider(provider).algorithm(algorithm, token.profile.oaep_hashes)
    bits = alg.rsa_bits or 2048
    priv = ck.new_rsa(bits)
    key, importer = _objects(token, bits, priv)
    wrapped = wrap.oaep(token, importer, key, "sha256")
    value = ck.provider_unwrap(priv, wrapped, "sha256", rsa_aes=False)
    kcv = token.run("cmac", lambda lease: lease.key(key).sign(bytes(16),
                                                               mechanism=Mechanism.AES_CMAC))
    assert ck.kcv(value) == kcv[:5].hex()


@pytest.mark.parametrize("provider,algorithm", SHA256_RSA_AES, ids=[a for _, a in SHA256_RSA_AES])
def test_rsa_aes_sha256_wraps_in_nss_unwrap_at_the_provider(nss_token, provider, algorithm):
    """The two in-token wraps of the composed route (KWP under an ephemeral AES-256 key, then
    OAEP-SHA-256 of it) with SHA-256. NSS has no security officer, so here the ephemeral key is
    the user's own and not CKA_TRUSTED: NSS enforces no trusted wrap, which is also why
    `cloud-key create` refuses NSS (the check below); the SO step is SoftHSM2's
    (test_export)."""
    token = nss_token.token
    assert "CKA_WRAP_WITH_TRUSTED" in token.profile.missing_enforcement()
    alg = providers.provider(provider).algorithm(algorithm, token.profile.oaep_hashes)
    bits = alg.rsa_bits or 4096
    priv = ck.new_rsa(bits)
    key, importer = _objects(token, bits, priv)
    kwp = token.profile.aes_kwp
    eph_label = unique_label("cloud-nss-ephemeral")

    def make(lease):
        return lease.session.generate_key(KeyType.AES, 256, label=eph_label, store=False,
                                          template={Attribute.EXTRACTABLE: True,
                                                    Attribute.SENSITIVE: True,
                                                    Attribute.WRAP: True}).handle
    ephemeral = token.run_on_anchor("ephemeral", make)
    wrapped = token.run("wrap twice", wrap._wrap_twice, key.label, token.module.raw, importer,
                        key, ephemeral, "sha256", kwp)
    assert len(wrapped) == bits // 8 + 40
    value = ck.provider_unwrap(priv, wrapped, "sha256", rsa_aes=True)
    kcv = token.run("cmac", lambda lease: lease.key(key).sign(bytes(16),
                                                               mechanism=Mechanism.AES_CMAC))
    assert ck.kcv(value) == kcv[:5].hex()
