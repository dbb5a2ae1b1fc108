/*
 * Products with packed panels (the layout is in decoder.h): Y[t, rows of panel p] = W X[t] for a
 * tile of tokens at once, so each weight loaded feeds every token of the tile. At batch 1 a
 * panel is one sequential stream (the weight-bound case); at 64 tokens the tile keeps up to 24
 * vector accumulators busy (the compute-bound case). Every output is one accumulation over the
 * inputs in order (float32: one fused multiply-add per input; bfloat16: one pair-product per two
 * inputs), whatever the tile, the batch or the thread: so a token's result never depends on
 * which other tokens share its step, nor on the thread count.
 */
#ifndef MOERAY_PANELS_H
#define MOERAY_PANELS_H

#include <stdint.h>
#include <string.h>

#include "common.h"
#include "decoder.h"

#define LANES 32                       /* rows per panel */
#define PANEL_VECS (LANES / VEC)       /* vectors per panel row */
#define TILE_F32 (PANEL_VECS >= 24 ? 1 : 24 / PANEL_VECS)  /* tokens per float32 tile: 24 accumulators */
#define TILE_MAX 12

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even (as torch does) */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline long panel_count(const Panels* W) { return (W->rows + LANES - 1) / LANES; }

/* out[t][j] = sum_k panel[k][j] * xs[t][k] for t < T (a compile-time constant where inlined). */
static inline __attribute__((always_inline)) void tile_f32(const float* panel, long K, const float* const* xs,
                                                           const int T, float out[][LANES]) {
    vec acc[TILE_F32][PANEL_VECS];
    for (int t = 0; t < T; t++)
        for (int v = 0; v < PANEL_VECS; v++) acc[t][v] = vec_zero();
    for (long k = 0; k < K; k++) {
        const float* w = panel + k * LANES;
        vec wv[PANEL_VECS];
        for (int v = 0; v < PANEL_VECS; v++) wv[v] = vec_load(w + v * VEC);
        for (int t = 0; t < T; t++) {
            const vec x = vec_set1(xs[t][k]);
            for (int v = 0; v < PANEL_VECS; v++) acc[t][v] = vec_fmadd(wv[v], x, acc[t][v]);
        }
    }
    for (int t = 0; t < T; t++)
        for (int v = 0; v < PANEL_VECS; v++) vec_store(out[t] + v * VEC, acc[t][v]);
}

