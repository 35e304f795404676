"""The ``[service]`` section of a node's TOML: listening, TLS files, limits, audit, client policy.

Strict like the rest of ``kms.node.config``: an unknown key, a wrong type or a bad value stops with
``file: service.key: what is wrong``. Paths are relative to the configuration file. The client
policy (``[[service.clients]]``) is parsed here too, so SIGHUP can re-read it from the same file
(``reload_policy``) without restarting the node.

    [service]
    host = "127.0.0.1"
    port = 8443
    workers = 2
    certificate = "tls/eu-server.pem"      # server chain (PEM)
    private_key = "tls/eu-server.key"      # its key (PEM, unencrypted, 0600)
    client_ca = "tls/ca.pem"               # CA(s) that client certificates must chain to
    audit_dir = "audit-eu"                 # one hash-chained file per worker
    [[service.clients]]
    identity = "uri:spiffe://demo/encryption-service"   # uri:, dns: or cn: (docs/service-hardening.md)
    roles = ["data"]                                # data, admin, status
    orgs = ["*"]                                    # exact ids or fnmatch patterns
    key_types = ["field", "database"]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from suite import tomlfile
from kms import key_rules
from kms.errors import ConfigError

from . import eventloop

ROLES = ("data", "admin", "status")

_LIMITS: dict[str, tuple[tomlfile.Kind, float, float]] = {
    # name: (type, default, minimum)
    "max_body_bytes": (int, 64 * 1024, 256),
    "header_timeout_seconds": ((int, float), 10.0, 0.1),
    "idle_timeout_seconds": ((int, float), 30.0, 0.1),
    "request_timeout_seconds": ((int, float), 30.0, 0.1),
    "handshake_timeout_seconds": ((int, float), 10.0, 0.1),
    "shutdown_timeout_seconds": ((int, float), 20.0, 0.1),
    "max_concurrent": (int, 64, 1),
    "max_connections": (int, 1024, 1),
    "executor_threads": (int, 8, 1),
    "audit_batch_ms": (int, 50, 1),
    # A request body must arrive whole within this many seconds of its header (slow bodies).
    "body_timeout_seconds": ((int, float), 10.0, 0.1),
    # Per client identity (one policy entry; every identity the policy does not name counts as
    # one client together), per worker: so one client cannot starve another.
    "max_connections_per_client": (int, 64, 1),
    "max_concurrent_per_client": (int, 16, 1),
    "requests_per_second_per_client": ((int, float), 5000.0, 0.1),
    # Refusals (401/403/429 from authorisation and the caps above) recorded in the audit log
    # per client and second; beyond it they are counted and recorded as one aggregate line.
    "audited_refusals_per_second": ((int, float), 5.0, 0.1),
    # Calls to customer key services and AWS KMS running at once for one org, per worker.
    "outbound_per_org": (int, 2, 1),
}
_FIELDS: dict[str, tomlfile.Kind] = {"host": str, "port": int, "workers": int, "certificate": str, "private_key": str,
           "client_ca": str, "audit_dir": str, "clients": list, "event_loop": str,
           **{k: v[0] for k, v in _LIMITS.items()}}
_CLIENT_FIELDS: dict[str, tomlfile.Kind] = {"identity": str, "roles": list, "orgs": list, "key_types": list}


KINDS = ("uri", "dns", "cn")
# An untyped identity written before identities were typed: a string with a URI scheme is a SAN
# URI (what every untyped identity the demo and the docs wrote was); anything else is refused,
# since "monitor.example" could be a DNS name or a CN and guessing is what let a CN stand in for
# a SAN URI.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def typed(identity: str) -> tuple[str, str] | None:
    """``(kind, name)`` of a policy identity, or None when it cannot be read as one type."""
    kind, sep, name = identity.partition(":")
    if sep and kind in KINDS and name:
        return kind, name
    if _URI.match(identity):
        return "uri", identity
    return None


@dataclass(frozen=True)
class Client:
    identity: str                 # as written in the configuration (audit records name it)
    roles: frozenset[str]
    orgs: tuple[str, ...] = ("*",)
    key_types: frozenset[str] = frozenset(key_rules.KEY_TYPES)

    @property
    def name(self) -> tuple[str, str]:
        """The ``(kind, name)`` the certificate must present (settings refused any other)."""
        got = typed(self.identity)
        assert got is not None
        return got


@dataclass(frozen=True)
class ServiceSettings:
    certificate: Path
    private_key: Path
    client_ca: Path
    host: str = "127.0.0.1"
    port: int = 8443
    workers: int = 1
    audit_dir: Path | None = None
    clients: tuple[Client, ...] = ()
    event_loop: str = "uvloop"    # or "asyncio" (kms.server.eventloop)
    limits: dict = field(default_factory=lambda: {k: v[1] for k, v in _LIMITS.items()})

    def limit(self, name: str):
        return self.limits[name]


def _strings(where: str, value, *, allowed=None) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v
                                                            for v in value):
        raise ConfigError(f"{where} must be a non-empty list of strings")
    if allowed is not None:
        bad = [v for v in value if v not in allowed]
        if bad:
            raise ConfigError(f"{where}: unknown {', '.join(map(repr, bad))} "
                              f"(known: {', '.join(allowed)})")
    return value


def _line(path: Path, key: str, nth: int = 0) -> str:
    """``path:line`` of the ``nth`` assignment of ``key`` in the file (best effort: the file
    was parsed already, this only points the operator at the line)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return str(path)
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    hits = [i + 1 for i, text in enumerate(lines) if pattern.match(text)]
    return f"{path}:{hits[nth]}" if nth < len(hits) else str(path)


