"""The user-PIN holder as an adversary, after a real ceremony, on real tokens.

Each test plays an insider with a shell and the *user* PIN (never the SO PIN) on the primary or a
regional token, using plain python-pkcs11 and raw Cryptoki calls (hsm.core._cryptoki, i.e. what
pkcs11-tool or a few lines of C could send), and tries to get a release secret out: extractable
unwrap, persistent copy, attribute flips, C_CopyObject, decrypt instead of unwrap, wrap to a
trusted key and unwrap again, key-check oracles, rewriting the release record. Each attempt must
be refused *by the token*, asserted with its CKR code. Only the KMS's own unwrap template works,
and what it yields cannot be read, wrapped out or used as an ECB oracle.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import pkcs11
import pytest
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass

from release import bundle as bundles
from ceremony import runner
from release.certificates import as_asn1
from release.certificates import load as load_cert
from hsm.core import _cryptoki, ops
from hsm.keys import export
from hsm.keys import attributes
from hsm.core.errors import from_pkcs11
from hsm.core.token import Token
from tests.ceremony_kit import kit_fixture

_label = itertools.count()
OAEP_SHA1 = (Mechanism.SHA_1, MGF.SHA1, None)
KINDS = {"generic-secret": KeyType.GENERIC_SECRET, "aes": KeyType.AES}


kit = kit_fixture("adversary", regions=("eu",))


@pytest.fixture(scope="module")
def release(kit):
    p = kit.run_release()
    cert = as_asn1(load_cert(kit.pki / f"{kit.primary.label}-signing.pem", "primary signing"))
    manifests = {r: bundles.verify((p.output_dir / runner.bundle_name(p, r)).read_bytes(),
                                   cert).manifest for r in ("eu", "escrow")}
    return p, manifests


@pytest.fixture
def primary(kit):
    token = Token.open(kit.primary.label, pin=kit.primary.user_pin)
    yield token
    token.close()


def ckr(fn) -> str:
    """Run ``fn``; it must fail; return the CKR name the token answered."""
    with pytest.raises(pkcs11.PKCS11Error) as info:
        fn()
    return from_pkcs11(info.value, operation="attack").ckr


def raw_rv(rv_or_tuple) -> str:
    rv = rv_or_tuple[0] if isinstance(rv_or_tuple, tuple) else rv_or_tuple
    from hsm.core.errors import CKR_BY_VALUE
    return CKR_BY_VALUE.get(rv, f"CKR 0x{rv:x}") if rv else "CKR_OK"


def entries(manifest) -> list[dict]:
    return manifest["secrets"]


def unwrap_with(lease, key_label: str, entry: dict, template: dict):
    key = lease.key(ops.private(key_label))
    return key.unwrap_key(ObjectClass.SECRET_KEY, KINDS[entry["key_type"]],
                          bytes.fromhex(entry["wrapped"]), label=f"atk-{next(_label)}",
                          mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_SHA1,
                          store=False, template=template)


def sweep(token: Token) -> None:
    def destroy(lease):
        for obj in list(lease.session.get_objects({Attribute.TOKEN: False})):
            if str(obj[Attribute.LABEL]).startswith("atk-"):
                obj.destroy()
    token.run_on_anchor("sweep", destroy)


def raw_handles(token: Token, ref):
    with token.lease() as lease:
        return lease.session.handle, lease.key(ref).handle


# ================================================================ the regional token
@pytest.mark.parametrize("template", [
    {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True},
    {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.TOKEN: True},
    {},
], ids=["readable", "extractable", "persistent-copy", "token-defaults"])
def test_regional_unwrap_as_anything_but_the_kms_template_is_refused(kit, release, template):
    _, manifests = release
    eu = kit.regionals["eu"]
    for entry in entries(manifests["eu"]):
        with eu.token.lease() as lease:
            assert ckr(lambda: unwrap_with(lease, f"{eu.label}-encryption", entry,
                                           template)) == "CKR_TEMPLATE_INCONSISTENT"


def test_regional_unwrap_cannot_widen_the_allowed_mechanisms(kit, release):
    """Asking the KMS template but with AES-ECB allowed (the E_K(0) = GCM H oracle): refused."""
    _, manifests = release
    eu = kit.regionals["eu"]
    raw = eu.token.module.raw
    entry = next(e for e in entries(manifests["eu"]) if e["key_type"] == "aes")
    h, priv = raw_handles(eu.token, ops.private(f"{eu.label}-encryption"))
    oaep = _cryptoki.CK_RSA_PKCS_OAEP_PARAMS(int(Mechanism.SHA_1), int(MGF.SHA1), 1, None, 0)
    tpl = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
           Attribute.LABEL: f"atk-{next(_label)}", Attribute.ENCRYPT: True,
           **attributes.REGIONAL_UNWRAP_TEMPLATE,
           Attribute.ALLOWED_MECHANISMS: [Mechanism.AES_ECB, *attributes.KMS_SECRET_MECHANISMS]}
    got = raw.unwrap_key(h, Mechanism.RSA_PKCS_OAEP, oaep, priv, bytes.fromhex(entry["wrapped"]),
                         tpl)
    assert raw_rv(got) == "CKR_TEMPLATE_INCONSISTENT"


def test_what_the_kms_template_yields_cannot_be_read_wrapped_out_or_used_as_ecb(kit, release):
    _, manifests = release
    eu = kit.regionals["eu"]
    entry = next(e for e in entries(manifests["eu"]) if e["key_type"] == "aes")
    label = f"atk-{next(_label)}"
    ops.unwrap_release_secret(eu.token, ops.private(f"{eu.label}-encryption"), ops.Wrapped(
        bytes.fromhex(entry["wrapped"]), "RSA_PKCS_OAEP", {"hash": "sha1"}), kind="aes",
        usage="encrypt-decrypt", label=label)
    try:
        with eu.token.anchor() as lease:
            key = lease.key(ops.secret(label))
            assert ckr(lambda: key[Attribute.VALUE]) == "CKR_ATTRIBUTE_SENSITIVE"
            assert ckr(lambda: key.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)) == \
                "CKR_MECHANISM_INVALID"
            wrapper = lease.session.generate_key(KeyType.AES, 256, store=False, template={
                Attribute.WRAP: True, Attribute.LABEL: f"atk-{next(_label)}"})
            assert ckr(lambda: wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)) \
                == "CKR_KEY_UNEXTRACTABLE"
            assert ckr(lambda: key.__setitem__(Attribute.EXTRACTABLE, True)) in (
                "CKR_ATTRIBUTE_READ_ONLY", "CKR_ACTION_PROHIBITED")
    finally:
        sweep(eu.token)


def test_regional_private_key_cannot_decrypt_be_flipped_copied_or_use_pkcs1(kit, release):
    _, manifests = release
    eu = kit.regionals["eu"]
    raw = eu.token.module.raw
    blob = bytes.fromhex(entries(manifests["eu"])[0]["wrapped"])
    ref = ops.private(f"{eu.label}-encryption")
    with eu.token.lease() as lease:
        key = lease.key(ref)
        h = lease.session.handle
        # C_Decrypt of the bundle instead of C_UnwrapKey: the key has no CKA_DECRYPT...
        oaep = _cryptoki.CK_RSA_PKCS_OAEP_PARAMS(int(Mechanism.SHA_1), int(MGF.SHA1), 1, None, 0)
        assert raw_rv(raw.operation_init("C_DecryptInit", h, Mechanism.RSA_PKCS_OAEP, oaep,
                                         key.handle)) == "CKR_KEY_FUNCTION_NOT_PERMITTED"
        # ...and cannot be given one, nor any other attribute change.
        assert raw_rv(raw.set_attributes(h, key.handle, {Attribute.DECRYPT: True})) == \
            "CKR_ACTION_PROHIBITED"
        assert raw_rv(raw.set_attributes(h, key.handle, {Attribute.ALLOWED_MECHANISMS: [
            Mechanism.RSA_PKCS]})) == "CKR_ACTION_PROHIBITED"
        # No copy with weaker attributes (or any copy at all).
        assert raw_rv(raw.copy_object(h, key.handle, {Attribute.DECRYPT: True,
                                                      Attribute.TOKEN: False})) == \
            "CKR_ACTION_PROHIBITED"
        # Unwrap with PKCS#1 v1.5 (not the key's one allowed mechanism), template matched.
        tpl = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
               Attribute.LABEL: f"atk-{next(_label)}", **attributes.REGIONAL_UNWRAP_TEMPLATE}
        assert raw_rv(raw.unwrap_key(h, Mechanism.RSA_PKCS, None, key.handle, blob, tpl)) == \
            "CKR_MECHANISM_INVALID"


# ================================================================ the primary token
def test_the_primary_keeps_no_release_secret_after_the_ceremony(primary, release):
    p, _ = release
    found = primary.run("find", lambda lease: [
        str(o[Attribute.LABEL]) for o in lease.session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY})])
    assert [f for f in found if f.startswith(f"rel-{p.release}-")] == []


@pytest.mark.parametrize("template", [
    {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
    {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True, Attribute.WRAP_WITH_TRUSTED: False},
    {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True, Attribute.WRAP_WITH_TRUSTED: True,
     Attribute.TOKEN: True},
], ids=["readable", "without-trusted-wrap", "persistent-copy"])
def test_escrow_unwrap_as_anything_but_the_escrow_template_is_refused(kit, primary, release,
                                                                     template):
    _, manifests = release
    for entry in entries(manifests["escrow"]):
        with primary.lease() as lease:
            assert ckr(lambda: unwrap_with(lease, f"{kit.primary.label}-encryption", entry,
                                           template)) == "CKR_TEMPLATE_INCONSISTENT"


def test_escrow_copy_leaves_only_to_trusted_keys_and_comes_back_just_as_protected(
        kit, primary, release):
    """Unwrap the escrow bundle the only way allowed, then try to get it out: an untrusted
    wrapping key is refused; wrapping to the SO-trusted escrow key and unwrapping again cannot
    strip CKA_WRAP_WITH_TRUSTED; and the copy is no ECB oracle."""
    _, manifests = release
    entry = next(e for e in entries(manifests["escrow"]) if e["key_type"] == "aes")
    label = f"atk-{next(_label)}"
    enc = f"{kit.primary.label}-encryption"
    ops.unwrap_release_secret(primary, ops.private(enc), ops.Wrapped(
        bytes.fromhex(entry["wrapped"]), "RSA_PKCS_OAEP", {"hash": "sha1"}), kind="aes",
        usage="sign", label=label, escrow=True)
    try:
        with primary.anchor() as lease:
            key = lease.key(ops.secret(label))
            assert key[Attribute.WRAP_WITH_TRUSTED] is True
            assert ckr(lambda: key[Attribute.VALUE]) == "CKR_ATTRIBUTE_SENSITIVE"
            raw = primary.module.raw
            for fn, mech in (("C_EncryptInit", Mechanism.AES_ECB),
                             ("C_SignInit", Mechanism.AES_MAC)):
                assert raw_rv(raw.operation_init(fn, lease.session.handle, mech, None,
                                                 key.handle)) in (
                    "CKR_MECHANISM_INVALID", "CKR_KEY_FUNCTION_NOT_PERMITTED"), fn
            mine = lease.session.generate_key(KeyType.AES, 256, store=False, template={
                Attribute.WRAP: True, Attribute.LABEL: f"atk-{next(_label)}"})
            assert ckr(lambda: mine.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP_PAD)) == \
                "CKR_KEY_NOT_WRAPPABLE"
            escrow = lease.key(ops.public(runner.recipient_label("escrow")))
            wrapped = escrow.wrap_key(key, mechanism=Mechanism.RSA_PKCS_OAEP,
                                      mechanism_param=OAEP_SHA1)
            assert ckr(lambda: lease.key(ops.private(enc)).unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.RSA_PKCS_OAEP,
                mechanism_param=OAEP_SHA1, store=False, template={
                    Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})) == \
                "CKR_TEMPLATE_INCONSISTENT"
    finally:
        sweep(primary)


def test_a_release_secret_is_no_ecb_oracle_and_cannot_be_changed_or_copied(primary):
    """While it exists (between generation and destruction), a release secret may only compute
    its check value."""
    label = f"rel-atk-{next(_label)}"
    export.ensure_secret(primary, "aes", label, os.urandom(16))
    raw = primary.module.raw
    try:
        with primary.lease() as lease:
            key = lease.key(ops.secret(label))
            h = lease.session.handle
            # No CKA_ENCRYPT (so no ECB), and SIGN only with AES-CMAC (no AES-MAC = CBC-MAC,
            # whose first block is an ECB block).
            assert raw_rv(raw.operation_init("C_EncryptInit", h, Mechanism.AES_ECB, None,
                                             key.handle)) == "CKR_KEY_FUNCTION_NOT_PERMITTED"
            assert raw_rv(raw.operation_init("C_SignInit", h, Mechanism.AES_MAC, None,
                                             key.handle)) == "CKR_MECHANISM_INVALID"
            for change in ({Attribute.ENCRYPT: True}, {Attribute.WRAP_WITH_TRUSTED: False},
                           {Attribute.EXTRACTABLE: False}):
                assert raw_rv(raw.set_attributes(h, key.handle, change)) == \
                    "CKR_ACTION_PROHIBITED", change
            assert raw_rv(raw.copy_object(h, key.handle, {Attribute.TOKEN: False})) == \
                "CKR_ACTION_PROHIBITED"
            assert len(key.sign(export.KCV_LABEL, mechanism=Mechanism.AES_CMAC)) == 16  # its job
    finally:
        primary.run_on_anchor("destroy", lambda lease: [o.destroy() for o in
                                                        lease.session.get_objects(
                                                            {Attribute.LABEL: label})])


def test_the_release_record_cannot_be_destroyed_rewritten_or_copied(primary, release):
    p, _ = release
    raw = primary.module.raw

    def find(lease):
        found = list(lease.session.get_objects({Attribute.CLASS: ObjectClass.DATA,
                                                Attribute.LABEL: export.record_label(p.release)}))
        assert len(found) == 1
        return lease.session.handle, found[0].handle
    with primary.anchor() as lease:
        h, obj = find(lease)
        assert raw_rv(raw.destroy_object(h, obj)) == "CKR_ACTION_PROHIBITED"
        assert raw_rv(raw.set_attributes(h, obj, {Attribute.VALUE: b"1"})) == \
            "CKR_ACTION_PROHIBITED"
        assert raw_rv(raw.copy_object(h, obj, {Attribute.VALUE: b"1"})) == \
            "CKR_ACTION_PROHIBITED"
    assert p.release in export.read_states(primary)


def test_the_user_cannot_create_a_trusted_key(primary, kit):
    raw = primary.module.raw
    with primary.anchor() as lease:
        rv, _ = raw.create_object(lease.session.handle, {
            **export.trusted_key_template(f"atk-{next(_label)}", b"x", b"\xc5" * 256,
                                          b"\x01\x00\x01"), Attribute.TOKEN: False})
    assert raw_rv(rv) == "CKR_ATTRIBUTE_READ_ONLY"


# ================================================================ the KMS database
def _node(kit, release, tmp_path):
    from kms.node import config as configs
    from kms.node.node import Kms
    p, _ = release
    cfg = tmp_path / "kms-eu.toml"
    cfg.write_text(f'region = "eu"\ntoken = "{kit.regionals["eu"].label}"\n'
                   f'primary_certificate = "{kit.pki / (kit.primary.label + "-signing.pem")}"\n'
                   f'bundle_dir = "{p.output_dir}"\nstore = "{tmp_path / "kms.db"}"\n'
                   "pbkdf2_iterations = 50\n" + kit.pins_toml())
    clock = [1_900_000_000.0]
    node = Kms(configs.load(cfg), pin=kit.regionals["eu"].user_pin, clock=lambda: clock[0])
    node.start()
    return node, clock


def _rewrite(node, org, key_type, **changes):
    """What someone with write access to the database does: change columns and recompute the
    row's (unkeyed) checksum so the store's own integrity check passes."""
    import dataclasses
    import sqlite3

    from kms import store as stores
    row = node.store.active(org, key_type, now=1e12) or node.store.get(org, key_type, 1)
    new = dataclasses.replace(row, **changes)
    with sqlite3.connect(node.config.store.removeprefix("sqlite:///")) as conn:
        conn.execute("UPDATE tenant_secrets SET source = ?, derivation = ?, release_id = ?, "
                     "iterations = ?, usable_from = ?, checksum = ? WHERE org_id = ? AND "
                     "key_type = ? AND version = ?",
                     (new.source, new.derivation, new.release, new.iterations, new.usable_from,
                      stores.secret_checksum(new), org, key_type, row.version))
    return new


@pytest.mark.parametrize("changes", [
    {"derivation": "NONE"}, {"iterations": 1}, {"source": "UPLOADED"}],
    ids=["pbkdf2-to-none", "fewer-iterations", "source"])
def test_a_database_writer_cannot_change_how_a_field_key_is_used(kit, release, tmp_path,
                                                               changes):
    from kms.errors import CorruptRecord
    node, _ = _node(kit, release, tmp_path)
    try:
        node.create_tenant("victim", "production")
        node.generate_secret("victim", "field")
        _rewrite(node, "victim", "field", **changes)
        node.cache.flush()
        ((column, value),) = changes.items()
        with pytest.raises(CorruptRecord, match=rf"org 'victim': the store does not match the "
                           rf"state sealed in the HSM \(generation \d+\): field v1: {column} is "
                           rf"{value!r} in the store"):
            node.dek_for_encrypt("victim", "field")
    finally:
        node.close()


def test_a_database_writer_cannot_shorten_the_database_key_delay(kit, release, tmp_path):
    from kms.errors import CorruptRecord, KmsError
    node, clock = _node(kit, release, tmp_path)
    try:
        node.create_tenant("dbvictim", "production")
        node.generate_secret("dbvictim", "database")
        with pytest.raises(KmsError, match="no usable database secret"):
            node.dek_for_encrypt("dbvictim", "database")
        _rewrite(node, "dbvictim", "database", usable_from=clock[0] - 1)
        # The running node serves the state it verified in the HSM: the edit is not honoured...
        with pytest.raises(KmsError, match="no usable database secret"):
            node.dek_for_encrypt("dbvictim", "database")
        node._views.clear()     # ...and its next verification of the org refuses it
        with pytest.raises(CorruptRecord, match=r"database v1: usable_from is .* in the store, "
                                                r".* in the sealed state"):
            node.dek_for_encrypt("dbvictim", "database")
    finally:
        node.close()


def test_kms_and_ceremony_refuse_a_key_provisioned_without_the_policy(softhsm_token, tmp_path):
    """A token provisioned the old way (python-pkcs11 defaults: modifiable, no allowed
    mechanisms, no unwrap template): the KMS import and the ceremony refuse to use its keys."""
    from hsm.core.errors import KeyPolicyViolation
    from kms.node import importer
    token = softhsm_token.token
    label = token.label
    with token.anchor() as lease:
        lease.session.generate_keypair(KeyType.RSA, 2048, store=True, label=f"{label}-encryption",
                                       public_template={Attribute.WRAP: True},
                                       private_template={Attribute.UNWRAP: True,
                                                         Attribute.DECRYPT: False,
                                                         Attribute.SENSITIVE: True,
                                                         Attribute.EXTRACTABLE: False})
        lease.session.create_domain_parameters(KeyType.EC, {
            Attribute.EC_PARAMS: __import__("pkcs11.util.ec", fromlist=["x"])
            .encode_named_curve_parameters("secp384r1")}, local=True).generate_keypair(
                store=True, label=f"{label}-signing")
    (tmp_path / "bundles").mkdir()
    with pytest.raises(KeyPolicyViolation) as info:
        importer.import_bundles(token, region="eu", primary_cert_path=tmp_path / "none.pem",
                                bundle_dir=tmp_path / "bundles", allow_practice=False,
                                history={}, officers=None)
    text = str(info.value)
    assert "CKA_UNWRAP_TEMPLATE: missing" in text and "CKA_MODIFIABLE" in text
    assert "provision a new token" in text
    from types import SimpleNamespace
    run = runner.Runner.__new__(runner.Runner)
    run.plan = SimpleNamespace(type="release-secrets")
    with pytest.raises(KeyPolicyViolation, match="refusing to sign ceremony outputs"):
        run._check_primary_keys(token)


# ================================================================ both backends
def test_policy_attributes_are_refused_changes_on_each_backend(hsm_token):
    """What applies to any token: a key made non-modifiable with one allowed mechanism. Both
    backends refuse the attribute change; only a token that enforces CKA_ALLOWED_MECHANISMS
    refuses the other mechanism (NSS softokn 3.87 does not, which is why provisioning refuses
    production keys there, see test_provision)."""
    token = hsm_token.token
    raw = token.module.raw
    label = f"atk-{next(_label)}"
    # A session of its own: an operation the token wrongly lets start (NSS) stays active in
    # it, and closing the session ends it (never session.close(): that logs everyone out).
    h = token.p11token.open(rw=True).handle
    try:
        rv, key = raw.generate_key(h, Mechanism.AES_KEY_GEN, {
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE_LEN: 32, Attribute.TOKEN: False, Attribute.LABEL: label,
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
            Attribute.ENCRYPT: True, Attribute.MODIFIABLE: False,
            Attribute.ALLOWED_MECHANISMS: [Mechanism.AES_CMAC]})
        assert rv == 0, hex(rv)
        try:
            assert raw_rv(raw.set_attributes(h, key, {Attribute.ENCRYPT: False})) in (
                "CKR_ACTION_PROHIBITED", "CKR_ATTRIBUTE_READ_ONLY")
            ecb = raw_rv(raw.operation_init("C_EncryptInit", h, Mechanism.AES_ECB, None, key))
            if hsm_token.backend == "nss":
                assert token.profile.allowed_mechanisms_enforced is False
                pytest.skip("NSS softokn 3.87 does not enforce CKA_ALLOWED_MECHANISMS (AES-ECB "
                            f"init answered {ecb}); the suite refuses production keys there")
            assert ecb == "CKR_MECHANISM_INVALID"
        finally:
            raw.destroy_object(h, key)
    finally:
        raw.close_session(h)


# ------------------------------------------------------------------------------ cloud keys
@pytest.fixture(scope="module")
def cloud_primary(kit, release, tmp_path_factory):
    """A cloud key on the primary after the ceremony, and an AWS import key the SO trusted,
    both made by the real command in another process (the officers' route)."""
    from tests import cloud_kit as ck
    from tests.helpers import run_hsm
    root = tmp_path_factory.mktemp("cloud-adversary")
    tt = kit.primary
    r = run_hsm(tt, "cloud-key", "create", "--token", tt.label, "--label", "cloud-atk",
                env=ck.pins(tt))
    assert r.returncode == 0, r.stderr
    provider = ck.new_rsa(2048)
    r = ck.trust(tt, "aws", ck.write_key(provider, root / "aws.pem"), provider)
    assert r.returncode == 0, r.stderr
    from hsm.cloud.keys import import_label
    return {"key": "cloud-atk", "import": import_label("aws", bytes.fromhex(
        ck.fingerprint(provider))), "key_file": root / "aws.pem", "root": root}


def _oaep_wrap(primary, lease, wrapping, target) -> str:
    from hsm.cloud.wrap import oaep_params
    raw = primary.module.raw
    rv, _ = raw.wrap_key(lease.session.handle, Mechanism.RSA_PKCS_OAEP, oaep_params("sha1"),
                         wrapping.handle, target.handle)
    return raw_rv(rv)


def test_the_cloud_key_cannot_be_read_flipped_copied_or_used_as_an_oracle(primary,
                                                                         cloud_primary):
    raw = primary.module.raw
    with primary.lease() as lease:
        key = lease.key(ops.secret(cloud_primary["key"]))
        h = lease.session.handle
        assert ckr(lambda: key[Attribute.VALUE]) == "CKR_ATTRIBUTE_SENSITIVE"
        assert raw_rv(raw.operation_init("C_EncryptInit", h, Mechanism.AES_ECB, None,
                                         key.handle)) == "CKR_KEY_FUNCTION_NOT_PERMITTED"
        assert raw_rv(raw.operation_init("C_SignInit", h, Mechanism.AES_MAC, None,
                                         key.handle)) == "CKR_MECHANISM_INVALID"
        # Its mechanism list names the token's KWP (the wrap-template marker), but it has
        # CKA_WRAP=false: it cannot wrap anything with it.
        target = lease.session.generate_key(KeyType.AES, 256, store=False, template={
            Attribute.EXTRACTABLE: True, Attribute.LABEL: f"atk-{next(_label)}"})
        assert raw_rv(raw.wrap_key(h, 0x210A, None, key.handle, target.handle)) == \
            "CKR_KEY_FUNCTION_NOT_PERMITTED"
        for change in ({Attribute.WRAP_WITH_TRUSTED: False}, {Attribute.EXTRACTABLE: False},
                       {Attribute.ENCRYPT: True}, {Attribute.SENSITIVE: False}):
            assert raw_rv(raw.set_attributes(h, key.handle, change)) == \
                "CKR_ACTION_PROHIBITED", change
        assert raw_rv(raw.copy_object(h, key.handle, {Attribute.TOKEN: False})) == \
            "CKR_ACTION_PROHIBITED"
        assert len(key.sign(bytes(16), mechanism=Mechanism.AES_CMAC)) == 16  # its job


def test_the_cloud_key_leaves_only_to_trusted_keys_and_the_user_cannot_make_one(
        primary, cloud_primary):
    """An untrusted AES or RSA key cannot wrap it; the user can make no trusted key - not by
    generating, creating or unwrapping one (the composed RSA-AES route's ephemeral key needs
    the SO for exactly this reason)."""
    from hsm.cloud.keys import kwp_code
    raw = primary.module.raw
    kwp = kwp_code(primary)
    with primary.lease() as lease:
        h = lease.session.handle
        key = lease.key(ops.secret(cloud_primary["key"]))
        mine = lease.session.generate_key(KeyType.AES, 256, store=False, template={
            Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.LABEL: f"atk-{next(_label)}"})
        assert raw_rv(raw.wrap_key(h, kwp, None, mine.handle, key.handle)) == \
            "CKR_KEY_NOT_WRAPPABLE"
        rv, pub = raw.create_object(h, {
            **export.trusted_key_template(f"atk-{next(_label)}", b"x", b"\xc5" * 256,
                                          b"\x01\x00\x01"), Attribute.TOKEN: False,
            Attribute.TRUSTED: False})
        assert raw_rv(rv) == "CKR_OK"
        from hsm.cloud.wrap import oaep_params
        assert raw_rv(raw.wrap_key(h, Mechanism.RSA_PKCS_OAEP, oaep_params("sha1"), pub,
                                   key.handle)) == "CKR_KEY_NOT_WRAPPABLE"
        ephemeral = {**attributes.cloud_ephemeral(kwp).creation_attributes(
            attributes.cloud_mechanisms(kwp)), Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE_LEN: 32, Attribute.LABEL: f"atk-{next(_label)}"}
        assert raw_rv(raw.generate_key(h, Mechanism.AES_KEY_GEN, ephemeral)) == \
            "CKR_ATTRIBUTE_READ_ONLY"
        spare = lease.session.generate_key(KeyType.AES, 256, store=False, template={
            Attribute.EXTRACTABLE: True, Attribute.LABEL: f"atk-{next(_label)}"})
        wrapped = mine.wrap_key(spare, mechanism=Mechanism(kwp))
        assert raw_rv(raw.unwrap_key(h, kwp, None, mine.handle, wrapped, {
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: False, Attribute.TRUSTED: True, Attribute.WRAP: True})) == \
            "CKR_ATTRIBUTE_READ_ONLY"


def test_a_trusted_ceremony_key_gives_no_readable_copy_of_the_cloud_key(
        kit, primary, cloud_primary):
    """The ceremony's trusted escrow key takes release secrets only (its CKA_WRAP_TEMPLATE):
    the token refuses to wrap the cloud key to it, so the primary's encryption key never gets
    a cloud key to unwrap (and would unwrap it only under its unwrap template)."""
    with primary.lease() as lease:
        key = lease.key(ops.secret(cloud_primary["key"]))
        escrow = lease.key(ops.public(runner.recipient_label("escrow")))
        assert ckr(lambda: escrow.wrap_key(key, mechanism=Mechanism.RSA_PKCS_OAEP,
                                           mechanism_param=OAEP_SHA1)) == "CKR_KEY_NOT_WRAPPABLE"


def test_the_cloud_import_key_wraps_no_release_secret_and_no_long_term_key(
        kit, primary, cloud_primary):
    """The provider key's CKA_WRAP_TEMPLATE (enforced by SoftHSM2 2.6.1 on
    CKA_ALLOWED_MECHANISMS) makes the token refuse to send a release secret to a cloud
    provider, though both are trusted-wrap; private keys are never extractable at all."""
    label = f"rel-atk-{next(_label)}"
    export.ensure_secret(primary, "aes", label, os.urandom(16))
    seed = f"rel-atk-{next(_label)}"
    export.ensure_secret(primary, "generic-secret", seed, os.urandom(16))
    try:
        with primary.lease() as lease:
            importer = lease.key(ops.public(cloud_primary["import"]))
            for secret_label in (label, seed):
                assert _oaep_wrap(primary, lease, importer,
                                  lease.key(ops.secret(secret_label))) == "CKR_KEY_NOT_WRAPPABLE"
            for name in (f"{kit.primary.label}-encryption", f"{kit.primary.label}-signing"):
                assert _oaep_wrap(primary, lease, importer, lease.key(ops.private(name))) in (
                    "CKR_KEY_UNEXTRACTABLE", "CKR_KEY_NOT_WRAPPABLE"), name
            assert _oaep_wrap(primary, lease, importer, lease.key(
                ops.secret(cloud_primary["key"]))) == "CKR_OK"  # what it is for
        # ...and the command refuses them before asking the token.
        from tests import cloud_kit as ck
        from tests.helpers import assert_one_line_error
        token_file = cloud_primary["root"] / "t.token"
        token_file.write_bytes(b"t")
        for name in (label, seed, f"{kit.primary.label}-encryption"):
            line = assert_one_line_error(ck.export(
                kit.primary, name, "aws", cloud_primary["key_file"],
                cloud_primary["root"] / f"out-{name}", "--import-token", str(token_file),
                "--algorithm", "RSAES_OAEP_SHA_1"))
            assert ("was not made by `hsm cloud-key create`" in line
                    or "no secret key labelled" in line), line
    finally:
        primary.run_on_anchor("destroy", lambda lease: [
            o.destroy() for lab in (label, seed)
            for o in lease.session.get_objects({Attribute.LABEL: lab})])


def test_the_composed_routes_ephemeral_key_is_trusted_only_by_the_so_and_stays_inside(
        softhsm_token):
    """The ephemeral key as hsm.cloud.wrap makes it: only the SO can generate it, it survives
    the SO's logout as a public session object, and the user then cannot read it, use it to
    encrypt, wrap it with an untrusted key, or strip CKA_TRUSTED / CKA_WRAP_WITH_TRUSTED."""
    from hsm.core import module as modules
    from hsm.core.token import find_token
    tt = softhsm_token  # its Token is never opened: this test logs in by hand
    mod = modules.load(tt.module_path)
    p11token = find_token(mod, label=tt.label)
    raw = mod.raw
    kwp = 0x210A  # SoftHSM2's RFC 5649 code (hsm.core.profile.kwp_mechanism)
    template = {**attributes.cloud_ephemeral(kwp).creation_attributes(
        attributes.cloud_mechanisms(kwp)), Attribute.KEY_TYPE: KeyType.AES,
        Attribute.VALUE_LEN: 32, Attribute.LABEL: "eph"}
    session = p11token.open(rw=True)
    h = session.handle
    try:
        assert raw_rv(raw.login(h, tt.user_pin.reveal().encode(), _cryptoki.CKU_USER)) == "CKR_OK"
        assert raw_rv(raw.generate_key(h, Mechanism.AES_KEY_GEN, template)) == \
            "CKR_ATTRIBUTE_READ_ONLY"  # the user cannot make it
        raw.logout(h)
        assert raw_rv(raw.login(h, tt.so_pin.reveal().encode(), _cryptoki.CKU_SO)) == "CKR_OK"
        rv, eph = raw.generate_key(h, Mechanism.AES_KEY_GEN, template)
        assert raw_rv(rv) == "CKR_OK"
        raw.logout(h)
        assert raw_rv(raw.login(h, tt.user_pin.reveal().encode(), _cryptoki.CKU_USER)) == "CKR_OK"
        assert raw.get_attribute(h, eph, Attribute.TRUSTED)[1] == b"\x01"  # survived the logout
        assert raw_rv(raw.get_attribute(h, eph, Attribute.VALUE)) == "CKR_ATTRIBUTE_SENSITIVE"
        assert raw_rv(raw.operation_init("C_EncryptInit", h, Mechanism.AES_ECB, None, eph)) == \
            "CKR_KEY_FUNCTION_NOT_PERMITTED"
        rv, mine = raw.generate_key(h, Mechanism.AES_KEY_GEN, {
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE_LEN: 32, Attribute.TOKEN: False, Attribute.WRAP: True})
        assert raw_rv(raw.wrap_key(h, kwp, None, mine, eph)) == "CKR_KEY_NOT_WRAPPABLE"
        # Trusted as it is, it takes only cloud keys (its CKA_WRAP_TEMPLATE): not a release
        # secret, which the user can make the ceremony's way.
        export.ensure_secret(tt.token, "aes", "rel-eph", b"eph-id")
        rel = raw_handles(tt.token, ops.secret("rel-eph"))[1]
        assert raw_rv(raw.wrap_key(h, kwp, None, eph, rel)) == "CKR_KEY_NOT_WRAPPABLE"
        rv, cloudish = raw.generate_key(h, Mechanism.AES_KEY_GEN, {
            **attributes.cloud_key(kwp).creation_attributes(), Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE_LEN: 32, Attribute.TOKEN: False})
        assert raw_rv(raw.wrap_key(h, kwp, None, eph, cloudish)) == "CKR_OK"
        for change in ({Attribute.TRUSTED: False}, {Attribute.WRAP_WITH_TRUSTED: False},
                       {Attribute.SENSITIVE: False}):
            assert raw_rv(raw.set_attributes(h, eph, change)) == "CKR_ACTION_PROHIBITED", change
        assert raw_rv(raw.copy_object(h, eph, {Attribute.TRUSTED: True})) == \
            "CKR_ACTION_PROHIBITED"
    finally:
        raw.logout(h)
        raw.close_session(h)


# ================================================================ BYOK keys (issue 9)
@pytest.fixture(scope="module")
def byok_keys(kit):
    """The seed and dek BYOK key pairs of one org on the regional token, made the KMS's way,
    and a customer's 32-byte secret wrapped to each (the attacker has the store's copies)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from hsm.keys import byok as hbyok
    eu = kit.regionals["eu"]
    out = {}
    for purpose in ("seed", "dek"):
        hbyok.generate(eu.token, "adv", purpose)
        label = hbyok.label_for("adv", purpose)
        n = eu.token.run("read", lambda lease: int.from_bytes(lease.key(ops.public(label))[
            Attribute.MODULUS], "big"))
        secret = os.urandom(32)
        ct = rsa.RSAPublicNumbers(65537, n).public_key().encrypt(
            secret, padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
        out[purpose] = (label, secret, ct)
    return out


def _byok_unwrap(token, label, ct, template, lease):
    oaep = _cryptoki.CK_RSA_PKCS_OAEP_PARAMS(int(Mechanism.SHA_1), int(MGF.SHA1), 1, None, 0)
    tpl = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
           Attribute.LABEL: f"atk-{next(_label)}", Attribute.SIGN: True, **template}
    return token.module.raw.unwrap_key(lease.session.handle, Mechanism.RSA_PKCS_OAEP, oaep,
                                       lease.key(ops.private(label)).handle, ct, tpl)


@contextlib.contextmanager
def _eu_anchor(kit):
    """The eu regional's anchor session, for raw calls: yields (token, its RawModule, the lease,
    the session handle); the attack's session objects are swept afterwards, whatever happened."""
    token = kit.regionals["eu"].token
    try:
        with token.anchor() as lease:
            yield token, token.module.raw, lease, lease.session.handle
    finally:
        sweep(token)


