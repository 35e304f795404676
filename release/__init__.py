"""What a ceremony hands a region: the contract between its writer and its reader.

A release is a set of secrets made in the primary HSM and sent, wrapped, to each region in a
*bundle*: a manifest in a CMS SignedData signed by the primary (:mod:`release.bundle`), checked
offline against the pinned primary certificate (:mod:`release.certificates`), and ordered by its
release id (:func:`release.ids.release_key`). ``ceremony`` writes bundles and ``kms`` reads them;
both depend on this package and neither on the other, so a KMS never imports the ceremony
runner, and a change of the format is one change in one place. It depends on ``suite`` only
(fingerprints, signature algorithm identifiers, the error base), never on ``hsm``, and never
touches a token: verifying a bundle needs no python-pkcs11.
"""

from release.bundle import FORMAT, VERSION, Verified, build, verify
from release.certificates import check_primary, check_recipient, spki_fingerprint
from release.errors import CertificateError, ReleaseError, VerificationError
from release.ids import release_key

__all__ = [
    "FORMAT",
    "VERSION",
    "CertificateError",
    "ReleaseError",
    "VerificationError",
    "Verified",
    "build",
    "check_primary",
    "check_recipient",
    "release_key",
    "spki_fingerprint",
    "verify",
]
