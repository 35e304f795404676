# Sourced by the demo scripts: is an org there, and is it complete (an ACTIVE key)? A section
# that finds its orgs complete skips; one interrupted half-way finishes what it started.
# Needs EU (the eu node configuration) and the kms command on PATH.
has_org() {
    kms --config "$EU" status --json | python3 -c '
import json, sys
sys.exit(0 if any(t["org"] == sys.argv[1] for t in json.load(sys.stdin)["tenants"]) else 1)' "$1"
}
complete() {
    has_org "$1" || return 1
    # no grep -q: it could exit before kms's last write (SIGPIPE under pipefail)
    kms --config "$EU" tenant list --org "$1" | grep ' ACTIVE ' >/dev/null
}
# `py - ARGS <<'PY' ... PY`: python3 for the demo's inline snippets, with Ctrl-C answered by a
# quiet exit 130 instead of a KeyboardInterrupt traceback (the handler is set before the
# snippet's imports, which is where an interrupt usually lands).
py() {
    python3 -c 'import signal, sys
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
source = sys.stdin.read()
sys.argv = sys.argv[1:]
exec(compile(source, "<demo snippet>", "exec"), {"__name__": "__main__"})' "$@"
}
