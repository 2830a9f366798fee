#!/usr/bin/env bash
# End-to-end proof of the test application (run as root, about a minute):
# a throwaway PostgreSQL 15 cluster, the app repository from make-app-repo,
# the service under PM2 (own PM2_HOME) in postgres mode at main, then the
# same state exported as Baileys files, PostgreSQL stopped, the emergency tag
# checked out in files mode: same digests. Also: files mode at main and the
# broken tag are not ready. Everything it starts is stopped at exit.
#
# Usage: testbed/app/test/e2e.sh [--companies N] [--keys K]   (KEEP=1 keeps the work dir)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
app_src=$(dirname "$here")
bin="$(dirname "$app_src")/bin"
schema="$(dirname "$app_src")/schema.sql"
pgbin=${PGBIN:-/usr/lib/postgresql/15/bin}
companies=3
keys=60
while [ $# -gt 0 ]; do
  case "$1" in
    --companies) companies=$2; shift ;;
    --keys) keys=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

say() { printf '\n== %s\n' "$*"; }
fail() { echo "E2E FAILED: $*" >&2; exit 1; }

eval "$("$bin/install-node-deps")"
work=$(mktemp -d /tmp/bdr-e2e.XXXXXX)
chmod 755 "$work"
export PM2_HOME="$work/pm2home"
pm2() { "$PM2_BIN" "$@"; }

