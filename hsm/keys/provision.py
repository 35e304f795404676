"""Provision the primary and regional HSMs and certify regional keys.

Provisioning converges: each role's key is generated only if its label is absent, an existing key
is re-checked (attributes read back) and reported, and certificate files are written once. A run
interrupted between two keys is finished by running it again; nothing is ever replaced.

Regional certification. The regional encryption key is RSA with UNWRAP only, so it cannot sign a
CSR (allowing SIGN on it would widen what a stolen PIN can do). The regional side instead writes a
*certification request*: its SPKI, token serial and region, plus the SPKI's SHA-256 fingerprint.
The file proves nothing by itself; the primary side issues the certificate only after an officer
confirms that the fingerprint read on the regional console (hex or PGP words) equals the one in
the file (``--fingerprint`` or the interactive prompt). That comparison is the proof of origin.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import keys

from hsm.core.errors import HsmError, UsageError
from hsm.core.token import Token
from suite import errors as suite_errors
from suite import fingerprint as fp
from suite.files import check_writable, write_new

from . import x509 as certs
from .keygen import KeyPairInfo, check_private_attributes, existing_keypair, generate_keypair
from .roles import (DEFAULT_SIGNING, PRIMARY_ENCRYPTION, REGIONAL_AUDIT_SIGNING,
                    REGIONAL_ENCRYPTION, SIGNING_ROLES, KeyRole)

REQUEST_VERSION = 1
DEFAULT_ORG = "hsm-suite"
CERT_DAYS = {"primary-signing": 3650, "primary-encryption": 1825, "regional-encryption": 1825}


@dataclass
class Outcome:
    """What provisioning did for one key: ``created`` or ``exists``, and where things are."""

    role: str
    label: str
    status: str
    fingerprint: bytes
    certificate: Path | None = None
    request: Path | None = None

    @property
    def certificate_path(self) -> Path:
        """The certificate this outcome issued or found (certification always has one)."""
        if self.certificate is None:
            raise HsmError(f"{self.label}: no certificate in this outcome ({self.status})")
        return self.certificate

    @property
    def request_path(self) -> Path:
        """The certification request written (a regional initialisation always has one)."""
        if self.request is None:
            raise HsmError(f"{self.label}: no request in this outcome ({self.status})")
        return self.request

    def lines(self) -> list[str]:
        out = [f"{self.label} ({self.role}): {self.status}", *fp.display(self.fingerprint)]
        if self.certificate:
            out.append(f"  certificate {self.certificate}")
        if self.request:
            out.append(f"  request     {self.request}")
        return out


def _ensure_keypair(token: Token, role: KeyRole, label: str, *,
                    allow_weak_token: bool = False,
                    progress: Callable[[str], None] | None = None) -> tuple[KeyPairInfo, str]:
    info = existing_keypair(token, role, label)
    if info is not None:
        return info, "exists"
    if progress is not None:  # RSA-4096 takes seconds on SoftHSM2, longer on some HSMs
        kind = f"RSA-{role.bits}" if role.algorithm == "rsa" else f"EC {role.curve}"
        progress(f"generating the {kind} key pair {label!r} in token {token.label!r}...")
    return generate_keypair(token, role, label, allow_weak_token=allow_weak_token), "created"


def _cert_matches(path: Path, spki: keys.PublicKeyInfo) -> bool:
    try:
        cert = certs.load_pem(path.read_bytes())
        return cert.public_key.dump() == spki.dump()
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(f"{path} exists but is not a readable certificate ({exc})",
                         hint="outputs are never overwritten; move it away and run again") \
            from None


def _write_cert_once(path: Path, make, spki: keys.PublicKeyInfo, *,
                     key_label: str | None = None, token_label: str | None = None) -> Path:
    if path.exists():
        if not _cert_matches(path, spki):
            raise UsageError(f"{path} holds a certificate for another key",
                             hint="it is stale; move it away and run again")
        return path
    pem = certs.to_pem(make())
    try:
        return write_new(path, pem)
    except suite_errors.UsageError as exc:  # suite.files raises the token-free kind
        if key_label is None:
            raise
        # The key pair is on the token already: say so, and that a re-run adopts it (it is
        # never generated twice) rather than leaving a key nobody knows about.
        raise UsageError(str(exc).split(" - ")[0], hint=(
            f"the key pair {key_label!r} stays on token {token_label!r}; fix the directory and "
            "run the same command again: it adopts the key pair and writes the certificate")) \
            from None


def init_primary(token: Token, out_dir: Path, *, signing: str = DEFAULT_SIGNING,
                 organization: str = DEFAULT_ORG, allow_weak_token: bool = False,
                 progress: Callable[[str], None] | None = None) -> list[Outcome]:
    """Signing key pair + self-signed certificate, encryption key pair + certificate."""
    _check_out_dir(out_dir)
    if signing not in SIGNING_ROLES:
        raise UsageError(f"unknown signing algorithm {signing!r}",
                         hint="choose one of " + ", ".join(SIGNING_ROLES))
    role = SIGNING_ROLES[signing]
    sign_label = f"{token.label}-signing"
    enc_label = f"{token.label}-encryption"
    existing = existing_keypair(token, role, sign_label, check=False)
    if existing is not None:
        role = _signing_role_of(token, existing)
    sig_info, sig_status = _ensure_keypair(token, role, sign_label,
                                           allow_weak_token=allow_weak_token, progress=progress)
    sig_spki = certs.public_key_info(token, sig_info.public)
    root_name = certs.names(role="signing", token_label=token.label, organization=organization,
                            serial=token.serial)
    sig_cert = _write_cert_once(
        out_dir / f"{sign_label}.pem",
        lambda: certs.issue(token, issuer_key=sig_info.private, signature=role.signature,
                            subject=root_name, subject_spki=sig_spki, issuer_name=None,
                            issuer_spki=sig_spki, ca=True,
                            key_usage={"key_cert_sign", "crl_sign", "digital_signature"},
                            days=CERT_DAYS["primary-signing"]),
        sig_spki, key_label=sign_label, token_label=token.label)
    issuer_name = certs.load_pem(sig_cert.read_bytes()).subject
    enc_info, enc_status = _ensure_keypair(token, PRIMARY_ENCRYPTION, enc_label,
                                           allow_weak_token=allow_weak_token, progress=progress)
    enc_spki = certs.public_key_info(token, enc_info.public)
    enc_cert = _write_cert_once(
        out_dir / f"{enc_label}.pem",
        lambda: certs.issue(token, issuer_key=sig_info.private, signature=role.signature,
                            subject=certs.names(role="encryption", token_label=token.label,
                                                organization=organization, serial=token.serial),
                            subject_spki=enc_spki, issuer_name=issuer_name, issuer_spki=sig_spki,
                            ca=False, key_usage={"key_encipherment"},
                            days=CERT_DAYS["primary-encryption"]),
        enc_spki, key_label=enc_label, token_label=token.label)
    return [Outcome("primary-signing", sign_label, sig_status, certs.fingerprint(sig_spki),
                    certificate=sig_cert),
            Outcome("primary-encryption", enc_label, enc_status, certs.fingerprint(enc_spki),
                    certificate=enc_cert)]


def _signing_role_of(token: Token, info: KeyPairInfo) -> KeyRole:
    """An existing signing key keeps its algorithm, whatever --signing says on a re-run."""
    spki = certs.public_key_info(token, info.public)
    if spki.algorithm == "ec":
        return SIGNING_ROLES["ecdsa-p384"]
    return SIGNING_ROLES["rsa-pss-4096" if spki.bit_size > 3072 else "rsa-pss-3072"]


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory whose parent does not exist: a typo must not silently create
    a tree somewhere else (the directory itself is created if its parent is there)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        check_writable(out_dir, what="--out directory")  # before any key is generated
        return
    if out_dir.exists():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    if not out_dir.parent.is_dir():
        raise UsageError(f"--out {out_dir}: its parent directory {out_dir.parent} does not exist",
                         hint="create it first, or give an existing directory")
    check_writable(out_dir, what="--out directory")
    out_dir.mkdir(mode=0o755)


def init_regional(token: Token, region: str, out_dir: Path, *,
                  allow_weak_token: bool = False,
                  progress: Callable[[str], None] | None = None) -> Outcome:
    """Regional encryption key pair and its certification request file."""
    if not region or not region.replace("-", "").isalnum():
        raise UsageError(f"bad region name {region!r}", hint="use letters, digits and '-'")
    _check_out_dir(out_dir)
    label = f"{token.label}-encryption"
    info, status = _ensure_keypair(token, REGIONAL_ENCRYPTION, label,
                                   allow_weak_token=allow_weak_token, progress=progress)
    spki = certs.public_key_info(token, info.public)
    digest = certs.fingerprint(spki)
    request = {
        "version": REQUEST_VERSION,
        "kind": "regional-encryption-certification-request",
        "region": region,
        "token_label": token.label,
        "token_serial": token.serial,
        "key_label": label,
        "key_id": info.key_id.hex(),
        "spki_der_hex": spki.dump().hex(),
        "fingerprint_sha256": digest.hex(),
        "created": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    path = out_dir / f"{token.label}.request.json"
    if path.exists():
        old = read_request(path)
        if old["fingerprint_sha256"] != digest.hex():
            raise UsageError(f"{path} is a request for another key",
                             hint="it is stale; move it away and run again")
    else:
        write_new(path, (json.dumps(request, indent=2) + "\n").encode())
    return Outcome("regional-encryption", label, status, digest, request=path)


def audit_key_label(token: Token) -> str:
    return f"{token.label}-audit"


def init_audit_key(token: Token, *, allow_weak_token: bool = False
                   ) -> tuple[Outcome, keys.PublicKeyInfo]:
    """The regional KMS's audit-signing key pair (ECDSA P-256, SIGN only, raw CKM_ECDSA,
    non-modifiable), generated in the token if absent, re-checked against its policy if present.

    Its public key is *pinned*, not certified: whoever verifies an audit log offline compares
    the checkpoints' key with the fingerprint read on the regional console (``hsm fingerprint
    --key TOKEN-audit``), as for the regional request. A certificate would need the offline
    primary for every regional token already in service before its audit could be keyed."""
    label = audit_key_label(token)
    info, status = _ensure_keypair(token, REGIONAL_AUDIT_SIGNING, label,
                                   allow_weak_token=allow_weak_token)
    spki = certs.public_key_info(token, info.public)
    return Outcome(REGIONAL_AUDIT_SIGNING.name, label, status, certs.fingerprint(spki)), spki


def read_request(path: Path) -> dict:
    """Load and check a certification request; its fingerprint must match its SPKI."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read certification request {path}: {exc}") from None
    required = {"version", "kind", "region", "token_label", "token_serial", "key_label",
                "spki_der_hex", "fingerprint_sha256"}
    missing = required - set(data) if isinstance(data, dict) else required
    if missing:
        raise UsageError(f"certification request {path} lacks {', '.join(sorted(missing))}")
    if data["version"] != REQUEST_VERSION or \
            data["kind"] != "regional-encryption-certification-request":
        raise UsageError(f"{path} is not a version-{REQUEST_VERSION} regional request")
    try:
        spki = keys.PublicKeyInfo.load(bytes.fromhex(data["spki_der_hex"]))
        _ = spki.native  # forces a full parse: a truncated or altered SPKI fails here
    except ValueError as exc:
        raise UsageError(f"{path}: the public key is not a valid SPKI ({exc})") from None
    if certs.fingerprint(spki).hex() != data["fingerprint_sha256"]:
        raise UsageError(f"{path}: the fingerprint does not match the public key in the file",
                         hint="the file was altered; ask the regional officer for a new one")
    if spki.algorithm != "rsa" or spki.bit_size < 3072:
        raise UsageError(f"{path}: a regional encryption key must be RSA >= 3072 bits "
                         f"(got {spki.algorithm} {spki.bit_size})")
    for field in ("region", "token_label"):
        value = data[field]
        if not isinstance(value, str) or not value or len(value) > 63 or \
                not all(c.isascii() and (c.isalnum() or c in "._-") for c in value) or \
                value.startswith("."):
            raise UsageError(f"{path}: {field} {value!r} is not a plain name "
                             "(letters, digits, '.', '_', '-')")
    data["spki"] = spki
    return data


