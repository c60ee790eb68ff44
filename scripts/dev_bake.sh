#!/usr/bin/env bash
# Developer loop: bake the template into /tmp/dev/<name> with the defaults (plus key=value extras)
# and print the baked project's path. Run its tests with the template's venv, no install needed:
#   p=$(scripts/dev_bake.sh mine) && cd "$p" && PYTHONPATH=src ../../../work/main/.venv/bin/pytest -q
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
name=${1:?usage: dev_bake.sh NAME [key=value ...]}
shift
out=/tmp/dev/$name
rm -rf "$out" && mkdir -p "$out"
"$here/.venv/bin/cookiecutter" --no-input -o "$out" "$here" "$@" >/dev/null
ls -d "$out"/*/
