#!/usr/bin/env bash
# Install what the project needs, only when missing (idempotent, quiet when all is there).
set -euo pipefail
need=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need+=(softhsm2)
command -v pkcs11-tool >/dev/null || need+=(opensc)
command -v certutil >/dev/null || need+=(libnss3-tools)
command -v openssl >/dev/null || need+=(openssl)
# PostgreSQL server binaries for the KMS store tests (tests/pg.py starts a throw-away server).
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v psql >/dev/null || need+=(postgresql-client)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
# Always this checkout's own virtual environment at .venv, whatever the interpreter: an editable
# install into a shared interpreter would make the last clone that ran `make` decide which code
# every other clone's commands (and their tests' subprocesses) run.
if [ ! -x .venv/bin/python ]; then
    if ! $PY -c "import venv, ensurepip" 2>/dev/null; then
        echo "installing: python3-venv"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    echo "creating .venv (this checkout's own Python environment)"
    $PY -m venv .venv
fi
PY=$PWD/.venv/bin/python   # absolute: the import check below runs from /
# Reinstall unless each package is importable from *this* checkout (an editable install made
# from another clone, or before a package was added, would otherwise test other code or none).
here=$(pwd -P)
if ! (cd / && $PY -c "
import os, sys, suite, hsm, release, ceremony, kms, pkcs11, asn1crypto, cryptography, psycopg, aiohttp, orjson, uvloop, prometheus_client, kmip, pytest, pytest_benchmark, hypothesis, boto3, jwcrypto, moto, mypy, schemathesis
ours = all(os.path.realpath(p.__file__).startswith('$here/') for p in (suite, hsm, release, ceremony, kms))
sys.exit(0 if ours else 1)") 2>/dev/null || ! grep -q "hsm.commands.entry" .venv/bin/kms; then
    echo "installing the hsm-suite package (editable) with its token side and test dependencies"
    $PY -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[hsm,test]"
fi
