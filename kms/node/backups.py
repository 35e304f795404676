"""Tenant backups: an org's rows (secrets still wrapped, destroyed versions as tombstones),
encrypted and authenticated inside the HSM under the current release's tenant wrapping key, bound
to the region and to this store's record of the org, valid for ``key_rules.BACKUP_VALIDITY``; and
their restore, into the store they came from only, of versions the org's sealed state holds and
the store lost (a destroyed version never comes back). ``Kms.export_backup`` and
``Kms.import_backup`` are these two.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from hsm.core import ops
from hsm.core.errors import DecryptionFailed
from kms import key_rules
from kms.errors import KmsError, UnknownTenant
from kms.node import sealing
from kms.node.node import _lp
from kms.store.records import secret_checksum

if TYPE_CHECKING:
    from kms.node.node import Kms

BACKUP_AAD = b"hsm-suite tenant backup v2"


def export(node: Kms, org_id: str, path: Path) -> Path:
    """The tenant's rows (secrets stay wrapped, destroyed versions as tombstones), encrypted
    and authenticated inside the HSM under the current release's tenant wrapping key, bound
    to this region and this store's record of the org, and valid for
    key_rules.BACKUP_VALIDITY."""
    from suite.files import write_new
    rel = node.current_release()
    view = node._view(org_id)
    # Inner blobs (under the release's key), not the org KEK's: the KEK is replaced at
    # the org's next change, and a backup must still restore after it.
    rows = [{**r.as_dict(), "checksum": secret_checksum(r)} for r in (
        r if r.wrapped is None else dataclasses.replace(
            r, wrapped=node._seals().unwrap(org_id, view.generation, r))
        for r in view.rows())]
    now = node.clock()
    binding = {"org": org_id, "region": node.config.region,
               "org_created": node.store.org_created(org_id), "created": now,
               "expires": now + key_rules.BACKUP_VALIDITY, "release": rel.release}
    plain = json.dumps({"org": org_id, "org_type": node.store.org_type(org_id),
                        "rows": rows}, sort_keys=True, default=_jsonable).encode()
    nonce = os.urandom(12)
    blob = ops.aes_gcm_encrypt(node.token, rel.wrapping_key, nonce, plain,
                               aad=_backup_aad(binding))
    doc = {"format": "hsm-suite-tenant-backup", "version": 2, **binding,
           "nonce": nonce.hex(), "ciphertext": blob.hex()}
    return write_new(path, (json.dumps(doc) + "\n").encode(), mode=0o600)

def restore(node: Kms, path: Path) -> str:
    """Restore rows of a tenant into the store its backup came from. Refused: another region,
    another store (the org missing, or created anew), an expired backup, a tampered file, and
    any version this store already holds - a destroyed version stays destroyed."""
    try:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != "hsm-suite-tenant-backup" or doc.get("version") != 2:
            raise ValueError("not a version-2 hsm-suite tenant backup")
        binding = {k: doc[k] for k in ("org", "region", "org_created", "created",
                                       "expires", "release")}
        nonce, blob = bytes.fromhex(doc["nonce"]), bytes.fromhex(doc["ciphertext"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KmsError(f"cannot read backup {path}: {exc}") from None
    org_id = binding["org"]
    if binding["region"] != node.config.region:
        raise KmsError(f"backup {path} is of region {binding['region']!r}; this KMS serves "
                       f"{node.config.region!r}", hint="a backup restores only into the "
                       "store it came from, so a key destroyed there cannot come back "
                       "anywhere else")
    try:
        created = node.store.org_created(org_id)
    except UnknownTenant:
        raise KmsError(f"backup {path}: org {org_id!r} does not exist in this store; a "
                       "backup restores only into the store it was exported from",
                       hint="recover a lost store from the database's own backups, which "
                            "keep its tombstones") from None
    if created != binding["org_created"]:
        raise KmsError(f"backup {path} was exported from another store's org {org_id!r} "
                       "(created at another time); refusing it",
                       hint="a backup restores only into the store it came from")
    if node.clock() > binding["expires"]:
        raise KmsError(f"backup {path} expired at {_iso(binding['expires'])}",
                       hint=f"backups are valid {key_rules.BACKUP_VALIDITY / key_rules.DAY:g} "
                            "days; export a new one")
    rel = node._release(binding["release"])
    try:
        plain = ops.aes_gcm_decrypt(node.token, rel.wrapping_key, nonce, blob,
                                    aad=_backup_aad(binding))
    except DecryptionFailed:  # a lost session or token is not a tampered file
        raise KmsError(f"backup {path} failed its integrity check", hint="the file was "
                       "altered or belongs to another tenant") from None
    data = json.loads(plain)
    rows = _restorable(node, path, org_id, [_from_json(r) for r in data["rows"]])
    node._change(org_id, lambda s: node.store.import_rows(org_id, rows, sealer=s),
                 restoring=frozenset(f"{r['key_type']} v{r['version']}" for r in rows))
    node._invalidated("import", org_id)
    return org_id


def _restorable(node: Kms, path: Path, org_id: str, rows: list[dict]) -> list[dict]:
    """The backup rows this org may take back: only versions its state sealed in the HSM
    holds, not destroyed, whose rows the store lost; each with the sealed columns (the
    backup gives only the blob). A version destroyed since never comes back."""
    sealed = node._seals().sealed(node.store.org_rows(org_id))["secrets"]
    held = {(r.key_type, r.version) for r in node.store.org_rows(org_id).secrets}
    out = []
    for r in rows:
        key = f"{r['key_type']} v{r['version']}"
        entry = sealed.get(key)
        if entry is not None and entry["state"] == "DESTROYED":
            raise KmsError(f"import of backup {path} refused (nothing imported): the store "
                           f"already holds {key} as destroyed; a destroyed key never "
                           "comes back")
        if (r["key_type"], r["version"]) in held:
            raise KmsError(f"import of backup {path} refused (nothing imported): the store "
                           f"already holds {key}")
        if entry is None:
            raise KmsError(f"import of backup {path} refused (nothing imported): {key} is "
                           f"not in org {org_id!r}'s state sealed in the HSM")
        r = {**r, **{c: entry[c] for c in sealing.SEALED_COLUMNS}}
        r.pop("checksum", None)
        out.append(r)
    return out


def _backup_aad(binding: dict) -> bytes:
    return _lp([BACKUP_AAD] + [repr(binding[k]).encode() for k in (
        "org", "region", "org_created", "created", "expires", "release")])


def _iso(ts: float) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value):
    if isinstance(value, bytes):
        return {"__bytes__": value.hex()}
    raise TypeError(type(value).__name__)


def _from_json(row: dict) -> dict:
    return {k: bytes.fromhex(v["__bytes__"]) if isinstance(v, dict) and "__bytes__" in v else v
            for k, v in row.items()}