@pytest.mark.parametrize("change", [
    {Attribute.EXTRACTABLE: True}, {Attribute.SENSITIVE: False}, {Attribute.TOKEN: True},
    {Attribute.ALLOWED_MECHANISMS: (Mechanism.AES_ECB,)}, {Attribute.WRAP: True},
], ids=["extractable", "readable", "persistent", "ecb-allowed", "wrapping"])
def test_byok_seed_key_unwraps_only_into_the_non_extractable_template(kit, byok_keys, change):
    label, _, ct = byok_keys["seed"]
    with _eu_anchor(kit) as (token, _, lease, _):
        got = _byok_unwrap(token, label, ct, {**attributes.BYOK_SEED_UNWRAP_TEMPLATE, **change},
                           lease)
    assert raw_rv(got) == "CKR_TEMPLATE_INCONSISTENT"


def test_what_a_pin_holder_gets_from_a_byok_seed_unwrap(kit, byok_keys):
    """With the user PIN and the stored ciphertext, a PIN holder can unwrap the customer's seed
    exactly as the KMS does, and then: not read it, not wrap it out, not copy it; but compute its
    SHA-256 (C_DigestKey; the same hash the customer uploads) and HMACs with it (the KMS's image:
    what the KMS itself stores, so no more than the store's reader with the PIN already gets)."""
    import hashlib
    import hmac as hmac_
    label, secret, ct = byok_keys["seed"]
    with _eu_anchor(kit) as (token, raw, lease, h):
        rv, key = _byok_unwrap(token, label, ct, attributes.BYOK_SEED_UNWRAP_TEMPLATE, lease)
        assert raw_rv(rv) == "CKR_OK"
        assert raw_rv(raw.get_attribute(h, key, Attribute.VALUE)) == "CKR_ATTRIBUTE_SENSITIVE"
        rv, wrapper = raw.generate_key(h, Mechanism.AES_KEY_GEN, {
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE_LEN: 32, Attribute.TOKEN: False, Attribute.WRAP: True,
            Attribute.LABEL: f"atk-{next(_label)}"})
        assert raw_rv(raw.wrap_key(h, Mechanism.AES_KEY_WRAP_PAD, None, wrapper, key)) == \
            "CKR_KEY_UNEXTRACTABLE"
        assert raw_rv(raw.copy_object(h, key, {Attribute.EXTRACTABLE: True})) == \
            "CKR_ATTRIBUTE_READ_ONLY"
        assert raw_rv(raw.set_attributes(h, key, {Attribute.SENSITIVE: False})) in (
            "CKR_ATTRIBUTE_READ_ONLY", "CKR_ACTION_PROHIBITED")
        rv, digest = raw.digest_key(h, Mechanism.SHA256, key)
        assert digest == hashlib.sha256(secret).digest()
        assert raw_rv(raw.operation_init("C_SignInit", h, Mechanism.SHA256_HMAC, None,
                                         key)) == "CKR_OK"
        assert raw.one_shot("C_Sign", h, b"m")[1] == hmac_.new(secret, b"m",
                                                               hashlib.sha256).digest()


