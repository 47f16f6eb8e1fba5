// uae_fast._topk: exact inner-product top-k over stored embeddings (float32, bfloat16, int8 + per-row scale).
//
// Python (uae_fast/index.py) owns the storage (numpy arrays, so save/load/mmap are plain file I/O);
// this module packs rows into the panel layout (topk_common.h) and searches it:
//   - queries in chunks; per chunk, threads split the matrix into contiguous panel ranges and scan
//     their range once, in L2-sized blocks, against every query tile (blocked scoring);
//   - each thread keeps a bounded heap per query; heaps are merged at the end;
//   - compact dtypes keep a few extra candidates and rescore them against the float32 query
//     (in float64), so returned scores are exact for the stored vectors and query rounding cannot
//     reorder them;
//   - the GIL is released for the whole search; nothing is shared between calls, so concurrent
//     searches from several Python threads are safe.
// ISA: the best of generic / AVX2 / AVX-512 / AVX-512+BF16+VNNI is picked at runtime
// (__builtin_cpu_supports); the package is built for the baseline ISA (no -march=native).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define UAE_X86 1
#endif

#if !defined(__GNUC__)
#error "uae_fast._topk needs GCC or Clang (vector extensions, target pragmas)"
#endif
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "uae_fast._topk assumes a little-endian CPU (packed query words)"
#endif

#include "topk_common.h"

#if defined(__clang__)
#define UAE_UNROLL _Pragma("unroll")
#else
#define UAE_UNROLL _Pragma("GCC unroll 16")
#endif

namespace py = pybind11;