def parse_clients(path: Path, items) -> tuple[Client, ...]:
    if not isinstance(items, list):
        raise ConfigError(f"{path}: service.clients must be an array of tables "
                          "([[service.clients]])")
    out, seen = [], set()
    for i, item in enumerate(items):
        where = f"{path}: service.clients[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table")
        tomlfile.check_keys(item, _CLIENT_FIELDS, where=where, error=ConfigError)
        if not item.get("identity"):
            raise ConfigError(f"{where}: identity is required")
        kind_name = typed(item["identity"])
        if kind_name is None:
            ident = item["identity"]
            raise ConfigError(
                f"{_line(path, 'identity', i)}: service.clients[{i}].identity {ident!r} has no "
                f"type: write \"uri:{ident}\" (a SAN URI), \"dns:{ident}\" (a SAN DNS name) or "
                f"\"cn:{ident}\" (the subject CN of a certificate without SAN URI/DNS names)")
        if kind_name in seen:
            raise ConfigError(f"{where}: identity {item['identity']!r} is named twice")
        seen.add(kind_name)
        roles = _strings(f"{where}.roles", item.get("roles"), allowed=ROLES)
        orgs = _strings(f"{where}.orgs", item.get("orgs", ["*"]))
        kts = _strings(f"{where}.key_types", item.get("key_types", list(key_rules.KEY_TYPES)),
                       allowed=key_rules.KEY_TYPES)
        out.append(Client(item["identity"], frozenset(roles), tuple(orgs), frozenset(kts)))
    return tuple(out)


def parse(path: Path, data) -> ServiceSettings:
    """``data`` is the ``[service]`` table of the node configuration at ``path``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: service must be a table ([service])")
    tomlfile.check_keys(data, _FIELDS, where=f"{path}: service", error=ConfigError,
                        required=("certificate", "private_key", "client_ca"))
    port = data.get("port", 8443)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{path}: service.port must be 0-65535")
    workers = data.get("workers", 1)
    if not 1 <= workers <= 64:
        raise ConfigError(f"{path}: service.workers must be 1-64")
    event_loop = data.get("event_loop", "uvloop")
    if event_loop not in eventloop.KINDS:
        raise ConfigError(f"{_line(path, 'event_loop')}: service.event_loop must be "
                          f"{' or '.join(map(repr, eventloop.KINDS))}, not {event_loop!r}")
    limits = {}
    for name, (_kind, default, minimum) in _LIMITS.items():
        value = data.get(name, default)
        if value < minimum:
            raise ConfigError(f"{_line(path, name)}: service.{name} must be >= {minimum} "
                              f"(default {default})")
        limits[name] = value
    base = path.parent
    return ServiceSettings(
        certificate=base / data["certificate"], private_key=base / data["private_key"],
        client_ca=base / data["client_ca"], host=data.get("host", "127.0.0.1"), port=port,
        workers=workers, audit_dir=base / data["audit_dir"] if "audit_dir" in data else None,
        clients=parse_clients(path, data.get("clients", [])), event_loop=event_loop,
        limits=limits)


def reload_policy(path: Path) -> tuple[Client, ...]:
    """Re-read only ``[[service.clients]]`` from the node configuration (SIGHUP)."""
    data, _, _ = tomlfile.read(Path(path), what="node configuration", error=ConfigError)
    service = data.get("service")
    if not isinstance(service, dict):
        raise ConfigError(f"{path}: no [service] section")
    return parse_clients(Path(path), service.get("clients", []))
