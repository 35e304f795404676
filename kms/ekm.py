"""External Key Management: the org's root key stays in the customer's AWS KMS.

Rotation asks AWS for ``GenerateDataKeyWithoutPlaintext`` (AES_256) under the customer's key with
the encryption context {org, key_type, version}; the store keeps only the returned ciphertext
blob (inside the row's HSM-wrapped descriptor, source REMOTE, derivation NONE). On a cache miss
the node calls ``Decrypt`` with the same key id and context and the DEK goes only into the
encrypted key cache. The customer revokes by disabling the key, deleting it or editing its key
policy; every AWS failure is a ``KeyUnavailable`` that names the cause, and the stored blob is
never touched by a failure.

AWS credentials come from boto3's ordinary chain (environment, shared files, instance role):
never from this project's configuration.
"""

from __future__ import annotations

import base64
import os
import re

from .errors import KeyUnavailable, KmsError

KIND = "ekm"
CONTEXT_KEYS = ("org", "key_type", "version")
FETCH_TIMEOUT_S = 3.0
_ARN = re.compile(r"^arn:aws[a-z-]*:kms:([a-z0-9-]+):(\d{12}):key/[A-Za-z0-9-]{1,128}$")
_PRINCIPAL = re.compile(r"^arn:aws[a-z-]*:(iam|sts)::\d{12}:[A-Za-z0-9+=,.@_/:-]{1,512}$")
# AWS error codes -> what the operator should read. Anything else is reported by its code.
_CAUSES = {
    "AccessDeniedException": "access denied by the customer's key policy or IAM",
    "DisabledException": "the customer disabled the key",
    "NotFoundException": "the key does not exist (deleted, or a wrong key id)",
    "KMSInvalidStateException": "the key is not usable (pending deletion or deleted)",
    "InvalidCiphertextException": "AWS refused the ciphertext: encryption context mismatch or "
                                  "a blob of another key",
    "IncorrectKeyException": "the blob was made under another key",
    "UnrecognizedClientException": "AWS did not accept the node's credentials",
    "InvalidSignatureException": "AWS did not accept the node's credentials",
}


def check_key_arn(arn: str) -> re.Match:
    m = _ARN.match(arn or "")
    if m is None:
        raise KmsError(f"not an AWS KMS key ARN: {arn!r}",
                       hint="arn:aws:kms:REGION:ACCOUNT:key/KEY-ID (an alias is not accepted: "
                            "it can be re-pointed without the KMS noticing)")
    return m


def policy_document(org_id: str, principal: str, key_arn: str) -> dict:
    """The key policy the customer applies: account administrators may manage but not use the
    key; the regional KMS principal may only GenerateDataKeyWithoutPlaintext and Decrypt, and
    only with an encryption context naming this org and a key type this KMS knows."""
    account = check_key_arn(key_arn).group(2)
    if not _PRINCIPAL.match(principal or ""):
        raise KmsError(f"not an IAM principal ARN: {principal!r}",
                       hint="arn:aws:iam::ACCOUNT:role/NAME of the regional KMS")
    partition = key_arn.split(":")[1]
    admin_actions = ["kms:Create*", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*",
                     "kms:Update*", "kms:Revoke*", "kms:Disable*", "kms:Get*", "kms:Delete*",
                     "kms:TagResource", "kms:UntagResource", "kms:ScheduleKeyDeletion",
                     "kms:CancelKeyDeletion"]
    return {
        "Version": "2012-10-17",
        "Id": f"hsm-suite-ekm-{org_id}",
        "Statement": [
            {"Sid": "KeyAdministrationByTheCustomerAccount", "Effect": "Allow",
             "Principal": {"AWS": f"arn:{partition}:iam::{account}:root"},
             "Action": admin_actions, "Resource": "*"},
            {"Sid": "RegionalKmsDataKeysForThisOrgOnly", "Effect": "Allow",
             "Principal": {"AWS": principal},
             "Action": ["kms:GenerateDataKeyWithoutPlaintext", "kms:Decrypt"],
             "Resource": "*",
             "Condition": {
                 "StringEquals": {"kms:EncryptionContext:org": org_id},
                 "ForAnyValue:StringEquals": {"kms:EncryptionContext:key_type":
                                              ["field", "database"]},
                 "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": list(CONTEXT_KEYS)},
                 "Null": {"kms:EncryptionContext:org": "false",
                          "kms:EncryptionContext:key_type": "false",
                          "kms:EncryptionContext:version": "false"}}},
        ],
    }


MAX_CA_BYTES = 1024 * 1024