@pytest.mark.parametrize("purpose", ["seed", "dek"])
def test_byok_private_keys_cannot_decrypt_be_changed_copied_or_use_pkcs1(kit, byok_keys,
                                                                          purpose):
    eu = kit.regionals["eu"]
    raw = eu.token.module.raw
    label, _, ct = byok_keys[purpose]
    with eu.token.lease() as lease:
        h, key = lease.session.handle, lease.key(ops.private(label)).handle
        oaep = _cryptoki.CK_RSA_PKCS_OAEP_PARAMS(int(Mechanism.SHA_1), int(MGF.SHA1), 1, None, 0)
        assert raw_rv(raw.operation_init("C_DecryptInit", h, Mechanism.RSA_PKCS_OAEP, oaep,
                                         key)) == "CKR_KEY_FUNCTION_NOT_PERMITTED"
        assert raw_rv(raw.operation_init("C_SignInit", h, Mechanism.SHA256_RSA_PKCS, None,
                                         key)) in ("CKR_KEY_FUNCTION_NOT_PERMITTED",
                                                   "CKR_MECHANISM_INVALID")
        assert raw_rv(raw.set_attributes(h, key, {Attribute.DECRYPT: True})) == \
            "CKR_ACTION_PROHIBITED"
        assert raw_rv(raw.copy_object(h, key, {Attribute.DECRYPT: True,
                                               Attribute.TOKEN: False})) == "CKR_ACTION_PROHIBITED"
        template = (attributes.BYOK_SEED_UNWRAP_TEMPLATE if purpose == "seed"
                    else attributes.BYOK_DEK_UNWRAP_TEMPLATE)
        tpl = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
               Attribute.LABEL: f"atk-{next(_label)}", **template}
        assert raw_rv(raw.unwrap_key(h, Mechanism.RSA_PKCS, None, key, ct, tpl)) == \
            "CKR_MECHANISM_INVALID"


