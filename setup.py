"""Builds the C++ retrieval extension ``uae_fast._topk`` (pybind11, C++17, OpenMP when the compiler has it)
and lists the packages (metadata is in pyproject.toml)."""
import os
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup


def _has_flag(flag: str) -> bool:
    """Probe the compiler once, so a compiler without OpenMP still builds (single-threaded)."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            return subprocess.run([cxx, flag, src, "-o", os.path.join(d, "t")], capture_output=True).returncode == 0
        except OSError:
            return False


# -ffp-contract=fast: -std=c++17 turns GCC's FMA contraction off; the kernels rely on it for a*b+c.
# No -march: the package must run on any x86-64 (or other) CPU. AVX2 / AVX-512 kernels are compiled
# per function (target pragmas in csrc/topk.cpp) and picked at runtime.
compile_args, link_args = ["-O3", "-ffp-contract=fast", "-fno-math-errno"], []
if sys.platform != "win32" and "clang" not in os.environ.get("CXX", ""):
    compile_args.append("-Wno-psabi")  # 64-byte vector types inside kernels; no ABI boundary crosses them
if sys.platform != "win32" and _has_flag("-fopenmp"):
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")

ext = Pybind11Extension(
    "uae_fast._topk",
    sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
    include_dirs=["csrc"],
    depends=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith((".h", ".inc"))),
    cxx_std=17,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

# The checkout's data/ folder (QASPER slices, utilities tables) installs as uae_fast/_data, so an installed
# package finds it where a checkout finds data/ (uae_fast.data.shipped_file looks in both).
setup(
    packages=find_packages(include=["uae_fast", "uae_fast.*"]) + ["uae_fast._data"],
    package_dir={"uae_fast._data": "data"},
    # The quickstart slices and the default utilities table (not the 1.2 MB every-paragraph table: no default reads it).
    include_package_data=False,  # exactly package_data: not whatever a stale egg-info/SOURCES.txt lists
    package_data={"uae_fast": ["py.typed"],
                  "uae_fast._data": ["qasper-*-v0.3-quickstart.json.gz", "qasper-train-utilities.jsonl.gz",
                                     "qasper-train-utilities-nogold-top12.jsonl.gz",
                                     "qasper-train-utilities-nogold-answer12.jsonl.gz",
                                     "qasper-train-utilities-nogold-top12-gemma3-270m.jsonl.gz",
                                     "qasper-train-utilities-gemma3-270m.jsonl.gz",
                                     "qasper-train-utilities-nogold-answer12-gemma3-270m.jsonl.gz", "README.md"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)
