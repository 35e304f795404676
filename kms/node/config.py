"""KMS configuration: one strict TOML file per regional KMS node. PIN *sources* only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

from hsm.core import module as modules
from suite import tomlfile
from release import quorum
from release.errors import PinsError

from kms.node import limits
from kms import key_rules
from kms.errors import ConfigError

if TYPE_CHECKING:     # kms.server is loaded only by nodes that serve
    from kms.server.settings import ServiceSettings
    from kms.xks.config import XksConfig

_FIELDS: dict[str, tomlfile.Kind] = {
    "region": str, "token": str, "module": str, "module_params": str, "pin_source": str,
    "primary_certificate": str, "bundle_dir": str, "store": str, "allow_practice": bool,
    "pbkdf2_iterations": int, "cache_max_entries": int, "cache_flush_hours": (int, float),
    "service": dict,  # [service]: the network service (kms.server.settings, parsed strictly)
    "officers": list,  # [[officers]]: the pinned officer sets (release.quorum), by release
    "xks": dict,      # [xks]: an AWS KMS external key store proxy beside it (kms.xks.config)
}
_REQUIRED = ("region", "token", "primary_certificate", "bundle_dir", "store")


@dataclass(frozen=True)
class KmsConfig:
    path: Path
    region: str
    token: str
    primary_certificate: Path
    bundle_dir: Path
    store: str
    module: str = modules.DEFAULT_MODULE
    module_params: str | None = None
    pin_source: str | None = None
    allow_practice: bool = False
    pbkdf2_iterations: int = key_rules.DEFAULT_PBKDF2_ITERATIONS
    cache_max_entries: int = key_rules.CACHE_MAX_ENTRIES
    cache_flush_hours: float = key_rules.CACHE_FLUSH_AFTER / key_rules.HOUR
    service: ServiceSettings | None = None  # when [service] is present
    # The officers whose signatures a release needs here. None only on a rehearsal node
    # (allow_practice = true), which then takes PRACTICE bundles only.
    officers: quorum.Pins | None = None
    xks: XksConfig | None = None            # when [xks] is present


def load(path: str | Path) -> KmsConfig:
    path = Path(path)
    data, _, text = tomlfile.read(path, what="KMS configuration", error=ConfigError)
    tomlfile.check_keys(data, _FIELDS, where=str(path), error=ConfigError, required=_REQUIRED)
    if "pin_source" in data and not data["pin_source"].startswith(("env:", "file:")):
        raise ConfigError(f"{path}: pin_source must be env:VAR or file:PATH; never a PIN")
    if data.get("pbkdf2_iterations", 1) < 1:
        raise ConfigError(f"{path}: pbkdf2_iterations must be >= 1")
    if data.get("cache_max_entries", 1) < 1:
        raise ConfigError(f"{path}: cache_max_entries must be >= 1 (the cache holds the DEKs "
                          "being served)")
    if data.get("cache_flush_hours", 1) <= 0:
        raise ConfigError(f"{path}: cache_flush_hours must be > 0")
    limits.check(path, text, data, limits.NODE)  # every number finite and within its range
    base = path.parent
    if "officers" in data:
        try:
            data["officers"] = quorum.parse(data["officers"], str(path))
        except PinsError as exc:
            raise ConfigError(str(exc)) from None
    elif not data.get("allow_practice", False):
        raise ConfigError(
            f"{path}: no officers pinned, so no release can be accepted (a region takes a "
            "release only with the signatures of M officers it pins itself)",
            hint=quorum.HOW_TO_PIN + "; a rehearsal node (allow_practice = true) may go "
                 "without and then takes PRACTICE bundles only")
    if "service" in data:
        from kms.server import settings
        raw_service = data["service"]
        data["service"] = settings.parse(path, raw_service)  # its minimums, types, file:line
        limits.check(path, text, raw_service, limits.SERVICE, "service")  # then the maximums
    if "xks" in data:
        from kms.xks import config as xks_config
        data["xks"] = xks_config.parse(path, data["xks"], secrets=False)  # serve reads them
    store = data["store"]
    if "://" not in store:
        store = f"sqlite:///{(base / store).resolve()}"
    return KmsConfig(path=path, region=data["region"], token=data["token"],
                     primary_certificate=base / data["primary_certificate"],
                     bundle_dir=base / data["bundle_dir"], store=store,
                     **{k: data[k] for k in ("module", "module_params", "pin_source",
                                             "allow_practice", "pbkdf2_iterations",
                                             "cache_max_entries", "cache_flush_hours",
                                             "service", "officers", "xks")
                        if k in data})
