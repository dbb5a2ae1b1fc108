/*
 * Helpers shared by the CPU decode kernels (decode.c: one operation per call; decoder.c: the
 * whole decoder stack per call). Float32 throughout; every function here is single-threaded,
 * the callers split work over OpenMP threads.
 */
#ifndef MOERAY_KERNELS_COMMON_H
#define MOERAY_KERNELS_COMMON_H

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <math.h>
#include <stdlib.h>

#define ROWS_PER_BLOCK 8

/*
 * One SIMD vector of floats, the width the kernels are written in. They are memory-bound, so
 * the width buys nothing but the rate at which loads stream, and on AMD Zen 4 (which runs a
 * 512-bit load as two halves) 256-bit loads stream faster: 5-10% on a weight GEMV here. So the
 * default is 256 bits wherever AVX2 and FMA exist (with AVX-512VL the compiler still has 32
 * registers for them); -DMOERAY_VECTOR_BITS=512 selects 512-bit vectors, and a machine without
 * AVX2 gets one float per "vector", which the compiler vectorises as it can.
 */
#ifndef MOERAY_VECTOR_BITS
#define MOERAY_VECTOR_BITS 256
#endif
#if MOERAY_VECTOR_BITS == 512 && defined(__AVX512F__)
typedef __m512 vec;
#define VEC 16
#define vec_load _mm512_loadu_ps
#define vec_store _mm512_storeu_ps
#define vec_fmadd _mm512_fmadd_ps /* a * b + c */
#define vec_mul _mm512_mul_ps
#define vec_add _mm512_add_ps
#define vec_set1 _mm512_set1_ps
#define vec_zero _mm512_setzero_ps
#define vec_sum _mm512_reduce_add_ps
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define VEC 8
#define vec_load _mm256_loadu_ps
#define vec_store _mm256_storeu_ps
#define vec_fmadd _mm256_fmadd_ps
#define vec_mul _mm256_mul_ps
#define vec_add _mm256_add_ps
#define vec_set1 _mm256_set1_ps
#define vec_zero _mm256_setzero_ps
static inline float vec_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
typedef float vec;
#define VEC 1
static inline vec vec_load(const float* p) { return *p; }
static inline void vec_store(float* p, vec v) { *p = v; }
static inline vec vec_fmadd(vec a, vec b, vec c) { return a * b + c; }
static inline vec vec_mul(vec a, vec b) { return a * b; }
static inline vec vec_add(vec a, vec b) { return a + b; }
static inline vec vec_set1(float a) { return a; }
static inline vec vec_zero(void) { return 0.0f; }
static inline float vec_sum(vec v) { return v; }
#endif
#define STRIPE (16 * VEC) /* outputs kept in 16 vector registers by the column-wise kernels */

static inline float dot(const float* w, const float* x, long cols) {
    /* Four accumulators: one would chain every FMA on the previous one's latency. */
    vec a0 = vec_zero(), a1 = a0, a2 = a0, a3 = a0;
    long k = 0;
    for (; k + 4 * VEC <= cols; k += 4 * VEC) {
        a0 = vec_fmadd(vec_load(w + k), vec_load(x + k), a0);
        a1 = vec_fmadd(vec_load(w + k + VEC), vec_load(x + k + VEC), a1);
        a2 = vec_fmadd(vec_load(w + k + 2 * VEC), vec_load(x + k + 2 * VEC), a2);
        a3 = vec_fmadd(vec_load(w + k + 3 * VEC), vec_load(x + k + 3 * VEC), a3);
    }
    vec acc = vec_add(vec_add(a0, a1), vec_add(a2, a3));
    for (; k + VEC <= cols; k += VEC) acc = vec_fmadd(vec_load(w + k), vec_load(x + k), acc);
    float s = vec_sum(acc);
    for (; k < cols; k++) s += w[k] * x[k];
    return s;
}

/* out[i] = w[i][0, cols) . x for 8 rows at once, so every x load feeds 8 FMAs: for rows that
 * sit in cache against a streamed x (several heads' queries against one cached key). */
