"""``hsm cloud-key create|trust|export``: the cloud BYOK subcommands of ``hsm``.

Output files are created with O_EXCL (an existing one stops the export before the token is
asked to wrap anything); PINs come from the same sources as every ``hsm`` command.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path

from asn1crypto import keys as asn1keys
from asn1crypto import pem
from asn1crypto import x509 as asn1x509
from pkcs11 import ObjectClass

from hsm.commands import options
from hsm.core import pin as pins
from hsm.core.errors import UsageError
from hsm.core.token import KeyRef, Token
from suite.files import check_writable, write_set

from . import keys, providers, wrap

MAX_KEY_FILE = 64 * 1024


def read_wrapping_key(path: Path) -> asn1keys.PublicKeyInfo:
    """A provider import key: PEM or DER SubjectPublicKeyInfo, PEM or DER X.509 certificate
    (Google's CSEK ingress certificate), or the base64 DER the AWS and Alibaba APIs return."""
    try:
        data = Path(path).read_bytes()[:MAX_KEY_FILE + 1]
    except OSError as exc:
        raise UsageError(f"cannot read wrapping key {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise UsageError(f"{path}: too large for a public key or certificate")
    if pem.detect(data):
        kind, _, der = pem.unarmor(data)
        if "PRIVATE KEY" in kind:
            raise UsageError(f"{path} is a private key; the provider's wrapping key is its "
                             "public import key", hint="give the public key or certificate the "
                             "provider published; never hand a private key around")
    else:
        kind, der = None, data
        try:
            der = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            der = data
    try:
        if kind == "CERTIFICATE" or (kind is None and _looks_like_certificate(der)):
            return asn1x509.Certificate.load(der).public_key
        spki = asn1keys.PublicKeyInfo.load(der)
        if spki.algorithm == "rsa":
            _ = spki["public_key"].parsed["modulus"].native  # parse now: a bad key stops here
        return spki
    except (ValueError, TypeError, KeyError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # one line
        raise UsageError(f"{path}: not a public key (SubjectPublicKeyInfo) or X.509 "
                         f"certificate: {detail}") from None


def _looks_like_certificate(der: bytes) -> bool:
    try:
        cert = asn1x509.Certificate.load(der)
        _ = cert["tbs_certificate"]["subject_public_key_info"].algorithm
        return True
    except (ValueError, TypeError, KeyError):
        return False


def _confirm(args, digest: bytes) -> None:
    """The same confirmation as regional certification: the officer types the fingerprint the
    provider shows (hex or PGP words); without it, or with another one, nothing is trusted."""
    confirmed = options.confirm_fingerprint(digest, args.fingerprint, "the provider shows")
    if confirmed != digest:
        raise UsageError("the confirmed fingerprint does not match the wrapping key file; "
                         "nothing trusted", hint="get the import key again from the provider")


def _describe(spki, path) -> tuple[bytes, int]:
    bits = keys.load_rsa_spki(spki, str(path))
    print(f"Import key {path}: RSA-{bits}")
    return hashlib.sha256(spki.dump()).digest(), bits


# ------------------------------------------------------------------------------ commands
def cmd_create(args, open_token) -> int:
    with open_token(args) as token:
        key_id, status = keys.create(token, args.label, args.bits,
                                     allow_weak_token=args.allow_weak_token)
        kcv = keys.check_value(token, args.label)
    print(f"cloud key {args.label!r} {status}: AES-{args.bits}, id {key_id.hex()}, "
          f"check value {kcv}")
    return 0


def cmd_trust(args, open_token) -> int:
    prov = providers.provider(args.provider)
    spki = read_wrapping_key(Path(args.wrapping_key))
    digest, _ = _describe(spki, args.wrapping_key)
    _confirm(args, digest)
    with options.open_so(args) as so:
        label, status = keys.trust(so, prov.name, spki, digest)
    print(f"{prov.name} import key {label!r} " + (
        "created as CKA_TRUSTED by the security officer" if status == "created" else
        "exists: CKA_TRUSTED, its policy re-checked"))
    return 0


def cmd_export(args, open_token) -> int:
    prov = providers.provider(args.provider)
    spki = read_wrapping_key(Path(args.wrapping_key))
    rsa_bits = keys.load_rsa_spki(spki, args.wrapping_key)
    digest = hashlib.sha256(spki.dump()).digest()
    import_token = _import_token(args, prov)
    if prov.needs_kid and not (args.kid or "").startswith("https://"):
        raise UsageError(f"{prov.name} needs --kid: the key identifier URL of the KEK "
                         "(https://...)", hint="`az keyvault key show` prints it as 'kid'")
    out = Path(args.out)
    check_writable(out, what="--out directory")  # before the token wraps anything
    with open_token(args) as token:
        oaep_hashes = list(token.profile.oaep_hashes)
        alg = prov.algorithm(args.algorithm, oaep_hashes)
        providers.refuse_unsupported(prov, alg, token.label, oaep_hashes)
        info = keys.require_cloud_key(token, args.key)
        providers.check_sizes(prov, alg, rsa_bits, info["bytes"])
        import_ref = keys.require_trusted(token, prov.name, spki, digest)
        kcv = keys.check_value(token, args.key)
        # The file names only (an empty payload): refuse an existing one before any wrap.
        _, planned = providers.outputs(prov, alg, args.key, b"", import_token=import_token,
                                       kid=args.kid, generator="")
        _refuse_existing(out, [*planned, "export.json"])
        key_ref = KeyRef(args.key, ObjectClass.SECRET_KEY)
        if not alg.rsa_aes:
            wrapped, route = wrap.oaep(token, import_ref, key_ref, alg.hash), "C_WrapKey(OAEP)"
        elif token.profile.rsa_aes_key_wrap:
            wrapped = wrap.rsa_aes_native(token, import_ref, key_ref, alg.hash)
            route = "C_WrapKey(RSA_AES_KEY_WRAP)"
        else:
            wrapped, route = None, "composed"
            kwp = keys.kwp_code(token)
            mod, p11token = token.module, token.p11token
    if wrapped is None:
        # The composed RSA-AES route needs a CKA_TRUSTED ephemeral key: only the SO can make
        # one. The user's login ended with the block above (login is per application).
        label = options.token_target(args)[0]
        so_pin = pins.resolve(args.so_pin_source, default_env="HSM_SO_PIN", token_label=label,
                              prompt=f"Security officer PIN for token {label}: ")
        wrapped = wrap.composed(mod, p11token, so_pin, lambda: open_token(args), import_ref,
                                key_ref, alg.hash, kwp)
        route = "composed: SO-trusted ephemeral AES-256 key, C_WrapKey(KWP) + C_WrapKey(OAEP)"
    wrapped_name, files = providers.outputs(prov, alg, args.key, wrapped,
                                            import_token=import_token, kid=args.kid,
                                            generator=_generator())
    manifest = {"provider": prov.name, "algorithm": alg.name, "key": args.key,
                "check_value": kcv, "wrapped_file": wrapped_name, "files": sorted(files),
                "wrapping_key_sha256": digest.hex(), "wrap": route}
    # All the provider's files and export.json, or none of them (and no empty directory).
    write_set(out, {**files, "export.json": (json.dumps(manifest, indent=2) + "\n").encode()})
    print(f"cloud key {args.key!r} wrapped inside token {p11_label(args)} for {prov.name} "
          f"with {alg.name} ({route})")
    print(f"check_value {kcv}   (AES-CMAC of a zero block, first 5 bytes)")
    for name in sorted(files):
        print(f"  wrote {out / name}" + ("   <- upload this" if name == wrapped_name else ""))
    print(f"  wrote {out / 'export.json'}")
    print("next: " + providers.next_command(prov, alg, str(out), args.key))
    return 0


def p11_label(args) -> str:
    return repr(options.token_target(args)[0])


def _import_token(args, prov) -> bytes | None:
    if not prov.needs_import_token:
        if args.import_token:
            raise UsageError(f"{prov.name} takes no import token")
        return None
    if not args.import_token:
        raise UsageError(f"{prov.name} needs --import-token FILE (from GetParametersForImport, "
                         "valid 24 h, used together with its public key)")
    try:
        data = Path(args.import_token).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read import token {args.import_token}: {exc.strerror}") from None
    if not data.strip():
        raise UsageError(f"import token {args.import_token} is empty")
    return data


def _refuse_existing(out: Path, names: list[str]) -> None:
    present = [n for n in names if (out / n).exists()]
    if present:
        raise UsageError(f"{out / present[0]} already exists; outputs are never overwritten "
                         "and nothing was wrapped", hint="choose another --out directory")


def _generator() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"hsm-suite {version('hsm-suite')}"
    except PackageNotFoundError:
        return "hsm-suite"


# ------------------------------------------------------------------------------ parser
def register(sub, add_token_args, add_weak_arg, open_token) -> None:
    p = sub.add_parser("cloud-key", help="cloud BYOK: create, trust a provider key, export")
    cloud = p.add_subparsers(dest="cloud_command", required=True)

    def bind(parser, func):
        parser.set_defaults(func=lambda args: func(args, open_token))

    c = cloud.add_parser("create", help="an AES key for a cloud KMS, generated in the token")
    add_token_args(c)
    c.add_argument("--label", required=True)
    c.add_argument("--bits", type=int, default=256, choices=keys.KEY_BITS)
    add_weak_arg(c)
    bind(c, cmd_create)

    names = sorted(providers.PROVIDERS)
    t = cloud.add_parser("trust", help="the SO trusts a provider's import key")
    add_token_args(t)
    t.add_argument("--provider", required=True, choices=names)
    t.add_argument("--wrapping-key", required=True, metavar="FILE",
                   help="PEM/DER SubjectPublicKeyInfo or X.509 certificate")
    t.add_argument("--fingerprint", default=None, help="as the provider shows it (hex or words)")
    t.add_argument("--so-pin-source", default=None, metavar="env:VAR|file:PATH")
    bind(t, cmd_trust)

    e = cloud.add_parser("export", help="wrap a cloud key inside the token for a provider")
    add_token_args(e)
    e.add_argument("--key", required=True, help="the cloud key's label")
    e.add_argument("--provider", required=True, choices=names)
    e.add_argument("--wrapping-key", required=True, metavar="FILE")
    e.add_argument("--algorithm", default=None,
                   help="the provider's wrapping algorithm (default: the best the token does)")
    e.add_argument("--import-token", default=None, metavar="FILE", help="aws, alibaba")
    e.add_argument("--kid", default=None, metavar="URL", help="azure: the KEK's key identifier")
    e.add_argument("--out", required=True, metavar="DIR")
    e.add_argument("--so-pin-source", default=None, metavar="env:VAR|file:PATH",
                   help="RSA-AES on a token without CKM_RSA_AES_KEY_WRAP needs the SO")
    bind(e, cmd_export)
