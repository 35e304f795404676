"""The one interface between the node and a key a customer holds outside it.

A REMOTE row's wrapped blob is a JSON descriptor ``{"kind": K, ...}``. On a cache miss the node
asks the DEK source of kind K for the DEK: ``source(node, row, descriptor) -> 32 bytes``, or a
``KmsError`` (``KeyUnavailable`` when the customer's service cannot answer). Two kinds ship
(``ekm``: the customer's AWS KMS root key unwraps it; ``cache-only``: the customer's key service
hands it out per use); BYOK needs none, since an uploaded secret is stored like the node's own.
A node may add others in ``Kms.dek_sources``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kms.node.node import Kms
    from kms.store import SecretRow

# kind -> the module whose ``dek`` is its source, imported only when a row needs it (so a node
# without customer-held keys never loads boto3 or jwcrypto).
BUILTIN = {"ekm": "kms.customer_keys.ekm", "cache-only": "kms.customer_keys.cache_only"}


class DekSource(Protocol):
    def __call__(self, node: Kms, row: SecretRow, descriptor: dict, /) -> bytes: ...


def builtin(kind: str) -> DekSource:
    """The shipped source of ``kind``; KeyError for a kind this project does not ship."""
    return importlib.import_module(BUILTIN[kind]).dek
