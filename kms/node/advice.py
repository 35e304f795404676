"""What to do when an org has no usable key: the next step that will actually work.

After the only ACTIVE key of an org is destroyed, encryption is refused until a new key exists,
and the rate limit decides when one may be made (one new secret per 24 h, 4 h for sandboxes,
counted from the newest - even a destroyed one). Pointing at `kms tenant rotate` without that
time was a dead end; this names the time, and that decrypting older data still works.
"""

from __future__ import annotations

import datetime as dt

from kms import key_rules


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")


def next_key(kms, org_id: str, key_type: str) -> str:
    """One hint: when and how the org can get a usable ``key_type`` key again."""
    rows = [r for r in kms.secrets(org_id) if r.key_type == key_type]
    if not rows:
        return (f"`kms tenant rotate --org {org_id} --key-type {key_type}` makes its first key "
                "(or upload one: BYOK, cache-only, EKM)")
    newest = max(rows, key=lambda r: r.version)
    if newest.state == "ACTIVE" and newest.usable_from > kms.clock():
        return f"its v{newest.version} becomes usable at {_iso(newest.usable_from)}"
    allowed = newest.created_at + key_rules.NEW_SECRET_INTERVAL[kms.store.org_type(org_id)]
    when = "now" if allowed <= kms.clock() else f"from {_iso(allowed)} (the rate limit)"
    return (f"a new key can be made {when}: `kms tenant rotate --org {org_id} --key-type "
            f"{key_type}` (or an upload); data under archived versions still decrypts")


def has_active(kms, org_id: str, key_type: str) -> bool:
    return any(r.key_type == key_type and r.state == "ACTIVE"
               for r in kms.secrets(org_id))
