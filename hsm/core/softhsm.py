"""SoftHSM2 specifics: its configuration file and token initialisation.

SoftHSM2 reads ``SOFTHSM2_CONF`` and scans its token directory once, in ``C_Initialize``: a token
created by ``softhsm2-util`` in another process is invisible to a process that already initialised
the module. Inside such a process, create tokens with :func:`init_token_in_process`
(``C_InitToken`` on the spare slot), which SoftHSM2 sees at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pkcs11

from . import module as modules
from .errors import TokenNotFound, from_rv
from .pin import Pin


def write_config(conf_path: Path, token_dir: Path) -> Path:
    """Write a SoftHSM2 configuration with an absolute token directory (created 0700)."""
    token_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(token_dir, 0o700)
    conf_path.write_text(
        f"directories.tokendir = {token_dir.resolve()}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
        "slots.mechanisms = ALL\n"
        "library.reset_on_fork = false\n"
    )
    return conf_path


def render_config(template: Path, conf_path: Path, root: Path) -> Path:
    """Render the repository's softhsm.conf (relative token dir) with absolute paths."""
    lines = []
    for line in template.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "directories.tokendir" and not value.strip().startswith("/"):
            token_dir = (root / value.strip()).resolve()
            token_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(token_dir, 0o700)
            line = f"directories.tokendir = {token_dir}"
        lines.append(line)
    conf_path.parent.mkdir(parents=True, exist_ok=True)
    conf_path.write_text("\n".join(lines) + "\n")
    return conf_path


def init_token_in_process(mod: modules.LoadedModule, label: str, so_pin: Pin,
                          user_pin: Pin) -> pkcs11.Token:
    """C_InitToken on the module's one uninitialised slot, then C_InitPIN as the SO."""
    spare = [slot for slot in mod.lib.get_slots(token_present=True)
             if not slot.get_token().flags & pkcs11.TokenFlag.TOKEN_INITIALIZED]
    if not spare:
        raise TokenNotFound("no uninitialised slot to create a token in", token=label,
                            hint="SoftHSM2 always offers one; other tokens: free a slot first")
    rv = mod.raw.init_token(spare[0].slot_id, so_pin.reveal().encode(), label)
    if rv != 0:
        raise from_rv(rv, operation="C_InitToken", token=label)
    for slot in mod.lib.get_slots(token_present=True):
        tok = slot.get_token()
        if tok.label == label and tok.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED \
                and not tok.flags & pkcs11.TokenFlag.USER_PIN_INITIALIZED:
            so_session = tok.open(rw=True, so_pin=so_pin.reveal())
            try:
                so_session.init_pin(user_pin.reveal())
            finally:
                so_session.close()  # logs the SO out, which is what we want here
            return slot.get_token()
    raise TokenNotFound(f"token {label!r} did not appear after C_InitToken", token=label)