static inline void dot8(const float* const w[ROWS_PER_BLOCK], const float* x, long cols, float* out) {
    vec a0 = vec_zero(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    long k = 0;
    for (; k + VEC <= cols; k += VEC) {
        vec xv = vec_load(x + k);
        a0 = vec_fmadd(vec_load(w[0] + k), xv, a0);
        a1 = vec_fmadd(vec_load(w[1] + k), xv, a1);
        a2 = vec_fmadd(vec_load(w[2] + k), xv, a2);
        a3 = vec_fmadd(vec_load(w[3] + k), xv, a3);
        a4 = vec_fmadd(vec_load(w[4] + k), xv, a4);
        a5 = vec_fmadd(vec_load(w[5] + k), xv, a5);
        a6 = vec_fmadd(vec_load(w[6] + k), xv, a6);
        a7 = vec_fmadd(vec_load(w[7] + k), xv, a7);
    }
    vec acc[ROWS_PER_BLOCK] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int i = 0; i < ROWS_PER_BLOCK; i++) {
        float s = vec_sum(acc[i]);
        for (long kk = k; kk < cols; kk++) s += w[i][kk] * x[kk];
        out[i] = s;
    }
}

/*
 * y[r] = W[r, :] . x for rows [row_begin, row_end), one row after another, so a thread reads its
 * rows as one sequential stream. Reading 8 rows side by side (one x load per 8 FMAs) was 10%
 * slower per decode step here: the hardware prefetcher and the DRAM pages serve one stream per
 * core best, and x is in L1 anyway.
 */
static inline void gemv_rows(const float* W, long ldw, const float* x, long cols, float* y, long row_begin, long row_end) {
    for (long r = row_begin; r < row_end; r++) y[r] = dot(W + r * ldw, x, cols);
}

/*
 * Column-major weights (W^T stored row-major as [cols, rows], row stride ldw): y[c] for c in
 * [col_begin, col_end) accumulates x[i] * WT[i, c] over i, STRIPE outputs at a time in
 * registers. Used per head (kv_b's narrow slices) by the batched product.
 */
static inline void gemv_cols(const float* WT, long ldw, const float* x, long inner, float* y, long col_begin, long col_end) {
    long c = col_begin;
    for (; c + STRIPE <= col_end; c += STRIPE) {
        vec acc[16];
        for (int j = 0; j < 16; j++) acc[j] = vec_zero();
        for (long i = 0; i < inner; i++) {
            vec xi = vec_set1(x[i]);
            const float* row = WT + i * ldw + c;
            for (int j = 0; j < 16; j++) acc[j] = vec_fmadd(xi, vec_load(row + VEC * j), acc[j]);
        }
        for (int j = 0; j < 16; j++) vec_store(y + c + VEC * j, acc[j]);
    }
    /* Narrower matrices (a head's 64 value rows of kv_b_proj) still go a vector at a time: a
     * scalar walk down a column would read one float per cache line. */
    for (; c + VEC <= col_end; c += VEC) {
        vec acc = vec_zero();
        for (long i = 0; i < inner; i++) acc = vec_fmadd(vec_set1(x[i]), vec_load(WT + i * ldw + c), acc);
        vec_store(y + c, acc);
    }
    for (; c < col_end; c++) {
        float s = 0.0f;
        for (long i = 0; i < inner; i++) s += x[i] * WT[i * ldw + c];
        y[c] = s;
    }
}

/*
 * y[0, width) += sum_{i in [begin, end)} x[i] * WT[i, 0, width): whole rows of W^T, one after
 * another, so the weights are one sequential stream (y stays in L1, a few KB). Four rows side by
 * side halved the traffic to y but cost 4% per decode step here, for the reason gemv_rows gives.
 */
