"""The ``[service]`` section of a node's TOML: listening, TLS files, limits, audit, client policy.

Strict like the rest of ``kms.config``: an unknown key, a wrong type or a bad value stops with
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
    identity = "spiffe://demo/encryption-service"   # SAN URI or DNS name, else subject CN
    roles = ["data"]                                # data, admin, status
    orgs = ["*"]                                    # exact ids or fnmatch patterns
    key_types = ["field", "database"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hsm import tomlfile
from kms import policy
from kms.errors import ConfigError

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
}
_FIELDS: dict[str, tomlfile.Kind] = {"host": str, "port": int, "workers": int, "certificate": str, "private_key": str,
           "client_ca": str, "audit_dir": str, "clients": list,
           **{k: v[0] for k, v in _LIMITS.items()}}
_CLIENT_FIELDS: dict[str, tomlfile.Kind] = {"identity": str, "roles": list, "orgs": list, "key_types": list}


@dataclass(frozen=True)
class Client:
    identity: str
    roles: frozenset[str]
    orgs: tuple[str, ...] = ("*",)
    key_types: frozenset[str] = frozenset(policy.KEY_TYPES)


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
        if item["identity"] in seen:
            raise ConfigError(f"{where}: identity {item['identity']!r} is named twice")
        seen.add(item["identity"])
        roles = _strings(f"{where}.roles", item.get("roles"), allowed=ROLES)
        orgs = _strings(f"{where}.orgs", item.get("orgs", ["*"]))
        kts = _strings(f"{where}.key_types", item.get("key_types", list(policy.KEY_TYPES)),
                       allowed=policy.KEY_TYPES)
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
    limits = {}
    for name, (_kind, default, minimum) in _LIMITS.items():
        value = data.get(name, default)
        if value < minimum:
            raise ConfigError(f"{path}: service.{name} must be >= {minimum}")
        limits[name] = value
    base = path.parent
    return ServiceSettings(
        certificate=base / data["certificate"], private_key=base / data["private_key"],
        client_ca=base / data["client_ca"], host=data.get("host", "127.0.0.1"), port=port,
        workers=workers, audit_dir=base / data["audit_dir"] if "audit_dir" in data else None,
        clients=parse_clients(path, data.get("clients", [])), limits=limits)


def reload_policy(path: Path) -> tuple[Client, ...]:
    """Re-read only ``[[service.clients]]`` from the node configuration (SIGHUP)."""
    data, _, _ = tomlfile.read(Path(path), what="node configuration", error=ConfigError)
    service = data.get("service")
    if not isinstance(service, dict):
        raise ConfigError(f"{path}: no [service] section")
    return parse_clients(Path(path), service.get("clients", []))
