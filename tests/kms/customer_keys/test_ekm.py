"""EKM on a real AWS-KMS-compatible server: moto in server mode over TLS on 127.0.0.1, a real
regional SoftHSM2 token, ceremony bundles from a real release.

moto 5.2.5 enforces: the encryption context, the key a blob belongs to, a key that does not
exist. It does NOT enforce key policies (no AccessDenied from a policy) and still generates and
decrypts with disabled or pending-deletion keys; those paths are mapped in kms.customer_keys.ekm
but not
exercised here (docs/customer-keys.md, "EKM on AWS KMS").
"""

from __future__ import annotations

import base64
import dataclasses
import json
import sqlite3

import boto3
import pytest

from kms.customer_keys import ekm
from kms.errors import CorruptRecord, KmsError
from kms.caller.sdk import FieldEncryptor
from kms.node.node import Kms
from tests import localtls
from tests.ceremony_kit import kit_fixture
from tests.helpers import assert_secrets_absent
from tests.kms_kit import Clock, CustomerDek, kms_config
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


kit = kit_fixture("ekm", regions=("eu",))


@pytest.fixture(scope="module")
def release(kit):
    return kit.run_release()


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """(endpoint URL, CA file, customer-side boto3 client) of a moto server this module owns."""
    localtls.set_aws_env()
    pki = localtls.make_pki(tmp_path_factory.mktemp("moto-pki"))
    proc, url = localtls.start_moto(pki)
    client = boto3.client("kms", endpoint_url=url, verify=str(pki.ca), region_name="eu-west-1")
    yield url, pki, client, proc
    localtls.stop(proc)


@pytest.fixture
def node(kit, release, tmp_path):
    kms = Kms(kms_config(kit, tmp_path, release.output_dir), pin=kit.regionals["eu"].user_pin,
              clock=Clock())
    kms.start()
    yield kms
    kms.close()


def _ekm_org(node, aws, org: str) -> str:
    url, pki, client, _ = aws
    arn = client.create_key(Description=f"root key of {org}")["KeyMetadata"]["Arn"]
    node.create_tenant(org, "sandbox")
    ekm.register(node, org, arn, endpoint_url=url, ca_bundle=str(pki.ca))
    return arn


def _descriptor(node, row) -> dict:
    """The row's descriptor, read from its current blob (every change of the org re-wraps
    its blobs under a new key-encryption key)."""
    return json.loads(node._tenant_secret(node.store.get(row.org_id, row.key_type, row.version)))


def _versions(node, org) -> list:
    return [dataclasses.replace(r, wrapped=None) for r in node.store.secrets(org)]


def _customer_dek(client, org, row, descriptor) -> bytes:
    """What the customer can compute on their own: Decrypt of the stored blob in their AWS."""
    return client.decrypt(CiphertextBlob=base64.b64decode(descriptor["blob"]),
                          KeyId=descriptor["key_id"],
                          EncryptionContext=ekm.context(org, row.key_type, row.version))[
        "Plaintext"]


def test_policy_document_is_least_privilege():
    arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    doc = ekm.policy_document("acme", "arn:aws:iam::444455556666:role/kms-eu", arn)
    admin, use = doc["Statement"]
    assert admin["Principal"] == {"AWS": "arn:aws:iam::111122223333:root"}
    assert not any(a in admin["Action"] for a in ("kms:Decrypt", "kms:Encrypt", "kms:*",
                                                  "kms:GenerateDataKey*"))
    assert use["Principal"] == {"AWS": "arn:aws:iam::444455556666:role/kms-eu"}
    assert use["Action"] == ["kms:GenerateDataKeyWithoutPlaintext", "kms:Decrypt"]
    assert use["Condition"]["StringEquals"] == {"kms:EncryptionContext:org": "acme"}
    with pytest.raises(KmsError, match="not an AWS KMS key ARN"):
        ekm.policy_document("acme", "arn:aws:iam::444455556666:role/x", "alias/acme")
    with pytest.raises(KmsError, match="not an IAM principal"):
        ekm.policy_document("acme", "*", arn)


