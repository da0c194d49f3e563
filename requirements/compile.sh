#!/usr/bin/env bash
# Re-pin requirements/agent.txt, operator.txt and build.txt (one set per image
# target, plus the wheel build), with hashes of every wheel and sdist (so the
# image builds the same on amd64 and arm64), from the matching .in files, holding
# every transitive dependency at the version installed in .venv: the image runs
# exactly what the tests ran against.
# Needs the package index; pip-tools goes into a throwaway venv.
set -euo pipefail
cd "$(dirname "$0")"
venv_python=../.venv/bin/python
[ -x "$venv_python" ] || { echo "compile.sh: run 'make venv' first" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv_python" -m venv "$work/tools"
"$work/tools/bin/pip" install -q pip-tools==7.6.2
# The dev venv's versions as constraints; local wheels (file: URLs) and the
# editable project itself are not constraints on what the index serves.
"$venv_python" -m pip freeze --all --exclude-editable | grep -v ' @ file:' >"$work/venv.txt"

# Arguments: which sets to re-pin (default: all three).
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(agent operator build)
for name in "${names[@]}"; do
  case "$name" in agent | operator | build) ;; *) echo "compile.sh: no set $name" >&2; exit 2 ;; esac
  CUSTOM_COMPILE_COMMAND="requirements/compile.sh" \
    "$work/tools/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe \
    --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
    --constraint "$work/venv.txt" --output-file "$name.txt" "$name.in"
  # The constraint file is a temporary path: drop it from the "via" annotations.
  sed -i '/^    #   -c /d' "$name.txt"
done
echo "compile.sh: wrote requirements/${names[*]/%/.txt}"
