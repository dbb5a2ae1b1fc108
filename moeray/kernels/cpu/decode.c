/*
 * CPU kernels for small-batch decode: matrix-vector products that stream weights at close to
 * the memory bandwidth. At batch 1 a decode step is weight-bound (each weight is read once and
 * used for one multiply-add), and the generic GEMM behind torch.nn.functional.linear reaches
 * only about half the bandwidth for M = 1.
 *
 * Layout: weights row-major [rows, cols] with row stride `ldw` (Hugging Face [out, in] layout),
 * float32. Threads come from the OpenMP runtime torch already loaded (same libgomp).
 */
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#define ROWS_PER_BLOCK 8

#ifdef __AVX512F__
static inline float dot(const float* w, const float* x, long cols) {
    /* Four accumulators: one would chain every FMA on the previous one's latency. */
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long k = 0;
    for (; k + 64 <= cols; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    __m512 acc = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    for (; k + 16 <= cols; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), acc);
    float s = _mm512_reduce_add_ps(acc);
    for (; k < cols; k++) s += w[k] * x[k];
    return s;
}

/* y[r] = W[r, :] . x for rows [row_begin, row_end); 8 rows per pass so every x load feeds 8 FMAs. */
static void gemv_rows(const float* W, long ldw, const float* x, long cols, float* y, long row_begin, long row_end) {
    long r = row_begin;
    for (; r + ROWS_PER_BLOCK <= row_end; r += ROWS_PER_BLOCK) {
        const float* w = W + r * ldw;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        long k = 0;
        for (; k + 16 <= cols; k += 16) {
            __m512 xv = _mm512_loadu_ps(x + k);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 0 * ldw + k), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 1 * ldw + k), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 2 * ldw + k), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 3 * ldw + k), xv, a3);
            a4 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 4 * ldw + k), xv, a4);
            a5 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 5 * ldw + k), xv, a5);
            a6 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 6 * ldw + k), xv, a6);
            a7 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 7 * ldw + k), xv, a7);
        }
        __m512 acc[ROWS_PER_BLOCK] = {a0, a1, a2, a3, a4, a5, a6, a7};
        for (int i = 0; i < ROWS_PER_BLOCK; i++) {
            float s = _mm512_reduce_add_ps(acc[i]);
            for (long kk = k; kk < cols; kk++) s += w[i * ldw + kk] * x[kk];
            y[r + i] = s;
        }
    }
    for (; r < row_end; r++) y[r] = dot(W + r * ldw, x, cols);
}

/*
 * Column-major weights (W^T stored row-major as [cols, rows], row stride ldw): y[c] for c in
 * [col_begin, col_end) accumulates x[i] * WT[i, c] over i, 256 outputs at a time in registers.
 * Used per head (kv_b's narrow slices) by the batched product.
 */
static void gemv_cols(const float* WT, long ldw, const float* x, long inner, float* y, long col_begin, long col_end) {
    long c = col_begin;
    for (; c + 256 <= col_end; c += 256) {
        __m512 acc[16];
        for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
        for (long i = 0; i < inner; i++) {
            __m512 xi = _mm512_set1_ps(x[i]);
            const float* row = WT + i * ldw + c;
            for (int j = 0; j < 16; j++) acc[j] = _mm512_fmadd_ps(xi, _mm512_loadu_ps(row + 16 * j), acc[j]);
        }
        for (int j = 0; j < 16; j++) _mm512_storeu_ps(y + c + 16 * j, acc[j]);
    }
    /* Narrower matrices (a head's 64 value rows of kv_b_proj) still go 16 columns at a time: a
     * scalar walk down a column would read one float per cache line. */
    for (; c + 16 <= col_end; c += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (long i = 0; i < inner; i++) acc = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), _mm512_loadu_ps(WT + i * ldw + c), acc);
        _mm512_storeu_ps(y + c, acc);
    }
    for (; c < col_end; c++) {
        float s = 0.0f;
        for (long i = 0; i < inner; i++) s += x[i] * WT[i * ldw + c];
        y[c] = s;
    }
}

/*
 * y[0, width) += sum_{i in [begin, end)} x[i] * WT[i, 0, width): whole rows of W^T, front to back,
 * four at a time. Reading the rows contiguously is what lets the hardware prefetcher stream
 * them; stripes of a row (gemv_cols) restart it on every row. y stays in L1 (a few KB).
 */
