#!/usr/bin/env bash
# The GPU lane (`make test-gpu`): CUDA torch in its own cached venv; the gpu-marked tests,
# `rayq bench int8 --device cuda` and `rayq bench train --device cuda`; ONE JSON on stdout.
#
# On a machine without an NVIDIA GPU it prints one JSON line saying it skipped and exits 0,
# BEFORE any download: the CUDA build of torch is several GB.
#
# The project's venv holds the CPU build of torch (pyproject pins torch==X; CPU machines resolve
# it to the CPU wheel), so the CUDA build gets its own venv, kept OUTSIDE the checkout:
#   ${RAYQ_GPU_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/rayq/gpu-venv}
# Same torch version as pyproject's pin. PyPI's Linux x86_64 torch wheels are CUDA builds; to
# pick a CUDA flavour set RAYQ_GPU_TORCH_INDEX, e.g. https://download.pytorch.org/whl/cu128.
# Later runs reuse the venv (stamps keyed on the versions and the dependency list) and only
# re-link rayq to this checkout (pip --no-deps -e).
#
# Usage: cluster/gpu_lane.sh [pytest args...]   (default: -m gpu tests/)
#   RAYQ_GPU_VENV=DIR  venv location     RAYQ_GPU_TORCH_INDEX=URL  torch wheel index
#   PYTHON=python3.11  interpreter to build the venv with
#   RAYQ_GPU_BUILD_ONLY=1  build/refresh the venv, run nothing
#   RAYQ_GPU_BENCH_STEPS=N  steps of `rayq bench train` (default 40)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf 'gpu-lane: %s\n' "$*" >&2; }

# --- 1. Is there a GPU at all? (nothing is downloaded or built before this check) ----------
gpu_names() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true
    fi
}
GPUS=$(gpu_names)
if [[ -z "$GPUS" ]] && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
    echo '{"lane": "gpu", "skipped": "no NVIDIA GPU here (nvidia-smi lists none, no /dev/nvidia*): nothing built or run"}'
    exit 0
fi
log "GPU(s): ${GPUS:-/dev/nvidia* present, nvidia-smi unavailable}"

# --- 2. The cached CUDA venv ------------------------------------------------------------------
PY=${PYTHON:-python3}
VENV=${RAYQ_GPU_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/rayq/gpu-venv}
TORCH_INDEX=${RAYQ_GPU_TORCH_INDEX:-}
read -r TORCH_VERSION DEPS < <("$PY" - "$ROOT/pyproject.toml" <<'EOF'
import json, re, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
name = lambda d: re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower()
torch = [d for d in p["dependencies"] if name(d) == "torch"]
pin = re.fullmatch(r"torch\s*==\s*([\w.]+)", torch[0].strip()) if torch else None
if pin is None:
    sys.exit(f"gpu-lane: pyproject.toml must pin torch==X (found {torch})")
deps = [d for d in p["dependencies"] if name(d) != "torch"] + p.get("optional-dependencies", {}).get("test", [])
print(pin.group(1), json.dumps(deps))
EOF
)
[[ -n "$TORCH_VERSION" ]] || exit 1
BASE_KEY=$(printf '%s\n' "$("$PY" -c 'import sys; print(sys.version_info[:2])')" "torch==$TORCH_VERSION" \
    "$TORCH_INDEX" | sha256sum | cut -c1-16)
DEPS_KEY=$(printf '%s\n' "$BASE_KEY" "$DEPS" | sha256sum | cut -c1-16)

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # one build (and one run against the shared venv) at a time

