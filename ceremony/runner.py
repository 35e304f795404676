"""Run a ceremony: open (fresh nonce), approvals, then the steps of its type, journaled.

Every step is idempotent against the journal (the transcript) and the token: a run killed at any
point is finished by running it again, which skips journaled steps, adopts objects an interrupted
step made (matched by label *and* CKA_ID derived from the ceremony id), and never generates a
secret twice. The transcript records where a run resumed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsm.core import ops
from hsm.core import pin as pins
from hsm.core.token import KeyRef, Token
from hsm.keys import export
from hsm.keys import x509 as hx
from release import bundle as bundles
from release import certificates as certs
from release.canonical import canonical
from release.ids import release_key
from suite import fingerprint as fp
from suite.files import write_new

from . import approvals as approvals_mod
from . import lock
from .environment import Environment
from .errors import CeremonyError, ResumeError
from .plan import CEREMONY_TYPES, Plan
from .transcript import SIGNATURE_FILE, Transcript, head_message, sha256_hex
from .verify import release_digest

APPROVALS_DIR = "approvals"
# Test hook: kill the runner with SIGKILL at a named checkpoint, to prove resume works. Named
# loudly so nobody sets it by accident; it can only stop a ceremony, never change what it does.
KILL_ENV = "HSM_SUITE_TEST_KILL_AT"
PRACTICE_MARK = "PRACTICE"


def secret_label(plan: Plan, name: str) -> str:
    # Practice secrets get their own labels: a practice run must never block (or be mistaken
    # for) the production run of the same release.
    return f"{'practice-' if plan.practice else ''}rel-{plan.release}-{name}"


def secret_id(plan: Plan, name: str, nonce: bytes) -> bytes:
    """CKA_ID tying a token object to this ceremony *run*: how a resumed run recognises its own.
    The run's nonce is in it, so another run with the same ceremony id (a practice run, an
    aborted and re-planned one) can never have its secrets adopted."""
    return hashlib.sha256(f"{plan.id}\x00{name}\x00{int(plan.practice)}\x00".encode()
                          + nonce).digest()[:16]


def recipient_label(name: str) -> str:
    return f"trusted-{name}"


def bundle_name(plan: Plan, recipient: str) -> str:
    stamp = f"-{PRACTICE_MARK}" if plan.practice else ""
    return f"bundle-{plan.release}-{recipient}{stamp}.p7"


class Runner:
    def __init__(self, plan: Plan, env: Environment, *, interactive: bool = False,
                 log: Callable[[str], None] = print):
        self.plan = plan
        self.env = env
        self.out = plan.output_dir
        self.interactive = interactive
        self.log = log
        self._user_pin: pins.Pin | None = None
        self._token: Token | None = None
        self._scheme: str | None = None
        self._restored: dict[str, KeyRef] = {}  # escrow-export: secret name -> session object

    # ------------------------------------------------------------------------- open
    def open(self) -> bytes:
        """Create the output directory and the journal's first record with a fresh nonce.
        Re-opening the same plan returns the recorded nonce (approvals stay valid)."""
        self.out.mkdir(parents=True, exist_ok=True)
        with lock.exclusive(self.plan.path, self.out):
            return self._open()

    def _open(self) -> bytes:
        tr = Transcript(self.out)
        first = tr.find("open")
        if first is not None:
            if first["data"]["plan_digest"] != self.plan.digest.hex():
                raise ResumeError(f"{self.out} holds another plan's ceremony",
                                  hint="choose another output_dir; outputs are never overwritten")
            if tr.find("close") and (self.out / SIGNATURE_FILE).exists():
                raise ResumeError(f"ceremony {self.plan.id} in {self.out} is already closed")
            return bytes.fromhex(first["data"]["nonce"])
        if any(self.out.iterdir()):
            raise ResumeError(f"{self.out} is not empty and holds no journal",
                              hint="choose an empty output_dir")
        nonce = os.urandom(32)
        tr.append("open", {"ceremony_id": self.plan.id, "type": self.plan.type,
                           "release": self.plan.release, "practice": self.plan.practice,
                           "plan_file": self.plan.path.name,
                           "plan_digest": self.plan.digest.hex(), "nonce": nonce.hex(),
                           "quorum": self.plan.quorum,
                           "officers": [[o.name, o.role] for o in self.plan.officers]})
        return nonce

    # ------------------------------------------------------------------------- run
    def run(self) -> Transcript:
        """Perform (or resume) the steps, holding the plan, the output directory and the
        primary token for the whole run (:mod:`ceremony.lock`)."""
        if not self.out.is_dir():
            raise ResumeError(f"ceremony not opened in {self.out}",
                              hint="run `ceremony open PLAN` first, then collect approvals")
        with lock.exclusive(self.plan.path, self.out, self._token_identity()):
            return self._run()

    def _token_identity(self) -> tuple[str, str, str]:
        """(module, serial, label) of the primary, found without logging in."""
        from hsm.core import module as modules
        from hsm.core.token import find_token
        mod = modules.load(self.env.module, self.env.module_params)
        found = find_token(mod, label=self.env.primary_token)
        return mod.path, found.serial.decode("ascii", "replace"), found.label

    def _run(self) -> Transcript:
        tr = Transcript(self.out)
        if tr.find("open") is None:
            raise ResumeError(f"ceremony not opened in {self.out}",
                              hint="run `ceremony open PLAN` first, then collect approvals")
        if tr.data("open")["plan_digest"] != self.plan.digest.hex():
            raise ResumeError(f"{self.out} holds another plan's ceremony (the plan changed "
                              "after it was opened)")
        if tr.find("close") and (self.out / SIGNATURE_FILE).exists():
            raise ResumeError(f"ceremony {self.plan.id} is already closed")
        done = tr.steps_done()
        todo = [s for s in steps(self.plan) if s not in done]
        _remove_stale_temporaries(self.out)  # a killed writer's, e.g. of the head signature
        if len(done) > 1 and todo:
            last = tr.records[-1]["step"]
            tr.append("resume", {"after_step": last, "remaining": todo})
            self.log(f"resuming after step {last!r}")
        self.tr = tr
        try:
            for step in todo:
                self._kill_point(f"before:{step}")
                self.log(f"step {step}")
                self._do(step)
            if not (self.out / SIGNATURE_FILE).exists():
                self._sign_head()
            self.show_release_digest()
        finally:
            self._destroy_restored()
            self._close_user_token()
        return tr

    def _do(self, step: str) -> None:
        name, _, arg = step.partition(":")
        handler = handlers(self.plan.type)[name]
        handler(self, arg) if arg else handler(self)

    def _kill_point(self, where: str) -> None:
        if os.environ.get(KILL_ENV) == where:
            os.kill(os.getpid(), signal.SIGKILL)

    def _journal(self, step: str, data: dict, officer: str | None = None) -> None:
        self._kill_point(f"after-op:{step}")
        self.tr.append(step, data, officer)

    # ------------------------------------------------------------------------- tokens
    def _user_token(self) -> contextlib.AbstractContextManager[Token]:
        """The primary, logged in as the user once for all user steps (not per step)."""
        if self._token is None:
            if self._user_pin is None:
                self._user_pin = pins.resolve(self.env.user_pin_source, default_env="HSM_PIN",
                                              token_label=self.env.primary_token,
                                              prompt="Primary HSM user PIN: ",
                                              option="user_pin_source in the --env file")
            self._token = Token.open(self.env.primary_token, module=self.env.module,
                                     parameters=self.env.module_params, pin=self._user_pin)
            self._check_primary_keys(self._token)
        return contextlib.nullcontext(self._token)

    def _check_primary_keys(self, token: Token) -> None:
        """Every run re-checks the primary's keys against their policy before using them (a
        key provisioned before the policy, or on a token that does not keep it, is refused)."""
        from hsm.keys import attributes
        sign = f"{token.label}-signing"
        spki = hx.public_key_info(token, ops.public(sign))
        signing = attributes.SIGNING_ECDSA if spki.algorithm == "ec" else attributes.SIGNING_RSA_PSS
        attributes.require(token, ops.private(sign), signing, purpose="sign ceremony outputs")
        if self.plan.type != "regional-enrollment":
            attributes.require(token, ops.private(f"{token.label}-encryption"),
                           attributes.PRIMARY_ENCRYPTION, purpose="receive the escrow bundle")
            # Release secrets leave only under trusted keys whose wrap template the token must
            # keep (an escrow-export generates nothing, so the generate step's check is not
            # enough).
            from hsm.core.profile import require_enforcement
            require_enforcement(token, "export release secrets", allow_weak=self.plan.practice)

    def _close_user_token(self) -> None:
        self._destroy_restored()
        if self._token is not None:
            self._token.close()  # logs the user out: the SO cannot log in while we are
            self._token = None

    def _so_token(self) -> Token:
        self._close_user_token()
        so_pin = pins.resolve(self.env.so_pin_source, default_env="HSM_SO_PIN",
                              token_label=self.env.primary_token,
                              prompt="Primary HSM security officer PIN: ",
                              option="so_pin_source in the --env file")
        return Token.open(self.env.primary_token, module=self.env.module,
                          parameters=self.env.module_params, pin=so_pin, so=True)

    # ------------------------------------------------------------------------- steps
    def step_approvals(self) -> None:
        nonce = bytes.fromhex(self.tr.data("open")["nonce"])
        folder = self.out / APPROVALS_DIR
        found = sorted(folder.glob("*.json")) if folder.is_dir() else []
        given = [approvals_mod.Approval.load(p) for p in found]
        valid = approvals_mod.check_detailed(self.plan, nonce, given)
        self._journal("approvals", {
            "nonce": nonce.hex(), "approved_by": list(valid),
            "signatures": {name: sha256_hex(sig) for name, sig in valid.items()}})

    def _recipients(self) -> list[tuple[str, Path, bytes | None]]:
        rows: list[tuple[str, Path, bytes | None]] = [
            (r.name, r.certificate, r.fingerprint) for r in self.plan.regions]
        if self.plan.type != "escrow-export":  # its escrow bundle exists already
            rows.append(("escrow", self.plan.primary_encryption_certificate, None))
        return rows

    def step_check_certificates(self) -> None:
        primary = certs.check_primary(self.plan.primary_signing_certificate)
        checked = {}
        for name, path, pinned in self._recipients():
            cert = certs.check_recipient(path, primary, pinned, name)
            checked[name] = {"certificate_sha256": sha256_hex(cert.public_bytes(
                certs.Encoding.DER)), "spki_sha256": certs.spki_fingerprint(cert).hex()}
        self._journal("check-certificates", {
            "primary_signing_spki_sha256": certs.spki_fingerprint(primary).hex(),
            "recipients": checked})

    def step_check_release(self) -> None:
        with self._user_token() as token:
            recorded = export.read_states(token)
        last = max(recorded, key=release_key) if recorded else None
        if last is not None and release_key(self.plan.need(self.plan.release, "ceremony.release")) <= release_key(last):
            raise CeremonyError(f"release {self.plan.release} is not newer than the last "
                                f"release recorded in the primary HSM ({last})",
                                hint="release ids only move forward; fix the plan")
        self._journal("check-release", {"last_recorded": last, "release": self.plan.release})

    def step_trust_recipients(self) -> None:
        checked = self.tr.data("check-certificates")["recipients"]
        result = {}
        with self._so_token() as so:
            # The escrow recipient is not pinned in the plan: it must be this primary's own
            # encryption key, or an edited certificate path could send every secret elsewhere.
            own = hx.public_key_info(so, ops.public(f"{so.label}-encryption")).dump()
            escrow_cert = certs.load(self.plan.primary_encryption_certificate, "escrow")
            if certs.as_asn1(escrow_cert).public_key.dump() != own:
                raise CeremonyError("the plan's primary encryption certificate is not this "
                                    "primary HSM's encryption key; the escrow bundle would go "
                                    "to another key", hint="fix primary.encryption_certificate")
            for name, path, _ in self._recipients():
                cert = certs.load(path, name)
                spki = certs.as_asn1(cert).public_key
                key_id = bytes.fromhex(checked[name]["spki_sha256"])[:16]
                status = export.ensure_trusted_public_key(so, recipient_label(name), key_id, spki)
                result[name] = {"label": recipient_label(name), "id": key_id.hex(),
                                "status": status,
                                "template": export.applied_trusted_template()}
        self._journal("trust-recipients", {"recipients": result}, officer="security officer")

    def step_kdf_salt(self) -> None:
        with self._user_token() as token:
            salt = export.random_bytes(token, 32)
        self._journal("kdf-salt", {"kdf_salt": salt.hex(), "source": "C_GenerateRandom"})

    def step_generate(self, name: str) -> None:
        secret = next(s for s in self.plan.secrets if s.name == name)
        nonce = bytes.fromhex(self.tr.data("open")["nonce"])
        label, key_id = secret_label(self.plan, name), secret_id(self.plan, name, nonce)
        with self._user_token() as token:
            status = export.ensure_secret(token, secret.key_type, label, key_id,
                                          allow_weak_token=self.plan.practice)
            attrs = export.check_secret(token, secret.key_type, label)
        self._journal(f"generate:{name}", {
            "label": label, "id": key_id.hex(), "type": secret.type, "bits": secret.bits,
            "status": status, "attributes_read_back": attrs,
            "template": export.applied_template(secret.key_type)})

    def step_check_values(self) -> None:
        values = {}
        with self._user_token() as token:
            for s in self.plan.secrets:
                method, kcv = export.check_value(token, s.key_type, secret_label(self.plan,
                                                                                 s.name))
                values[s.name] = {"method": method, "value": kcv.hex()}
        self._journal("check-values", {"check_values": values})

    def step_export(self, recipient: str) -> None:
        path = self.out / bundle_name(self.plan, recipient)
        primary_cert = self._primary_asn1
        if path.exists():  # written by a run killed before it could journal the step
            verified = bundles.verify(path.read_bytes(), primary_cert, where=str(path))
            manifest = verified.manifest
            if manifest["ceremony_id"] != self.plan.id or manifest["region"] != recipient:
                raise ResumeError(f"{path} belongs to another ceremony or region")
            self._journal(f"export:{recipient}", {
                "bundle": path.name, "status": "adopted", "sha256": verified.core_sha256,
                "manifest_sha256": verified.manifest_sha256.hex()})
            return
        checked = self.tr.data("check-certificates")["recipients"][recipient]
        wrap_ref = ops.public(recipient_label(recipient))
        entries = []
        with self._user_token() as token:
            salt, sources = self._export_sources(token)
            for src in sources:
                wrapped = ops.rsa_oaep_wrap(token, wrap_ref, src["ref"])
                entries.append({"name": src["name"], "type": src["type"],
                                "key_type": src["key_type"], "bits": src["bits"],
                                "wrap": {"mechanism": wrapped.mechanism, **wrapped.parameters},
                                "wrapped": wrapped.data.hex(),
                                "check_value": src["check_value"]})
            manifest = {
                "format": bundles.FORMAT, "version": bundles.VERSION,
                "ceremony_id": self.plan.id, "release": self.plan.release, "region": recipient,
                "recipient": {"spki_sha256": checked["spki_sha256"],
                              "certificate_sha256": checked["certificate_sha256"]},
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "practice": self.plan.practice, "kdf_salt": salt, "secrets": entries,
                # What the officers approved, inside what they countersign: a manifest is
                # bound to the reviewed plan and to this run.
                "plan_digest": self.plan.digest.hex(), "run_nonce": self.tr.data("open")["nonce"]}
            der = bundles.build(manifest, primary_cert, self._signature_scheme(token),
                                lambda data: self._sign(token, data))
        write_new(path, der)
        self._journal(f"export:{recipient}", {
            "bundle": path.name, "status": "created", "sha256": sha256_hex(der),
            "manifest_sha256": sha256_hex(canonical(manifest)),
            "wraps": [{"secret": e["name"], **e["wrap"]} for e in entries]})

    def _export_sources(self, token: Token) -> tuple[str, list[dict]]:
        """What an export wraps: the release's token secrets (release-secrets), or the escrow
        bundle's secrets restored into session objects (escrow-export)."""
        if self.plan.type != "escrow-export":
            kcvs = self.tr.data("check-values")["check_values"]
            return self.tr.data("kdf-salt")["kdf_salt"], [
                {"name": s.name, "type": s.type, "key_type": s.key_type, "bits": s.bits,
                 "ref": ops.secret(secret_label(self.plan, s.name)),
                 "check_value": kcvs[s.name]} for s in self.plan.secrets]
        escrow = self.tr.data("check-escrow")
        return escrow["kdf_salt"], [
            {**{k: e[k] for k in ("name", "type", "key_type", "bits", "check_value")},
             "ref": self._restore(token, e)} for e in escrow["secrets"]]

    def _restore(self, token: Token, entry: dict) -> KeyRef:
        """Unwrap one escrow secret with the primary's encryption key into a session object.
        The key's CKA_UNWRAP_TEMPLATE makes it sensitive, extractable only to SO-trusted keys
        and able only to compute its check value; it dies with this run's session at the
        latest. The check value must equal the one the original ceremony recorded."""
        if entry["name"] in self._restored:
            return self._restored[entry["name"]]
        usage = "sign"
        wrapped = ops.Wrapped(bytes.fromhex(entry["wrapped"]), entry["wrap"]["mechanism"],
                              {"hash": entry["wrap"]["hash"]})
        label = f"restore-{self.plan.id}-{entry['name']}-{os.urandom(4).hex()}"
        ref, method, kcv = ops.unwrap_release_secret(
            token, ops.private(f"{token.label}-encryption"), wrapped, kind=entry["key_type"],
            usage=usage, label=label, escrow=True)
        self._restored[entry["name"]] = ref
        want = entry["check_value"]
        if (method, kcv.hex()) != (want["method"], want["value"]):
            raise CeremonyError(f"the escrow secret {entry['name']!r} does not match its check "
                                "value: the escrow bundle is not the one its ceremony made")
        return ref

    def _destroy_restored(self) -> None:
        if self._restored and self._token is not None:
            for ref in self._restored.values():
                ops.destroy_session_object(self._token, ref)
        self._restored = {}

    def step_check_escrow(self) -> None:
        """The escrow bundle: signed by this primary, of the plan's release and practice flag,
        addressed to this primary's own encryption key, and of a release the primary recorded."""
        path = self.plan.need(self.plan.escrow_bundle, "escrow.bundle")
        der = path.read_bytes()
        manifest = bundles.verify(der, self._primary_asn1, where=str(path)).manifest
        if manifest["region"] != "escrow":
            raise CeremonyError(f"{path} is the bundle of region {manifest['region']!r}, not the "
                                "escrow bundle", hint="give [escrow] bundle = the original "
                                "ceremony's bundle-RELEASE-escrow.p7")
        if manifest["release"] != self.plan.release or \
                manifest["practice"] != self.plan.practice:
            raise CeremonyError(f"{path} holds release {manifest['release']} (practice "
                                f"{manifest['practice']}), not the plan's {self.plan.release}")
        with self._user_token() as token:
            own = hx.fingerprint(hx.public_key_info(
                token, ops.public(f"{token.label}-encryption"))).hex()
            recorded = export.read_states(token)
        if manifest["recipient"]["spki_sha256"] != own:
            raise CeremonyError(f"{path} is addressed to another key than this primary's "
                                "encryption key")
        if not self.plan.practice and self.plan.release not in recorded:
            raise CeremonyError(f"release {self.plan.release} was never recorded by this "
                                "primary HSM; only a release it made can be exported from escrow")
        self._journal("check-escrow", {
            "bundle": path.name, "sha256": sha256_hex(der),
            "source_ceremony": manifest["ceremony_id"], "kdf_salt": manifest["kdf_salt"],
            "secrets": [{k: e[k] for k in ("name", "type", "key_type", "bits", "wrap",
                                           "wrapped", "check_value")}
                        for e in manifest["secrets"]]})

    def step_verify_bundles(self) -> None:
        primary_cert = self._primary_asn1
        results = {}
        for name, _, _ in self._recipients():
            path = self.out / bundle_name(self.plan, name)
            der = path.read_bytes()
            verified = bundles.verify(der, primary_cert, where=str(path))
            if verified.manifest["region"] != name or \
                    verified.manifest["practice"] != self.plan.practice:
                raise CeremonyError(f"{path}: manifest region/practice flag is wrong")
            results[name] = {"bundle": path.name, "sha256": sha256_hex(der), "verified": True}
        self._journal("verify-bundles", {"bundles": results})

    def step_destroy_secrets(self) -> None:
        nonce = bytes.fromhex(self.tr.data("open")["nonce"])
        destroyed = {}
        with self._user_token() as token:
            for s in self.plan.secrets:
                destroyed[s.name] = export.destroy_secret(
                    token, secret_label(self.plan, s.name), secret_id(self.plan, s.name, nonce))
        self._journal("destroy-secrets", {"secrets": destroyed,
                                          "backup": bundle_name(self.plan, "escrow")})

    def step_record_release(self) -> None:
        with self._user_token() as token:
            if self.plan.practice:
                status = "skipped (practice)"
            else:
                status = export.write_state(token, self.plan.need(self.plan.release,
                                                                   "ceremony.release"))
        self._journal("record-release", {"release": self.plan.release, "status": status})

    def step_certify_regional(self) -> None:
        from hsm.keys import provision
        with self._user_token() as token:
            outcome = provision.certify_regional(
                token, self.plan.need(self.plan.enrollment_request, "enrollment.request"),
                self.plan.primary_signing_certificate.parent,
                confirmed_fingerprint=self.plan.need(self.plan.enrollment_fingerprint,
                                                     "enrollment.fingerprint"))
        cert = outcome.certificate_path.read_bytes()
        self._journal("certify-regional", {"certificate": str(outcome.certificate_path),
                                           "status": outcome.status,
                                           "spki_sha256": outcome.fingerprint.hex(),
                                           "certificate_sha256": sha256_hex(cert)})

    def step_close(self) -> None:
        summary: dict[str, Any] = {"steps": [r["step"] for r in self.tr.records],
                   "bundles": {}}
        manifests = {}
        for r in self.tr.records:
            if r["step"].startswith("export:"):
                summary["bundles"][r["data"]["bundle"]] = r["data"]["sha256"]
                manifests[r["data"]["bundle"]] = r["data"].get("manifest_sha256") or \
                    self._manifest_sha256(r["data"]["bundle"])
        summary["resumed"] = sum(1 for r in self.tr.records if r["step"] == "resume")
        if manifests:
            summary["manifests"] = manifests
            summary["release_digest"] = release_digest(manifests).hex()
        self._journal("close", summary)

    def _manifest_sha256(self, name: str) -> str:
        """For an export journaled by a version that did not record it (a resumed run)."""
        path = self.out / name
        return bundles.verify(path.read_bytes(), self._primary_asn1,
                              where=str(path)).manifest_sha256.hex()

    def show_release_digest(self) -> None:
        """After close: what each crypto officer compares before countersigning."""
        closed = self.tr.data("close")
        if "release_digest" not in closed:
            return
        self.log("Release manifests, for the officers to countersign "
                 "(`ceremony countersign DIR --officer NAME --token URI --digest HEX|WORDS`):")
        for line in fp.display(bytes.fromhex(closed["release_digest"]), title="Digest"):
            self.log(line)

    # ------------------------------------------------------------------------- signing
    @functools.cached_property
    def _primary(self):
        """The primary signing certificate, read once per run."""
        return certs.load(self.plan.primary_signing_certificate, "primary signing")

    @functools.cached_property
    def _primary_asn1(self):
        return certs.as_asn1(self._primary)

    def _signing_ref(self, token: Token) -> KeyRef:
        return ops.private(f"{token.label}-signing")

    def _signature_scheme(self, token: Token) -> str:
        """Checked once per run: the token's signing key is the certificate's key."""
        if self._scheme is not None:
            return self._scheme
        cert = self._primary
        spki = hx.public_key_info(token, ops.public(f"{token.label}-signing"))
        if spki.dump() != certs.as_asn1(cert).public_key.dump():
            raise CeremonyError("the primary token's signing key is not the key of the plan's "
                                "primary signing certificate",
                                hint="wrong token or wrong certificate in the plan")
        self._scheme = "ecdsa-sha384" if spki.algorithm == "ec" else "rsa-pss-sha384"
        return self._scheme

    def _sign(self, token: Token, data: bytes) -> bytes:
        return ops.sign(token, self._signing_ref(token), self._signature_scheme(token), data)

    def _sign_head(self) -> None:
        head = self.tr.head
        with self._user_token() as token:
            scheme = self._signature_scheme(token)
            sig = self._sign(token, head_message(head))
        cert = self._primary
        doc = {"head": head, "records": len(self.tr.records), "algorithm": scheme,
               "signature": sig.hex(), "signer_spki_sha256": certs.spki_fingerprint(cert).hex()}
        write_new(self.out / SIGNATURE_FILE, (json.dumps(doc, indent=2) + "\n").encode())