static inline void axpy_rows(const float* WT, long ldw, const float* x, long begin, long end, float* y, long width) {
    for (long i = begin; i < end; i++) {
        const float* w = WT + i * ldw;
        const vec xi = vec_set1(x[i]);
        long c = 0;
        for (; c + VEC <= width; c += VEC) vec_store(y + c, vec_fmadd(xi, vec_load(w + c), vec_load(y + c)));
        for (; c < width; c++) y[c] += x[i] * w[c];
    }
}

/* dst[k] = sum_n coeff[n] * row_n[k] for k < width, row_n = base + (rows ? rows[n] : n) * stride.
 * Stripes of columns are summed in registers over all rows, so dst is written once. The rows
 * here are short (a 1 KB latent row, a head's 64 rows of W_uk) and read one after another; they
 * stream well only when a whole 256-float row is one stripe, which takes 16 zmm registers
 * (32 ymm accumulators do not fit beside the broadcast, and two passes of half rows ran at half
 * the rate), so this kernel uses 512-bit vectors wherever the CPU has them. */
static inline void weighted_row_sum(const float* coeff, const float* base, long stride, const long* rows, long count,
                                    long width, float* dst) {
    long c = 0;
#ifdef __AVX512F__
    for (; c + 256 <= width; c += 256) {
        __m512 acc[16];
        for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
        for (long n = 0; n < count; n++) {
            const float* row = base + (rows ? rows[n] : n) * stride + c;
            __m512 a = _mm512_set1_ps(coeff[n]);
            for (int j = 0; j < 16; j++) acc[j] = _mm512_fmadd_ps(a, _mm512_loadu_ps(row + 16 * j), acc[j]);
        }
        for (int j = 0; j < 16; j++) _mm512_storeu_ps(dst + c + 16 * j, acc[j]);
    }
#endif
    for (; c + STRIPE <= width; c += STRIPE) {
        vec acc[16];
        for (int j = 0; j < 16; j++) acc[j] = vec_zero();
        for (long n = 0; n < count; n++) {
            const float* row = base + (rows ? rows[n] : n) * stride + c;
            vec a = vec_set1(coeff[n]);
            for (int j = 0; j < 16; j++) acc[j] = vec_fmadd(a, vec_load(row + VEC * j), acc[j]);
        }
        for (int j = 0; j < 16; j++) vec_store(dst + c + VEC * j, acc[j]);
    }
    for (long k = c; k < width; k++) dst[k] = 0.0f;
    for (long n = 0; n < count && c < width; n++) {
        const float a = coeff[n], *row = base + (rows ? rows[n] : n) * stride;
        #pragma omp simd
        for (long k = c; k < width; k++) dst[k] += a * row[k];
    }
}

/*
 * The absorbed MLA decode of one head for one query over its n cached keys (rows keys[s] of
 * cache [slots, r + dr]), in three steps:
 *   mla_query_latent:  q_lat = W_uk^T q_nope                                       [r]
 *   mla_attend_latent: p = softmax(scale * (q_lat . latent_s + q_pe . k_pe_s)); o_lat = sum_s p_s latent_s
 *   mla_value_out:     out = W_uv o_lat                                            [dv]
 * w_uk: the head's dn rows of kv_b (row-major [dn, r]), followed by its dv rows of W_uv. The first
 * and last stream weights, the middle one only reads the (cache-resident) keys, so a caller
 * running many heads can keep the memory busy by running each step for all heads in turn.
 */
static inline void mla_query_latent(const float* q_nope, const float* w_uk, long dn, long r, float* q_lat) {
    weighted_row_sum(q_nope, w_uk, r, NULL, dn, r, q_lat);
}

static inline void mla_attend_latent(const float* q_lat, const float* q_pe, const float* cache, const long* keys,
                                     long n, long dr, long r, float scale, float* probs, float* o_lat) {
    float top = -INFINITY;
    for (long s = 0; s < n; s++) {
        const float* key = cache + keys[s] * (r + dr);
        probs[s] = (dot(key, q_lat, r) + dot(key + r, q_pe, dr)) * scale;
        top = probs[s] > top ? probs[s] : top;
    }
    float total = 0.0f;
    for (long s = 0; s < n; s++) total += (probs[s] = expf(probs[s] - top));
    for (long s = 0; s < n; s++) probs[s] /= total;
    weighted_row_sum(probs, cache, r + dr, keys, n, r, o_lat);
}

