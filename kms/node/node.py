"""The regional KMS: start-up import, tenant secret lifecycle, DEK derivation, encrypted cache.

Keys and where they live:
- release secrets (KDF seed, tenant wrapping key): session objects in the regional HSM, imported
  from the ceremony's bundles at every start (``kms.node.importer``);
- tenant secrets: 32 bytes from the HSM's RNG, stored only as AES-256-GCM ciphertext made *inside*
  the HSM under the release's tenant wrapping key, with the tenant, key type and version as
  associated data (a row copied to another tenant or version fails to decrypt), wrapped again
  under the org's key-encryption key, a token object replaced at every change of the org's
  state, whose whole state it also seals (``kms.node.sealing``);
- DEKs: PBKDF2-HMAC-SHA256 keyed by the KDF seed inside the HSM (``kms.node.derive``), or the
  customer's own key (derivation NONE); held only in the encrypted key cache;
- cache keys: per org, HMAC of (org, epoch) by an HSM-resident session key, never stored.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from pathlib import Path

from hsm.keys import export
from hsm.core import ops
from hsm.core import pin as pins
from hsm.core.errors import DecryptionFailed, HsmError, ObjectNotFound
from hsm.core.token import KeyRef, Token
from release.ids import release_key

from kms.node import advice, derive, importer, orgid, rowcache, sealing
from kms import key_rules
from kms.customer_keys import source as customer_sources
from kms.customer_keys.source import DekSource
from kms.dek_cache import KeyCache
from kms.node.config import KmsConfig
from kms.errors import (CorruptRecord, KeyDestroyed, KmsError, PolicyViolation, ReleaseNotHeld,
                     RolledBack, UnknownTenant)
from kms.store import SecretRow, Store

WRAP_AAD = b"hsm-suite tenant secret v2"


def _lp(parts: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _aad(org_id: str, key_type: str, version: int, *, source: str, derivation: str,
         release: str | None, iterations: int, usable_from: float) -> bytes:
    """The associated data of a wrapped tenant secret: who it belongs to *and* every column that
    changes how it is used. A database writer who flips derivation to NONE, lowers the
    iterations, moves the release or shortens the 24 h activation delay makes the AES-GCM tag
    fail inside the HSM, so the row is refused instead of used."""
    return _lp([WRAP_AAD, org_id.encode(), key_type.encode(), str(version).encode(),
                source.encode(), derivation.encode(), (release or "").encode(),
                str(iterations).encode(), repr(float(usable_from)).encode()])


def _row_aad(row: SecretRow) -> bytes:
    return _aad(row.org_id, row.key_type, row.version, source=row.source,
                derivation=row.derivation, release=row.release, iterations=row.iterations,
                usable_from=row.usable_from)


class Kms:
    def __init__(self, config: KmsConfig, *, pin: pins.Pin | None = None, clock=time.time,
                 token_sessions: int = 8):
        """``token_sessions``: the token's session pool. A server worker asks for one more
        than its executor threads and its audit writer can hold at once, so the event loop's
        checkpoint signature (kms.server.audit) never waits for a session."""
        self.config = config
        self._token_sessions = token_sessions
        self.clock = clock
        self._pin = pin
        # Set by start(); the properties below refuse use before it.
        self._token: Token | None = None
        self._store: Store | None = None
        self._report: importer.ImportReport | None = None
        self._cache: KeyCache | None = None
        self._cache_master: KeyRef | None = None
        self._sealing: sealing.Sealing | None = None
        self._views: dict[str, sealing.OrgView] = {}   # each org's state as last verified
        self._lock = threading.Lock()
        # DEK sources other than HSM-generated or uploaded secrets, by the kind a REMOTE row's
        # descriptor names (kms.customer_keys.source; "ekm" and "cache-only" are built in).
        self.dek_sources: dict[str, DekSource] = {}
        # The hot path's read of an org's head (generation, seal), kept while the store says
        # nothing changed (kms.node.rowcache): SQLite's data_version from start(); on PostgreSQL the
        # server sets one on its invalidation listener. None: every DEK request reads it.
        self.rows: rowcache.FreshRows | None = None
        # Told of every change this node commits, after its own cache dropped the entries:
        # announce(op, org, key_type, version) tells the other nodes on one PostgreSQL store
        # (kms.server.invalidation; set by the server's worker and by the CLI). None: alone.
        self.announce: Callable[[str, str, str | None, int | None], None] | None = None
        # Set by the token's recovery hook: the session keys (releases, cache master) died
        # with a lost login and are imported again before their next use.
        self._session_keys_lost = False
        self._unhook_recovery: Callable[[], None] | None = None
        # (org, key_type, fragment) -> the version dek_for_encrypt served last: which cached
        # DEK the hit-only lookup (cached_dek_for_encrypt) may answer with.
        self._served: dict[tuple, int] = {}

    @property
    def started(self) -> bool:
        return self._cache is not None

    @property
    def token(self) -> Token:
        return _started(self._token)

    @property
    def store(self) -> Store:
        return _started(self._store)

    @property
    def report(self) -> importer.ImportReport:
        return _started(self._report)

    @property
    def cache(self) -> KeyCache:
        return _started(self._cache)

    # ------------------------------------------------------------------------- life cycle
    def start(self) -> importer.ImportReport:
        if self._pin is None:  # a missing token is said to be missing, not asked for a PIN
            from hsm.core import module as modules
            from hsm.core.token import find_token
            find_token(modules.load(self.config.module, self.config.module_params),
                       label=self.config.token)
        pin = self._pin or pins.resolve(self.config.pin_source, default_env="HSM_PIN",
                                        token_label=self.config.token,
                                        prompt=f"User PIN for {self.config.token}: ",
                                        option="pin_source in the node configuration")
        self._token = Token.open(self.config.token, module=self.config.module,
                                 parameters=self.config.module_params, pin=pin,
                                 pool_size=self._token_sessions)
        self._store = Store.open(self.config.store)
        self.rows = rowcache.for_store(self._store, self.clock)
        self._unhook_recovery = self._token.on_recovery(self._lost_session_keys)
        self._load_session_keys()
        # Handed each org's cache key by _dek: the cache never calls back into the node.
        self._cache = KeyCache(None, max_entries=self.config.cache_max_entries,
                              flush_after=self.config.cache_flush_hours * key_rules.HOUR)
        self._open_sealing()
        return self.report

    def _open_sealing(self) -> None:
        """Find every org KEK with one search, sweep the ones the committed state no longer
        names (a change a crash interrupted), and seal the orgs of a store made before sealing
        (the one-time upgrade; each line goes into the start-up report)."""
        keks = sealing.Keks(self.token, self.store.store_id())
        keks.load()
        self._sealing = sealing.Sealing(self.token, keks, self.store.db.checkpoint,
                                        self.store.under_token_lock)
        notes = sealing.sweep(keks, self.store.org_generations(), self.store.under_org_lock)
        unsealed = [org for org, g in self.store.org_generations().items() if g is None]
        sealed = 0
        for org in sorted(unsealed):
            if keks.sealed_anywhere(org):
                notes.append(f"org {org!r}: not sealed in the store, but the HSM holds a "
                             "key-encryption key for it: its seal was removed; the org is "
                             "refused (an org sealed once is never sealed again)")
                continue
            self._upgrade_registrations(org)
            if self._change(org, lambda s, org=org: self.store.seal_unsealed(org, s),
                            transform=self._upgrade_blob):
                sealed += 1
        if sealed:
            notes.append(f"sealed {sealed} org(s) of a store made before per-org key-encryption "
                         "keys (a one-time upgrade; DEKs are unchanged)")
        self.report.notes.extend(notes)

    def _seals(self) -> sealing.Sealing:
        return _started(self._sealing)

    def _lost_session_keys(self) -> None:
        """The token's recovery hook (runs on the token's recovering thread: a note, no work)."""
        self._session_keys_lost = True

    def _load_session_keys(self) -> None:
        """Import the releases and make the cache master: all session objects, which die with
        the token's login. ``_ensure_session_keys`` redoes this after the layer recovered a
        lost session or login (C_CloseAllSessions, a dropped link: the token's hook says so)."""
        self._session_keys_lost = False
        self._report = importer.import_bundles(
            self.token, region=self.config.region,
            primary_cert_path=self.config.primary_certificate,
            bundle_dir=self.config.bundle_dir, allow_practice=self.config.allow_practice,
            officers=self.config.officers,
            history=self.store.releases(),
            record=lambda rel, cid, sha: self.store.record_release(rel, cid, sha, self.clock()))
        self._cache_master = ops.generate_session_secret(
            self.token, kind="generic-secret", usage="sign",
            label=f"kms-cache-master-{os.getpid()}-{os.urandom(4).hex()}")

    def _ensure_session_keys(self) -> None:
        if self._session_keys_lost:
            with self._lock:
                if self._session_keys_lost:
                    self._load_session_keys()
                    if self._cache is not None:   # its keys came from the lost cache master
                        self._cache.flush()

    def _in_hsm(self, fn):
        """Run a token operation on session keys. If the layer had to recover a lost login
        while running it, the session keys are gone: reload them once and retry."""
        try:
            return fn()
        except ObjectNotFound:
            if not self._session_keys_lost:
                raise
            self._ensure_session_keys()
            return fn()

    def close(self) -> None:
        if self._cache is not None:
            self._cache.flush()
        if self._token is not None:
            # Session objects would die with the process anyway; destroy them now so a
            # token shared within the process keeps no release secret past this node.
            refs = [self._cache_master] if self._cache_master else []
            for rel in (self._report.held if self._report else {}).values():
                refs += [rel.seed, rel.wrapping_key]
            for ref in refs:
                try:
                    ops.destroy_session_object(self._token, ref)
                except HsmError:
                    pass       # the login is gone already: the session objects went with it
        if self.rows is not None:
            self.rows.close()
        if self._unhook_recovery is not None:
            self._unhook_recovery()
        if self._store is not None:
            self._store.close()
        if self._token is not None:
            self._token.close()

    def __enter__(self) -> Kms:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _cache_key(self, org_id: str, epoch: int) -> bytes:
        """The org's cache key of ``epoch``: an HMAC by the HSM-resident cache master, never
        stored (handed to the cache by _dek when it holds none for the org)."""
        self._ensure_session_keys()
        msg = b"hsm-suite cache key v1\x00" + org_id.encode() + b"\x00" + str(epoch).encode()
        return self._in_hsm(lambda: ops.hmac_sha256(self.token, _started(self._cache_master), msg))

    # ------------------------------------------------------------------------- releases
    @property
    def releases(self) -> dict[str, importer.Release]:
        """The releases held, by name. A read only: session keys lost with a login are imported
        again by the next operation that uses them (``_release``), not here."""
        return {} if self._report is None else self._report.held

    def current_release(self) -> importer.Release:
        self._ensure_session_keys()
        if not self.releases:
            raise ReleaseNotHeld("this KMS holds no release", hint="check `kms import` output "
                                 "for refused bundles")
        newest = max(self.releases, key=release_key)
        recorded = max(self.store.releases(), key=release_key, default=newest)
        if release_key(recorded) > release_key(newest):
            raise ReleaseNotHeld(f"release {recorded} was imported before but is not held now; "
                                 f"refusing to wrap new secrets under the older release {newest}",
                                 hint="restore its bundle (see `kms import`) and restart")
        return self.releases[newest]

    def _release(self, name: str | None) -> importer.Release:
        self._ensure_session_keys()
        if name is None or name not in self.releases:
            raise ReleaseNotHeld(f"release {name} is not held by this KMS (its bundle was not "
                                 "imported)", hint="run `kms import` and read why it was refused")
        return self.releases[name]

    # ------------------------------------------------------------------------- tenants
    def create_tenant(self, org_id: str, org_type: str) -> None:
        orgid.check(org_id)  # no look-alike ids: blanks, invisible or control characters
        if org_type not in key_rules.ORG_TYPES:
            raise KmsError(f"org type must be one of {', '.join(key_rules.ORG_TYPES)}")
        # A tenant's first secret needs a release: refuse now rather than leave an org row
        # behind that has no secret and whose creation blocks a retry.
        self.current_release()
        self._change(org_id, lambda s: self.store.create_org(org_id, org_type, sealer=s))

    # ------------------------------------------------------------------------- sealed state
    def _change(self, org_id: str, write, *, transform=None, restoring=frozenset()):
        """One change of an org's state: ``write(sealer)`` runs the store's transaction, which
        makes the next KEK and seals the new state; then the older KEK is destroyed, so no copy
        of the old rows can be used again. A change that did not commit destroys its new KEK."""
        sealer = sealing.Sealer(self._seals(), org_id, transform, restoring)
        try:
            result = write(sealer)
        except BaseException:
            try:
                committed: int | None = self.store.org_head(org_id)[0] or 0
            except UnknownTenant:
                committed = 0
            except KmsError:
                committed = None        # unknown: the start-up sweep settles it
            sealer.failed(committed)
            raise
        finally:
            self._views.pop(org_id, None)
            self._changed()
        sealer.committed()
        return result

    def _view(self, org_id: str, *, hot: bool = False) -> sealing.OrgView:
        """The org's state as verified in the HSM. Per request one indexed read of the org's
        generation and seal; the full rows are read and verified only when those changed, and
        the seal is re-checked in the token every ``sealing.RECHECK_S`` seconds (so a KEK
        another node destroyed is noticed within that bound). ``hot`` (DEK requests): that
        read is kept while the store says nothing changed (``_head``)."""
        generation, seal = self._head(org_id) if hot else self.store.org_head(org_id)
        view = self._views.get(org_id)
        if view is not None and view.generation == generation and view.seal == seal:
            if time.monotonic() - view.checked < sealing.RECHECK_S:
                return view
            try:
                self._seals().recheck(view)
                return view
            except (CorruptRecord, HsmError):
                self._views.pop(org_id, None)
                self.cache.invalidate(org_id)
                raise
        try:
            fresh = self._seals().verify(self.store.org_rows(org_id))
        except (CorruptRecord, HsmError):
            if self._views.pop(org_id, None) is not None:
                self.cache.invalidate(org_id)
            raise
        if view is not None and view.generation != fresh.generation:
            self.cache.invalidate(org_id)    # changed by another node
        self._views[org_id] = fresh
        return fresh

    def customer_key(self, org_id: str, kind: str) -> dict | None:
        """The org's EKM or BYOK registration, as sealed in the HSM."""
        return self._view(org_id).customer_keys.get(kind)

    def put_customer_key(self, org_id: str, kind: str, spec: dict) -> None:
        self._change(org_id, lambda s: self.store.put_customer_key(
            org_id, kind, spec, now=self.clock(), sealer=s))
        self._invalidated("register", org_id)

    def secrets(self, org_id: str) -> list[SecretRow]:
        """The org's versions, as sealed in the HSM."""
        return self._view(org_id).rows()

    def _upgrade_registrations(self, org_id: str) -> None:
        """Upgrade: an EKM registration kept its CA bundle's path; seal its bytes instead."""
        rows = self.store.org_rows(org_id)
        if "ekm" in rows.customer_keys:
            text, created = rows.customer_keys["ekm"]
            spec = json.loads(text)
            if spec.get("ca_bundle") and "ca_pem" not in spec:
                from kms.customer_keys.ekm import read_ca
                spec["ca_pem"] = read_ca(spec["ca_bundle"])
                self.store.put_customer_key(org_id, "ekm", spec, now=created)

    def _upgrade_blob(self, row: SecretRow, inner: bytes) -> bytes:
        """Upgrade: a cache-only key's descriptor kept its CA bundle's path; seal its bytes."""
        if row.source != "REMOTE":
            return inner
        descriptor = json.loads(self._open_inner(row, inner))
        if descriptor.get("kind") != "cache-only" or not descriptor.get("ca") \
                or "ca_pem" in descriptor:
            return inner
        from kms.customer_keys.ekm import read_ca
        descriptor["ca_pem"] = read_ca(descriptor["ca"])
        rel = self._release(row.release)
        nonce = os.urandom(12)
        return nonce + self._in_hsm(lambda: ops.aes_gcm_encrypt(
            self.token, rel.wrapping_key, nonce, json.dumps(descriptor).encode(),
            aad=_row_aad(row)))

    def generate_secret(self, org_id: str, key_type: str = "field") -> SecretRow:
        """A new tenant secret from the HSM's RNG; archives the previous one (rotation)."""
        self.store.org_type(org_id)
        material = export.random_bytes(self.token, 32)
        return self._add(org_id, key_type, material, source="HSM", derivation="PBKDF2",
                         op="rotate")

    rotate = generate_secret

    def upload_secret(self, org_id: str, key_type: str, material: bytes, *,
                      derivation: str = "PBKDF2", upload_sha256: str | None = None) -> SecretRow:
        """A customer-supplied tenant secret (PBKDF2) or DEK (NONE), stored wrapped.
        Database-encryption keys take seeds only: the DEK is always derived (PBKDF2)."""
        if len(material) != 32:
            raise KmsError(f"an uploaded secret or DEK must be 32 bytes, not {len(material)}")
        if key_type == "database" and derivation != "PBKDF2":
            raise PolicyViolation("database-encryption uploads are seeds only: derivation NONE "
                                  "is refused", hint="upload with --derivation PBKDF2")
        self.store.org_type(org_id)
        return self._add(org_id, key_type, material, source="UPLOADED", derivation=derivation,
                         upload_sha256=upload_sha256, op="upload")

    def add_remote(self, org_id: str, key_type: str, descriptor_for) -> SecretRow:
        """A new version whose DEK lives outside this KMS (source REMOTE, derivation NONE).
        ``descriptor_for(version)`` returns the JSON-able descriptor (e.g. the EKM ciphertext
        blob and key id); it is stored AES-GCM-wrapped like any tenant secret, so its columns
        stay bound to it."""
        self.store.org_type(org_id)
        return self._add(org_id, key_type,
                         lambda version: json.dumps(descriptor_for(version)).encode(),
                         source="REMOTE", derivation="NONE", op="rotate")

    def _add(self, org_id, key_type, material, *, source, derivation, op,
             upload_sha256=None) -> SecretRow:
        rel = self.current_release()
        now = self.clock()
        iterations = self.config.pbkdf2_iterations

        def wrap(version: int) -> bytes:
            plain = material(version) if callable(material) else material
            nonce = os.urandom(12)
            aad = _aad(org_id, key_type, version, source=source, derivation=derivation,
                       release=rel.release, iterations=iterations,
                       usable_from=key_rules.usable_from(key_type, now))
            return nonce + self._in_hsm(lambda: ops.aes_gcm_encrypt(
                self.token, rel.wrapping_key, nonce, plain, aad=aad))
        row = self._change(org_id, lambda s: self.store.add_secret(
            org_id, key_type, source=source, derivation=derivation, release=rel.release,
            iterations=iterations, now=now, wrap=wrap, upload_sha256=upload_sha256, sealer=s))
        self._invalidated(op, org_id, key_type)
        return row

    def destroy(self, org_id: str, key_type: str, version: int) -> SecretRow:
        """Crypto-shred one version: its row becomes a tombstone, the surviving versions are
        re-wrapped under a new KEK and the KEK that wrapped this one is destroyed in the HSM
        before this returns, so no earlier copy of any row yields it."""
        row = self.store.get(org_id, key_type, version)
        if row.state == "DESTROYED":
            self._view(org_id).get(key_type, version)   # a sealed tombstone, not an edit
            return row
        row = self._change(org_id, lambda s: self.store.destroy_secret(
            org_id, key_type, version, now=self.clock(), sealer=s))
        self._invalidated("destroy", org_id, key_type, version)
        # Another worker on this SQLite store may reuse a change-counter read for
        # rowcache.STAMP_REUSE after it: waiting that long here means that once destroy returns,
        # every lookup anywhere on the store refuses the version (read-your-destroy).
        time.sleep(rowcache.STAMP_REUSE)
        return row

    def _tenant_secret(self, row: SecretRow, view: sealing.OrgView | None = None) -> bytes:
        if row.state == "DESTROYED" or row.wrapped is None:
            raise _destroyed(row)
        view = view or self._view(row.org_id)
        inner = self._seals().unwrap(row.org_id, view.generation, row)
        return self._open_inner(row, inner)

    def _open_inner(self, row: SecretRow, inner: bytes) -> bytes:
        rel = self._release(row.release)
        nonce, blob = inner[:12], inner[12:]
        try:
            return self._in_hsm(lambda: ops.aes_gcm_decrypt(
                self.token, rel.wrapping_key, nonce, blob, aad=_row_aad(row)))
        except DecryptionFailed:
            raise CorruptRecord(
                f"org {row.org_id}: {row.key_type} secret v{row.version} failed its "
                "authentication in the HSM: the wrapped blob or a column bound to it "
                "(source, derivation, release, iterations, usable-from) was altered",
                hint="restore the row from a backup of this store; do not edit rows by hand",
                records=[("tenant_secrets", row.org_id, row.key_type, row.version)]) from None

    # ------------------------------------------------------------------------- DEKs
    def _dek(self, row: SecretRow, fragment: str | None, generation: int,
             view: sealing.OrgView | None = None) -> bytes:
        """``generation`` was read *before* ``row`` came from the store: a destroy committed
        after that read bumps the cache generation, and put() then drops our DEK."""
        if row.state == "DESTROYED":
            raise _destroyed(row)
        key_id = (row.key_type, row.version, fragment)
        cached = self.cache.get(row.org_id, key_id)
        if cached is not None:
            return cached
        secret = self._tenant_secret(row, view)
        if row.source == "REMOTE":
            dek = self._remote_dek(row, secret)
        elif row.derivation == "NONE":
            dek = secret
        else:
            rel = self._release(row.release)
            ctx = derive.KeyContext(row.org_id, row.key_type, row.version, fragment)
            dek = self._in_hsm(lambda: derive.derive_dek(self.token, rel.seed, rel.kdf_salt,
                                                         secret, ctx, row.iterations))
        # The cache is handed the org's cache key when it holds none (never calls back here).
        epoch = self.cache.key_needed(row.org_id)
        cache_key = None if epoch is None else (epoch, self._cache_key(row.org_id, epoch))
        self.cache.put(row.org_id, key_id, dek, since=generation, cache_key=cache_key)
        return dek

    def _remote_dek(self, row: SecretRow, blob: bytes) -> bytes:
        try:
            descriptor = json.loads(blob)
            source = self.dek_sources.get(descriptor["kind"]) or customer_sources.builtin(
                descriptor["kind"])
        except (ValueError, KeyError, TypeError):
            raise KmsError(f"org {row.org_id}: {row.key_type} key v{row.version} is a remote key "
                           "of a kind this node does not serve", hint="start the node with "
                           "its EKM / cache-only support") from None
        dek = source(self, row, descriptor)
        if len(dek) != 32:
            raise KmsError(f"org {row.org_id}: remote key v{row.version} gave {len(dek)} bytes, "
                           "not a 32-byte DEK")
        return dek

    def dek_for_encrypt(self, org_id: str, key_type: str = "field",
                        fragment: str | None = None) -> tuple[int, str, bytes]:
        generation = self.cache.generation()
        view = self._view(org_id, hot=True)
        row = view.active(key_type, self.clock())
        if row is None:
            raise KmsError(f"org {org_id} has no usable {key_type} secret",
                           hint=advice.next_key(self, org_id, key_type))
        dek = self._dek(row, fragment, generation, view)
        if len(self._served) > 100_000:
            self._served.clear()
        self._served[(org_id, key_type, fragment)] = row.version
        return row.version, row.derivation, dek

    def dek_for_decrypt(self, org_id: str, key_type: str, version: int,
                        fragment: str | None = None) -> bytes:
        generation = self.cache.generation()
        view = self._view(org_id, hot=True)
        return self._dek(view.get(key_type, version), fragment, generation, view)

    # -- the hit path's store read (kms.node.rowcache): DEK requests read the org's head only here
    def _head(self, org_id: str):
        read = lambda: self.store.org_head(org_id)  # noqa: E731
        return read() if self.rows is None else self.rows.get(("head", org_id), read)

    def _changed(self) -> None:
        """This node wrote an org's state: no head read before may answer again."""
        if self.rows is not None:
            self.rows.clear()

    # -- the hit-only lookups: the server answers these on its event loop (no pool hop)
    def cached_dek_for_encrypt(self, org_id: str, key_type: str = "field",
                               fragment: str | None = None) -> tuple[int, str, bytes] | None:
        """What ``dek_for_encrypt`` answers, if that needs neither the HSM nor the store (its
        DEK is cached, the org's head is kept fresh, its verified view needs no re-check in the
        token); else None, and the caller runs ``dek_for_encrypt`` (on its pool). The checks of
        the full path run here too: the org's sealed head and view, the ACTIVE version."""
        version = self._served.get((org_id, key_type, fragment))
        view = None if version is None else \
            self._local_view(org_id, (key_type, version, fragment))
        if view is None:
            return None
        row = view.active(key_type, self.clock())
        if row is None or row.version != version:
            return None                 # rotated or gone: the full path says which
        dek = self.cache.get(org_id, (key_type, version, fragment))
        return None if dek is None else (version, row.derivation, dek)

    def cached_dek_for_decrypt(self, org_id: str, key_type: str, version: int,
                               fragment: str | None = None) -> bytes | None:
        """What ``dek_for_decrypt`` answers, if that needs neither the HSM nor the store; else
        None. A destroyed or unknown version is refused here as there."""
        view = self._local_view(org_id, (key_type, version, fragment))
        if view is None:
            return None
        row = view.get(key_type, version)
        if row.state == "DESTROYED":
            raise _destroyed(row)
        return self.cache.get(org_id, (key_type, version, fragment))

    def _local_view(self, org_id: str, key_id: tuple) -> sealing.OrgView | None:
        """The org's verified view, if a DEK lookup needs neither the HSM nor the store: the
        DEK is cached, the org's head is kept fresh (kms.node.rowcache) and is the one the view
        verified, and the view needs no re-check in the token yet. One look at the store's
        change counter, never a read: this runs on the event loop."""
        if self.rows is None or not self.cache.holds(org_id, key_id):
            return None
        view = self._views.get(org_id)
        if view is None or time.monotonic() - view.checked >= sealing.RECHECK_S:
            return None
        head = self.rows.kept(("head", org_id))
        return view if head == (view.generation, view.seal) else None

    def _invalidated(self, op: str, org_id: str, key_type: str | None = None,
                     version: int | None = None) -> None:
        """After a change this node committed: drop the DEKs it cached and tell the other
        nodes (the one place changes are announced from; the payload names no key material)."""
        self.cache.invalidate(org_id, key_type, version)
        if self.announce is not None:
            self.announce(op, org_id, key_type, version)

    # ------------------------------------------------------------------------- status, backup
    def status(self) -> dict:
        return {"region": self.config.region, "token": self.token.label,
                "releases": sorted(self.releases, key=release_key),
                "refused": dict(self.report.refused) if self.report else {},
                "tenants": [{"org": org, "type": t} for org, t in self.store.orgs()],
                "cache": self.cache.stats()}

    def export_backup(self, org_id: str, path: Path) -> Path:
        """The tenant's backup, encrypted in the HSM (kms.node.backups.export)."""
        from kms.node import backups
        return backups.export(self, org_id, path)

    def import_backup(self, path: Path) -> str:
        """Restore a tenant's rows from its backup (kms.node.backups.restore)."""
        from kms.node import backups
        return backups.restore(self, path)


T = TypeVar("T")


def _started(value: T | None) -> T:
    if value is None:
        raise KmsError("this KMS node is not started", hint="call Kms.start() first")
    return value


def _destroyed(row: SecretRow) -> KeyDestroyed:
    return KeyDestroyed(f"key destroyed: org {row.org_id}, {row.key_type} key version "
                        f"{row.version}", hint="data under a destroyed key cannot be "
                        "decrypted (crypto-shredding)")


__all__ = ["Kms", "PolicyViolation"]
