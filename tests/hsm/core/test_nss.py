"""NSS softokn as a second backend: loading, login, the operations the layer needs, its quirks.

All against the real libsoftokn3.so (the session's ``nss_token``) and real SoftHSM2 tokens; no
mocks. The NSS token is shared by the whole session, so every token object gets a unique label.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import (InvalidUnwrap, aes_key_unwrap_with_padding,
                                                    aes_key_wrap_with_padding)
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from hsm.core import module as modules
from hsm.core import nss
from hsm.core.errors import HsmError, ModuleLoadError, PinError
from hsm.core.pin import Pin
from hsm.core.token import KeyRef, Lease, Token
from hsm.testing import TestToken, require_mechanism, unique_label
from tests.helpers import run_threads

OAEP_SHA256 = (Mechanism.SHA256, MGF.SHA256, None)
WRAP_CAPS = (MechanismFlag.WRAP | MechanismFlag.UNWRAP | MechanismFlag.ENCRYPT
             | MechanismFlag.DECRYPT)


def _import_aes(lease: Lease, value: bytes, attrs: dict) -> pkcs11.SecretKey:
    """A session AES key with a value we know, so results can be checked off-token."""
    return lease.session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: False, Attribute.VALUE: value, **attrs})


# ------------------------------------------------------------------ loading and login
def test_module_loads_through_the_layer_with_its_parameter_string(nss_token: TestToken) -> None:
    params = nss_token.parameters
    assert params is not None and params.startswith("configdir='sql:/")
    mod = modules.load(nss.MODULE_PATH, params)
    assert mod.parameters == params
    assert "NSS" in mod.description
    labels = {slot.get_token().label for slot in mod.lib.get_slots(token_present=True)}
    assert nss.TOKEN_LABEL in labels
    # One initialisation per process: another database in the same process is refused loudly.
    with pytest.raises(ModuleLoadError, match="already initialised"):
        modules.load(nss.MODULE_PATH, nss.parameters(Path("/nonexistent/other-db")))


def test_parameters_quote_the_directory() -> None:
    params = nss.parameters(Path("/srv/db dir/it's"))
    assert params.startswith("configdir='sql:/srv/db dir/it\\'s' ")
    assert "readOnly" not in params and "forceOpen" not in params


def test_login_right_pin_works_and_wrong_pin_is_a_pin_error(nss_token: TestToken) -> None:
    tok = nss_token.token
    assert tok.label == nss.TOKEN_LABEL
    with tok.lease() as lease:  # login is per application: a worker session shares it
        _rv, info = tok.module.raw.session_info(lease.session.handle)
        assert info.state == 3  # CKS_RW_USER_FUNCTIONS: logged in as the user
    # In this process the token is already logged in; the layer still refuses a wrong PIN.
    wrong = Pin("not-" + nss_token.user_pin.reveal())
    with pytest.raises(PinError) as caught:
        Token.open(nss.TOKEN_LABEL, module=nss.MODULE_PATH, parameters=nss_token.parameters,
                   pin=wrong)
    assert "CKR_PIN_INCORRECT" in str(caught.value)
    assert wrong.reveal() not in str(caught.value)
    assert nss_token.user_pin.reveal() not in str(caught.value)


_LOGIN_SCRIPT = r"""
import json, os, sys
from pkcs11 import KeyType, Mechanism, MechanismFlag
from hsm.core import module as modules, nss
from hsm.core.errors import PinError
from hsm.core.pin import Pin
from hsm.core.token import Token, find_token
from tests.helpers import run_threads

params, out = sys.argv[1], {}
mod = modules.load(nss.MODULE_PATH, params)
with find_token(mod, label=nss.TOKEN_LABEL).open() as probe:
    out["so_login"] = mod.raw.login(probe.handle, b"anything", 0)  # CKU_SO, nobody logged in
try:
    Token.open(nss.TOKEN_LABEL, module=nss.MODULE_PATH, parameters=params,
               pin=Pin(os.environ["NSS_TEST_WRONG_PIN"]))
    out["wrong"] = "accepted"
except PinError as exc:
    out["wrong"], out["ckr"] = str(exc), exc.ckr
tok = Token.open(nss.TOKEN_LABEL, module=nss.MODULE_PATH, parameters=params,
                 pin=Pin(os.environ["NSS_TEST_PIN"]))