def test_ekm_end_to_end_dek_is_the_customers(node, aws, kit, release, tmp_path):
    url, pki, client, _ = aws
    arn = _ekm_org(node, aws, "ekm-acme")
    row = ekm.rotate(node, "ekm-acme")
    assert (row.source, row.derivation, row.version) == ("REMOTE", "NONE", 1)
    descriptor = _descriptor(node, row)
    assert descriptor["kind"] == "ekm" and descriptor["key_id"] == arn
    assert set(descriptor) == {"kind", "key_id", "blob"}          # no DEK in the row
    sdk = FieldEncryptor(node)
    blob = sdk.encrypt("ekm-acme", b"card 4111")
    dek = _customer_dek(client, "ekm-acme", row, descriptor)
    assert FieldEncryptor(CustomerDek(dek)).decrypt("ekm-acme", blob) == b"card 4111"
    # A cache miss on a fresh node: Decrypt in AWS with the same context.
    node.cache.flush()
    assert sdk.decrypt("ekm-acme", blob) == b"card 4111"
    # Rotation: a new blob under the same root key, the old version still decrypts.
    node.clock.now += 5 * 3600
    row2 = ekm.rotate(node, "ekm-acme")
    assert row2.version == 2 and _descriptor(node, row2)["blob"] != descriptor["blob"]
    blob2 = sdk.encrypt("ekm-acme", b"v2")
    assert FieldEncryptor(node).decrypt("ekm-acme", blob) == b"card 4111"
    assert sdk.decrypt("ekm-acme", blob2) == b"v2"
    # Destroy v1: crypto-shredded here even though the root key still exists in AWS.
    node.destroy("ekm-acme", "field", 1)
    with pytest.raises(KmsError, match="key destroyed"):
        sdk.decrypt("ekm-acme", blob)
    backup = node.export_backup("ekm-acme", tmp_path / "ekm-acme.json")
    # Nothing of either DEK in the store or the backup.
    dek2 = _customer_dek(client, "ekm-acme", row2, _descriptor(node, row2))
    assert_secrets_absent([dek, dek2, node._pin.reveal().encode()],
                   [node.config.store.removeprefix("sqlite:///"), backup])


def test_context_and_key_are_enforced_by_aws(node, aws):
    _ekm_org(node, aws, "ekm-ctx")
    row = ekm.rotate(node, "ekm-ctx")
    descriptor = _descriptor(node, row)
    # AWS binds the blob to {org, key_type, version}: another version's context is refused.
    with pytest.raises(ekm.KeyUnavailable, match="encryption context mismatch"):
        ekm.dek(node, dataclasses.replace(row, version=7), descriptor)
    # A blob presented as another key's (moto answers AccessDenied, AWS IncorrectKey).
    other = aws[2].create_key()["KeyMetadata"]["Arn"]
    with pytest.raises(ekm.KeyUnavailable, match=r"AccessDeniedException|IncorrectKeyException"):
        ekm.dek(node, row, {**descriptor, "key_id": other})
    # Our own binding comes first: the row's blob copied into another version fails in the HSM.
    node.clock.now += 5 * 3600
    row2 = ekm.rotate(node, "ekm-ctx")
    db = sqlite3.connect(node.config.store.removeprefix("sqlite:///"))
    db.execute("UPDATE tenant_secrets SET wrapped = ? WHERE org_id = ? AND version = 2",
               (row.wrapped, "ekm-ctx"))
    db.commit()
    db.close()
    forged = dataclasses.replace(row2, wrapped=row.wrapped)
    with pytest.raises(CorruptRecord):
        node._tenant_secret(forged)


