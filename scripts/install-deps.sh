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
# Debian's own python3 is "externally managed" (PEP 668) and may lack pip: then the package goes
# into a virtual environment at .venv, which the Makefile puts first on PATH.
if [ ! -x .venv/bin/python ] && ! $PY -c "
import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'))
import importlib.util
sys.exit(1 if managed or importlib.util.find_spec('pip') is None else 0)"; then
    if ! $PY -c "import venv, ensurepip" 2>/dev/null; then
        echo "installing: python3-venv"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    echo "creating .venv (this Python is externally managed or has no pip)"
    $PY -m venv .venv
fi
[ -x .venv/bin/python ] && PY=.venv/bin/python
# Reinstall unless each package is importable from *this* checkout (an editable install made
# from another clone, or before a package was added, would otherwise test other code or none).
here=$(pwd -P)
if ! (cd / && $PY -c "
import os, sys, hsm, release, ceremony, kms, pkcs11, asn1crypto, cryptography, psycopg, aiohttp, prometheus_client, kmip, pytest, pytest_benchmark, hypothesis, boto3, jwcrypto, moto, mypy
ours = all(os.path.realpath(p.__file__).startswith('$here/') for p in (hsm, release, ceremony, kms))
sys.exit(0 if ours else 1)") 2>/dev/null; then
    echo "installing the hsm-suite package (editable) and its test dependencies"
    $PY -m pip install -q --disable-pip-version-check --root-user-action=ignore -e ".[test]"
fi