static void axpy_rows(const float* WT, long ldw, const float* x, long begin, long end, float* y, long width) {
    long i = begin;
    for (; i + 4 <= end; i += 4) {
        const float *w0 = WT + i * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        const __m512 x0 = _mm512_set1_ps(x[i]), x1 = _mm512_set1_ps(x[i + 1]);
        const __m512 x2 = _mm512_set1_ps(x[i + 2]), x3 = _mm512_set1_ps(x[i + 3]);
        long c = 0;
        for (; c + 16 <= width; c += 16) {
            __m512 a = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w0 + c), _mm512_loadu_ps(y + c));
            __m512 b = _mm512_mul_ps(x1, _mm512_loadu_ps(w1 + c));
            a = _mm512_fmadd_ps(x2, _mm512_loadu_ps(w2 + c), a);
            b = _mm512_fmadd_ps(x3, _mm512_loadu_ps(w3 + c), b);
            _mm512_storeu_ps(y + c, _mm512_add_ps(a, b));
        }
        for (; c < width; c++) y[c] += x[i] * w0[c] + x[i + 1] * w1[c] + x[i + 2] * w2[c] + x[i + 3] * w3[c];
    }
    for (; i < end; i++) {
        const float* w = WT + i * ldw;
        const __m512 xi = _mm512_set1_ps(x[i]);
        long c = 0;
        for (; c + 16 <= width; c += 16) _mm512_storeu_ps(y + c, _mm512_fmadd_ps(xi, _mm512_loadu_ps(w + c), _mm512_loadu_ps(y + c)));
        for (; c < width; c++) y[c] += x[i] * w[c];
    }
}
#else
/* Portable path: the compiler vectorises the reduction for whatever -march=native offers. */
static void gemv_rows(const float* W, long ldw, const float* x, long cols, float* y, long row_begin, long row_end) {
    for (long r = row_begin; r < row_end; r++) {
        const float* w = W + r * ldw;
        float s = 0.0f;
        #pragma omp simd reduction(+ : s)
        for (long k = 0; k < cols; k++) s += w[k] * x[k];
        y[r] = s;
    }
}

static void gemv_cols(const float* WT, long ldw, const float* x, long inner, float* y, long col_begin, long col_end) {
    for (long c = col_begin; c < col_end; c++) y[c] = 0.0f;
    for (long i = 0; i < inner; i++) {
        const float* row = WT + i * ldw;
        #pragma omp simd
        for (long c = col_begin; c < col_end; c++) y[c] += x[i] * row[c];
    }
}

static void axpy_rows(const float* WT, long ldw, const float* x, long begin, long end, float* y, long width) {
    for (long i = begin; i < end; i++) {
        const float* row = WT + i * ldw;
        #pragma omp simd
        for (long c = 0; c < width; c++) y[c] += x[i] * row[c];
    }
}
#endif

#define INNER_SLICES 8

/*
 * Y[m, :] = W X[m, :] for m < M, W of shape [rows, cols]. Row-major W (column_major = 0): W[r, k]
 * at W[r * ldw + k]; output rows are split across threads in blocks, so each thread streams its
 * own part of W. Column-major W (column_major = 1): W[r, k] at W[k * ldw + r], i.e. W^T row-major;
 * the inner dimension is cut into INNER_SLICES fixed slices, each streamed front to back into a
 * partial sum, and the partials are added in slice order, so the result does not depend on the
 * thread count.
 */