static inline void mla_value_out(const float* w_uk, const float* o_lat, long dn, long dv, long r, float* out) {
    const float* w_uv = w_uk + dn * r;
    for (long j = 0; j < dv; j++) out[j] = dot(w_uv + j * r, o_lat, r);
}

/* All three steps for one head; q_lat, o_lat [r] and probs [n] are the caller's scratch. */
static inline void mla_head(const float* q_nope, const float* q_pe, const float* w_uk, const float* cache,
                            const long* keys, long n, float* out, long dn, long dr, long dv, long r, float scale,
                            float* q_lat, float* o_lat, float* probs) {
    mla_query_latent(q_nope, w_uk, dn, r, q_lat);
    mla_attend_latent(q_lat, q_pe, cache, keys, n, dr, r, scale, probs, o_lat);
    mla_value_out(w_uk, o_lat, dn, dv, r, out);
}

#define INNER_SLICES 8

/* A weight matrix W [rows, cols] as the kernels read it. Row-major: W[r, k] = w[r * ld + k]
 * (Hugging Face [out, in] layout); column-major: W[r, k] = w[k * ld + r], i.e. W^T row-major. */
typedef struct {
    const float* w;
    long rows, cols, ld, column_major;
} Matrix;

/*
 * Y[m, :] = W X[m, :] for m < M, computed by all threads of the enclosing parallel region (an
 * orphaned worksharing loop; it ends with a barrier). Row-major W: blocks of output rows per
 * thread, each streaming its own rows. Column-major W: the inner dimension is cut into
 * INNER_SLICES fixed slices, each streamed front to back into its partial sum (`partial`: scratch
 * of INNER_SLICES * M * rows floats), then the partials are added in slice order. Either way
 * every output has one fixed summation order, whatever the thread count.
 */
static inline void par_gemv(const Matrix* W, const float* X, long ldx, float* Y, long ldy, long M, float* partial) {
    const long rows = W->rows, cols = W->cols;
    if (!W->column_major) {
        long blocks = (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
        #pragma omp for schedule(static)
        for (long b = 0; b < blocks; b++) {
            long begin = b * ROWS_PER_BLOCK, end = begin + ROWS_PER_BLOCK < rows ? begin + ROWS_PER_BLOCK : rows;
            for (long m = 0; m < M; m++) gemv_rows(W->w, W->ld, X + m * ldx, cols, Y + m * ldy, begin, end);
        }
        return;
    }
    long slice = ((cols + INNER_SLICES - 1) / INNER_SLICES + 3) / 4 * 4;
    long slices = (cols + slice - 1) / slice;
    long stripes = (rows + 255) / 256;
    #pragma omp for schedule(static)
    for (long j = 0; j < slices; j++) {
        long begin = j * slice, end = begin + slice < cols ? begin + slice : cols;
        for (long m = 0; m < M; m++) {
            float* part = partial + (j * M + m) * rows;
            for (long r = 0; r < rows; r++) part[r] = 0.0f;
            axpy_rows(W->w, W->ld, X + m * ldx, begin, end, part, rows);
        }
    }
    #pragma omp for schedule(static)
    for (long stripe = 0; stripe < stripes; stripe++) {
        long begin = stripe * 256, end = begin + 256 < rows ? begin + 256 : rows;
        for (long m = 0; m < M; m++) {
            float* y = Y + m * ldy;
            for (long r = begin; r < end; r++) y[r] = partial[m * rows + r];
            for (long j = 1; j < slices; j++) {
                const float* part = partial + (j * M + m) * rows;
                #pragma omp simd
                for (long r = begin; r < end; r++) y[r] += part[r];
            }
        }
    }
}

#endif