static void tile_f32_any(const float* panel, long K, const float* const* xs, long T, float out[][LANES]) {
    switch (T) {  /* one specialised loop nest per tile width: the accumulators stay in registers */
#define TILE_CASE(n) case n: tile_f32(panel, K, xs, n, out); break;
        TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
#if TILE_F32 > 6
        TILE_CASE(7) TILE_CASE(8) TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12)
#endif
#undef TILE_CASE
        default: break;
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAS_BF16_DOT 1
#define TILE_BF16 6
/* out[t][j] = sum over input pairs of panel[k2][j][0..1] . xb[t][2 k2 .. 2 k2 + 1] (vdpbf16ps), the
 * even and odd pairs in two accumulators added at the end: twice the independent chains of
 * a single one, which a batch-1 product needs to keep the loads streaming. */
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t* panel, long K2, const uint16_t* const* xb,
                                                            const int T, float out[][LANES]) {
    __m512 even[TILE_BF16][2], odd[TILE_BF16][2];
    for (int t = 0; t < T; t++) even[t][0] = even[t][1] = odd[t][0] = odd[t][1] = _mm512_setzero_ps();
    long k = 0;
    for (; k + 2 <= K2; k += 2) {
        const __m512i w0 = _mm512_loadu_si512((const void*)(panel + k * 64));
        const __m512i w1 = _mm512_loadu_si512((const void*)(panel + k * 64 + 32));
        const __m512i w2 = _mm512_loadu_si512((const void*)(panel + k * 64 + 64));
        const __m512i w3 = _mm512_loadu_si512((const void*)(panel + k * 64 + 96));
        for (int t = 0; t < T; t++) {
            int32_t pairs[2];
            memcpy(pairs, xb[t] + 2 * k, 8);
            const __m512i x0 = _mm512_set1_epi32(pairs[0]), x1 = _mm512_set1_epi32(pairs[1]);
            even[t][0] = _mm512_dpbf16_ps(even[t][0], (__m512bh)w0, (__m512bh)x0);
            even[t][1] = _mm512_dpbf16_ps(even[t][1], (__m512bh)w1, (__m512bh)x0);
            odd[t][0] = _mm512_dpbf16_ps(odd[t][0], (__m512bh)w2, (__m512bh)x1);
            odd[t][1] = _mm512_dpbf16_ps(odd[t][1], (__m512bh)w3, (__m512bh)x1);
        }
    }
    for (; k < K2; k++) {
        const __m512i w0 = _mm512_loadu_si512((const void*)(panel + k * 64));
        const __m512i w1 = _mm512_loadu_si512((const void*)(panel + k * 64 + 32));
        for (int t = 0; t < T; t++) {
            int32_t pair;
            memcpy(&pair, xb[t] + 2 * k, 4);
            const __m512i x = _mm512_set1_epi32(pair);
            even[t][0] = _mm512_dpbf16_ps(even[t][0], (__m512bh)w0, (__m512bh)x);
            even[t][1] = _mm512_dpbf16_ps(even[t][1], (__m512bh)w1, (__m512bh)x);
        }
    }
    for (int t = 0; t < T; t++) {
        _mm512_storeu_ps(out[t], _mm512_add_ps(even[t][0], odd[t][0]));
        _mm512_storeu_ps(out[t] + 16, _mm512_add_ps(even[t][1], odd[t][1]));
    }
}
#else
#define HAS_BF16_DOT 0
#define TILE_BF16 4
/* The portable form: widen each weight to float32 and multiply-add the float32 inputs in order. */
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t* panel, long K2, const float* const* xs,
                                                            const int T, float out[][LANES]) {
    float acc[TILE_BF16][LANES];
    for (int t = 0; t < T; t++)
        for (int j = 0; j < LANES; j++) acc[t][j] = 0.0f;
    for (long k = 0; k < K2; k++) {
        float even[LANES], odd[LANES];
        for (int j = 0; j < LANES; j++) {
            even[j] = bf16_to_f32(panel[k * 64 + 2 * j]);
            odd[j] = bf16_to_f32(panel[k * 64 + 2 * j + 1]);
        }
        for (int t = 0; t < T; t++) {
            const float x0 = xs[t][2 * k], x1 = xs[t][2 * k + 1];
            for (int j = 0; j < LANES; j++) acc[t][j] = acc[t][j] + even[j] * x0 + odd[j] * x1;
        }
    }
    for (int t = 0; t < T; t++) memcpy(out[t], acc[t], sizeof(float) * LANES);
}
#endif

/* Scratch one thread needs for `panel_product`: the inputs of a product in bfloat16 (or padded
 * float32), converted once per product and reused for all the panels the thread computes. The
 * key says which inputs `inputs` holds; `valid` is cleared before each product, since the same
 * buffers hold new values from one product to the next. */
typedef struct {
    void* inputs;
    long capacity;  /* inputs per token */
    const float* key_x;
    const long* key_index;
    long key_ldx, key_count, key_cols, valid;
} TileScratch;

static inline void new_product(TileScratch* scratch) { scratch->valid = 0; }

