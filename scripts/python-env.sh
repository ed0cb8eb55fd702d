#!/usr/bin/env bash
# Makes (once) a virtualenv under target/ with scripts/python-requirements.txt
# installed, and prints the path of its python. Reinstalls when the
# requirements change.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/python-venv
stamp="$venv/.requirements"
if [ ! -x "$venv/bin/python" ] || ! cmp -s scripts/python-requirements.txt "$stamp"; then
  echo "making the Python test environment in $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/python-requirements.txt >&2
  cp scripts/python-requirements.txt "$stamp"
fi
echo "$PWD/$venv/bin/python"
