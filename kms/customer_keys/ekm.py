"""External Key Management: the org's root key stays in the customer's AWS KMS.

Rotation asks AWS for ``GenerateDataKeyWithoutPlaintext`` (AES_256) under the customer's key with
the encryption context {org, key_type, version}; the store keeps only the returned ciphertext
blob (inside the row's HSM-wrapped descriptor, source REMOTE, derivation NONE). On a cache miss
the node calls ``Decrypt`` with the same key id and context and the DEK goes only into the
encrypted key cache. The customer revokes by disabling the key, deleting it or editing its key
policy; every AWS failure is a ``KeyUnavailable`` that names the cause, and the stored blob is
never touched by a failure.

AWS credentials come from boto3's ordinary chain (environment, shared files, instance role):
never from this project's configuration. botocore signs each request (SigV4); the request itself
goes through ``kms.customer_keys.outbound``: one total deadline of ``FETCH_TIMEOUT_S`` for the
whole call (boto3's
connect and read timeouts are per socket operation: an endpoint dripping a byte a second would
hold a call for ever), no redirect followed, HTTPS only, at most ``[service] outbound_per_org``
calls per org at once.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import urllib.parse
from pathlib import Path

from kms.customer_keys import outbound
from kms.errors import KeyUnavailable, KmsError

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
    if endpoint_url is not None and not endpoint_url.startswith("https://"):
        # The KMS sends the wrapped tenant key material and receives plaintext data keys here.
        raise KmsError(f"--endpoint-url must be an https:// URL, not {endpoint_url!r}",
                       hint="AWS KMS and every compatible server speak TLS")
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        raise KmsError(f"--ca-bundle {ca_bundle} is not a file", hint="fix the path; nothing "
                                                                      "was registered")
    if aws_region is not None and aws_region != m.group(1):
        raise KmsError(f"--aws-region {aws_region} contradicts the key ARN's region "
                       f"{m.group(1)}", hint="leave --aws-region out: the ARN names the region")
    spec = {"key_id": key_id, "endpoint_url": endpoint_url,
            "aws_region": aws_region or m.group(1), "ca_bundle": ca_bundle,
            "ca_pem": read_ca(ca_bundle) if ca_bundle else None}
    kms.put_customer_key(org_id, KIND, spec)
    return spec


def context(org_id: str, key_type: str, version: int) -> dict[str, str]:
    return {"org": org_id, "key_type": key_type, "version": str(version)}


_MAX_ANSWER = 64 * 1024


def _endpoint(spec: dict) -> str:
    return spec.get("endpoint_url") or f"https://kms.{spec['aws_region']}.amazonaws.com/"


def _aws(org_id: str, spec: dict, action: str, params: dict) -> dict:
    import botocore.session
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    url = _endpoint(spec)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https":
        raise KeyUnavailable(f"key unavailable: org {org_id}: {action}: the endpoint {url!r} "
                             "is not https", hint="re-register it with an https:// URL")
    credentials = botocore.session.get_session().get_credentials()
    if credentials is None:
        raise KeyUnavailable(f"key unavailable: org {org_id}: {action}: no AWS credentials for "
                             "this node", hint="set them the ordinary boto3 way (environment, "
                             "shared credentials file, instance role)")
    body = json.dumps(params).encode()
    host = parts.netloc.removesuffix(":443")
    req = AWSRequest(method="POST", url=url, data=body, headers={
        "Host": host, "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": f"TrentService.{action}"})
    SigV4Auth(credentials.get_frozen_credentials(), "kms", spec["aws_region"]).add_auth(req)
    try:
        # Only the CA bundle's bytes sealed with the registration, never the file at its path
        # (anyone who can write that file could name their own endpoint's CA); a registration
        # made before sealing was upgraded at the node's start (kms.node.node).
        ctx = ssl.create_default_context(cadata=spec["ca_pem"]) if spec.get("ca_pem") else \
            ssl.create_default_context()
        answer = outbound.request("POST", url, headers=dict(req.headers.items()), body=body,
                                  context=ctx, deadline_s=FETCH_TIMEOUT_S, max_body=_MAX_ANSWER)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.reason if isinstance(exc, outbound.OutboundFailure) else type(exc).__name__
        raise KeyUnavailable(f"key unavailable: org {org_id}: {action}: AWS KMS unreachable "
                             f"({reason})", hint="check the endpoint and the network; the "
                             "stored key is unchanged") from None
    except outbound.OutboundFailure as exc:
        raise KeyUnavailable(f"key unavailable: org {org_id}: {action}: AWS KMS unreachable "
                             f"({exc.reason}, {FETCH_TIMEOUT_S:g} s deadline)", hint="check the "
                             "endpoint and the network; the stored key is unchanged") from None
    if 300 <= answer.status < 400:
        raise KeyUnavailable(f"key unavailable: org {org_id}: {action}: the endpoint answered "
                             f"HTTP {answer.status}, a redirect (not followed)", code="REDIRECT")
    try:
        doc = json.loads(answer.body) if len(answer.body) <= _MAX_ANSWER else None
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        raise KeyUnavailable(f"key unavailable: org {org_id}: {action}: AWS KMS answered HTTP "
                             f"{answer.status} with no JSON object")
    if answer.status != 200:
        code = str(doc.get("__type", "?")).rsplit("#", 1)[-1][:100]
        cause = _CAUSES.get(code, "AWS KMS refused the request")
        raise KeyUnavailable(f"key unavailable: org {org_id}: {action} failed: {cause} ({code})",
                             hint="the customer controls this key in their AWS account")
    return doc


def _blob(org_id: str, doc: dict, field: str) -> bytes:
    try:
        return base64.b64decode(doc[field], validate=True)
    except (KeyError, TypeError, ValueError):
        raise KeyUnavailable(f"key unavailable: org {org_id}: AWS KMS answered without a "
                             f"valid {field}") from None


def _gated(kms, org_id: str):
    try:
        return outbound.gate(kms)(org_id)
    except outbound.Busy:
        raise KeyUnavailable(f"key unavailable: org {org_id}: its AWS KMS calls are at their "
                             "limit; retry (BUSY)", code="BUSY") from None


def rotate(kms, org_id: str, key_type: str = "field"):
    """A new version whose DEK is generated by AWS under the customer's root key."""
    spec = kms.customer_key(org_id, KIND)
    if spec is None:
        raise KmsError(f"org {org_id} has no EKM root key", hint="register it with `kms ekm add`")

    # Called inside the store's write transaction (the version is known only there): the AWS
    # call is bounded by the 3 s total deadline, and a failure rolls the transaction back whole.
    def descriptor(version: int) -> dict:
        with _gated(kms, org_id):
            out = _aws(org_id, spec, "GenerateDataKeyWithoutPlaintext", {
                "KeyId": spec["key_id"], "KeySpec": "AES_256",
                "EncryptionContext": context(org_id, key_type, version)})
        blob = _blob(org_id, out, "CiphertextBlob")
        return {"kind": KIND, "key_id": spec["key_id"], "blob": base64.b64encode(blob).decode()}
    return kms.add_remote(org_id, key_type, descriptor)


def dek(kms, row, descriptor: dict) -> bytes:
    """On a cache miss: Decrypt the stored blob with the same key id and context."""
    spec = kms.customer_key(row.org_id, KIND)      # as sealed in the HSM
    if spec is None:
        raise KeyUnavailable(f"key unavailable: org {row.org_id}: its EKM registration is gone")
    with _gated(kms, row.org_id):
        out = _aws(row.org_id, spec, "Decrypt", {
            "CiphertextBlob": descriptor["blob"], "KeyId": descriptor["key_id"],
            "EncryptionContext": context(row.org_id, row.key_type, row.version)})
    return _blob(row.org_id, out, "Plaintext")


def enable(kms) -> None:
    kms.dek_sources[KIND] = dek
