#!/usr/bin/env bash
# Installs the wheel into a fresh virtual environment and uses it from outside the source tree: the C++
# top-k index, utility_infonce forward/backward, the shipped data, the `uae` console script.
#
#   bash scripts/check_wheel.sh [WHEEL]     # default: build one with scripts/build_wheel.sh
#
# The venv sees the system site-packages (torch and friends are not downloaded again) and installs the
# wheel with --no-index, so every dependency it declares must already be there; uae_fast itself must come
# from the venv, which the smoke test asserts (a source tree or an editable install must not shadow it).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
wheel="${1:-}"
if [ -z "$wheel" ]; then
  bash "$root/scripts/build_wheel.sh"
  version="$("$PY" -c "import ast,sys; t=open(sys.argv[1]).read(); print(next(ast.literal_eval(l.split('=',1)[1].split('#')[0]) for l in t.splitlines() if l.startswith('__version__')))" "$root/uae_fast/__init__.py")"
  wheel="$(ls -t "$root"/dist/uae_fast-"$version"-*manylinux*.whl | head -1)"
fi
case "$(basename "$wheel")" in
  *manylinux*) ;;
  *) echo "check_wheel.sh: $wheel is not a manylinux wheel" >&2; exit 1 ;;
esac
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# --without-pip: the venv's own (older) pip/setuptools would shadow the system ones torch's metadata needs;
# the system pip installs into the venv instead.
"$PY" -m venv --system-site-packages --without-pip "$tmp/venv"
"$PY" -m pip --python "$tmp/venv/bin/python" install -q --no-index --no-cache-dir "$wheel"
cd "$tmp"  # nowhere near the checkout
export -n PYTHONPATH 2>/dev/null || true
unset PYTHONPATH UAE_DATA_DIR
export HF_HUB_OFFLINE=1 VENV="$tmp/venv"
"$tmp/venv/bin/python" "$root/scripts/wheel_smoke.py"
"$tmp/venv/bin/uae" --version
"$tmp/venv/bin/uae" --help >/dev/null
for cmd in score train eval quickstart; do "$tmp/venv/bin/uae" "$cmd" --help >/dev/null; done
"$tmp/venv/bin/uae" quickstart --dry-run
echo "check_wheel.sh: OK $(basename "$wheel")"
