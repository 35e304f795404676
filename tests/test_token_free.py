"""The encryption-service side needs no token: importing the SDK, the client or the bundle format
loads neither python-pkcs11 nor the token layer, and works where python-pkcs11 is not installed.

Each check runs in a fresh interpreter (this one has loaded the token layer long ago). The token
layer's shared, token-free base is the ``suite`` package; ``hsm`` re-exports it at the old paths.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.localtls import free_port, make_pki

ROOT = Path(__file__).resolve().parent.parent
TOKEN_LAYER = ("pkcs11", "hsm.core.token", "hsm.core.module", "hsm.core._cryptoki")


def _fresh(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object, returned here."""
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_LOADED = """
import json, sys
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("pkcs11", "hsm"))
print(json.dumps({"loaded": loaded}))
"""


def test_sdk_client_and_release_load_no_token_layer():
    for module in ("kms.caller.sdk", "kms.caller.client", "release", "kms", "suite.cli"):
        loaded = _fresh(f"import {module}\n" + _LOADED)["loaded"]
        token_side = [m for m in loaded
                      if m in TOKEN_LAYER or m.startswith("pkcs11.")]
        assert token_side == [], f"import {module} loads {token_side}"
    # ...and the lazy names of the kms package resolve to the SDK and the client without it.
    loaded = _fresh("from kms import FieldEncryptor, KmsClient, RemoteKeyProvider, KmsError\n"
                    + _LOADED)["loaded"]
    assert [m for m in loaded if m.split(".")[0] == "pkcs11" or m in TOKEN_LAYER] == []


def test_the_sdk_and_the_client_work_where_python_pkcs11_is_not_installed(tmp_path):
    """``sys.modules["pkcs11"] = None`` makes ``import pkcs11`` fail as on a machine without it:
    the SDK still encrypts and decrypts, the client sets up its mTLS context and reports a node
    that does not answer as Unavailable, a bundle's format loads, and the pytest entry point
    that every installation registers loads no fixtures instead of failing."""
    pki = make_pki(tmp_path, client=True)
    out = _fresh("""
import json, os, sys
sys.modules["pkcs11"] = None
from kms.caller.sdk import FieldEncryptor
from kms.caller.client import KmsClient, RemoteKeyProvider
from kms.errors import Unavailable
import release, hsm.pytest_plugin
url, cert, key, ca = sys.argv[1:]

class Provider:                      # the one DEK an encryption service was handed
    dek = os.urandom(32)
    def dek_for_encrypt(self, org, key_type="field", fragment=None):
        return 1, "PBKDF2", self.dek
    def dek_for_decrypt(self, org, key_type, version, fragment=None):
        return self.dek

fields = FieldEncryptor(Provider())
blob = fields.encrypt("acme", b"card 4111")
remote = FieldEncryptor(RemoteKeyProvider(KmsClient([url], cert=cert, key=key, ca=ca,
                                                  connect_timeout=1, retries=0)))
try:
    remote.encrypt("acme", b"card 4111")
    refused = None
except Unavailable as exc:
    refused = type(exc).__name__
print(json.dumps({"plain": fields.decrypt("acme", blob).decode(), "refused": refused,
                  "plugins": hsm.pytest_plugin.pytest_plugins,
                  "pkcs11": sys.modules["pkcs11"] is None}))
""", f"https://127.0.0.1:{free_port()}", str(pki.cert), str(pki.key), str(pki.ca))
    assert out == {"plain": "card 4111", "refused": "Unavailable", "plugins": [],
                   "pkcs11": True}


def test_old_import_paths_are_the_same_objects_until_the_next_release():
    import hsm
    import suite.cli
    import suite.errors
    import suite.files
    import suite.fingerprint
    import suite.signatures
    import suite.tomlfile
    from hsm import cliutil, errors, files, fingerprint, ops, tomlfile
    assert errors.SuiteError is suite.errors.SuiteError is hsm.SuiteError
    assert issubclass(errors.HsmError, suite.errors.SuiteError)
    # the token layer's usage error is both a token error and the suite's usage error
    assert issubclass(errors.UsageError, errors.HsmError)
    assert issubclass(errors.UsageError, suite.errors.UsageError)
    assert issubclass(suite.errors.UsageError, ValueError)
    assert tomlfile.read is suite.tomlfile.read and tomlfile.check_keys is suite.tomlfile.check_keys
    assert files.write_new is suite.files.write_new
    assert fingerprint.parse_fingerprint is suite.fingerprint.parse_fingerprint
    assert fingerprint.display is suite.fingerprint.display
    assert cliutil.run is suite.cli.run and cliutil.parser is suite.cli.parser
    assert ops.SIGNATURE_ALGORITHMS is suite.signatures.SIGNATURE_ALGORITHMS


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_only_hsm_imports_pkcs11_and_suite_imports_no_other_package():
    offenders = []
    for package in ("suite", "release", "ceremony", "kms"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in _imports(path):
                top = name.split(".")[0]
                if top == "pkcs11" or (package == "suite" and top in
                                       ("hsm", "release", "ceremony", "kms")):
                    offenders.append(f"{path.relative_to(ROOT)}: import {name}")
    assert offenders == []
