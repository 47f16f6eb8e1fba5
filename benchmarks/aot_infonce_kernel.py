"""Compile utility_infonce's score-tile kernel for sm_90a without a GPU and print, per config and mode,
shared memory, whether the K-loop is pipelined (async copies), registers and spills (ptxas -v).

    python benchmarks/aot_infonce_kernel.py            # every Hopper config in _infonce_gemm_triton.py

Pointer and stride arguments are marked 16-divisible as the JIT does at run time for aligned tensors and
d % 16 == 0 (without it 16-bit loads are not pipelined). Uses the ptxas that ships with Triton.
"""
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from uae_fast.ops import _infonce_gemm_triton as G  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS = next((os.path.join(_BIN, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(_BIN, n))), "ptxas")
ARGS = ["Q", "P", "MOFF", "EX", "WS", "PART_M", "PART_S", "R", "N", "D", "row0", "stride_q", "stride_p", "stride_ws",
        "stride_ex", "n_ex", "scale_log2", "num_splits", "tiles_per_split"]
ALIGNED = ("Q", "P", "MOFF", "EX", "WS", "PART_M", "PART_S", "N", "D", "stride_q", "stride_p", "stride_ws")


def compile_one(dt, prec, cfg, write, has_ex):
    sig = {a: "i32" for a in ARGS}
    sig.update(Q=f"*{dt}", P=f"*{dt}", WS=f"*{dt}", MOFF="*fp32", EX="*i64", PART_M="*fp32", PART_S="*fp32", scale_log2="fp32")
    const = dict(WRITE=write, HAS_EX=has_ex, EVEN_D=True, BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n,
                 BLOCK_D=cfg.block_d, GROUP_B=cfg.group_b, PRECISION=prec, UPCAST=False)
    sig.update({c: "constexpr" for c in const})
    attrs = {(ARGS.index(a),): [["tt.divisibility", 16]] for a in ALIGNED}
    ck = triton.compile(ASTSource(fn=G._score_tile_kernel, signature=sig, constexprs=const, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ck.asm["ptx"])
    r = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    out = r.stderr + r.stdout
    regs = next((ln.split("Used ")[1].split(" registers")[0] for ln in out.splitlines() if "Used " in ln), "?")
    spill = next((ln.split("properties for _score_tile_kernel")[-1].strip() for ln in out.splitlines() if "spill stores" in ln), "?")
    spill = next((ln.strip().split("info    : ")[-1] for ln in out.splitlines() if "spill stores" in ln), spill)
    ttgir = ck.asm.get("ttgir", "")
    pipelined = "async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir
    return ck.metadata.shared, pipelined, "wgmma" in ck.asm["ptx"], regs, spill


def main():
    for dt, cfgs, prec in (("bf16", G._CONFIGS_HALF_SM90, "tf32"), ("fp32", G._CONFIGS_TF32, "tf32"),
                           ("fp32", G._CONFIGS_IEEE, "ieee")):
        for cfg in cfgs:
            for write, has_ex in ((False, False), (True, False), (True, True)):
                smem, pipe, wgmma, regs, spill = compile_one(dt, prec, cfg, write, has_ex)
                mode = ("write" if write else "lse") + ("+ex" if has_ex else "")
                print(f"{dt} {prec:4} {cfg.block_b}x{cfg.block_n}x{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages} {mode:8} "
                      f"smem {smem // 1024:3d} KiB pipelined {pipe!s:5} wgmma {wgmma!s:5} regs {regs:>3} | {spill}", flush=True)


if __name__ == "__main__":
    main()