out["mac_len"] = tok.run("sign", lambda lease: len(lease.session.generate_key(
    KeyType.GENERIC_SECRET, 256, capabilities=MechanismFlag.SIGN).sign(
    b"x", mechanism=Mechanism.SHA256_HMAC)))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_fresh_process_real_c_login(tmp_path: Path) -> None:
    """The real C_Login path (not the in-process registry): a fresh process, a fresh database
    at a path that needs quoting, wrong PIN first, then the right one."""
    reason = nss.missing()
    if reason:
        pytest.skip(reason)
    pin, wrong = Pin(secrets.token_hex(8)), secrets.token_hex(8)
    db = tmp_path / "db with 'quote"
    nss.create_database(db, pin)
    assert sorted(p.name for p in db.iterdir()) == ["cert9.db", "key4.db", "pkcs11.txt"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in db.iterdir())
    env = dict(os.environ, NSS_TEST_PIN=pin.reveal(), NSS_TEST_WRONG_PIN=wrong)
    proc = subprocess.run([sys.executable, "-c", _LOGIN_SCRIPT, nss.parameters(db)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ckr"] == "CKR_PIN_INCORRECT" and "CKR_PIN_INCORRECT" in out["wrong"]
    assert out["mac_len"] == 32
    assert out["so_login"] == 0x103  # CKR_USER_TYPE_INVALID: softokn has no SO role
    for secret in (pin.reveal(), wrong):
        assert secret not in proc.stdout and secret not in proc.stderr


def test_create_database_refuses_an_existing_one(tmp_path: Path) -> None:
    reason = nss.missing()
    if reason:
        pytest.skip(reason)
    nss.create_database(tmp_path, Pin("first"))
    with pytest.raises(HsmError, match="already exists"):
        nss.create_database(tmp_path, Pin("second"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pw-")]  # PIN file removed


# ------------------------------------------------------------------ operations via Token.run
def test_hmac_sha256_with_generic_secret_session_key(nss_token: TestToken) -> None:
    def op(lease: Lease) -> tuple[bytes, bytes, bool]:
        key = lease.session.generate_key(KeyType.GENERIC_SECRET, 256,
                                         capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY)
        mac = key.sign(b"message", mechanism=Mechanism.SHA256_HMAC)
        other = key.sign(b"messagf", mechanism=Mechanism.SHA256_HMAC)
        return mac, other, key.verify(b"message", mac, mechanism=Mechanism.SHA256_HMAC)

    mac, other, good = nss_token.token.run("HMAC", op)
    assert len(mac) == 32 and good and not hmac.compare_digest(mac, other)


def test_hmac_sign_only_capability_and_python_hmac_agree(nss_token: TestToken) -> None:
    value = os.urandom(32)

    def op(lease: Lease) -> bytes:
        key = lease.session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.TOKEN: False, Attribute.VALUE: value, Attribute.SIGN: True})
        return key.sign(b"abc", mechanism=Mechanism.SHA256_HMAC)

    assert nss_token.token.run("HMAC", op) == hmac.new(value, b"abc", hashlib.sha256).digest()


def test_aes256_session_key_generation(nss_token: TestToken) -> None:
    def op(lease: Lease) -> dict:
        key = lease.session.generate_key(KeyType.AES, 256)
        return {a: key[a] for a in (Attribute.VALUE_LEN, Attribute.TOKEN, Attribute.SENSITIVE)}

    attrs = nss_token.token.run("C_GenerateKey", op)
    assert attrs == {Attribute.VALUE_LEN: 32, Attribute.TOKEN: False, Attribute.SENSITIVE: True}


@pytest.mark.parametrize("size", [32, 16, 17])  # 17: not a multiple of 8, so KWP must pad
def test_aes_kwp_wrap_is_rfc5649_and_round_trips(nss_token: TestToken, size: int) -> None:
    require_mechanism(nss_token, Mechanism.AES_KEY_WRAP_KWP)
    kek_value, secret = os.urandom(32), os.urandom(size)

    def op(lease: Lease) -> tuple[bytes, bool]:
        kek = _import_aes(lease, kek_value, {Attribute.WRAP: True, Attribute.UNWRAP: True})
        target = lease.session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.TOKEN: False, Attribute.VALUE: secret, Attribute.EXTRACTABLE: True,
            Attribute.SIGN: True})
        wrapped = nss.wrap_key_kwp(lease.session, kek, target)
        back = kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, wrapped,
                              mechanism=Mechanism.AES_KEY_WRAP_KWP,
                              template={Attribute.SIGN: True, Attribute.TOKEN: False})
        same = (back.sign(b"m", mechanism=Mechanism.SHA256_HMAC)
                == target.sign(b"m", mechanism=Mechanism.SHA256_HMAC))
        return wrapped, same

    wrapped, same = nss_token.token.run("C_WrapKey", op)
    assert wrapped == aes_key_wrap_with_padding(kek_value, secret)  # RFC 5649, byte for byte
    assert aes_key_unwrap_with_padding(kek_value, wrapped) == secret
    assert same


