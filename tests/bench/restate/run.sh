#!/usr/bin/env bash
# Restate side of Baton's benchmark (not part of CI).
#
# Installs Restate from the npm registry (restate-server, the restate CLI and the TypeScript/JS SDK,
# pinned in package.json) into .baton/restate/, starts restate-server on free loopback ports with
# a temporary data directory, starts service.mjs (a 3-step workflow of no-op `ctx.run` steps),
# registers it with the restate CLI, and measures it with load.mjs: runs/s and client-observed
# latency at concurrency 1 and 64. The last line of stdout is the figures as JSON; the bench
# (`cargo run --release -p baton-bench -- --restate`) reads it.
#
#   tests/bench/restate/run.sh            # 20 s windows
#   QUICK=1 tests/bench/restate/run.sh    # 5 s windows
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
work="${RESTATE_BENCH_DIR:-$root/.baton/restate}"
seconds=20
if [ "${QUICK:-0}" = "1" ]; then seconds=5; fi

fail() {
  echo "restate bench: $*" >&2
  echo "{\"error\": \"$*\"}"
  exit 1
}

command -v node >/dev/null || fail "node is not installed (Node 20 or newer is needed)"
command -v npm >/dev/null || fail "npm is not installed"
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) platform=linux-x64 ;;
  Linux-aarch64) platform=linux-arm64 ;;
  Darwin-x86_64) platform=darwin-x64 ;;
  Darwin-arm64) platform=darwin-arm64 ;;
  *) fail "restate-server has no npm binary for $(uname -s) $(uname -m)" ;;
esac

mkdir -p "$work"
cp "$here/package.json" "$here/service.mjs" "$here/load.mjs" "$work/"
if ! (cd "$work" && npm install --no-audit --no-fund --loglevel=error >&2); then
  fail "npm install of @restatedev/restate-server, @restatedev/restate and @restatedev/restate-sdk failed"
fi
server="$work/node_modules/@restatedev/restate-server-$platform/bin/restate-server"
cli="$work/node_modules/@restatedev/restate-$platform/bin/restate"
[ -x "$server" ] || fail "the npm package has no restate-server binary at $server"
version=$("$server" --version | awk '{print $2}')

free_port() { node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
ingress=$(free_port)
admin=$(free_port)
node_port=$(free_port)
service_port=$(free_port)
data=$(mktemp -d "${TMPDIR:-/tmp}/baton-bench-restate-XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT

echo "starting restate-server $version (ingress :$ingress, admin :$admin, data $data)" >&2
RESTATE_INGRESS__BIND_ADDRESS="127.0.0.1:$ingress" \
RESTATE_ADMIN__BIND_ADDRESS="127.0.0.1:$admin" \
RESTATE_BIND_ADDRESS="127.0.0.1:$node_port" \
RESTATE_LISTEN_MODE=tcp \
  "$server" --base-dir "$data" --node-name bench --no-logo >"$data/restate.log" 2>&1 &
server_pid=$!
pids+=("$server_pid")
for _ in $(seq 1 300); do
  curl -fs "http://127.0.0.1:$admin/health" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || fail "restate-server exited at start: $(tail -3 "$data/restate.log" | tr '"' "'" | tr '\n' ' ')"
  sleep 0.1
done
curl -fs "http://127.0.0.1:$admin/health" >/dev/null || fail "restate-server's admin API did not answer within 30 s"

(cd "$work" && PORT=$service_port exec node service.mjs) >"$data/service.log" 2>&1 &
service_pid=$!
pids+=("$service_pid")
for _ in $(seq 1 100); do
  (echo >"/dev/tcp/127.0.0.1/$service_port") 2>/dev/null && break
  sleep 0.1
done

RESTATE_ADMIN_URL="http://127.0.0.1:$admin" "$cli" --yes deployments register \
  "http://127.0.0.1:$service_port" >&2 || fail "restate deployments register failed: $(tail -3 "$data/service.log" | tr '"' "'" | tr '\n' ' ')"
# The ingress learns the new service shortly after registration.
for _ in $(seq 1 100); do
  curl -fs -X POST -H 'content-type: application/json' -d '{}' \
    "http://127.0.0.1:$ingress/bench/three" >/dev/null 2>&1 && break
  sleep 0.1
done

echo "measuring ${seconds} s at concurrency 1, then 64 ..." >&2
figures=$(cd "$work" && node load.mjs "http://127.0.0.1:$ingress/bench/three" "$seconds" \
  "version=$version" "sdk=1.17.2" "node=$(node --version)" "durability=fsync (restate-server defaults)")
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
echo "$figures" | node -e '
  let s = ""; process.stdin.on("data", d => s += d).on("end", () => {
    const out = JSON.parse(s);
    out.peak_rss_kib = { "restate-server": Number(process.argv[1]), "node service": Number(process.argv[2]) };
    console.log(JSON.stringify(out));
  });' "$(hwm "$server_pid")" "$(hwm "$service_pid")"
