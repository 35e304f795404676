"""The ceremony machine's environment file: which module, which token, where PINs come from.

Kept apart from the plan so the plan reviewed weeks before runs unchanged on the day. It names PIN
*sources* (env:VAR, file:PATH) and never holds a PIN itself; strict like the plan.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from hsm import module as modules

from .errors import PlanError

_KEYS = {"module", "module_params", "primary_token", "user_pin_source", "so_pin_source"}


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
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PlanError(f"cannot read environment file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PlanError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"{path}: TOML syntax error: {exc}") from None
    unknown = set(data) - _KEYS
    if unknown:
        raise PlanError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: "
                        f"{', '.join(sorted(_KEYS))})")
    for key, value in data.items():
        if not isinstance(value, str):
            raise PlanError(f"{path}: {key} must be a string")
        if key.endswith("pin_source") and not value.startswith(("env:", "file:")):
            raise PlanError(f"{path}: {key} must be env:VAR or file:PATH - PINs themselves "
                            "never go in a file the ceremony reads")
    return Environment(**data)