def test_the_byok_dek_key_releases_what_it_unwraps_by_design(kit, byok_keys):
    """Derivation NONE: the uploaded value is the DEK the KMS serves in the clear, so a PIN
    holder with the stored ciphertext reads it too. It still cannot become a token object."""
    label, dek, ct = byok_keys["dek"]
    with _eu_anchor(kit) as (token, raw, lease, h):
        got = _byok_unwrap(token, label, ct, {**attributes.BYOK_DEK_UNWRAP_TEMPLATE,
                                              Attribute.TOKEN: True}, lease)
        assert raw_rv(got) == "CKR_TEMPLATE_INCONSISTENT"
        rv, key = _byok_unwrap(token, label, ct, {**attributes.BYOK_DEK_UNWRAP_TEMPLATE,
                                                  Attribute.SIGN: False}, lease)
        assert raw_rv(rv) == "CKR_OK"
        assert raw.get_attribute(h, key, Attribute.VALUE)[1] == dek


def test_byok_keys_pass_the_audit_and_a_ciphertext_for_one_is_nothing_to_the_other(kit,
                                                                                    byok_keys):
    from hsm import inventory
    eu = kit.regionals["eu"]
    rows = [r for r in inventory.audit(eu.token) if r.label.startswith("byok-")]
    assert {r.role for r in rows} >= {"byok-seed", "byok-dek", "public key"}
    assert all(r.deviations == [] for r in rows)
    seed_label, _, _ = byok_keys["seed"]
    _, _, dek_ct = byok_keys["dek"]
    with eu.token.anchor() as lease:
        got = _byok_unwrap(eu.token, seed_label, dek_ct, attributes.BYOK_SEED_UNWRAP_TEMPLATE,
                           lease)
    assert raw_rv(got) != "CKR_OK"
    sweep(eu.token)