def test_aes_kwp_unwrap_of_an_off_token_blob(nss_token: TestToken) -> None:
    kek_value, secret = os.urandom(32), os.urandom(32)
    blob = aes_key_wrap_with_padding(kek_value, secret)

    def op(lease: Lease) -> bytes:
        kek = _import_aes(lease, kek_value, {Attribute.UNWRAP: True})
        key = kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, blob,
                             mechanism=Mechanism.AES_KEY_WRAP_KWP,
                             template={Attribute.SIGN: True, Attribute.TOKEN: False})
        return key.sign(b"m", mechanism=Mechanism.SHA256_HMAC)

    expected = hmac.new(secret, b"m", hashlib.sha256).digest()
    assert nss_token.token.run("C_UnwrapKey", op) == expected


def test_rsa_oaep_sha256_encrypt_and_wrap(nss_token: TestToken) -> None:
    plain = os.urandom(32)

    def op(lease: Lease) -> tuple[bytes, bytes, int, bytes]:
        pub, priv = lease.session.generate_keypair(KeyType.RSA, 2048)
        ours = pub.encrypt(plain, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_SHA256)
        # Encrypt off-token with SHA-256/MGF1-SHA-256: proves the token really uses SHA-256.
        numbers = rsa.RSAPublicNumbers(int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
                                       int.from_bytes(pub[Attribute.MODULUS], "big"))
        theirs = numbers.public_key().encrypt(plain, padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
        aes = lease.session.generate_key(KeyType.AES, 256)
        wrapped = pub.wrap_key(aes, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_SHA256)
        back = priv.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped,
                               mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_SHA256,
                               capabilities=WRAP_CAPS)
        ct = aes.encrypt(b"0123456789abcdef", mechanism=Mechanism.AES_ECB)
        return (priv.decrypt(ours, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_SHA256),
                priv.decrypt(theirs, mechanism=Mechanism.RSA_PKCS_OAEP,
                             mechanism_param=OAEP_SHA256),
                back[Attribute.VALUE_LEN], back.decrypt(ct, mechanism=Mechanism.AES_ECB))

    ours, theirs, length, roundtrip = nss_token.token.run("RSA-OAEP", op)
    assert ours == plain and theirs == plain
    assert length == 32 and roundtrip == b"0123456789abcdef"


