"""The ``[xks]`` section: a node that is only an XKS proxy needs nothing else in its TOML.

Strict like every configuration of the suite (unknown keys, wrong types and bad values stop with
``file: xks.key: what is wrong``); paths are relative to the file. Secrets never stand in the
file: a credential names its secret access key by source (``env:VAR`` or ``file:PATH``), read at
start and on SIGHUP (which is how credentials are rotated without a restart)::

    [xks]
    token = "xks"                       # label (or PKCS#11 URI) of the token holding the keys
    pin_source = "env:HSM_PIN"
    host = "127.0.0.1"
    port = 8444
    certificate = "tls/server.pem"      # the proxy's certificate chain (AWS: a public CA)
    private_key = "tls/server.key"
    client_ca = "tls/amazon-trust.pem"  # only if a key store requires mTLS
    audit_dir = "audit"
    metrics_subjects = ["monitor.example.com"]   # client certificate CNs that may read /metrics

    [[xks.keystores]]
    name = "payments"
    path_prefix = "/payments"           # "" for none; then /kms/xks/v1
    region = "eu-west-1"                # the region in the SigV4 scope AWS KMS signs with
    keys = ["payments-root"]            # the externalKeyIds this key store serves
    disabled_keys = []                  # reported DISABLED, refused InvalidStateException
    requests_per_second = 1800          # per worker; more is ThrottlingException
    mtls_subject = "cks.kms.eu-west-1.amazonaws.com"   # optional: require AWS's certificate
    [[xks.keystores.credentials]]       # one or two: two during a rotation
    access_key_id = "AKIAI2SFODNN7EXAMPLE00"
    secret_source = "file:secrets/payments-1"
    [[xks.keystores.rules]]             # optional secondary authorisation; none = allow all
    principals = ["arn:aws:iam::111122223333:*"]
    keys = ["*"]
    kms_operations = ["*"]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hsm.core import module as modules
from hsm.core import pin as pins
from suite import tomlfile
from hsm.core.errors import HsmError
from hsm.keys.xks import KEY_ID
from kms.errors import ConfigError

from .sigv4 import Credential

# The limits of kms serve, same names and defaults (kms.server.settings), plus the token call's
# deadline: past it the request is answered DependencyTimeoutException.
_LIMITS: dict[str, tuple[tomlfile.Kind, float, float]] = {
    "max_body_bytes": (int, 64 * 1024, 32 * 1024),    # a maximal XKS request is ~22 KB
    "header_timeout_seconds": ((int, float), 10.0, 0.1),
    "idle_timeout_seconds": ((int, float), 30.0, 0.1),
    "request_timeout_seconds": ((int, float), 5.0, 0.1),
    "handshake_timeout_seconds": ((int, float), 10.0, 0.1),
    "shutdown_timeout_seconds": ((int, float), 20.0, 0.1),
    "max_concurrent": (int, 256, 1),
    "max_connections": (int, 1024, 1),
    "executor_threads": (int, 8, 1),
    "audit_batch_ms": (int, 50, 1),
    "token_timeout_seconds": ((int, float), 0.5, 0.0001),
    "health_interval_seconds": ((int, float), 10.0, 0.1),
}
_FIELDS: dict[str, tomlfile.Kind] = {
    "token": str, "module": str, "module_params": str, "pin_source": str, "host": str,
    "port": int, "workers": int, "certificate": str, "private_key": str, "client_ca": str,
    "audit_dir": str, "fleet_size": int, "vendor": str, "keystores": list,
    "metrics_subjects": list,
    **{k: v[0] for k, v in _LIMITS.items()}}
_KEYSTORE_FIELDS: dict[str, tomlfile.Kind] = {
    "name": str, "path_prefix": str, "region": str, "keys": list, "disabled_keys": list,
    "enabled": bool, "requests_per_second": (int, float), "mtls_subject": str,
    "credentials": list, "rules": list}
_CREDENTIAL_FIELDS: dict[str, tomlfile.Kind] = {"access_key_id": str, "secret_source": str}
_RULE_FIELDS: dict[str, tomlfile.Kind] = {"principals": list, "keys": list,
                                          "kms_operations": list, "via_services": list}
# The specification's XksProxyUriPath: at most 128 characters of a-z A-Z 0-9 / - _ in all,
# "/kms/xks/v1" included.
PREFIX = re.compile(r"^(/[A-Za-z0-9_-]+)*$")
ACCESS_KEY_ID = re.compile(r"^[A-Z2-7]{20,30}$")
SECRET = re.compile(r"^[A-Za-z0-9+/=]{43,64}$")
API_PATH = "/kms/xks/v1"


@dataclass(frozen=True)
class Rule:
    principals: tuple[str, ...] = ("*",)
    keys: tuple[str, ...] = ("*",)
    kms_operations: tuple[str, ...] = ("*",)
    via_services: tuple[str, ...] | None = None   # None: the request need not name one


@dataclass(frozen=True)
class KeyStore:
    name: str
    prefix: str
    region: str
    keys: tuple[str, ...]
    disabled_keys: frozenset[str]
    credentials: tuple[Credential, ...]
    enabled: bool = True
    requests_per_second: float = 1800.0
    mtls_subject: str | None = None
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class XksConfig:
    path: Path
    token: str
    certificate: Path
    private_key: Path
    keystores: tuple[KeyStore, ...]
    module: str = modules.DEFAULT_MODULE
    module_params: str | None = None
    pin_source: str | None = None
    host: str = "127.0.0.1"
    port: int = 8444
    workers: int = 1
    client_ca: Path | None = None
    audit_dir: Path | None = None
    fleet_size: int = 1
    vendor: str = "hsm-suite"
    metrics_subjects: tuple[str, ...] = ()   # client certificate CNs that may GET the metrics
    limits: dict = field(default_factory=lambda: {k: v[1] for k, v in _LIMITS.items()})

    @property
    def region(self) -> str:    # what `kms serve` prints on its first line
        return "xks: " + ", ".join(k.prefix + API_PATH for k in self.keystores)

    def limit(self, name: str):
        return self.limits[name]


def is_xks_only(data: dict) -> bool:
    """A node TOML whose only table is ``[xks]``: an XKS proxy without releases or tenants."""
    return set(data) == {"xks"}


def load(path: str | Path) -> XksConfig:
    path = Path(path)
    data, _, _ = tomlfile.read(path, what="XKS configuration", error=ConfigError)
    if "xks" not in data:
        raise ConfigError(f"{path}: no [xks] section")
    return parse(path, data["xks"])


def parse(path: Path, data, *, secrets: bool = True) -> XksConfig:
    """``secrets=False`` checks everything but does not read the secret access keys (a KMS
    node's other commands load its TOML without needing them; ``kms serve`` reads them)."""
    where = f"{path}: xks"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table ([xks])")
    tomlfile.check_keys(data, _FIELDS, where=where, error=ConfigError,
                        required=("token", "certificate", "private_key", "keystores"))
    if "pin_source" in data and not data["pin_source"].startswith(("env:", "file:")):
        raise ConfigError(f"{where}.pin_source must be env:VAR or file:PATH; never a PIN")
    if not 0 <= data.get("port", 8444) <= 65535:
        raise ConfigError(f"{where}.port must be 0-65535")
    if not 1 <= data.get("workers", 1) <= 64:
        raise ConfigError(f"{where}.workers must be 1-64")
    if not 1 <= data.get("fleet_size", 1) <= 1000:
        raise ConfigError(f"{where}.fleet_size must be 1-1000 (xksProxyFleetSize)")
    limits = {}
    for name, (_kind, default, minimum) in _LIMITS.items():
        value = data.get(name, default)
        if value < minimum:
            raise ConfigError(f"{where}.{name} must be >= {minimum}")
        limits[name] = value
    base = path.parent
    keystores = parse_keystores(path, data["keystores"], secrets=secrets)
    metrics = _strings(f"{where}.metrics_subjects", data["metrics_subjects"]) \
        if "metrics_subjects" in data else ()
    if (metrics or any(k.mtls_subject for k in keystores)) and "client_ca" not in data:
        raise ConfigError(f"{where}: mtls_subject or metrics_subjects need xks.client_ca",
                          hint="client_ca: the CA bundle AWS KMS's client certificate chains to "
                               "(Amazon Trust Services)")
    return XksConfig(
        path=path, token=data["token"], certificate=base / data["certificate"],
        private_key=base / data["private_key"], keystores=keystores,
        client_ca=base / data["client_ca"] if "client_ca" in data else None,
        audit_dir=base / data["audit_dir"] if "audit_dir" in data else None, limits=limits,
        metrics_subjects=metrics,
        **{k: data[k] for k in ("module", "module_params", "pin_source", "host", "port",
                                "workers", "fleet_size", "vendor") if k in data})


def reload_keystores(path: Path) -> tuple[KeyStore, ...]:
    """Re-read the key stores (credentials, keys, quotas, rules) for SIGHUP."""
    data, _, _ = tomlfile.read(Path(path), what="XKS configuration", error=ConfigError)
    xks = data.get("xks")
    if not isinstance(xks, dict):
        raise ConfigError(f"{path}: no [xks] section")
    return parse_keystores(Path(path), xks.get("keystores"))


def _strings(where: str, value, pattern: re.Pattern | None = None,
             empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or (not value and not empty) or \
            not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a {'' if empty else 'non-empty '}list of strings")
    if pattern is not None:
        bad = [v for v in value if not pattern.match(v)]
        if bad:
            raise ConfigError(f"{where}: {bad[0]!r} is not a valid XKS key id",
                              hint="1-128 characters of A-Z a-z 0-9 . _ -")
    return tuple(value)


def parse_keystores(path: Path, items, *, secrets: bool = True) -> tuple[KeyStore, ...]:
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{path}: xks.keystores must be a non-empty array of tables "
                          "([[xks.keystores]])")
    out: list[KeyStore] = []
    prefixes: set[str] = set()
    access_keys: set[str] = set()
    served: set[str] = set()
    for i, item in enumerate(items):
        where = f"{path}: xks.keystores[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a table")
        tomlfile.check_keys(item, _KEYSTORE_FIELDS, where=where, error=ConfigError,
                            required=("name", "region", "keys", "credentials"))
        prefix = item.get("path_prefix", "").rstrip("/")
        if not PREFIX.match(prefix) or len(prefix + API_PATH) > 128:
            raise ConfigError(f"{where}.path_prefix {item.get('path_prefix')!r} is not a valid "
                              "XKS path prefix", hint="/segment[/segment...] of a-z A-Z 0-9 - _, "
                              "at most 117 characters (the URI path may not exceed 128)")
        if prefix in prefixes:
            raise ConfigError(f"{where}.path_prefix {prefix!r} is used by another key store")
        prefixes.add(prefix)
        keys = _strings(f"{where}.keys", item["keys"], KEY_ID)
        disabled = _strings(f"{where}.disabled_keys", item.get("disabled_keys", []), KEY_ID,
                            empty=True)
        if served & set(keys):
            raise ConfigError(f"{where}.keys: {sorted(served & set(keys))[0]!r} is served by "
                              "another key store", hint="each key store has its own keys")
        served.update(keys)
        if set(disabled) - set(keys):
            raise ConfigError(f"{where}.disabled_keys names keys not in keys")
        rps = item.get("requests_per_second", 1800.0)
        if rps <= 0:
            raise ConfigError(f"{where}.requests_per_second must be > 0")
        creds = _credentials(path, where, item["credentials"], access_keys, secrets)
        rules = tuple(_rule(f"{where}.rules[{j}]", r) for j, r in enumerate(item.get("rules", [])))
        out.append(KeyStore(item["name"], prefix, item["region"], keys, frozenset(disabled),
                            creds, item.get("enabled", True), float(rps),
                            item.get("mtls_subject"), rules))
    return tuple(out)


