#!/usr/bin/env bash
# The xla test lane (`make test-xla`): torch-xla on XLA:CPU, in its own cached venv.
#
# torch-xla 2.9.0 (the only torch-xla on PyPI) is built against torch 2.9.0 and does not import
# beside the project's torch 2.13, so it gets a separate venv, kept OUTSIDE the checkout:
#   ${RAYQ_XLA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/rayq/xla-venv}
# First build: torch==2.9.0 from PyPI is the CUDA build (~4.2 GB with its nvidia-* wheels, a few
# minutes, ~7 GB venv); later runs reuse it (a stamp keyed on the pinned versions and on the
# project's dependency list) and only re-link rayq to this checkout (pip --no-deps -e).
# The project's other dependencies are installed with a constraints file pinning torch, so
# ray/optuna can never pull a different torch into this venv.
#
# Usage: cluster/xla_lane.sh [pytest args...]   (default: -m xla tests/)
#   RAYQ_XLA_VENV=DIR   venv location        PYTHON=python3.11   interpreter to build it with
#   RAYQ_XLA_BUILD_ONLY=1   build/refresh the venv, run nothing
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${RAYQ_XLA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/rayq/xla-venv}
PY=${PYTHON:-python3}
TORCH_VERSION=2.9.0
XLA_VERSION=2.9.0

log() { printf 'xla-lane: %s\n' "$*" >&2; }

# The project's runtime deps (from pyproject.toml) minus torch, plus pytest.
DEPS=$("$PY" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = [d for d in p["dependencies"] if re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower() != "torch"]
# only the test runner from the test extra: lm-eval is tested in the main venv, not on XLA
deps += [d for d in p.get("optional-dependencies", {}).get("test", []) if d.lower().startswith("pytest")]
print("\n".join(deps))
EOF
)
BASE_KEY=$(printf '%s\n' "$("$PY" -c 'import sys; print(sys.version_info[:2])')" \
    "torch==$TORCH_VERSION" "torch-xla==$XLA_VERSION" | sha256sum | cut -c1-16)
DEPS_KEY=$(printf '%s\n' "$BASE_KEY" "$DEPS" | sha256sum | cut -c1-16)

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # one build (and one run against the shared venv) at a time

VPY="$VENV/bin/python"
CONSTRAINTS="$VENV/constraints.txt"
start=$(date +%s)
if [[ ! -f "$VENV/.rayq-xla-base-$BASE_KEY" ]]; then
    log "building $VENV: torch==$TORCH_VERSION (~4.2 GB download unless in pip's cache), torch-xla==$XLA_VERSION"
    rm -rf "$VENV"  # a half-built venv has no stamp: start over
    "$PY" -m venv "$VENV"
    "$VPY" -m pip install --quiet --upgrade pip
    printf 'torch==%s\ntorch-xla==%s\n' "$TORCH_VERSION" "$XLA_VERSION" >"$CONSTRAINTS"
    "$VPY" -m pip install --quiet "torch==$TORCH_VERSION"
    "$VPY" -m pip install --quiet -c "$CONSTRAINTS" "torch-xla==$XLA_VERSION"
    touch "$VENV/.rayq-xla-base-$BASE_KEY"
fi
if [[ ! -f "$VENV/.rayq-xla-deps-$DEPS_KEY" ]]; then
    log "installing the project's dependencies (torch held at $TORCH_VERSION by $CONSTRAINTS)"
    mapfile -t dep_array <<<"$DEPS"
    "$VPY" -m pip install --quiet -c "$CONSTRAINTS" "setuptools>=68" wheel "${dep_array[@]}"
    got=$("$VPY" -c 'import torch; print(torch.__version__)')
    [[ "$got" == "$TORCH_VERSION"* ]] || { log "torch is $got, expected $TORCH_VERSION"; exit 1; }
    PJRT_DEVICE=CPU "$VPY" -c 'import torch_xla; print("xla-lane: torch_xla", torch_xla.__version__, torch_xla.device())' >&2
    rm -f "$VENV"/.rayq-xla-deps-*
    touch "$VENV/.rayq-xla-deps-$DEPS_KEY"
    log "venv ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
fi

VPY="$VENV/bin/python"
# rayq itself, never its dependencies (they would pull torch 2.13): re-linked per checkout.
if [[ "$(cat "$VENV/.rayq-src" 2>/dev/null)" != "$ROOT" ]]; then
    "$VPY" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT" >"$VENV/.rayq-install.log" 2>&1 \
        || { cat "$VENV/.rayq-install.log" >&2; exit 1; }
    echo "$ROOT" >"$VENV/.rayq-src"
fi

[[ -n "${RAYQ_XLA_BUILD_ONLY:-}" ]] && { log "venv ready: $VENV"; exit 0; }

cd "$ROOT"
export PJRT_DEVICE=CPU
if [[ $# -eq 0 ]]; then set -- -m xla tests/; fi
rc=0
"$VPY" -m pytest -q "$@" || rc=$?
if [[ $rc -eq 5 ]]; then log "pytest collected no xla tests"; exit 1; fi
exit $rc