# ------------------------------------------------------------------ NSS 3.87 quirks, pinned
class TestNssQuirks:
    """Behaviour of NSS softokn 3.87 the layer must live with. If one of these fails after an
    NSS upgrade, update hsm/core/nss.py's docstring (and any policy built on it)."""

    def test_python_pkcs11_kwp_wrap_trips_on_the_size_query(self, nss_token: TestToken) -> None:
        def op(lease: Lease) -> tuple[bytes, bytes]:
            kek = lease.session.generate_key(KeyType.AES, 256, capabilities=WRAP_CAPS)
            key = lease.session.generate_key(KeyType.AES, 256)
            ours = nss.wrap_key_kwp(lease.session, kek, key)
            return ours, kek.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_KWP)

        try:
            ours, theirs = nss_token.token.run("C_WrapKey", op)
        except HsmError as exc:
            assert "too small" in str(exc)  # python-pkcs11's words for CKR_BUFFER_TOO_SMALL
        else:
            assert ours == theirs  # fixed upstream: nss.wrap_key_kwp is no longer needed

    def test_aes_key_wrap_pad_0x210a_is_not_rfc5649(self, nss_token: TestToken) -> None:
        kek_value, secret = os.urandom(32), os.urandom(32)

        def op(lease: Lease) -> bytes:
            kek = _import_aes(lease, kek_value, {Attribute.WRAP: True})
            key = _import_aes(lease, secret, {Attribute.EXTRACTABLE: True})
            return kek.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)

        wrapped = nss_token.token.run("C_WrapKey", op)
        assert len(wrapped) == 48  # RFC 5649 would give 40: NSS adds a PKCS#7 block first
        with pytest.raises(InvalidUnwrap):
            aes_key_unwrap_with_padding(kek_value, wrapped)

    def test_token_rsa_keygen_non_extractable(self, nss_token: TestToken) -> None:
        label = unique_label("rsa")

        def op(lease: Lease) -> dict:
            _pub, priv = lease.session.generate_keypair(
                KeyType.RSA, 2048, store=True, label=label,
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
            try:
                return {a: priv[a] for a in (
                    Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE,
                    Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE,
                    Attribute.NEVER_EXTRACTABLE, Attribute.LOCAL)}
            finally:
                for obj in lease.session.get_objects({Attribute.LABEL: label}):
                    obj.destroy()

        assert nss_token.token.run("C_GenerateKeyPair", op) == {
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.ALWAYS_SENSITIVE: True,
            Attribute.NEVER_EXTRACTABLE: True,
            Attribute.LOCAL: False,  # quirk: generated on the token, yet not "local"
        }

    def test_token_secret_keys_are_forced_sensitive(self, nss_token: TestToken) -> None:
        label = unique_label("aes-ns")

        def op(lease: Lease) -> bool:
            key = lease.session.generate_key(KeyType.AES, 256, store=True, label=label,
                                             template={Attribute.SENSITIVE: False})
            try:
                with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                    key[Attribute.VALUE]
                return key[Attribute.SENSITIVE]
            finally:
                key.destroy()

        assert nss_token.token.run("C_GenerateKey", op) is True

    def test_labels_are_not_unique_so_the_layer_refuses_to_guess(self,
                                                                  nss_token: TestToken) -> None:
        label = unique_label("dup")
        ref = KeyRef(label, ObjectClass.SECRET_KEY)

        def make(lease: Lease) -> None:
            lease.session.generate_key(KeyType.GENERIC_SECRET, 256, store=True, label=label,
                                       capabilities=MechanismFlag.SIGN)

        tok = nss_token.token
        tok.run("C_GenerateKey", make)
        tok.run("C_GenerateKey", make)  # NSS accepts the same label twice
        try:
            with pytest.raises(HsmError, match="share the label"):
                tok.run("find", lambda lease: lease.key(ref))
        finally:
            tok.run("destroy", lambda lease: [o.destroy() for o in
                                              lease.session.get_objects(ref.template())])

    def test_hmac_verify_mismatch_is_a_device_error(self, nss_token: TestToken) -> None:
        """softokn maps a failed HMAC compare through the thread's last NSS error: in a fresh
        thread that is none, so a wrong MAC gives CKR_DEVICE_ERROR instead of False
        (CKR_SIGNATURE_INVALID); after an RSA verify failure on that thread it gives False."""
        def op(lease: Lease) -> bool:
            caps = MechanismFlag.SIGN | MechanismFlag.VERIFY
            key = lease.session.generate_key(KeyType.GENERIC_SECRET, 256, capabilities=caps)
            mac = key.sign(b"m", mechanism=Mechanism.SHA256_HMAC)
            return key.verify(b"n", mac, mechanism=Mechanism.SHA256_HMAC)

        with pytest.raises(HsmError) as raised:  # re-raised from the fresh thread
            run_threads(1, lambda i: nss_token.token.run("C_Verify", op))
        assert raised.value.ckr == "CKR_DEVICE_ERROR"


# ------------------------------------------------------------------ both backends
def test_hsm_token_hmac_round_trip(hsm_token: TestToken) -> None:
    def op(lease: Lease) -> tuple[bool, bool]:
        key = lease.session.generate_key(KeyType.GENERIC_SECRET, 256,
                                         capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY)
        mac = key.sign(b"payload", mechanism=Mechanism.SHA256_HMAC)
        # A mismatch is checked by signing again: NSS's verify reports one as CKR_DEVICE_ERROR
        # (see TestNssQuirks), so the layer should compare MACs on the host.
        tampered = key.sign(b"payloaD", mechanism=Mechanism.SHA256_HMAC)
        return (key.verify(b"payload", mac, mechanism=Mechanism.SHA256_HMAC),
                hmac.compare_digest(mac, tampered))

    assert hsm_token.token.run("HMAC", op) == (True, False)


def test_hsm_token_imported_hmac_matches_python(hsm_token: TestToken) -> None:
    value, label = os.urandom(32), unique_label("hmac")

    def op(lease: Lease) -> bytes:
        lease.session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.TOKEN: False, Attribute.LABEL: label, Attribute.VALUE: value,
            Attribute.SIGN: True})
        return lease.key(KeyRef(label, ObjectClass.SECRET_KEY)).sign(
            b"data", mechanism=Mechanism.SHA256_HMAC)

    assert hsm_token.token.run("HMAC", op) == hmac.new(value, b"data", hashlib.sha256).digest()


def test_hsm_token_backends(hsm_token: TestToken) -> None:
    assert hsm_token.backend in ("softhsm2", "nss")
    assert hsm_token.token.label == hsm_token.label
    if hsm_token.backend == "nss":
        assert hsm_token.label == nss.TOKEN_LABEL and hsm_token.parameters


def test_require_mechanism(hsm_token: TestToken) -> None:
    require_mechanism(hsm_token, Mechanism.SHA256_HMAC)  # offered by both: no skip
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_mechanism(hsm_token, 0x8000FFFF, why="vendor test")
    message = str(skipped.value)
    assert "0x8000ffff" in message and hsm_token.backend in message and "vendor test" in message
    offered = hsm_token.token.p11token.slot.get_mechanisms()
    absent = next(m for m in Mechanism if m not in offered)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_mechanism(hsm_token, absent)
    assert f"{absent.name} (0x{absent.value:x})" in str(skipped.value)


def test_unique_label() -> None:
    labels = {unique_label("k") for _ in range(100)}
    assert len(labels) == 100 and all(label.startswith("k-") for label in labels)
