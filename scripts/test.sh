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
cleanup() {
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

start_redis

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-targets --no-fail-fast
else
  cargo test --workspace --all-targets --no-fail-fast
fi
# nextest does not run doctests.
cargo test --workspace --doc