def certify_regional(token: Token, request_path: Path, out_dir: Path, *,
                     confirmed_fingerprint: bytes, organization: str = DEFAULT_ORG) -> Outcome:
    """Issue the regional certificate, signed by the primary signing key in ``token``."""
    req = read_request(request_path)
    digest = bytes.fromhex(req["fingerprint_sha256"])
    if confirmed_fingerprint != digest:
        raise HsmError("the confirmed fingerprint does not match the request's key",
                       operation="certify-regional",
                       hint="do not certify: the request did not come from the regional token "
                            "the officer read, or was altered")
    sign_label = f"{token.label}-signing"
    info = existing_keypair(token, SIGNING_ROLES[DEFAULT_SIGNING], sign_label, check=False)
    if info is None:
        raise HsmError(f"no signing key {sign_label!r} on token {token.label!r}",
                       hint="run `hsm init-primary` first")
    role = _signing_role_of(token, info)
    check_private_attributes(token, role, sign_label)
    issuer_cert_path = out_dir / f"{sign_label}.pem"
    if not issuer_cert_path.exists():
        raise UsageError(f"the primary signing certificate {issuer_cert_path} is missing",
                         hint="give the --out directory `hsm init-primary` wrote to")
    issuer = certs.load_pem(issuer_cert_path.read_bytes())
    sig_spki = certs.public_key_info(token, info.public)
    if issuer.public_key.dump() != sig_spki.dump():
        raise UsageError(f"{issuer_cert_path} does not belong to {sign_label}")
    subject = certs.names(role="encryption", token_label=req["token_label"],
                          organization=organization, region=req["region"],
                          serial=req["token_serial"])
    existed = (out_dir / f"{req['token_label']}.pem").exists()
    path = _write_cert_once(
        out_dir / f"{req['token_label']}.pem",
        lambda: certs.issue(token, issuer_key=info.private, signature=role.signature,
                            subject=subject, subject_spki=req["spki"], issuer_name=issuer.subject,
                            issuer_spki=sig_spki, ca=False, key_usage={"key_encipherment"},
                            days=CERT_DAYS["regional-encryption"]),
        req["spki"])
    return Outcome("regional-encryption", req["key_label"], "exists" if existed else "certified",
                   digest, certificate=path)