cleanup() {
  set +e
  [ -x "${PM2_BIN:-}" ] && [ -d "$PM2_HOME" ] && "$PM2_BIN" kill >/dev/null 2>&1
  if [ -f "$work/pgdata/postmaster.pid" ]; then
    runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pgdata" -m immediate stop >/dev/null 2>&1
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() { node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }

say "PostgreSQL 15 cluster"
pg_port=$(free_port)
password="e2e-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
mkdir -p "$work/pgdata" "$work/pgsock" "$work/pglog"
chown postgres "$work/pgdata" "$work/pgsock" "$work/pglog"
printf '%s\n' "$password" >"$work/pwfile"
chown postgres "$work/pwfile"
runuser -u postgres -- "$pgbin/initdb" -D "$work/pgdata" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
  --pwfile="$work/pwfile" --encoding=UTF8 --locale=C.UTF-8 >/dev/null
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pgdata" -l "$work/pglog/pg.log" -w \
  -o "-p $pg_port -k $work/pgsock -c listen_addresses=127.0.0.1" start >/dev/null
psql_su() { runuser -u postgres -- "$pgbin/psql" -h "$work/pgsock" -p "$pg_port" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
psql_su -d postgres -c "CREATE ROLE baileys LOGIN PASSWORD '$password'" -c "CREATE DATABASE baileys OWNER baileys"
if [ -f "$schema" ]; then
  psql_su -d baileys -c "SET ROLE baileys" -f "$schema"
else
  fail "$schema is missing"
fi

say "app repository"
eval "$("$bin/make-app-repo" "$work/app" --node-modules "$APP_NODE_MODULES" --broken-tag broken-build-v1)"
health_port=$(free_port)
write_env() { # write_env USE_DATABASE_AUTH_STATE
  cat >"$work/app/.env" <<EOF
USE_LEGACY_SUPABASE=false
USE_DATABASE_AUTH_STATE=$1
USE_REPOSITORY_PATTERN=$1
POSTGRES_HOST=127.0.0.1
POSTGRES_PORT=$pg_port
POSTGRES_DB=baileys
POSTGRES_USER=baileys
POSTGRES_PASSWORD=$password
HEALTH_PORT=$health_port
EOF
}
write_env true
fixture() { (cd "$work/app" && env POSTGRES_HOST=127.0.0.1 POSTGRES_PORT="$pg_port" POSTGRES_DB=baileys POSTGRES_USER=baileys POSTGRES_PASSWORD="$password" node tools/fixture.js "$@"); }

say "seed $companies companies x $keys keys"
fixture seed-pg --companies "$companies" --keys "$keys" >"$work/seed.json"
psql_su -d baileys -c "SELECT key_type, count(*) FROM whatsapp_keys GROUP BY 1 ORDER BY 1"

# wait_health EXPECTED_STATUS -> $work/health.json, once the load and its verification are over
# (ready comes first, on the creds alone; the digests are complete when the verification ends)
wait_health() {
  local want=$1 code=000
  for _ in $(seq 1 120); do
    code=$(curl -s -o "$work/health.json" -w '%{http_code}' "http://127.0.0.1:$health_port/health" || true)
    if [ "$code" = "$want" ] && node -e '
        const h = JSON.parse(require("fs").readFileSync(process.argv[1]));
        process.exit(h.loading || h.verifying || (h.ready && !h.digestsComplete) ? 1 : 0)' "$work/health.json" 2>/dev/null; then
      return 0
    fi
    sleep 0.5
  done
  cat "$work/health.json" >&2 || true
  fail "health answered $code, expected $want"
}
# check_health STORE REVISION DIGESTS_FILE
check_health() {
  node -e '
    const [h, store, rev, expected] = [require(process.argv[1]), process.argv[2], process.argv[3], require(process.argv[4]).digests];
    const problems = [];
    if (!h.ready) problems.push("not ready: " + h.errors.join("; "));
    if (h.store !== store) problems.push("store " + h.store);
    if (h.revision !== rev) problems.push("revision " + h.revision);
    if (h.companies !== Object.keys(expected).length) problems.push("companies " + h.companies);
    if (!h.digestsComplete) problems.push("digests not complete");
    if (!(h.readyAt <= h.verifiedAt)) problems.push(`readyAt ${h.readyAt} after verifiedAt ${h.verifiedAt}`);
    for (const [c, d] of Object.entries(expected)) if (h.digests[c] !== d) problems.push(`digest of ${c}: ${h.digests[c]} != ${d}`);
    if (problems.length) { console.error(problems.join("\n")); process.exit(1); }
    console.log(`ok: ${store} at ${rev.slice(0, 12)}, ${h.companies} companies, digests equal, ready in ${h.loadMs} ms, verified in ${h.verifyMs} ms`);
  ' "$work/health.json" "$1" "$2" "$3"
}

say "postgres mode at main, under PM2"
(cd "$work/app" && pm2 start ecosystem.config.js >/dev/null)
wait_health 200
check_health postgres "$MAIN_COMMIT" "$work/seed.json"
pm2 jlist 2>/dev/null | node -e '
  let t = ""; process.stdin.on("data", (c) => (t += c)).on("end", () => {
    const list = JSON.parse(t.slice(t.indexOf("[")));
    const p = list.find((x) => x.name === "baileys-whatsapp-service");
    console.log("pm2:", p.name, p.pm2_env.status, "restarts", p.pm2_env.restart_time);
    if (p.pm2_env.status !== "online") process.exit(1);
  });'

say "files mode at main: not available at this revision"
write_env false
pm2 restart baileys-whatsapp-service >/dev/null
wait_health 503
grep -q 'not available at this revision' "$work/health.json" || fail "main in files mode should say the file store is not available"
echo "ok: $(node -p 'require(process.argv[1]).errors.join("; ")' "$work/health.json")"

say "export PostgreSQL to Baileys files (Baileys' writer), then stop PostgreSQL"
fixture pg-to-files --dest "$work/app/baileys_sessions" >"$work/export.json"
node -e 'const a=require(process.argv[1]).digests,b=require(process.argv[2]).digests;if(JSON.stringify(a)!==JSON.stringify(b)){console.error("export digests differ");process.exit(1)}' "$work/seed.json" "$work/export.json"
ls "$work/app/baileys_sessions/company_co1" | head -5
runuser -u postgres -- "$pgbin/pg_ctl" -D "$work/pgdata" -m fast stop >/dev/null

say "files mode at $( cd "$work/app" && git describe --tags "$TAG_COMMIT" ), PostgreSQL down"
pm2 stop baileys-whatsapp-service >/dev/null
git -C "$work/app" checkout -q emergency-file-fallback-v1
pm2 restart baileys-whatsapp-service >/dev/null
wait_health 200
check_health files "$TAG_COMMIT" "$work/seed.json"

say "files mode without the manifest (ids recovered from file names)"
mv "$work/app/baileys_sessions/manifest.json" "$work/manifest.json"
code=$(curl -s -o "$work/health.json" -w '%{http_code}' -X POST "http://127.0.0.1:$health_port/reload")
[ "$code" = 200 ] || fail "reload answered $code"
check_health files "$TAG_COMMIT" "$work/seed.json"
node -p '"guessed ids: " + JSON.stringify(Object.fromEntries(Object.entries(require(process.argv[1]).guessedIds).map(([c, g]) => [c, g.count + " (ambiguous " + g.ambiguous + ")"])))' "$work/health.json"
mv "$work/manifest.json" "$work/app/baileys_sessions/manifest.json"

say "a truncated creds.json makes the service not ready"
cp "$work/app/baileys_sessions/company_co1/creds.json" "$work/creds.bak"
head -c 200 "$work/creds.bak" >"$work/app/baileys_sessions/company_co1/creds.json"
code=$(curl -s -o "$work/health.json" -w '%{http_code}' -X POST "http://127.0.0.1:$health_port/reload")
[ "$code" = 503 ] || fail "reload with truncated creds answered $code"
echo "ok: $(node -p 'require(process.argv[1]).errors.join("; ")' "$work/health.json")"
[ "$(wc -c <"$work/app/baileys_sessions/company_co1/creds.json")" = 200 ] || fail "creds.json was rewritten"
cp "$work/creds.bak" "$work/app/baileys_sessions/company_co1/creds.json"

say "broken tag: never ready"
pm2 stop baileys-whatsapp-service >/dev/null
git -C "$work/app" checkout -q broken-build-v1
pm2 restart baileys-whatsapp-service >/dev/null
wait_health 503
grep -q 'deliberately broken build' "$work/health.json" || fail "broken build should say so"
echo "ok: $(node -p 'require(process.argv[1]).errors.join("; ")' "$work/health.json")"
git -C "$work/app" checkout -q main

say "graceful stop, and no password in the logs"
pm2 stop baileys-whatsapp-service >/dev/null
grep -h '"event":"service_stopped"' "$PM2_HOME"/logs/*.log | tail -1
if grep -rqF "$password" "$PM2_HOME/logs"; then fail "the database password appears in the service logs"; fi
echo "ok: $(cat "$PM2_HOME"/logs/*.log | wc -l) log lines, all JSON: $(cat "$PM2_HOME"/logs/*out*.log | node -e 'let t="";process.stdin.on("data",c=>t+=c).on("end",()=>{const l=t.split("\n").filter(Boolean);let bad=0;for(const x of l){try{JSON.parse(x)}catch{bad++}}console.log(bad===0?"yes":bad+" not JSON")})')"

say "E2E PASSED"
