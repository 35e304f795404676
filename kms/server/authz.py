"""Who is calling, and may they? Identity comes only from the certificate the TLS layer verified.

``identities(peercert)`` reads the dict ``ssl.SSLObject.getpeercert()`` returns after the
handshake verified the chain against the configured CA: the SAN URIs and DNS names, or the
subject CN when the certificate has neither. Nothing the client *sends* (headers, body) is ever
an identity. ``Policy.decide`` is default deny: a verified client that no ``[[service.clients]]``
entry names, or one named without the role, org or key type asked for, is refused.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .settings import Client


def identities(peercert: dict | None) -> tuple[str, ...]:
    """Names of a verified peer, most specific first: SAN URIs, SAN DNS names, else the CN."""
    if not peercert:
        return ()
    sans = peercert.get("subjectAltName", ())
    names = [v for k, v in sans if k == "URI"] + [v for k, v in sans if k == "DNS"]
    if names:
        return tuple(names)
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return (value,)
    return ()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    identity: str | None      # the policy entry's identity, or the first name presented
    reason: str


class Policy:
    def __init__(self, clients: tuple[Client, ...]):
        self.clients = {c.identity: c for c in clients}

    def client(self, names: tuple[str, ...]) -> Client | None:
        for name in names:
            found = self.clients.get(name)
            if found is not None:
                return found
        return None

    def decide(self, names: tuple[str, ...], role: str, org: str | None = None,
               key_type: str | None = None) -> Decision:
        shown = names[0] if names else None
        client = self.client(names)
        if client is None:
            return Decision(False, shown, "the client certificate is not named by the policy")
        if role not in client.roles and not (role == "status" and "admin" in client.roles):
            return Decision(False, client.identity, f"{client.identity} lacks the {role} role")
        if org is not None and not any(fnmatch.fnmatchcase(org, pat) for pat in client.orgs):
            return Decision(False, client.identity, f"{client.identity} may not use org {org!r}")
        if key_type is not None and key_type not in client.key_types:
            return Decision(False, client.identity,
                            f"{client.identity} may not use {key_type} keys")
        return Decision(True, client.identity, "allowed")
