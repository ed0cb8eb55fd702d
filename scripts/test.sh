#!/usr/bin/env bash
# Runs the whole test suite.
#
# Integration tests talk to real servers. For each backend whose URL is not
# already set (REDIS_URL, DATABASE_URL, NATS_URL), this script starts a
# throw-away server on a free loopback port from the installed binaries —
# installing them with apt-get when missing and running as root — and stops
# it afterwards, so runs never share state.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d -t multiagents-test.XXXXXX)
pids=()
stops=()
cleanup() {
  for stop in "${stops[@]:-}"; do
    [ -n "$stop" ] && eval "$stop" >/dev/null 2>&1 || true
  done
  for pid in "${pids[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

need() { # need BINARY DEBIAN-PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing $2 for the integration tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2") >&2
  fi
  command -v "$1" >/dev/null 2>&1
}

start_redis() {
  [ -n "${REDIS_URL:-}" ] && return 0
  if ! need redis-server redis-server; then
    echo "warning: redis-server is not installed; Redis tests will be skipped" >&2
    return 0
  fi
  local port; port=$(free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
    --daemonize no --loglevel warning >"$work/redis.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      export REDIS_URL="redis://127.0.0.1:$port"
      echo "throw-away Redis at $REDIS_URL" >&2
      return 0
    fi
    sleep 0.05
  done
  echo "error: redis-server did not start; its log:" >&2
  cat "$work/redis.log" >&2
  return 1
}

# A free port below 55536 whose cluster bus port (+10000) is free too.
free_cluster_port() {
  python3 - <<'PY'
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
while True:
    p = random.randint(20000, 55000)
    if free(p) and free(p + 10000):
        print(p); break
PY
}

wait_port() { # wait_port PORT LOG
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "error: a server did not start on port $1; its log:" >&2
  cat "$2" >&2
  return 1
}

# A three-node Redis Cluster (no replicas) for the cluster tests.
start_redis_cluster() {
  [ -n "${REDIS_CLUSTER_URL:-}" ] && return 0
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || return 0
  local nodes=()
  for i in 1 2 3; do
    local port; port=$(free_cluster_port)
    mkdir -p "$work/cluster-$i"
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
      --dir "$work/cluster-$i" --cluster-enabled yes --cluster-config-file nodes.conf \
      --daemonize no --loglevel warning >"$work/cluster-$i.log" 2>&1 &
    pids+=("$!")
    wait_port "$port" "$work/cluster-$i.log"
    nodes+=("127.0.0.1:$port")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$work/cluster-create.log" 2>&1
  for _ in $(seq 1 100); do
    if redis-cli -p "${nodes[0]##*:}" cluster info 2>/dev/null | grep -q "cluster_state:ok"; then
      export REDIS_CLUSTER_URL="redis://${nodes[0]}"
      echo "throw-away Redis Cluster at ${nodes[*]}" >&2
      return 0
    fi
    sleep 0.1
  done
  echo "error: the Redis Cluster did not come up:" >&2
  cat "$work/cluster-create.log" >&2
  return 1
}

# PostgreSQL's server binaries: on PATH, or where Debian puts them.
pg_bin() {
  if command -v initdb >/dev/null 2>&1; then
    dirname "$(command -v initdb)"
    return 0
  fi
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/initdb" ] && { echo "$dir"; return 0; }
  done
  return 1
}

# A throw-away PostgreSQL cluster: initdb into the work directory, on a free
# port, trust authentication on loopback, stopped (fast) afterwards. As root
# the server runs as the `postgres` user, as PostgreSQL insists.
start_postgres() {
  [ -n "${DATABASE_URL:-}" ] && return 0
  local bin
  if ! bin=$(pg_bin); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing postgresql for the integration tests" >&2
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
    fi
    if ! bin=$(pg_bin); then
      echo "warning: PostgreSQL is not installed; PostgreSQL tests will be skipped" >&2
      return 0
    fi
  fi
  local dir="$work/postgres" port; port=$(free_port)
  mkdir -p "$dir"
  local as=()
  if [ "$(id -u)" = 0 ]; then
    chmod 755 "$work"
    chown postgres "$dir"
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres --no-sync >"$work/initdb.log" 2>&1 || {
    echo "error: initdb failed; its log:" >&2
    cat "$work/initdb.log" >&2
    return 1
  }
  # Tests are not benchmarks: no fsync. Enough connections for the
  # pools of tests running side by side.
  "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 start -o \
    "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400" >&2 || {
    echo "error: PostgreSQL did not start; its log:" >&2
    cat "$dir/log" >&2
    return 1
  }
  stops+=("${as[*]} $bin/pg_ctl -D $dir/data -m fast -w stop")
  export PG_BIN="$bin"
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "throw-away PostgreSQL at $DATABASE_URL" >&2
}

start_redis
start_redis_cluster
start_postgres

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-targets --no-fail-fast
else
  cargo test --workspace --all-targets --no-fail-fast
fi
# nextest does not run doctests.
cargo test --workspace --doc
# The HTTP API against its own OpenAPI document, over a real `multiagents serve`.
cargo build -p multiagents-cli
scripts/api-fuzz.sh target/debug/multiagents
# The dashboard in headless Chromium, over a real `multiagents serve`.
scripts/ui-test.sh target/debug/multiagents
# The Python client and workers, against real `multiagents serve` processes.
MULTIAGENTS_BIN="$PWD/target/debug/multiagents" "$(scripts/python-env.sh)" -m pytest -q clients/python
