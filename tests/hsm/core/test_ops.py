"""The operations layer on both tokens (SoftHSM2 and NSS softokn), checked against host crypto."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from hsm.core import ops
from hsm.core.errors import DecryptionFailed, HsmError
from hsm.core.token import KeyRef
from hsm.keys import x509 as certs
from hsm.testing import require_mechanism, unique_label


def _import_secret(token, label, key_type, value, capabilities):
    """Import known key material (test only) so results can be compared with host crypto."""
    tpl = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: key_type,
           Attribute.VALUE: value, Attribute.LABEL: label, Attribute.TOKEN: False,
           Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True}
    for flag, attr in ((MechanismFlag.SIGN, Attribute.SIGN), (MechanismFlag.ENCRYPT,
                       Attribute.ENCRYPT), (MechanismFlag.DECRYPT, Attribute.DECRYPT),
                       (MechanismFlag.WRAP, Attribute.WRAP), (MechanismFlag.UNWRAP,
                       Attribute.UNWRAP)):
        tpl[attr] = bool(capabilities & flag)
    token.run_on_anchor("C_CreateObject", lambda lease: lease.session.create_object(tpl), label)
    return ops.secret(label)


def test_hmac_matches_the_host(hsm_token):
    require_mechanism(hsm_token, Mechanism.SHA256_HMAC)
    token, value = hsm_token.token, os.urandom(32)
    ref = _import_secret(token, unique_label("mac"), KeyType.GENERIC_SECRET, value,
                         MechanismFlag.SIGN)
    assert ops.hmac_sha256(token, ref, b"data") == hmac.new(value, b"data", hashlib.sha256).digest()


def test_aes_gcm_round_trip_and_host_interop(hsm_token):
    require_mechanism(hsm_token, Mechanism.AES_GCM)
    token, value = hsm_token.token, os.urandom(32)
    ref = _import_secret(token, unique_label("gcm"), KeyType.AES, value,
                         MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT)
    nonce = os.urandom(12)
    host_ct = AESGCM(value).encrypt(nonce, b"secret field", b"tenant-1")
    assert ops.aes_gcm_decrypt(token, ref, nonce, host_ct, aad=b"tenant-1") == b"secret field"
    with pytest.raises(DecryptionFailed):  # a wrong AAD must fail authentication
        ops.aes_gcm_decrypt(token, ref, nonce, host_ct, aad=b"tenant-2")
    if hsm_token.backend == "nss":
        # NSS 3.87 under-reports the C_Encrypt(AES_GCM) output length (the tag is left out),
        # and python-pkcs11 0.10 then fails with "Buffer was too small"; see docs/tokens.md.
        with pytest.raises(HsmError, match="Buffer was too small") as info:
            ops.aes_gcm_encrypt(token, ref, nonce, b"secret field", aad=b"tenant-1")
        assert type(info.value) is HsmError and "C_Encrypt(AES_GCM)" in str(info.value)
        return
    assert ops.aes_gcm_encrypt(token, ref, nonce, b"secret field", aad=b"tenant-1") == host_ct


def test_aes_kwp_wrap_is_rfc5649_and_unwraps_to_a_sensitive_session_object(hsm_token):
    token = hsm_token.token
    kek_value, payload_value = os.urandom(32), os.urandom(32)
    kek = _import_secret(token, unique_label("kek"), KeyType.AES, kek_value,
                         MechanismFlag.WRAP | MechanismFlag.UNWRAP)
    payload = _import_secret(token, unique_label("payload"), KeyType.AES, payload_value,
                             MechanismFlag.ENCRYPT)
    wrapped = ops.aes_wrap(token, kek, payload)
    assert wrapped.mechanism == "AES_KEY_WRAP_KWP"
    assert aes_key_unwrap_with_padding(kek_value, wrapped.data) == payload_value
    label = unique_label("unwrapped")
    ops.aes_unwrap(token, kek, wrapped.data, key_type=KeyType.AES, label=label,
                   capabilities=MechanismFlag.ENCRYPT, on_anchor=True)
    attrs = token.run("read", lambda lease: lease.key(ops.secret(label)).get_attributes(
        [Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.TOKEN]))
    assert attrs == {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                     Attribute.TOKEN: False}


def test_rsa_oaep_wrap_uses_the_strongest_hash_and_unwraps(hsm_token):
    require_mechanism(hsm_token, Mechanism.RSA_PKCS_OAEP)
    token = hsm_token.token
    label = unique_label("rsa")
    token.run_on_anchor("C_GenerateKeyPair", lambda lease: lease.session.generate_keypair(
        KeyType.RSA, 2048, label=label, store=False,
        capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP), label)
    value = os.urandom(32)
    payload = _import_secret(token, unique_label("secret"), KeyType.AES, value,
                             MechanismFlag.ENCRYPT)
    wrapped = ops.rsa_oaep_wrap(token, KeyRef(label, ObjectClass.PUBLIC_KEY), payload)
    expected_hash = "sha1" if hsm_token.backend == "softhsm2" else "sha256"
    assert wrapped.parameters["hash"] == expected_hash
    out = unique_label("oaep-out")
    ops.rsa_oaep_unwrap(token, KeyRef(label, ObjectClass.PRIVATE_KEY), wrapped,
                        key_type=KeyType.AES, label=out, capabilities=MechanismFlag.ENCRYPT,
                        on_anchor=True)
    # Same key: AES-ECB of a zero block agrees with the host.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    enc = Cipher(algorithms.AES(value), modes.ECB()).encryptor()
    want = enc.update(bytes(16)) + enc.finalize()
    got = token.run("ecb", lambda lease: lease.key(ops.secret(out)).encrypt(
        bytes(16), mechanism=Mechanism.AES_ECB))
    assert got == want


def test_ecdsa_p384_signature_verifies_on_the_host(hsm_token):
    require_mechanism(hsm_token, Mechanism.ECDSA)
    token = hsm_token.token
    label = unique_label("ec")
    from pkcs11.util.ec import encode_named_curve_parameters

    def gen(lease):
        params = lease.session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp384r1")},
            local=True)
        return params.generate_keypair(store=False, label=label)
    token.run_on_anchor("C_GenerateKeyPair", gen, label)
    sig = ops.sign(token, KeyRef(label, ObjectClass.PRIVATE_KEY), "ecdsa-sha384", b"tbs")
    spki = certs.public_key_info(token, KeyRef(label, ObjectClass.PUBLIC_KEY))
    pub = serialization.load_der_public_key(spki.dump())
    from cryptography.hazmat.primitives.asymmetric import ec
    pub.verify(sig, b"tbs", ec.ECDSA(hashes.SHA384()))  # raises if the signature is wrong
    with pytest.raises(InvalidSignature):
        pub.verify(sig, b"other", ec.ECDSA(hashes.SHA384()))


def test_profile_records_the_backend_differences(hsm_token):
    prof = hsm_token.token.profile
    if hsm_token.backend == "softhsm2":
        assert prof.oaep_hashes == ["sha1"] and prof.aes_kwp == 0x210A
        assert not prof.hkdf and not prof.pbkdf2
    else:
        assert "sha256" in prof.oaep_hashes and prof.aes_kwp == 0x210B
        assert prof.pbkdf2 and prof.kwp_length_query_short
    assert prof.oaep_choice()[0] == ("sha1" if hsm_token.backend == "softhsm2" else "sha256")


def test_profile_reports_key_policy_enforcement(hsm_token):
    """Probed on throw-away session objects: SoftHSM2 2.6.1 enforces every part of the key
    policy; NSS softokn 3.87 keeps CKA_MODIFIABLE but not CKA_ALLOWED_MECHANISMS or
    CKA_DESTROYABLE, so it is refused for production keys."""
    prof = hsm_token.token.profile
    if hsm_token.backend == "softhsm2":
        assert (prof.unwrap_template_enforced, prof.allowed_mechanisms_enforced,
                prof.modifiable_enforced, prof.destroyable_enforced,
                prof.trusted_wrap_enforced) == (True, True, True, True, True)
        assert prof.missing_enforcement() == []
    else:
        assert prof.modifiable_enforced is True
        assert prof.allowed_mechanisms_enforced is False
        assert prof.destroyable_enforced is not True
        assert {"CKA_ALLOWED_MECHANISMS", "CKA_DESTROYABLE"} <= set(prof.missing_enforcement())
    # The probe leaves nothing behind, not even its non-destroyable data object.
    left = hsm_token.token.run("find", lambda lease: [
        o for o in lease.session.get_objects({}) if
        str(o[Attribute.LABEL]).startswith("hsm-suite-policy-probe")])
    assert left == []