# ================================================================ trusted keys' cargo (issue 15)
# Every CKA_TRUSTED key the suite makes has a CKA_WRAP_TEMPLATE that admits only its cargo:
# regional recipients and the escrow key take release secrets (CKA_ALLOWED_MECHANISMS exactly
# hsm.keys.attributes.RELEASE_SECRET_MECHANISMS), cloud import keys take cloud keys. Each row is one
# wrappable key kind, each column one trusted-key kind; the cell is what SoftHSM2 2.6.1
# answers C_WrapKey(RSA-OAEP SHA-1) with, the user PIN logged in.
_OK, _NO, _UNEXTRACTABLE = "CKR_OK", "CKR_KEY_NOT_WRAPPABLE", "CKR_KEY_UNEXTRACTABLE"
_PRIMARY_MATRIX = {           # (regional recipient, escrow key, cloud import key)
    "release seed": (_OK, _OK, _NO),
    "release AES key": (_OK, _OK, _NO),
    "escrow-restored seed": (_OK, _OK, _NO),
    "escrow-restored AES key": (_OK, _OK, _NO),
    "cloud key": (_NO, _NO, _OK),
    "user's own AES key": (_NO, _NO, _NO),
    "primary-encryption private key": (_UNEXTRACTABLE,) * 3,
}