VPY="$VENV/bin/python"
CONSTRAINTS="$VENV/constraints.txt"
start=$(date +%s)
if [[ ! -f "$VENV/.rayq-gpu-base-$BASE_KEY" ]]; then
    log "building $VENV: torch==$TORCH_VERSION CUDA build (several GB unless in pip's cache)"
    rm -rf "$VENV"  # a half-built venv has no stamp: start over
    "$PY" -m venv "$VENV"
    "$VPY" -m pip install --quiet --upgrade pip
    printf 'torch==%s\n' "$TORCH_VERSION" >"$CONSTRAINTS"
    index_args=()
    [[ -n "$TORCH_INDEX" ]] && index_args=(--index-url "$TORCH_INDEX")
    "$VPY" -m pip install --quiet "${index_args[@]}" "torch==$TORCH_VERSION"
    cuda=$("$VPY" -c 'import torch; print(torch.version.cuda or "")')
    if [[ -z "$cuda" ]]; then
        log "pip installed a torch without CUDA; set RAYQ_GPU_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cu128)"
        exit 1
    fi
    touch "$VENV/.rayq-gpu-base-$BASE_KEY"
fi
if [[ ! -f "$VENV/.rayq-gpu-deps-$DEPS_KEY" ]]; then
    log "installing the project's dependencies (torch held at $TORCH_VERSION by $CONSTRAINTS)"
    mapfile -t dep_array < <("$PY" -c 'import json, sys; print("\n".join(json.loads(sys.argv[1])))' "$DEPS")
    "$VPY" -m pip install --quiet -c "$CONSTRAINTS" "setuptools>=68" wheel "${dep_array[@]}" py-spy
    rm -f "$VENV"/.rayq-gpu-deps-*
    touch "$VENV/.rayq-gpu-deps-$DEPS_KEY"
    log "venv ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
fi
# rayq itself, never its dependencies: re-linked per checkout
if [[ "$(cat "$VENV/.rayq-src" 2>/dev/null)" != "$ROOT" ]]; then
    "$VPY" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT" >"$VENV/.rayq-install.log" 2>&1 \
        || { cat "$VENV/.rayq-install.log" >&2; exit 1; }
    echo "$ROOT" >"$VENV/.rayq-src"
fi
[[ -n "${RAYQ_GPU_BUILD_ONLY:-}" ]] && { log "venv ready: $VENV"; exit 0; }

if ! "$VPY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    log "a GPU is present but torch $("$VPY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') cannot use it (driver too old?)"
    exit 1
fi

# --- 3. Tests and benchmarks; their output goes to stderr, the summary JSON to stdout -------
cd "$ROOT"
OUT=$(mktemp -d "${TMPDIR:-/tmp}/rayq-gpu-lane.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
if [[ $# -eq 0 ]]; then set -- -m gpu tests/; fi
tests_rc=0
"$VPY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/junit.xml" "$@" >&2 || tests_rc=$?

int8_rc=0
"$VENV/bin/rayq" bench int8 --device cuda --json >"$OUT/int8.out" || int8_rc=$?
train_rc=0
"$VENV/bin/rayq" bench train --device cuda --steps "${RAYQ_GPU_BENCH_STEPS:-40}" --json >"$OUT/train.out" || train_rc=$?

"$VPY" - "$OUT" "$tests_rc" "$int8_rc" "$train_rc" "$GPUS" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

out, tests_rc, int8_rc, train_rc, gpus = Path(sys.argv[1]), *map(int, sys.argv[2:5]), sys.argv[5]


def last_json(path: Path, rc: int) -> dict:
    """A bench's result: the last stdout line (its JSON), or why there is none."""
    lines = path.read_text().strip().splitlines() if path.exists() else []
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        result = {"error": f"no JSON on stdout (exit {rc}); its stderr is above"}
    return {"exit": rc, **result}


tests = {"exit": tests_rc}
if (out / "junit.xml").exists():
    suites = ET.parse(out / "junit.xml").getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    for key in ("tests", "failures", "errors", "skipped"):
        tests[key] = sum(int(s.get(key, 0)) for s in suites)
    tests["passed"] = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
summary = {
    "lane": "gpu",
    "gpus": [g.strip() for g in gpus.splitlines() if g.strip()],
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name(0),
    "tests": tests,
    "bench_int8": last_json(out / "int8.out", int8_rc),
    "bench_train": last_json(out / "train.out", train_rc),
}
summary["ok"] = tests_rc == 0 and int8_rc == 0 and train_rc == 0
print(json.dumps(summary))
sys.exit(0 if summary["ok"] else 1)
EOF