def _credentials(path: Path, where: str, items, seen: set[str],
                 secrets: bool = True) -> tuple[Credential, ...]:
    if not isinstance(items, list) or not 1 <= len(items) <= 2:
        raise ConfigError(f"{where}.credentials must hold one or two credentials "
                          "([[xks.keystores.credentials]]): two while rotating")
    out = []
    for j, item in enumerate(items):
        w = f"{where}.credentials[{j}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{w} must be a table")
        tomlfile.check_keys(item, _CREDENTIAL_FIELDS, where=w, error=ConfigError,
                            required=("access_key_id", "secret_source"))
        akid, source = item["access_key_id"], item["secret_source"]
        if not ACCESS_KEY_ID.match(akid):
            raise ConfigError(f"{w}.access_key_id must be 20-30 characters of A-Z and 2-7")
        if akid in seen:
            raise ConfigError(f"{w}.access_key_id is used twice: an access key id must name "
                              "one secret")
        seen.add(akid)
        kind, _, rest = source.partition(":")
        if kind not in ("env", "file") or not rest:
            raise ConfigError(f"{w}.secret_source must be env:VAR or file:PATH; never the "
                              "secret itself")
        if kind == "file":
            source = f"file:{path.parent / rest}"
        if not secrets:
            out.append(Credential(akid, None))
            continue
        try:
            secret = pins.from_source(source)
        except HsmError as exc:
            raise ConfigError(f"{w}: secret access key: {exc}") from None
        if not SECRET.match(secret.reveal()):
            raise ConfigError(f"{w}: the secret access key from {item['secret_source']} must "
                              "be 43-64 characters of A-Z a-z 0-9 + / =",
                              hint="make one with: openssl rand 32 | base64")
        out.append(Credential(akid, secret))
    return tuple(out)


def _rule(where: str, item) -> Rule:
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a table")
    tomlfile.check_keys(item, _RULE_FIELDS, where=where, error=ConfigError)
    via = item.get("via_services")
    return Rule(_strings(f"{where}.principals", item.get("principals", ["*"])),
                _strings(f"{where}.keys", item.get("keys", ["*"])),
                _strings(f"{where}.kms_operations", item.get("kms_operations", ["*"])),
                _strings(f"{where}.via_services", via) if via is not None else None)