void moeray_gemv(const float* W, long rows, long cols, long ldw, int column_major, const float* X, long ldx,
                 float* Y, long ldy, long M) {
    if (!column_major) {
        long blocks = (rows + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK;
        #pragma omp parallel for schedule(static)
        for (long b = 0; b < blocks; b++) {
            long begin = b * ROWS_PER_BLOCK, end = begin + ROWS_PER_BLOCK < rows ? begin + ROWS_PER_BLOCK : rows;
            for (long m = 0; m < M; m++) gemv_rows(W, ldw, X + m * ldx, cols, Y + m * ldy, begin, end);
        }
        return;
    }
    long slice = ((cols + INNER_SLICES - 1) / INNER_SLICES + 3) / 4 * 4;
    long slices = (cols + slice - 1) / slice;
    float* partial = calloc(slices * M * rows, sizeof(float));  /* [slices, M, rows] */
    long stripes = (rows + 255) / 256;
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (long j = 0; j < slices; j++) {
            long begin = j * slice, end = begin + slice < cols ? begin + slice : cols;
            for (long m = 0; m < M; m++) axpy_rows(W, ldw, X + m * ldx, begin, end, partial + (j * M + m) * rows, rows);
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
    free(partial);
}

/*
 * The same product for B independent matrices (one per attention head): Y[b, m, :] = W[b] X[b, m, :].
 * W[b] starts at W + b * w_batch; X[b, m] at X + b * x_batch + m * ldx; Y likewise. Work is split
 * over (matrix, row block) pairs so two threads share even a handful of heads.
 */
void moeray_gemv_batched(const float* W, long w_batch, long rows, long cols, long ldw, int column_major,
                         const float* X, long x_batch, long ldx, float* Y, long y_batch, long ldy, long M, long B) {
    long block = column_major ? 256 : ROWS_PER_BLOCK;
    long blocks = (rows + block - 1) / block;
    #pragma omp parallel for schedule(static)
    for (long job = 0; job < B * blocks; job++) {
        long b = job / blocks, begin = (job % blocks) * block;
        long end = begin + block < rows ? begin + block : rows;
        for (long m = 0; m < M; m++) {
            const float* x = X + b * x_batch + m * ldx;
            float* y = Y + b * y_batch + m * ldy;
            if (column_major) gemv_cols(W + b * w_batch, ldw, x, cols, y, begin, end);
            else gemv_rows(W + b * w_batch, ldw, x, cols, y, begin, end);
        }
    }
}

/*
 * Routed experts for a handful of (token, expert) pairs, in one call:
 *   out[t] += weight * down[e] (silu(gate[e] x_t) * up[e] x_t)
 * gate_up: [E, 2I, D] row-major (gate rows then up rows); down: [E, D, I] stored column-major,
 * i.e. as [E, I, D] in memory (see RoutedExperts). Pairs are spread over threads;
 * each writes its own scratch row, and the rows are summed per token afterwards in pair order,
 * so the result does not depend on the thread count.
 */
void moeray_moe_pairs(const float* X, long D, const long* token_of_pair, const long* expert_of_pair,
                      const float* weight_of_pair, long num_pairs, const float* gate_up, const float* down, long I,
                      float* out, long num_tokens) {
    float* scratch = malloc(sizeof(float) * num_pairs * D);
    #pragma omp parallel
    {
        float* hidden = malloc(sizeof(float) * 2 * I);
        #pragma omp for schedule(static)
        for (long p = 0; p < num_pairs; p++) {
            const float* x = X + token_of_pair[p] * D;
            const float* gu = gate_up + expert_of_pair[p] * 2 * I * D;
            gemv_rows(gu, D, x, D, hidden, 0, 2 * I);
            for (long i = 0; i < I; i++) {
                float g = hidden[i];
                hidden[i] = g / (1.0f + expf(-g)) * hidden[I + i];
            }
            float* y = scratch + p * D;
            for (long d = 0; d < D; d++) y[d] = 0.0f;
            axpy_rows(down + expert_of_pair[p] * D * I, D, hidden, 0, I, y, D);
        }
        free(hidden);
    }
    for (long t = 0; t < num_tokens; t++)
        for (long d = 0; d < D; d++) out[t * D + d] = 0.0f;
    for (long p = 0; p < num_pairs; p++) {
        float w = weight_of_pair[p];
        float* o = out + token_of_pair[p] * D;
        const float* s = scratch + p * D;
        for (long d = 0; d < D; d++) o[d] += w * s[d];
    }
    free(scratch);
}

/*
 * Absorbed MLA decode of B sequences (one query each) over the paged latent cache, a layer per
 * call: what MultiHeadLatentAttention.attend_absorbed computes, without its ~20 small torch ops.
 * For sequence b and head h (the B * H jobs are spread over threads):
 *   q_lat   = W_uk[h]^T q_nope[b, h]                       [r]   W_uk[h]: kv_b rows h*(dn+dv) ..+dn
 *   score_s = scale * (q_lat . latent_s + q_pe[b, h] . k_pe_s)   for s < lengths[b]
 *   o_lat   = sum_s softmax(score)_s latent_s               [r]
 *   out[b, h] = W_uv[h] o_lat                               [dv]  W_uv[h]: the next dv rows
 * kv_b: row-major [H * (dn + dv), r]. cache: row-major [slots, r + dr], latent then rope key; the
 * s-th key of sequence b is cache row slots[b * slots_stride + s]. q_nope [B, H, dn], q_pe
 * [B, H, dr] and out [B, H, dv] are contiguous. Each job runs alone, so results do not depend
 * on the thread count.
 */
/* dst[k] = sum_n coeff[n] * row_n[k] for k < width, row_n = base + (rows ? rows[n] : n) * stride.
 * Each 256-column stripe is summed in registers over all rows, so dst is written once. */
static void weighted_row_sum(const float* coeff, const float* base, long stride, const long* rows, long count,
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
    for (long k = c; k < width; k++) dst[k] = 0.0f;
    for (long n = 0; n < count && c < width; n++) {
        const float a = coeff[n], *row = base + (rows ? rows[n] : n) * stride;
        #pragma omp simd
        for (long k = c; k < width; k++) dst[k] += a * row[k];
    }
}

#ifndef __AVX512F__
static inline float dot(const float* w, const float* x, long cols) {
    float s = 0.0f;
    #pragma omp simd reduction(+ : s)
    for (long k = 0; k < cols; k++) s += w[k] * x[k];
    return s;
}
#endif

void moeray_mla_decode(const float* q_nope, const float* q_pe, const float* kv_b, const float* cache,
                       const long* slots, long slots_stride, const long* lengths, float* out, long B, long H,
                       long dn, long dr, long dv, long r, float scale) {
    long longest = 1;
    for (long b = 0; b < B; b++) longest = lengths[b] > longest ? lengths[b] : longest;
    #pragma omp parallel
    {
        float* q_lat = malloc(sizeof(float) * r);
        float* o_lat = malloc(sizeof(float) * r);
        float* probs = malloc(sizeof(float) * longest);
        #pragma omp for schedule(static)
        for (long job = 0; job < B * H; job++) {
            const long b = job / H, h = job % H, n = lengths[b];
            const long* keys = slots + b * slots_stride;
            const float* w_uk = kv_b + h * (dn + dv) * r;
            weighted_row_sum(q_nope + job * dn, w_uk, r, NULL, dn, r, q_lat);
            float top = -INFINITY;
            for (long s = 0; s < n; s++) {
                const float* key = cache + keys[s] * (r + dr);
                probs[s] = (dot(key, q_lat, r) + dot(key + r, q_pe + job * dr, dr)) * scale;
                top = probs[s] > top ? probs[s] : top;
            }
            float total = 0.0f;
            for (long s = 0; s < n; s++) total += (probs[s] = expf(probs[s] - top));
            for (long s = 0; s < n; s++) probs[s] /= total;
            weighted_row_sum(probs, cache, r + dr, keys, n, r, o_lat);
            const float* w_uv = w_uk + dn * r;
            for (long j = 0; j < dv; j++) out[job * dv + j] = dot(w_uv + j * r, o_lat, r);
        }
        free(q_lat);
        free(o_lat);
        free(probs);
    }
}

/* Streaming read of n floats with all threads: the bandwidth probe for roofline figures. */
double moeray_stream_sum(const float* a, long n) {
    double total = 0;
#ifdef __AVX512F__
    #pragma omp parallel reduction(+ : total)
    {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        #pragma omp for schedule(static)
        for (long i = 0; i < n / 64 * 64; i += 64) {
            s0 = _mm512_add_ps(s0, _mm512_loadu_ps(a + i));
            s1 = _mm512_add_ps(s1, _mm512_loadu_ps(a + i + 16));
            s2 = _mm512_add_ps(s2, _mm512_loadu_ps(a + i + 32));
            s3 = _mm512_add_ps(s3, _mm512_loadu_ps(a + i + 48));
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    }
#else
    #pragma omp parallel for simd reduction(+ : total)
    for (long i = 0; i < n; i++) total += a[i];
#endif
    return total;
}