// ---- one copy of the kernels per ISA ------------------------------------------------------------
namespace uae {
namespace generic {
#if defined(UAE_X86)
#define UAE_VW 4
#define UAE_QM_MAX 3  // 16 xmm registers: 3 queries x 1 panel x 4 xmm accumulators
#define UAE_NP 1
#define UAE_NP_SMALL 4
#else
#define UAE_VW 4
#define UAE_QM_MAX 6  // e.g. NEON: 32 q-registers
#define UAE_NP 1
#define UAE_NP_SMALL 4
#endif
#include "topk_kernels.inc"
#undef UAE_QM_MAX
#undef UAE_VW
#undef UAE_NP
#undef UAE_NP_SMALL
}  // namespace generic

#if defined(UAE_X86)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,popcnt"))), apply_to = function)
#endif
namespace avx2 {
#define UAE_VW 8
#define UAE_QM_MAX 6  // 16 ymm: 6 queries x 1 panel x 2 ymm accumulators
#define UAE_NP 1
#define UAE_NP_SMALL 4
#include "topk_kernels.inc"
#undef UAE_QM_MAX
#undef UAE_VW
#undef UAE_NP
#undef UAE_NP_SMALL
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt"))), apply_to = function)
#endif
namespace avx512 {
#define UAE_AVX512 1
#define UAE_VW 16
#define UAE_QM_MAX 12  // 32 zmm: 12 queries x 2 panels = 24 accumulators
#define UAE_NP 2
#define UAE_NP_SMALL 4
#include "topk_kernels.inc"
#undef UAE_QM_MAX
#undef UAE_VW
#undef UAE_NP
#undef UAE_NP_SMALL
#undef UAE_AVX512
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt")
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx2,fma,f16c,bmi,bmi2,popcnt"))), apply_to = function)
#endif
namespace avx512x {
#define UAE_AVX512 1
#define UAE_BF16_DP 1
#define UAE_VNNI 1
#define UAE_VW 16
#define UAE_QM_MAX 12
#define UAE_NP 2
#define UAE_NP_SMALL 4
#include "topk_kernels.inc"
#undef UAE_QM_MAX
#undef UAE_VW
#undef UAE_NP
#undef UAE_NP_SMALL
#undef UAE_VNNI
#undef UAE_BF16_DP
#undef UAE_AVX512
}  // namespace avx512x
#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#endif  // UAE_X86

// ---- ISA dispatch --------------------------------------------------------------------------------
struct Isa {
    const char* name;
    int qm_max;
    void (*scan)(const ScanArgs&, int64_t, int64_t, Heaps&, float*);
};

static const Isa kIsas[] = {
    {"generic", generic::QM_MAX, &generic::scan},
#if defined(UAE_X86)
    {"avx2", avx2::QM_MAX, &avx2::scan},
    {"avx512", avx512::QM_MAX, &avx512::scan},
    {"avx512_bf16_vnni", avx512x::QM_MAX, &avx512x::scan},
#endif
};
constexpr int kNumIsas = sizeof(kIsas) / sizeof(kIsas[0]);

static int detect_isa() {
#if defined(UAE_X86)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni")) return 3;
    if (avx512) return 2;
    if (avx2) return 1;
#endif
    return 0;
}

static const int kBestIsa = detect_isa();
static std::atomic<int> g_isa{kBestIsa};  // lowered only by set_isa() (tests run every code path)

}  // namespace uae

using namespace uae;

static int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static int num_procs() {
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    return 1;
#endif
}

static int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// ---- argument checks (errors name the argument; the Python layer checks first, this is the backstop)

static void require(bool ok, const std::string& msg) {
    if (!ok) throw py::value_error(msg);
}

template <class T>
static void check_array(const py::array& a, const char* name, int64_t min_items, bool writable) {
    if (!py::isinstance<py::array_t<T>>(a))
        throw py::type_error(std::string(name) + " has the wrong dtype for this index");
    require(a.flags() & py::array::c_style, std::string(name) + " must be C-contiguous");
    require(a.size() >= min_items, std::string(name) + " is too small: " + std::to_string(a.size()) + " items, need " +
                                       std::to_string(min_items));
    if (writable) require(a.writeable(), std::string(name) + " must be writable");
}

// Largest vector dimension (2^20: far above any embedding model; 16 rows of it are 64 MiB of float32).
// Keeps d + G, 16 * dpad and the query buffers far from int overflow.
constexpr int kMaxDim = 1 << 20;
// int8 scores are exact int32 sums of d products of at most 127 x 127: 2^17 dims keep them below 2^31.
// The kernels accumulate (q + 128) * x, up to 255 x 127 x d, which passes 2^31 above 66,313 dims: it wraps
// (VPDPBUSD by design, the portable kernels in unsigned lanes), and subtracting 128 * rowsum modulo 2^32
// leaves the exact score.
constexpr int kMaxDimI8 = 1 << 17;

struct Layout {
    int dtype, d, G, ng, dpad;
    int64_t pstride, panel_bytes;
    Layout(int dtype_, int d_) : dtype(dtype_), d(d_) {
        require(dtype == kF32 || dtype == kBF16 || dtype == kI8, "dtype code must be 0 (float32), 1 (bfloat16) or 2 (int8)");
        require(d >= 1 && d <= kMaxDim, "dim must be in [1, " + std::to_string(kMaxDim) + "], got " + std::to_string(d));
        require(dtype != kI8 || d <= kMaxDimI8, "dim must be <= " + std::to_string(kMaxDimI8) +
                " for int8 (larger int32 sums overflow), got " + std::to_string(d) + "; use float32 or bfloat16");
        G = group_of(dtype);
        ng = (d + G - 1) / G;
        dpad = ng * G;
        pstride = (int64_t)kPanel * dpad;
        panel_bytes = pstride * esize_of(dtype);
    }
    int64_t offset(int64_t r, int j) const {  // storage element of (row r, dim j)
        return (r / kPanel) * pstride + (int64_t)(j / G) * kPanel * G + (r % kPanel) * G + j % G;
    }
};

// Checks the storage arrays against (n rows, layout) and returns the panel count.
static int64_t check_storage(const Layout& L, const py::array& data, const py::array& xscale, const py::array& rowsum,
                             int64_t n, bool writable) {
    require(n >= 0, "n must be >= 0");
    // a row count whose byte size overflows int64 would wrap past the size check below
    require(n <= INT64_MAX - kPanel && n / kPanel + 1 < INT64_MAX / std::max<int64_t>(1, L.panel_bytes),
            "n is too large");
    const int64_t npanels = (n + kPanel - 1) / kPanel;
    check_array<uint8_t>(data, "data", npanels * L.panel_bytes, writable);
    if (L.dtype == kI8) {
        check_array<float>(xscale, "scales", npanels * kPanel, writable);
        check_array<int32_t>(rowsum, "rowsums", npanels * kPanel, writable);
    }
    return npanels;
}

// ---- packing ------------------------------------------------------------------------------------

// Round to the nearest int8 step and clamp to [-127, 127]. Its argument is finite (inputs are checked, the
// scale's inverse is a double), so the clamp sees no NaN.
static inline int quant8(double x) { return (int)std::max(-127.0, std::min(127.0, std::nearbyint(x))); }

// Writes rows [row0, row0 + m) of the panel storage from float32 x [m, d].
// Optional int8 refinement: a second int8 code of the rounding residual, row-major [n, d], with its own
// per-row scale. Never scanned; it only makes the rescoring of candidates (nearly) float32-exact.
struct Residual {
    int8_t* q = nullptr;
    float* s = nullptr;
    py::array keep_q, keep_s;  // a list given as resid/rscales is converted to a temporary: keep it alive
};

static Residual check_residual(const Layout& L, const py::object& resid, const py::object& rscales, int64_t n, bool writable) {
    Residual r;
    if (resid.is_none() && rscales.is_none()) return r;
    require(L.dtype == kI8, "resid/rscales are for the int8 dtype only");
    require(!resid.is_none() && !rscales.is_none(), "resid and rscales go together");
    r.keep_q = resid.cast<py::array>();
    r.keep_s = rscales.cast<py::array>();
    check_array<int8_t>(r.keep_q, "resid", n * L.d, writable);
    check_array<float>(r.keep_s, "rscales", n, writable);
    r.q = static_cast<int8_t*>(const_cast<void*>(r.keep_q.data()));
    r.s = static_cast<float*>(const_cast<void*>(r.keep_s.data()));
    return r;
}

static void pack_rows(int dtype, py::array x, py::array data, py::array xscale, py::array rowsum, int64_t row0,
                      py::object resid, py::object rscales, int threads) {
    check_array<float>(x, "x", 0, false);
    require(x.ndim() == 2, "x must be 2-D [rows, dim]");
    const Layout L(dtype, (int)x.shape(1));
    const int64_t m = x.shape(0);
    require(row0 >= 0 && row0 <= INT64_MAX / 2, "row0 must be >= 0 (and not absurdly large)");
    check_storage(L, data, xscale, rowsum, row0 + m, true);
    const Residual res = check_residual(L, resid, rscales, row0 + m, true);
    const float* src = static_cast<const float*>(x.data());
    uint8_t* dst = static_cast<uint8_t*>(data.mutable_data());
    float* xs = L.dtype == kI8 ? static_cast<float*>(xscale.mutable_data()) : nullptr;
    int32_t* rs = L.dtype == kI8 ? static_cast<int32_t*>(rowsum.mutable_data()) : nullptr;
    const int d = L.d;
    const int T = threads > 0 ? threads : max_threads();  // the index's threads= (0: OpenMP's default)
    (void)T;  // used by the pragma only (unused without OpenMP)
    py::gil_scoped_release nogil;
#pragma omp parallel for num_threads(T) schedule(static) if (m * d > (1 << 18))
    for (int64_t i = 0; i < m; ++i) {
        const float* row = src + i * d;
        const int64_t r = row0 + i;
        if (L.dtype == kF32) {
            float* o = reinterpret_cast<float*>(dst);
            for (int j = 0; j < d; ++j) o[L.offset(r, j)] = row[j];
        } else if (L.dtype == kBF16) {
            uint16_t* o = reinterpret_cast<uint16_t*>(dst);
            for (int j = 0; j < d; ++j) o[L.offset(r, j)] = bf16_from_f32(row[j]);
        } else {
            int8_t* o = reinterpret_cast<int8_t*>(dst);
            float amax = 0.f;
            for (int j = 0; j < d; ++j) amax = std::max(amax, std::fabs(row[j]));
            // Symmetric per-row scale: the row's largest |value| maps to 127. The inverse in double: for
            // amax below ~3.7e-37, 127 / amax overflows a float and 0 * inf would quantise zeros to 127.
            const float scale = amax > 0.f ? amax / 127.f : 0.f;
            const double inv = amax > 0.f ? 127.0 / (double)amax : 0.0;
            int32_t sum = 0;
            float ramax = 0.f;
            for (int j = 0; j < d; ++j) {
                const int v = quant8((double)row[j] * inv);
                o[L.offset(r, j)] = (int8_t)v;
                sum += v;
                ramax = std::max(ramax, std::fabs(row[j] - (float)v * scale));
            }
            xs[r] = scale;
            rs[r] = sum;
            if (res.q) {
                const double rinv = ramax > 0.f ? 127.0 / (double)ramax : 0.0;
                for (int j = 0; j < d; ++j)
                    res.q[r * d + j] = (int8_t)quant8((double)(row[j] - (float)o[L.offset(r, j)] * scale) * rinv);
                res.s[r] = ramax > 0.f ? ramax / 127.f : 0.f;
            }
        }
    }
}

// Rows [0, n) back as float32 [n, d] (dequantised): reconstruct() and the tests.
static py::array_t<float> unpack_rows(int dtype, int d, py::array data, py::array xscale, py::array rowsum, int64_t n,
                                      py::object resid, py::object rscales) {
    const Layout L(dtype, d);
    check_storage(L, data, xscale, rowsum, n, false);
    const Residual res = check_residual(L, resid, rscales, n, false);
    py::array_t<float> out({(py::ssize_t)n, (py::ssize_t)d});
    float* o = out.mutable_data();
    const uint8_t* src = static_cast<const uint8_t*>(data.data());
    const float* xs = L.dtype == kI8 ? static_cast<const float*>(xscale.data()) : nullptr;
    py::gil_scoped_release nogil;
    for (int64_t r = 0; r < n; ++r)
        for (int j = 0; j < d; ++j) {
            const int64_t off = L.offset(r, j);
            float v;
            if (L.dtype == kF32) v = reinterpret_cast<const float*>(src)[off];
            else if (L.dtype == kBF16) v = f32_from_bits((uint32_t)reinterpret_cast<const uint16_t*>(src)[off] << 16);
            else v = (float)reinterpret_cast<const int8_t*>(src)[off] * xs[r];
            if (res.q) v = (float)((double)v + (double)res.q[r * d + j] * (double)res.s[r]);
            o[r * d + j] = v;
        }
    return out;
}

// ---- search -------------------------------------------------------------------------------------

// Query words for one chunk: tile t (qm_max queries, the last one possibly shorter) at t * qm_max * ng,
// laid out [group][query of the tile] so the kernel's broadcasts walk memory sequentially.
// widen: bf16 storage scanned as float32 (ScanArgs::widen_bf16): float32 words over the padded dim.
static void pack_queries(const Layout& L, const float* q, int nq, int qm_max, uint32_t* qpack, float* qscale, bool widen) {
    const int words = widen ? L.dpad : L.ng;  // per query
    for (int q0 = 0; q0 < nq; q0 += qm_max) {
        const int qm = std::min(qm_max, nq - q0);
        uint32_t* tile = qpack + (int64_t)q0 * words;
        for (int i = 0; i < qm; ++i) {
            const float* row = q + (int64_t)(q0 + i) * L.d;
            auto dim = [&](int j) { return j < L.d ? row[j] : 0.f; };
            if (L.dtype == kF32) {
                for (int g = 0; g < words; ++g) tile[g * qm + i] = bits_from_f32(dim(g));
            } else if (widen) {  // the query rounded to bf16 as the one-tile path packs it: same candidates either way
                // pairs swapped (word 2g holds dim 2g + 1), matching widen_bf16_panels' odd-first order
                for (int g = 0; g < words; ++g) tile[g * qm + i] = (uint32_t)bf16_from_f32(dim(g ^ 1)) << 16;
            } else if (L.dtype == kBF16) {
                for (int g = 0; g < L.ng; ++g)
                    tile[g * qm + i] = (uint32_t)bf16_from_f32(dim(2 * g)) | ((uint32_t)bf16_from_f32(dim(2 * g + 1)) << 16);
            } else {
                float amax = 0.f;
                for (int j = 0; j < L.d; ++j) amax = std::max(amax, std::fabs(row[j]));
                const double inv = amax > 0.f ? 127.0 / (double)amax : 0.0;  // double: see pack_rows
                qscale[q0 + i] = amax > 0.f ? amax / 127.f : 0.f;
                for (int g = 0; g < L.ng; ++g) {
                    uint32_t w = 0;
                    for (int b = 0; b < 4; ++b) {
                        const int v = quant8((double)dim(4 * g + b) * inv);
                        w |= (uint32_t)(v + 128) << (8 * b);  // u8 operand of VPDPBUSD
                    }
                    tile[g * qm + i] = w;
                }
            }
        }
    }
}

// Exact score of a stored (dequantised) row against the zero-padded float32 query, in float64.
// G independent partial sums (one per position in a group) keep the dependency chains short.
static double rescore(const Layout& L, const void* data, const float* xscale, const Residual& res, const float* qpad,
                      int64_t r) {
    const int64_t base = (r / kPanel) * L.pstride + (r % kPanel) * L.G;
    if (L.dtype == kBF16) {
        const uint16_t* x = static_cast<const uint16_t*>(data) + base;
        double a0 = 0.0, a1 = 0.0;
        for (int g = 0; g < L.ng; ++g, x += 2 * kPanel) {
            a0 += (double)qpad[2 * g] * (double)f32_from_bits((uint32_t)x[0] << 16);
            a1 += (double)qpad[2 * g + 1] * (double)f32_from_bits((uint32_t)x[1] << 16);
        }
        return a0 + a1;
    }
    if (L.dtype == kI8) {
        const int8_t* x = static_cast<const int8_t*>(data) + base;
        double a[4] = {0.0, 0.0, 0.0, 0.0};
        for (int g = 0; g < L.ng; ++g, x += 4 * kPanel)
            for (int b = 0; b < 4; ++b) a[b] += (double)qpad[4 * g + b] * (double)x[b];
        double out = ((a[0] + a[1]) + (a[2] + a[3])) * (double)xscale[r];
        if (res.q) {
            const int8_t* e = res.q + r * L.d;
            double b0 = 0.0, b1 = 0.0, b2 = 0.0, b3 = 0.0;
            int j = 0;
            for (; j + 4 <= L.d; j += 4) {
                b0 += (double)qpad[j] * e[j];
                b1 += (double)qpad[j + 1] * e[j + 1];
                b2 += (double)qpad[j + 2] * e[j + 2];
                b3 += (double)qpad[j + 3] * e[j + 3];
            }
            for (; j < L.d; ++j) b0 += (double)qpad[j] * e[j];
            out += ((b0 + b1) + (b2 + b3)) * (double)res.s[r];
        }
        return out;
    }
    const float* x = static_cast<const float*>(data) + base;
    double a0 = 0.0;
    for (int g = 0; g < L.ng; ++g, x += kPanel) a0 += (double)qpad[g] * (double)x[0];
    return a0;
}

struct Cand {
    float s;
    int64_t id;
};
static bool better(const Cand& a, const Cand& b) { return a.s > b.s || (a.s == b.s && a.id < b.id); }

static py::tuple search(int dtype, int d, py::array data, py::array xscale, py::array rowsum, int64_t n, py::array queries,
                        int k, int candidates, int threads, bool rescore_candidates, py::object resid, py::object rscales,
                        bool force_threads) {
    const Layout L(dtype, d);
    require(n >= 1, "the index is empty");
    const int64_t npanels = check_storage(L, data, xscale, rowsum, n, false);
    const Residual res = check_residual(L, resid, rscales, n, false);
    check_array<float>(queries, "queries", 0, false);
    require(queries.ndim() == 2 && queries.shape(1) == d,
            "queries must be [Q, " + std::to_string(d) + "] float32");
    require(k >= 1 && k <= n, "k must be in [1, " + std::to_string(n) + "], got " + std::to_string(k));
    const bool compact = dtype != kF32 && rescore_candidates;
    const int kk = compact ? (int)std::min<int64_t>(n, std::max(candidates, k)) : k;
    require(threads >= 1, "threads must be >= 1");
    const int64_t nq_total = queries.shape(0);

    py::array_t<float> out_s({(py::ssize_t)nq_total, (py::ssize_t)k});
    py::array_t<int64_t> out_i({(py::ssize_t)nq_total, (py::ssize_t)k});
    if (nq_total == 0) return py::make_tuple(out_s, out_i);

    const Isa& isa = kIsas[std::min(g_isa.load(), kNumIsas - 1)];
    // Small searches run on fewer threads: waking a team costs more than ~1 ms of scanning on a busy
    // machine (a sleeping worker waits for a scheduler slot). ~16 MB of panel reads or ~32 M
    // multiply-adds per thread; the cap is the panel count, so each thread gets a share.
    const int64_t work = std::max<int64_t>(npanels * L.panel_bytes / (16 << 20), npanels * kPanel * (int64_t)d * nq_total >> 25);
    const int64_t cap = std::min<int64_t>({(int64_t)threads, npanels, 4LL * num_procs()});  // no runaway teams
    // Query chunk: up to 256 queries (the matrix is streamed once per chunk), fewer when the per-thread
    // heaps (T x chunk x kk entries) would pass ~256 MiB.
    const int64_t heap_budget = (int64_t)256 << 20;
    // The merge buffers hold T x T x kk candidates: a huge k (k = ntotal on a many-core machine) takes fewer
    // threads rather than gigabytes (16 threads x k = 1M would be 4 GiB).
    const int64_t merge_cap = std::max<int64_t>(1, (int64_t)std::sqrt((double)heap_budget / ((double)sizeof(Cand) * kk)));
    const int T = (int)std::max<int64_t>(1, std::min<int64_t>(
        {cap, merge_cap, force_threads ? cap : std::max<int64_t>(1, work)}));
    const int qc = (int)std::max<int64_t>(1, std::min<int64_t>({nq_total, 256, heap_budget / (12LL * kk * T)}));

    // All scratch allocated before the GIL is released and before any OpenMP region (no throw inside).
    const bool widen = dtype == kBF16 && qc > isa.qm_max;  // more than one query tile: widen blocks
    std::vector<uint32_t> qpack((size_t)qc * (widen ? L.dpad : L.ng));
    std::vector<float> qscale(qc);
    std::vector<float> hs((size_t)T * qc * kk);
    std::vector<int64_t> hid((size_t)T * qc * kk);
    std::vector<int> hsize((size_t)T * qc);
    std::vector<float> hthr((size_t)T * qc);
    std::vector<Cand> merge((size_t)T * T * kk);
    std::vector<float> qpad(compact ? (size_t)T * L.dpad : 0, 0.f);  // zero tail = the storage's pad dims

    ScanArgs a{};
    a.dtype = dtype;
    a.ng = L.ng;
    a.pstride = L.pstride;
    a.data = data.data();
    a.xscale = dtype == kI8 ? static_cast<const float*>(xscale.data()) : nullptr;
    a.rowsum = dtype == kI8 ? static_cast<const int32_t*>(rowsum.data()) : nullptr;
    a.n = n;
    a.qpack = qpack.data();
    a.qscale = dtype == kI8 ? qscale.data() : nullptr;
    // ~192 KiB of panels per block: stays in L2 next to the query tiles while every tile passes.
    a.block_panels = std::max<int64_t>(4, ((int64_t)192 << 10) / L.panel_bytes);
    a.widen_bf16 = widen;
    std::vector<float> scratch(widen ? (size_t)T * a.block_panels * kPanel * L.dpad : 0);

    const int64_t chunk = std::max(a.block_panels, (npanels + 8 * T - 1) / (8 * T));
    const int64_t nchunks = (npanels + chunk - 1) / chunk;
    const float* qall = static_cast<const float*>(queries.data());
    float* os = out_s.mutable_data();
    int64_t* oi = out_i.mutable_data();

    {
    py::gil_scoped_release nogil;
    for (int64_t c0 = 0; c0 < nq_total; c0 += qc) {
        const int nq = (int)std::min<int64_t>(qc, nq_total - c0);
        const float* qchunk = qall + c0 * d;
        a.nq = nq;
        pack_queries(L, qchunk, nq, isa.qm_max, qpack.data(), qscale.data(), widen);
        std::fill(hsize.begin(), hsize.end(), 0);
        std::fill(hthr.begin(), hthr.end(), -std::numeric_limits<float>::infinity());

        // Panels are handed out in contiguous chunks (long sequential streams), ~8 per thread and
        // dynamically: on a shared machine a descheduled thread's share is picked up by the others
        // instead of stalling the whole search. Results do not depend on who scans what: each heap
        // keeps a top-kk under a total order, and the merge takes the top-kk of their union.
#pragma omp parallel num_threads(T)
        {
            const int tid = thread_id();
            Heaps h{hs.data() + (size_t)tid * qc * kk, hid.data() + (size_t)tid * qc * kk, hsize.data() + (size_t)tid * qc,
                    hthr.data() + (size_t)tid * qc, kk};
#pragma omp for schedule(dynamic, 1)
            for (int64_t c = 0; c < nchunks; ++c) {
                const int64_t p0 = c * chunk, p1 = std::min(npanels, p0 + chunk);
                isa.scan(a, p0, p1, h, widen ? scratch.data() + (size_t)tid * a.block_panels * kPanel * L.dpad : nullptr);
            }
        }

        // The merge (and rescoring) is small: a second team only pays off for many queries.
        const bool par_merge = (int64_t)nq * kk * (compact ? d : 16) >= (1 << 16);
#pragma omp parallel for num_threads(T) schedule(static) if (par_merge)
        for (int qi = 0; qi < nq; ++qi) {
            Cand* buf = merge.data() + (size_t)thread_id() * T * kk;
            int cnt = 0;
            for (int t = 0; t < T; ++t) {
                const size_t hq = (size_t)t * qc + qi;
                for (int e = 0; e < hsize[hq]; ++e) buf[cnt++] = {hs[hq * kk + e], hid[hq * kk + e]};
            }
            const int keep = std::min(cnt, kk);
            std::partial_sort(buf, buf + keep, buf + cnt, better);
            if (compact) {
                float* qp = qpad.data() + (size_t)thread_id() * L.dpad;
                std::memcpy(qp, qchunk + (int64_t)qi * d, sizeof(float) * d);
                for (int e = 0; e < keep; ++e) buf[e].s = (float)rescore(L, a.data, a.xscale, res, qp, buf[e].id);
                std::sort(buf, buf + keep, better);
            }
            float* srow = os + (c0 + qi) * k;
            int64_t* irow = oi + (c0 + qi) * k;
            for (int e = 0; e < k; ++e) {
                // Fewer than k candidates only when scores overflowed to NaN: report them as missing.
                srow[e] = e < keep ? buf[e].s : -std::numeric_limits<float>::infinity();
                irow[e] = e < keep ? buf[e].id : -1;
            }
        }
    }
    }  // GIL re-acquired before the result tuple is built
    return py::make_tuple(out_s, out_i);
}

static std::string isa_name() { return kIsas[std::min(g_isa.load(), kNumIsas - 1)].name; }

static void set_isa(const std::string& name) {
    for (int i = 0; i < kNumIsas; ++i)
        if (name == kIsas[i].name) {
            require(i <= kBestIsa, "ISA '" + name + "' is not supported by this CPU (best: " + kIsas[kBestIsa].name + ")");
            g_isa.store(i);
            return;
        }
    if (name == "best") {
        g_isa.store(kBestIsa);
        return;
    }
    throw py::value_error("unknown ISA '" + name + "'");
}

static py::list available_isas() {
    py::list l;
    for (int i = 0; i <= kBestIsa && i < kNumIsas; ++i) l.append(kIsas[i].name);
    return l;
}

PYBIND11_MODULE(_topk, m) {
    m.doc() = "Exact top-k retrieval kernels for uae_fast (panel storage, blocked scoring, per-thread heaps)";
    m.def("max_threads", &max_threads, "Threads the search kernels use by default (OpenMP), 1 without OpenMP");
    m.def("isa", &isa_name, "Name of the kernel set in use (generic, avx2, avx512, avx512_bf16_vnni)");
    m.def("set_isa", &set_isa, py::arg("name"), "Force a kernel set at or below the CPU's best ('best' restores it); for tests");
    m.def("available_isas", &available_isas, "Kernel sets this CPU can run");
    m.def("panel_rows", []() { return (int)kPanel; });
    m.attr("max_dim") = kMaxDim;
    m.attr("max_dim_int8") = kMaxDimI8;
    m.def("layout", [](int dtype, int d) {
        const Layout L(dtype, d);
        return py::make_tuple(L.dpad, L.panel_bytes);
    }, py::arg("dtype"), py::arg("dim"), "(padded dim, bytes per 16-row panel)");
    m.def("pack", &pack_rows, py::arg("dtype"), py::arg("x"), py::arg("data"), py::arg("scales"), py::arg("rowsums"),
          py::arg("row0"), py::arg("resid") = py::none(), py::arg("rscales") = py::none(), py::arg("threads") = 0,
          "Write float32 rows x into the panel storage starting at row row0 (int8: optionally the residual codes; "
          "threads: 0 = OpenMP's default)");
    m.def("unpack", &unpack_rows, py::arg("dtype"), py::arg("dim"), py::arg("data"), py::arg("scales"), py::arg("rowsums"),
          py::arg("n"), py::arg("resid") = py::none(), py::arg("rscales") = py::none(),
          "Rows [0, n) as float32 (dequantised)");
    m.def("search", &search, py::arg("dtype"), py::arg("dim"), py::arg("data"), py::arg("scales"), py::arg("rowsums"),
          py::arg("n"), py::arg("queries"), py::arg("k"), py::arg("candidates"), py::arg("threads"),
          py::arg("rescore") = true, py::arg("resid") = py::none(), py::arg("rscales") = py::none(),
          py::arg("force_threads") = false,
          "Top-k by inner product: (scores float32 [Q, k], row positions int64 [Q, k]); higher score first, "
          "ties by lower position. Compact dtypes keep `candidates` by the kernel score and rescore them "
          "exactly unless rescore=False (then: raw kernel scores, for tests). Small searches use fewer than "
          "`threads` unless force_threads (tests of the multi-thread merge)");
}