def _so_trusts_on(tt, root, *, recipient_cert, provider_key_file, provider_key):
    """As the SO, in another process (this one holds the user's login): a trusted recipient
    and a cloud import key on the token ``tt``, each made by the suite's own code."""
    import subprocess
    import sys

    from tests import cloud_kit as ck
    code = ("import sys; from hsm.core.token import Token; from hsm.core.pin import Pin; "
            "from hsm import export; from release.certificates import load, as_asn1; "
            "spki = as_asn1(load(sys.argv[2], 'r')).public_key; "
            "t = Token.open(sys.argv[1], pin=Pin(sys.argv[3]), so=True); "
            "print(export.ensure_trusted_public_key(t, 'trusted-matrix', b'matrix', spki)); "
            "t.close()")
    r = subprocess.run([sys.executable, "-c", code, tt.label, str(recipient_cert),
                        tt.so_pin.reveal()], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **tt.env})
    assert r.returncode == 0 and r.stdout.strip() == "created", r.stderr
    r = ck.trust(tt, "aws", provider_key_file, provider_key)
    assert r.returncode == 0, r.stderr


def test_each_trusted_key_takes_only_its_own_cargo_on_the_primary(kit, release, primary,
                                                                  cloud_primary):
    """The matrix on the primary after a real ceremony and `hsm cloud-key`: only the intended
    pairs wrap. The insider attack of issue 15 (the cloud key wrapped to trusted-eu with the
    primary's user PIN, to be unwrapped in the region as an AES-GCM oracle) is the
    cloud-key x regional-recipient cell: CKR_KEY_NOT_WRAPPABLE."""
    _, manifests = release
    enc = f"{kit.primary.label}-encryption"
    seed, aes, key_id = f"rel-mx-{next(_label)}", f"rel-mx-{next(_label)}", os.urandom(16)
    export.ensure_secret(primary, "generic-secret", seed, key_id)
    export.ensure_secret(primary, "aes", aes, key_id)
    restored = {}
    for entry in entries(manifests["escrow"]):
        ref, _, _ = ops.unwrap_release_secret(
            primary, ops.private(enc), ops.Wrapped(bytes.fromhex(entry["wrapped"]), "",
                                                   {"hash": entry["wrap"]["hash"]}),
            kind=entry["key_type"], usage="sign", label=f"atk-{next(_label)}", escrow=True)
        restored[entry["key_type"]] = ref
    try:
        with primary.lease() as lease:
            own = lease.session.generate_key(KeyType.AES, 256, store=False, template={
                Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True,
                Attribute.LABEL: f"atk-{next(_label)}"})
            keys = {"release seed": lease.key(ops.secret(seed)),
                    "release AES key": lease.key(ops.secret(aes)),
                    "escrow-restored seed": lease.key(restored["generic-secret"]),
                    "escrow-restored AES key": lease.key(restored["aes"]),
                    "cloud key": lease.key(ops.secret(cloud_primary["key"])),
                    "user's own AES key": own,
                    "primary-encryption private key": lease.key(ops.private(enc))}
            trusted = [lease.key(ops.public(runner.recipient_label("eu"))),
                       lease.key(ops.public(runner.recipient_label("escrow"))),
                       lease.key(ops.public(cloud_primary["import"]))]
            got = {kind: tuple(_oaep_wrap(primary, lease, t, key) for t in trusted)
                   for kind, key in keys.items()}
    finally:
        for label in (seed, aes):
            export.destroy_secret(primary, label, key_id)
        sweep(primary)
    assert got == _PRIMARY_MATRIX


