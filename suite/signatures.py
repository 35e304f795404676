"""The signature algorithm identifiers the suite writes into certificates and CMS bundles
(asn1crypto's dict form), by the names ``hsm.core.ops.sign`` takes. Here rather than in ``hsm`` so
that ``release`` can read and check a bundle without loading the token layer."""

from __future__ import annotations

__all__ = ["SIGNATURE_ALGORITHMS"]

SIGNATURE_ALGORITHMS = {
    "ecdsa-sha384": {"algorithm": "sha384_ecdsa"},
    "rsa-pss-sha384": {"algorithm": "rsassa_pss", "parameters": {
        "hash_algorithm": {"algorithm": "sha384"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha384"}},
        "salt_length": 48, "trailer_field": "trailer_field_bc"}},
}
