// Shared definitions for the exact top-k kernels: storage layout, scan arguments, the bounded heap.
//
// Storage layout ("panels"): rows are stored in panels of 16. Inside a panel the reduction dimension
// is outermost, in groups of G consecutive dims (G = 1 float32, 2 bfloat16, 4 int8):
//     element (row r, dim j) of panel p = r / 16 lives at
//     p * 16 * dpad  +  (j / G) * 16 * G  +  (r % 16) * G  +  j % G          (in storage elements)
// so one 64-byte load holds group g of 16 rows. The kernels broadcast one query group and FMA (or
// dot-product instruction: VDPBF16PS for bf16 pairs, VPDPBUSD for int8 quads) it against 16 rows at
// once: no horizontal reductions, one sequential stream per panel, the same layout for every ISA (so
// an index file written on one CPU loads on any other). dpad = d rounded up to G; pad dims and pad
// rows are zero.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace uae {

constexpr int kPanel = 16;  // rows per panel

enum DType : int { kF32 = 0, kBF16 = 1, kI8 = 2 };

inline int group_of(int dtype) { return dtype == kF32 ? 1 : (dtype == kBF16 ? 2 : 4); }
inline int esize_of(int dtype) { return dtype == kF32 ? 4 : (dtype == kBF16 ? 2 : 1); }

// Everything one thread's scan needs. Queries are packed per tile of qm_max queries as
// [group][query] 32-bit words (a float, a bf16 pair, or four u8 = int8 + 128).
struct ScanArgs {
    int dtype;
    int ng;              // groups along d = dpad / G
    int64_t pstride;     // storage elements per panel = 16 * dpad
    const void* data;    // panels
    const float* xscale; // int8: per-row scale (padded to whole panels)
    const int32_t* rowsum;  // int8: per-row sum of the int8 values (for the +128 query offset)
    int64_t n;           // valid rows
    int nq;              // queries in this chunk
    const uint32_t* qpack;
    const float* qscale; // int8: per-query scale
    int64_t block_panels;  // panels per L2 block
    // bfloat16 with many queries: widen each block to float32 panels in a per-thread scratch (L2) and
    // run the float32 kernel on it. VDPBF16PS runs at half the float32 FMA rate on current Xeons, so
    // this keeps bf16's halved memory traffic at float32's compute rate. Queries are packed as float32
    // words holding their bf16-rounded values (the one-tile path's operands: same candidates either way).
    bool widen_bf16;
};

// Per-thread bounded heaps, one per query of the chunk; root = current worst kept entry.
// Order: higher score is better; equal scores: lower position is better (earlier-added first).
struct Heaps {
    float* s;
    int64_t* id;
    int* size;
    float* thr;  // root score when full, -inf before: the cheap filter the scan compares against
    int cap;
};

inline bool worse(float s1, int64_t i1, float s2, int64_t i2) {
    return s1 < s2 || (s1 == s2 && i1 > i2);
}

// Out of line on purpose: called for the few scores that beat the threshold, never in the FMA loop.
__attribute__((noinline)) inline void heap_push(Heaps& h, int q, float v, int64_t pos) {
    float* s = h.s + (int64_t)q * h.cap;
    int64_t* id = h.id + (int64_t)q * h.cap;
    int n = h.size[q];
    const int cap = h.cap;
    if (n < cap) {
        int c = n;
        while (c > 0) {
            int p = (c - 1) >> 1;
            if (!worse(v, pos, s[p], id[p])) break;
            s[c] = s[p];
            id[c] = id[p];
            c = p;
        }
        s[c] = v;
        id[c] = pos;
        h.size[q] = ++n;
        if (n == cap) h.thr[q] = s[0];
        return;
    }
    if (!worse(s[0], id[0], v, pos)) return;  // not better than the current worst
    int c = 0;
    for (;;) {
        int l = 2 * c + 1;
        if (l >= cap) break;
        int r = l + 1;
        int w = (r < cap && worse(s[r], id[r], s[l], id[l])) ? r : l;
        if (!worse(s[w], id[w], v, pos)) break;
        s[c] = s[w];
        id[c] = id[w];
        c = w;
    }
    s[c] = v;
    id[c] = pos;
    h.thr[q] = s[0];
}

inline float f32_from_bits(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

inline uint32_t bits_from_f32(float f) {
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}

// Round-to-nearest-even float32 -> bfloat16 (inputs are finite: the Python layer rejects NaN/inf).
inline uint16_t bf16_from_f32(float f) {
    uint32_t b = bits_from_f32(f);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}

}  // namespace uae
