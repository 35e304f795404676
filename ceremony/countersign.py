"""`ceremony countersign DIR`: a crypto officer adds their signature to every bundle of a closed
ceremony, without the primary HSM.

Before signing, the whole ceremony is verified offline as ``ceremony verify`` does (transcript
chain, the primary's head signature, approvals, each bundle against the transcript) except for
the officers' quorum, which is what is being made; then the officer is shown the release digest
(one SHA-256 over every bundle's manifest) in hex and PGP words and must confirm the digest the
ceremony showed them (``--digest``, or typed at a terminal). Each bundle then gains one
SignerInfo (:func:`release.bundle.countersign`) and is replaced atomically, under a lock so two
officers signing at once both land. A bundle the officer signed already is left as it is, so
running it twice changes nothing. The same command migrates releases made before officers
countersigned (version-1 manifests): what they sign is the manifest the primary signed then.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from release import bundle as bundles
from release import certificates as certs
from release import signers
from suite import fingerprint as fp
from suite.files import replace

from .errors import ApprovalError
from .verify import verify_directory


@dataclass(frozen=True)
class Outcome:
    bundle: str
    status: str   # "signed" | "already signed"


def release_digest_of(directory: Path, primary_cert_path: Path) -> tuple[bytes, list[str]]:
    """Verify the ceremony (all but the officers' quorum); its release digest and bundles."""
    result = verify_directory(directory, primary_cert_path, None)
    return bytes.fromhex(result["release_digest"]), result["bundles"]


def countersign(directory: Path, primary_cert_path: Path, signer: signers.OfficerSigner,
                officer: str, confirmed: bytes) -> list[Outcome]:
    """Add ``signer``'s signature to every bundle of the closed ceremony in ``directory``,
    after ``confirmed`` (the digest the officer was shown) matched the release digest."""
    directory = Path(directory)
    primary = certs.as_asn1(certs.load(primary_cert_path, "primary signing"))
    try:
        signers.curve(signer.spki)
    except ValueError as exc:
        raise ApprovalError(f"this key cannot countersign: {exc}",
                            hint="make an ECDSA officer key with `ceremony keygen` and have "
                                 "the regions pin its fingerprint") from None
    certificate = signers.certificate(signer, officer)
    # The directory itself is the lock (flock on its descriptor): another officer
    # countersigning at the same time waits, and no lock file is left among the outputs.
    lock_fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        digest, names = release_digest_of(directory, primary_cert_path)
        if confirmed != digest:
            raise ApprovalError(
                "the release digest of these bundles is not the one you confirmed: "
                f"they hold {fp.to_hex(digest)}, you confirmed {fp.to_hex(confirmed)}",
                hint="stop: these are not the manifests the ceremony showed; compare the "
                     "words read at the close of the ceremony")
        own = signers.fingerprint(signer.spki)
        outcomes = []
        for name in names:
            path = directory / name
            der = path.read_bytes()
            verified = bundles.verify(der, primary, where=str(path))
            if any(o.spki_sha256 == own for o in verified.officers):
                outcomes.append(Outcome(name, "already signed"))
                continue
            replace(path, bundles.countersign(der, primary, signer, certificate,
                                              where=str(path)))
            outcomes.append(Outcome(name, "signed"))
        return outcomes
    finally:
        os.close(lock_fd)
