# Shared by scripts/*: paths, logging, the cached venv. Source it; do not run it.
# shellcheck shell=bash
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${BAILEYS_DR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/baileys-dr}"
export BAILEYS_DR_CACHE="$CACHE"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# Debian packages, installed only when their command is missing.
need_packages() {
  local missing=()
  while [ $# -gt 0 ]; do
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
    shift 2
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}): run as root, or install them: apt-get install ${missing[*]}"
  log "installing Debian packages: ${missing[*]}"
  if [ ! -f /var/lib/apt/periodic/baileys-dr-updated ] || [ -n "$(find /var/lib/apt/periodic/baileys-dr-updated -mmin +720 2>/dev/null)" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    mkdir -p /var/lib/apt/periodic && touch /var/lib/apt/periodic/baileys-dr-updated
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

have_pg_server() {
  [ -n "${PG_BINDIR:-}" ] && [ -x "$PG_BINDIR/initdb" ] && return 0
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

# The control-node venv, keyed by requirements.txt and the Python version;
# .venv in the project points at it.
ensure_venv() {
  local py key venv
  py="$(command -v python3.11 || command -v python3 || true)"
  [ -n "$py" ] || die "python3 (3.11 or newer) is required"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$py is $("$py" --version 2>&1); ansible-core 2.19 needs Python 3.11 or newer"
  key="$( (cat "$ROOT/requirements.txt"; "$py" --version) | sha256sum | cut -c1-16)"
  venv="$CACHE/venv-$key"
  if [ ! -f "$venv/.complete" ]; then
    log "creating the Python venv $venv"
    rm -rf "$venv"
    "$py" -m venv "$venv" || die "python3 -m venv failed: install python3-venv"
    mkdir -p "$CACHE"
    if ! { "$venv/bin/pip" install -q --upgrade pip && "$venv/bin/pip" install -q -r "$ROOT/requirements.txt"; } >"$CACHE/pip.log" 2>&1; then
      grep -v 'is ignored: it is neither' "$CACHE/pip.log" | tail -20 >&2
      die "pip install -r requirements.txt failed (log: $CACHE/pip.log)"
    fi
    touch "$venv/.complete"
  fi
  ln -sfn "$venv" "$ROOT/.venv"
  export PATH="$venv/bin:$PATH"
  export VIRTUAL_ENV="$venv"
  export ANSIBLE_CONFIG="$ROOT/ansible.cfg"
}

# Node packages (the test application's and PM2), cached by lockfile hash.
ensure_node_deps() {
  local line
  command -v node >/dev/null || die "Node.js is required (node 20 or newer)"
  node -e 'process.exit(parseInt(process.versions.node) >= 20 ? 0 : 1)' \
    || die "node $(node --version) is too old: Baileys 7 needs Node.js 20 or newer (Debian 13 ships it; on Debian 12 use NodeSource)"
  while IFS= read -r line; do
    case "$line" in
      APP_NODE_MODULES=*|PM2_BIN=*) export "${line?}" ;;
    esac
  done < <("$ROOT/testbed/bin/install-node-deps" --link)
  [ -n "${APP_NODE_MODULES:-}" ] && [ -n "${PM2_BIN:-}" ] || die "testbed/bin/install-node-deps did not report APP_NODE_MODULES and PM2_BIN"
}
