"""Who is calling, and may they? Identity comes only from the certificate the TLS layer verified.

``identities(peercert)`` reads the dict ``ssl.SSLObject.getpeercert()`` returns after the
handshake verified the chain against the configured CA: typed names, ``("uri", ...)`` for each SAN
URI and ``("dns", ...)`` for each SAN DNS name, or ``("cn", ...)`` for the subject CN when the
certificate has neither. A policy identity names one type (``uri:``, ``dns:``, ``cn:``) and
matches only a name of that type: a CN or a DNS name spelling a SAN URI is not that URI.
Nothing the client *sends* (headers, body) is ever an identity. ``Policy.decide`` is default deny: a verified client that no ``[[service.clients]]``
entry names, or one named without the role, org or key type asked for, is refused.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .settings import Client


Name = tuple[str, str]   # (kind, value): kind is one of settings.KINDS


def identities(peercert: dict | None) -> tuple[Name, ...]:
    """Typed names of a verified peer, most specific first: SAN URIs, SAN DNS names, else the
    CN."""
    if not peercert:
        return ()
    sans = peercert.get("subjectAltName", ())
    names = [("uri", v) for k, v in sans if k == "URI"] + \
        [("dns", v) for k, v in sans if k == "DNS"]
    if names:
        return tuple(names)
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return (("cn", value),)
    return ()


def shown(names: tuple[Name, ...]) -> str | None:
    """How an unnamed peer is written in refusals and audit records: its first typed name."""
    return f"{names[0][0]}:{names[0][1]}"[:300] if names else None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    identity: str | None      # the policy entry's identity, or the first name presented
    reason: str


class Policy:
    """One policy as loaded; SIGHUP replaces the whole object (``worker._reload``), so the
    decisions it remembers (per identity, role, org and key type: a pure function of the
    policy) go with it."""

    MEMO_MAX = 65536

    def __init__(self, clients: tuple[Client, ...]):
        self.clients = {c.name: c for c in clients}
        self._decided: dict[tuple, Decision] = {}

    def client(self, names: tuple[Name, ...]) -> Client | None:
        for name in names:
            found = self.clients.get(name)
            if found is not None:
                return found
        return None

    def decide(self, names: tuple[Name, ...], role: str, org: str | None = None,
               key_type: str | None = None) -> Decision:
        client = self.client(names)
        if client is None:
            return Decision(False, shown(names),
                            "the client certificate is not named by the policy")
        key = (client.identity, role, org, key_type)
        decision = self._decided.get(key)
        if decision is None:
            if len(self._decided) >= self.MEMO_MAX:   # org names are the caller's: bounded
                self._decided.clear()
            decision = self._decided[key] = self.decide_client(client, role, org, key_type)
        return decision

    @staticmethod
    def decide_client(client: Client, role: str, org: str | None = None,
                      key_type: str | None = None) -> Decision:
        if role not in client.roles and not (role == "status" and "admin" in client.roles):
            return Decision(False, client.identity, f"{client.identity} lacks the {role} role")
        if org is not None and not any(fnmatch.fnmatchcase(org, pat) for pat in client.orgs):
            return Decision(False, client.identity, f"{client.identity} may not use org {org!r}")
        if key_type is not None and key_type not in client.key_types:
            return Decision(False, client.identity,
                            f"{client.identity} may not use {key_type} keys")
        return Decision(True, client.identity, "allowed")