# ------------------------------------------------------------------------- the steps, by type
@dataclass(frozen=True)
class Step:
    """One journaled step of a ceremony type: its name in the transcript and its handler. A step
    with ``each`` runs once per item of the plan (``generate:<secret>``, ``export:<region>``)."""
    name: str
    handler: Callable[..., object]
    each: Callable[[Plan], list[str]] | None = None


def _secrets(plan: Plan) -> list[str]:
    return [s.name for s in plan.secrets]


def _regions(plan: Plan) -> list[str]:
    return [r.name for r in plan.regions]


def _regions_and_escrow(plan: Plan) -> list[str]:
    return _regions(plan) + ["escrow"]


# Each ceremony type's steps, in order: the one place that says what a ceremony does and which
# method does each step. "open" is journaled by `ceremony open` (Runner.open), before any run.
STEPS: dict[str, tuple[Step, ...]] = {
    "release-secrets": (
        Step("open", Runner.open),
        Step("approvals", Runner.step_approvals),
        Step("check-certificates", Runner.step_check_certificates),
        Step("check-release", Runner.step_check_release),
        Step("trust-recipients", Runner.step_trust_recipients),
        Step("kdf-salt", Runner.step_kdf_salt),
        Step("generate", Runner.step_generate, each=_secrets),
        Step("check-values", Runner.step_check_values),
        Step("export", Runner.step_export, each=_regions_and_escrow),
        Step("verify-bundles", Runner.step_verify_bundles),
        Step("destroy-secrets", Runner.step_destroy_secrets),
        Step("record-release", Runner.step_record_release),
        Step("close", Runner.step_close),
    ),
    "regional-enrollment": (
        Step("open", Runner.open),
        Step("approvals", Runner.step_approvals),
        Step("certify-regional", Runner.step_certify_regional),
        Step("close", Runner.step_close),
    ),
    "escrow-export": (
        Step("open", Runner.open),
        Step("approvals", Runner.step_approvals),
        Step("check-certificates", Runner.step_check_certificates),
        Step("check-escrow", Runner.step_check_escrow),
        Step("trust-recipients", Runner.step_trust_recipients),
        Step("export", Runner.step_export, each=_regions),
        Step("verify-bundles", Runner.step_verify_bundles),
        Step("close", Runner.step_close),
    ),
}
# The plan accepts exactly the types that have steps here (the plan format cannot import the
# runner: it parses without a token).
if set(STEPS) != set(CEREMONY_TYPES):
    raise RuntimeError(f"ceremony types without steps or steps without a type: "
                       f"{sorted(set(STEPS) ^ set(CEREMONY_TYPES))}")


def steps(plan: Plan) -> list[str]:
    """The journaled steps of a plan, in order (as the transcript names them)."""
    return [f"{step.name}:{item}" if step.each else step.name
            for step in STEPS[plan.type]
            for item in (step.each(plan) if step.each else [""])]


def handlers(ceremony_type: str) -> dict[str, Callable[..., object]]:
    """Each step name of a ceremony type -> the Runner method that performs it."""
    return {step.name: step.handler for step in STEPS[ceremony_type]}


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a killed writer (suite.files.write_new names them .NAME.PID.tmp)."""
    for tmp in out.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