def read_ca(path: str) -> str:
    """A CA bundle's PEM text, read once at registration: the registration seals these bytes,
    never the path (a file someone can rewrite later)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CA_BYTES + 1)
    except OSError as exc:
        raise KmsError(f"cannot read the CA bundle {path}: {exc.strerror}") from None
    if len(data) > MAX_CA_BYTES or b"-----BEGIN CERTIFICATE-----" not in data:
        raise KmsError(f"{path} is not a PEM CA bundle (at most 1 MiB of certificates)")
    return data.decode("ascii", "replace")


def register(kms, org_id: str, key_id: str, *, endpoint_url: str | None = None,
             aws_region: str | None = None, ca_bundle: str | None = None) -> dict:
    m = check_key_arn(key_id)
    if endpoint_url is not None and not endpoint_url.startswith(("https://", "http://")):
        raise KmsError(f"--endpoint-url must be an http(s) URL, not {endpoint_url!r}")
    spec = {"key_id": key_id, "endpoint_url": endpoint_url,
            "aws_region": aws_region or m.group(1), "ca_bundle": ca_bundle,
            "ca_pem": read_ca(ca_bundle) if ca_bundle else None}
    kms.put_customer_key(org_id, KIND, spec)
    return spec


def context(org_id: str, key_type: str, version: int) -> dict[str, str]:
    return {"org": org_id, "key_type": key_type, "version": str(version)}


_ca_files: dict[str, str] = {}


def _ca_file(pem: str) -> str:
    """botocore takes a CA bundle only as a path: the sealed bytes go into a file of this
    process's own 0700 temporary directory, named by their hash (never the registered path)."""
    import hashlib
    import tempfile
    digest = hashlib.sha256(pem.encode()).hexdigest()
    path = _ca_files.get(digest)
    if path is None:
        folder = tempfile.mkdtemp(prefix="kms-ekm-ca-")
        path = os.path.join(folder, digest + ".pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(pem)
        _ca_files[digest] = path
    return path


def _client(spec: dict):
    import boto3
    from botocore.config import Config
    cfg = Config(connect_timeout=FETCH_TIMEOUT_S, read_timeout=FETCH_TIMEOUT_S,
                 retries={"max_attempts": 1, "mode": "standard"})
    # Only the sealed CA bytes: a registration of the path alone (made before sealing and not
    # upgraded) verifies against the system's roots, never against a file someone can rewrite.
    verify = _ca_file(spec["ca_pem"]) if spec.get("ca_pem") else True
    return boto3.session.Session().client(
        "kms", region_name=spec["aws_region"], endpoint_url=spec.get("endpoint_url"),
        verify=verify, config=cfg)


def _call(org_id: str, what: str, fn):
    """Run one AWS call; every failure becomes one KeyUnavailable line naming the cause."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
    try:
        return fn()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        cause = _CAUSES.get(code, "AWS KMS refused the request")
        raise KeyUnavailable(f"key unavailable: org {org_id}: {what} failed: {cause} ({code})",
                             hint="the customer controls this key in their AWS account") from None
    except NoCredentialsError:
        raise KeyUnavailable(f"key unavailable: org {org_id}: {what}: no AWS credentials for "
                             "this node", hint="set them the ordinary boto3 way (environment, "
                             "shared credentials file, instance role)") from None
    except BotoCoreError as exc:  # unreachable endpoint, TLS failure, timeout
        raise KeyUnavailable(f"key unavailable: org {org_id}: {what}: AWS KMS unreachable "
                             f"({type(exc).__name__})", hint="check the endpoint and the "
                             "network; the stored key is unchanged") from None


def rotate(kms, org_id: str, key_type: str = "field"):
    """A new version whose DEK is generated by AWS under the customer's root key."""
    spec = kms.customer_key(org_id, KIND)
    if spec is None:
        raise KmsError(f"org {org_id} has no EKM root key", hint="register it with `kms ekm add`")
    client = _client(spec)

    # Called inside the store's write transaction (the version is known only there): the AWS
    # call is bounded by the 3 s timeouts, and a failure rolls the transaction back whole.
    def descriptor(version: int) -> dict:
        out = _call(org_id, "GenerateDataKeyWithoutPlaintext", lambda: (
            client.generate_data_key_without_plaintext(
                KeyId=spec["key_id"], KeySpec="AES_256",
                EncryptionContext=context(org_id, key_type, version))))
        return {"kind": KIND, "key_id": spec["key_id"],
                "blob": base64.b64encode(out["CiphertextBlob"]).decode()}
    return kms.add_remote(org_id, key_type, descriptor)


def dek(kms, row, descriptor: dict) -> bytes:
    """On a cache miss: Decrypt the stored blob with the same key id and context."""
    spec = kms.customer_key(row.org_id, KIND)      # as sealed in the HSM
    if spec is None:
        raise KeyUnavailable(f"key unavailable: org {row.org_id}: its EKM registration is gone")
    client = _client(spec)
    blob = base64.b64decode(descriptor["blob"])
    out = _call(row.org_id, "Decrypt", lambda: client.decrypt(
        CiphertextBlob=blob, KeyId=descriptor["key_id"],
        EncryptionContext=context(row.org_id, row.key_type, row.version)))
    return out["Plaintext"]


def enable(kms) -> None:
    kms.dek_sources[KIND] = dek
