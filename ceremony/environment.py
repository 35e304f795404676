"""The ceremony machine's environment file: which module, which token, where PINs come from.

Kept apart from the plan so the plan reviewed weeks before runs unchanged on the day. It names PIN
*sources* (env:VAR, file:PATH) and never holds a PIN itself; strict like the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hsm.core import module as modules
from suite import tomlfile

from .errors import PlanError

_FIELDS = {key: str for key in ("module", "module_params", "primary_token", "user_pin_source",
                                "so_pin_source")}


@dataclass(frozen=True)
class Environment:
    module: str = modules.DEFAULT_MODULE
    module_params: str | None = None
    primary_token: str = "primary"
    user_pin_source: str | None = None
    so_pin_source: str | None = None


def load(path: str | Path | None) -> Environment:
    if path is None:
        return Environment()
    path = Path(path)
    data, _, _ = tomlfile.read(path, what="environment file", error=PlanError)
    tomlfile.check_keys(data, _FIELDS, where=str(path), error=PlanError)
    for key, value in data.items():
        if key.endswith("pin_source") and not value.startswith(("env:", "file:")):
            raise PlanError(f"{path}: {key} must be env:VAR or file:PATH - PINs themselves "
                            "never go in a file the ceremony reads")
    return Environment(**data)