def test_unreachable_and_vanished_keys_fail_closed_blob_untouched(node, aws, tmp_path):
    url, pki, client, _ = aws
    _ekm_org(node, aws, "ekm-down")
    row = ekm.rotate(node, "ekm-down")
    blob = FieldEncryptor(node).encrypt("ekm-down", b"x")
    # Each registration change re-wraps the blobs under a new key-encryption key: compare
    # what the versions are, not their blobs.
    before = _versions(node, "ekm-down")
    # AWS unreachable (a port nobody listens on): rotate stores nothing, decrypt fails closed.
    spec = node.customer_key("ekm-down", "ekm")
    node.put_customer_key("ekm-down", "ekm", {**spec, "endpoint_url":
                                f"https://127.0.0.1:{localtls.free_port()}"})
    node.cache.flush()
    node.clock.now += 5 * 3600
    with pytest.raises(ekm.KeyUnavailable, match="unreachable"):
        ekm.rotate(node, "ekm-down")
    with pytest.raises(ekm.KeyUnavailable, match="key unavailable.*unreachable"):
        FieldEncryptor(node).decrypt("ekm-down", blob)
    assert _versions(node, "ekm-down") == before
    # TLS is verified: the right server with an unknown CA is refused too.
    node.put_customer_key("ekm-down", "ekm", {**spec, "ca_bundle": None, "ca_pem": None})
    with pytest.raises(ekm.KeyUnavailable, match="unreachable .SSLError"):
        FieldEncryptor(node).decrypt("ekm-down", blob)
    # A key that does not exist (deleted, or a registration pointing elsewhere).
    ghost = spec["key_id"].rsplit("/", 1)[0] + "/00000000-0000-0000-0000-000000000000"
    node.put_customer_key("ekm-down", "ekm", {**spec, "key_id": ghost})
    with pytest.raises(ekm.KeyUnavailable, match=r"does not exist.*\(NotFoundException\)"):
        ekm.rotate(node, "ekm-down")
    with pytest.raises(ekm.KeyUnavailable, match="NotFoundException"):
        ekm.dek(node, row, {**_descriptor(node, row), "key_id": ghost})
    assert _versions(node, "ekm-down") == before
    # Back to the real registration: the untouched blob serves again.
    node.put_customer_key("ekm-down", "ekm", spec)
    assert FieldEncryptor(node).decrypt("ekm-down", blob) == b"x"


def test_no_credentials_and_unregistered_orgs(node, aws, monkeypatch):
    node.create_tenant("ekm-none", "sandbox")
    with pytest.raises(KmsError, match="no EKM root key"):
        ekm.rotate(node, "ekm-none")
    _ekm_org(node, aws, "ekm-nocreds")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ekm.KeyUnavailable, match="no AWS credentials"):
        ekm.rotate(node, "ekm-nocreds")


def test_cli_ekm_flow(kit, release, aws, tmp_path):
    url, pki, client, _ = aws
    cfg = kms_config(kit, tmp_path, release.output_dir)
    env = {**kit.environ(), **localtls.AWS_ENV, "HSM_PIN": kit.regionals["eu"].user_pin.reveal()}

    def kms(*args):
        return run_cli("kms", "--config", cfg.path, *args, env=env)
    arn = client.create_key()["KeyMetadata"]["Arn"]
    out = kms("ekm", "policy", "--org", "cli-ekm", "--principal",
              "arn:aws:iam::123456789012:role/kms-eu", "--key-arn", arn)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["Id"] == "hsm-suite-ekm-cli-ekm"   # JSON only on stdout
    bad = kms("ekm", "policy", "--org", "x", "--principal", "nobody", "--key-arn", arn)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert kms("tenant", "create", "--org", "cli-ekm", "--no-secret").returncode == 0
    assert "no usable" in kms("encrypt", "--org", "cli-ekm", "hi").stderr
    add = kms("ekm", "add", "--org", "cli-ekm", "--key-id", arn, "--endpoint-url", url,
              "--ca-bundle", str(pki.ca))
    assert add.returncode == 0, add.stderr
    rot = kms("tenant", "rotate", "--org", "cli-ekm", "--source", "ekm")
    assert rot.returncode == 0 and "v1 ACTIVE (REMOTE)" in rot.stdout, rot.stderr
    enc = kms("encrypt", "--org", "cli-ekm", "hello ekm")
    assert enc.returncode == 0, enc.stderr
    dec = kms("decrypt", "--org", "cli-ekm", enc.stdout.strip())
    assert dec.returncode == 0 and dec.stdout == "hello ekm\n", dec.stderr
    lst = kms("tenant", "list", "--org", "cli-ekm")
    assert "REMOTE   NONE" in lst.stdout
    # AWS unreachable from the CLI: one line, exit 2, no traceback.
    env_down = {**env, "AWS_CA_BUNDLE": "/nonexistent"}
    kms_down = run_cli("kms", "--config", cfg.path, "ekm", "add", "--org", "cli-ekm",
                       "--key-id", "not-an-arn", env=env_down)
    assert kms_down.returncode == 2 and "not an AWS KMS key ARN" in kms_down.stderr
    assert "Traceback" not in kms_down.stderr