/* The T input rows X(t), converted for the bfloat16 kernels into scratch->inputs [T, capacity]. */
static void convert_inputs(TileScratch* s, long T, const float* X, long ldx, const long* x_index, long K) {
    if (s->valid && s->key_x == X && s->key_index == x_index && s->key_ldx == ldx && s->key_count == T &&
        s->key_cols == K)
        return;
    for (long t = 0; t < T; t++) {
        const float* src = X + (x_index ? x_index[t] : t) * ldx;
#if HAS_BF16_DOT
        uint16_t* dst = (uint16_t*)s->inputs + t * s->capacity;
        long k = 0;
        for (; k + 32 <= K; k += 32) {  /* round to nearest even, 32 at a time */
            const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16), _mm512_loadu_ps(src + k));
            _mm512_storeu_si512((void*)(dst + k), (__m512i)pair);
        }
        for (; k < K; k++) dst[k] = f32_to_bf16(src[k]);
        if (K % 2) dst[K] = 0;
#else
        float* dst = (float*)s->inputs + t * s->capacity;  /* an odd input count reads one zero past the end */
        memcpy(dst, src, sizeof(float) * K);
        dst[K] = 0.0f;
#endif
    }
    s->key_x = X, s->key_index = x_index, s->key_ldx = ldx, s->key_count = T, s->key_cols = K, s->valid = 1;
}

/*
 * Panel p of matrix m of W for T tokens: Y(t)[p * 32 + j] = (W_m X(t))[p * 32 + j] for the panel's
 * real rows, where X(t) = X + (x_index ? x_index[t] : t) * ldx and Y(t) likewise with y_index.
 */
static void panel_product(const Panels* W, long m, long p, long T, const float* X, long ldx, const long* x_index,
                          float* Y, long ldy, const long* y_index, TileScratch* scratch) {
    const long K = W->cols, row0 = p * LANES;
    const long valid = W->rows - row0 < LANES ? W->rows - row0 : LANES;
    float out[TILE_MAX][LANES];
    const long tile = W->bf16 ? TILE_BF16 : TILE_F32;
    for (long t0 = 0; t0 < T; t0 += tile) {
        const long n = T - t0 < tile ? T - t0 : tile;
        const float* xs[TILE_MAX];
        for (long t = 0; t < n; t++) xs[t] = X + (x_index ? x_index[t0 + t] : t0 + t) * ldx;
        if (W->bf16) {
            const long K2 = (K + 1) / 2;
            const uint16_t* panel = (const uint16_t*)W->data + m * W->matrix_stride + p * W->panel_stride;
            convert_inputs(scratch, T, X, ldx, x_index, K);
#if HAS_BF16_DOT
            const uint16_t* xb[TILE_MAX];
            for (long t = 0; t < n; t++) xb[t] = (const uint16_t*)scratch->inputs + (t0 + t) * scratch->capacity;
            switch (n) {
#define TILE_CASE(c) case c: tile_bf16(panel, K2, xb, c, out); break;
                TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
#undef TILE_CASE
                default: break;
            }
#else
            const float* padded[TILE_MAX];
            for (long t = 0; t < n; t++) padded[t] = (const float*)scratch->inputs + (t0 + t) * scratch->capacity;
            switch (n) {
#define TILE_CASE(c) case c: tile_bf16(panel, K2, padded, c, out); break;
                TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4)
#undef TILE_CASE
                default: break;
            }
#endif
        } else {
            tile_f32_any((const float*)W->data + m * W->matrix_stride + p * W->panel_stride, K, xs, n, out);
        }
        for (long t = 0; t < n; t++) {
            float* y = Y + (y_index ? y_index[t0 + t] : t0 + t) * ldy + row0;
            memcpy(y, out[t], sizeof(float) * valid);
        }
    }
}

/* Y [T, rows] = X [T, cols] W^T, shared over the threads of the enclosing parallel region by
 * panels (an orphaned worksharing loop ending in a barrier). */
static void par_panels(const Panels* W, long T, const float* X, long ldx, float* Y, long ldy, TileScratch* scratch) {
    const long panels = panel_count(W);
    new_product(scratch);
    #pragma omp for schedule(static)
    for (long p = 0; p < panels; p++) panel_product(W, 0, p, T, X, ldx, NULL, Y, ldy, NULL, scratch);
}

#endif
