"""Start-up import of release bundles into the regional HSM, as session objects only.

For each bundle: the CMS signature against the pinned primary certificate, the signatures of M
officers this node pins for the release (:mod:`release.quorum`: never who the bundle says), the
region, the recipient (this HSM's own key), the practice flag, and release history (a release
imported before with other content, or another ceremony's bundle for it, is a replay and is
refused; the content is the bundle as the primary signed it, so officers countersigning an
imported release later does not change it). Then one
RSA-OAEP unwrap per secret into a sensitive, non-extractable *session* object with only the usage
it needs, and its key check value compared inside the token. Nothing is written to the token's
persistent store, so a KMS restart re-imports and a stolen token file holds no release secret.
A bundle that fails is reported with its reason; the others are still imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hsm.core import ops
from hsm.keys import attributes
from hsm.keys import x509 as hx
from hsm.core.errors import HsmError
from suite.files import read_regular
from hsm.core.token import KeyRef, Token
from release import bundle as bundles
from release import certificates as certs
from release import quorum
from release.errors import ReleaseError
from release.ids import release_key

from kms.errors import ImportRefused

SEED_TYPE = "hmac-sha256-seed"
WRAPPING_TYPE = "aes-256"
# A bundle is a few KiB (one wrap per secret); anything far larger is not one, and a FIFO or a
# link to /dev/zero named like one must neither block the node's start nor fill its memory.
MAX_BUNDLE_BYTES = 1 << 20


@dataclass(frozen=True)
class Release:
    """What the KMS holds for one release: session-object labels and the public KDF salt."""

    release: str
    ceremony_id: str
    bundle_sha256: str
    kdf_salt: bytes
    seed: KeyRef
    wrapping_key: KeyRef


@dataclass
class ImportReport:
    held: dict[str, Release] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)   # bundle file -> reason
    skipped: dict[str, str] = field(default_factory=dict)   # valid, but not for this KMS
    notes: list[str] = field(default_factory=list)          # the start-up sweep and upgrade

    def lines(self) -> list[str]:
        out = [f"imported release {r.release} (ceremony {r.ceremony_id})"
               for r in self.held.values()]
        out += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        out += [f"REFUSED {name}: {why}" for name, why in self.refused.items()]
        return out + self.notes


def own_key_fingerprint(token: Token) -> str:
    return hx.fingerprint(hx.public_key_info(token, ops.public(f"{token.label}-encryption"))).hex()


def import_bundles(token: Token, *, region: str, primary_cert_path: Path, bundle_dir: Path,
                   allow_practice: bool, history: dict[str, tuple[str, str]],
                   officers: quorum.Pins | None, record=None) -> ImportReport:
    """Import every ``bundle-*.p7`` under ``bundle_dir`` (recursively), oldest release first.

    ``officers``: the pinned officer sets a bundle's signatures must meet; ``None`` (a rehearsal
    node) accepts PRACTICE bundles only.

    ``history`` maps release -> (ceremony id, bundle SHA-256) of earlier imports (the store);
    ``record(release, ceremony_id, sha256)`` is called after a first successful import.
    """
    report = ImportReport()
    if not Path(bundle_dir).is_dir():
        raise ImportRefused(f"the bundle directory {bundle_dir} does not exist",
                            hint="set bundle_dir in the KMS configuration to the directory "
                                 "holding the ceremony's bundle-*.p7 files")
    # Every start re-checks the regional key's policy: a key that lets a PIN holder unwrap a
    # release secret as extractable (provisioned before the policy) is refused, not used.
    attributes.require(token, ops.private(f"{token.label}-encryption"),
                       attributes.REGIONAL_ENCRYPTION, purpose="import release bundles")
    # Session copies left by a node started earlier in this process: one sweep, not per key.
    ops.destroy_session_secrets(token, "release-")
    primary = certs.as_asn1(certs.check_primary(primary_cert_path))
    own = own_key_fingerprint(token)
    candidates = []
    for path in sorted(Path(bundle_dir).rglob("bundle-*.p7")):
        try:
            der = read_regular(path, MAX_BUNDLE_BYTES, what="bundle")
            verified = bundles.verify(der, primary, where=path.name)
            manifest = verified.manifest
            if manifest["region"] == region:   # others are skipped below, not judged
                _check_quorum(verified, officers, path.name)
            candidates.append((release_key(manifest["release"]), path, verified.core_sha256,
                               manifest))
        # ValueError: a non-numeric release id
        except (OSError, ReleaseError, ImportRefused, ValueError) as exc:
            report.refused[path.name] = str(exc)
    for _, path, core_sha256, manifest in sorted(candidates, key=lambda c: c[0]):
        try:
            rel = _import_one(token, path, core_sha256, manifest, region=region, own=own,
                              allow_practice=allow_practice, history=history,
                              held=report.held)
        except (ImportRefused, HsmError) as exc:
            report.refused[path.name] = str(exc)
            continue
        if rel is None:  # another region's or the escrow bundle: not for this KMS, not an error
            report.skipped[path.name] = (
                "the escrow bundle (for the primary HSM, not a KMS)"
                if manifest["region"] == "escrow" else
                f"a bundle for region {manifest['region']!r}, not this KMS's {region!r}")
            continue
        report.held[rel.release] = rel
        if rel.release not in history and record is not None:
            record(rel.release, rel.ceremony_id, rel.bundle_sha256)
            history[rel.release] = (rel.ceremony_id, rel.bundle_sha256)
    return report


def _check_quorum(verified: bundles.Verified, officers: quorum.Pins | None, name: str) -> None:
    if officers is not None:
        quorum.check(verified, officers, name)
    elif not verified.manifest["practice"]:
        raise ImportRefused(f"{name}: this node pins no officers (a rehearsal node), so it "
                            "takes PRACTICE bundles only", hint=quorum.HOW_TO_PIN)


def _import_one(token: Token, path: Path, digest: str, manifest: dict, *, region: str,
                own: str, allow_practice: bool, history: dict, held: dict) -> Release | None:
    if manifest["region"] != region:
        return None
    release, ceremony_id = manifest["release"], manifest["ceremony_id"]
    if manifest["practice"] and not allow_practice:
        raise ImportRefused(f"{path.name} is a PRACTICE bundle; this KMS refuses practice "
                            "bundles", hint="allow_practice = true only on practice KMSs")
    if manifest["recipient"]["spki_sha256"] != own:
        raise ImportRefused(f"{path.name} is addressed to another key "
                            f"({manifest['recipient']['spki_sha256'][:16]}...), not this HSM's")
    if release in history and history[release] != (ceremony_id, digest):
        before = history[release]
        raise ImportRefused(f"{path.name}: release {release} was imported before from ceremony "
                            f"{before[0]} with other content; refusing a replayed or conflicting "
                            "bundle")
    if release in held:
        raise ImportRefused(f"{path.name}: a second bundle for release {release}")
    by_type = {s["type"]: s for s in manifest["secrets"]}
    if set(by_type) != {SEED_TYPE, WRAPPING_TYPE} or len(manifest["secrets"]) != 2:
        raise ImportRefused(f"{path.name}: expected one {SEED_TYPE} and one {WRAPPING_TYPE} "
                            "secret")
    refs = {}
    try:
        for stype, key_type, caps in ((SEED_TYPE, "generic-secret", "sign"),
                                      (WRAPPING_TYPE, "aes", "encrypt-decrypt")):
            entry = by_type[stype]
            label = f"release-{release}-{entry['name']}"
            ref, method, kcv = _unwrap(token, entry, key_type, caps, label)
            refs[stype] = ref
            want = entry["check_value"]
            if method != want["method"] or kcv.hex() != want["value"]:
                raise ImportRefused(f"{path.name}: the key check value of {entry['name']} does "
                                    "not match: the unwrapped key is not the one the ceremony "
                                    "made")
    except BaseException:
        for ref in refs.values():
            ops.destroy_session_object(token, ref)
        raise
    return Release(release, ceremony_id, digest, bytes.fromhex(manifest["kdf_salt"]),
                   refs[SEED_TYPE], refs[WRAPPING_TYPE])


def _unwrap(token: Token, entry: dict, key_type: str, caps: str, label: str
            ) -> tuple[KeyRef, str, bytes]:
    wrap = entry["wrap"]
    if wrap.get("mechanism") != "RSA_PKCS_OAEP":
        raise ImportRefused(f"unsupported wrap mechanism {wrap.get('mechanism')!r}")
    wrapped = ops.Wrapped(bytes.fromhex(entry["wrapped"]), "RSA_PKCS_OAEP",
                          {"hash": wrap.get("hash", "sha1")})
    return ops.unwrap_release_secret(token, ops.private(f"{token.label}-encryption"), wrapped,
                                     kind=key_type, usage=caps, label=label)
