#!/usr/bin/env bash
# The property-based API test: starts a throw-away embedded `multiagents
# serve` (with an admin API key), checks its OpenAPI document, and lets
# schemathesis throw generated requests at every operation. Fails on a
# server error (5xx), a status code, content type or response body the
# document does not allow, or a crash.
#
#   scripts/api-fuzz.sh [BINARY] [EXAMPLES]     (default target/debug/multiagents, 30)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/multiagents}
examples=${2:-30}
py=$(scripts/python-env.sh)
work=$(mktemp -d -t multiagents-fuzz.XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" keys new fuzz --scopes admin --file "$work/keys" >"$work/key" 2>/dev/null
# Waits are capped, so that a generated ?wait=90m does not hold a test for long.
"$bin" serve --listen 127.0.0.1:0 --store "$work/store.db" --api-keys "$work/keys" \
  --max-wait 200ms 2>"$work/serve.log" &
pid=$!
addr=
for _ in $(seq 1 200); do
  addr=$(sed -n 's/.*serving http:\/\/\([^ ]*\).*/\1/p' "$work/serve.log" | head -1)
  [ -n "$addr" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.05
done
[ -n "$addr" ] || { echo "error: serve did not say where it listens" >&2; cat "$work/serve.log" >&2; exit 1; }
echo "fuzzing the API of http://$addr" >&2

curl -sf "http://$addr/openapi.json" >"$work/openapi.json"
"$py" - "$work/openapi.json" <<'PY'
import json, sys
from openapi_spec_validator import validate
validate(json.load(open(sys.argv[1])))
print("the OpenAPI document is valid", file=sys.stderr)
PY

# The SSE streams never end: they are tested in crates/multiagents-server/tests/events.rs.
"$(dirname "$py")/schemathesis" run "http://$addr/openapi.json" \
  -H "Authorization: Bearer $(cat "$work/key")" \
  --checks all --exclude-checks negative_data_rejection,positive_data_acceptance \
  --exclude-path-regex '/events$' \
  -n "$examples" --request-timeout 10 --generation-deterministic --no-color

kill -0 "$pid" 2>/dev/null || { echo "error: serve died under the fuzzing; its log:" >&2; cat "$work/serve.log" >&2; exit 1; }
echo "the API held: no server error, every answer as documented" >&2