_REGION_MATRIX = {            # (trusted recipient, cloud import key)
    "release seed (imported)": (_UNEXTRACTABLE,) * 2,
    "release AES key (imported)": (_UNEXTRACTABLE,) * 2,
    "tenant wrapping key": (_UNEXTRACTABLE,) * 2,
    "BYOK DEK (unwrapped)": (_NO, _NO),
    "cloud key": (_NO, _OK),
}


def test_each_trusted_key_takes_only_its_own_cargo_on_a_region(kit, release, byok_keys,
                                                               tmp_path):
    """The same on the eu regional token, with both trusted-key kinds the suite's code can put
    on any token made there by its SO (in another process): what the KMS unwraps or generates
    never leaves the token at all (CKR_KEY_UNEXTRACTABLE); the BYOK DEK, readable by design,
    is no trusted key's cargo; a cloud key goes only to a cloud import key."""
    from tests import cloud_kit as ck
    from tests.helpers import run_hsm
    from hsm.cloud.keys import import_label
    _, manifests = release
    eu = kit.regionals["eu"]
    provider = ck.new_rsa(2048)
    _so_trusts_on(eu, tmp_path, recipient_cert=kit.pki / f"{kit.primary.label}-encryption.pem",
                  provider_key_file=ck.write_key(provider, tmp_path / "aws.pem"),
                  provider_key=provider)
    r = run_hsm(eu, "cloud-key", "create", "--token", eu.label, "--label", "cloud-mx",
                env=ck.pins(eu))
    assert r.returncode == 0, r.stderr
    imported = {}
    for entry in entries(manifests["eu"]):
        usage = "sign" if entry["key_type"] == "generic-secret" else "encrypt-decrypt"
        ref, _, _ = ops.unwrap_release_secret(
            eu.token, ops.private(f"{eu.label}-encryption"),
            ops.Wrapped(bytes.fromhex(entry["wrapped"]), "", {"hash": entry["wrap"]["hash"]}),
            kind=entry["key_type"], usage=usage, label=f"atk-{next(_label)}")
        imported[entry["key_type"]] = ref
    tenant = ops.generate_session_secret(eu.token, kind="aes", usage="encrypt-decrypt",
                                         label=f"atk-{next(_label)}")
    label, _, ct = byok_keys["dek"]
    with _eu_anchor(kit) as (token, raw, lease, h):
        rv, dek = _byok_unwrap(token, label, ct, {**attributes.BYOK_DEK_UNWRAP_TEMPLATE,
                                                  Attribute.SIGN: False}, lease)
        assert raw_rv(rv) == "CKR_OK"
        keys = {"release seed (imported)": lease.key(imported["generic-secret"]).handle,
                "release AES key (imported)": lease.key(imported["aes"]).handle,
                "tenant wrapping key": lease.key(tenant).handle,
                "BYOK DEK (unwrapped)": dek,
                "cloud key": lease.key(ops.secret("cloud-mx")).handle}
        trusted = [lease.key(ops.public("trusted-matrix")).handle, lease.key(ops.public(
            import_label("aws", bytes.fromhex(ck.fingerprint(provider))))).handle]
        from hsm.cloud.wrap import oaep_params
        got = {kind: tuple(raw_rv(raw.wrap_key(h, Mechanism.RSA_PKCS_OAEP, oaep_params("sha1"),
                                               t, key)) for t in trusted)
               for kind, key in keys.items()}
    assert got == _REGION_MATRIX
