/*
 * CPU kernels for small-batch decode: matrix-vector products that stream weights at close to
 * the memory bandwidth. At batch 1 a decode step is weight-bound (each weight is read once and
 * used for one multiply-add), and the generic GEMM behind torch.nn.functional.linear reaches
 * only about half the bandwidth for M = 1.
 *
 * Layout: weights row-major [rows, cols] with row stride `ldw` (Hugging Face [out, in] layout),
 * float32. Shared helpers are in common.h. Threads come from the OpenMP runtime torch already
 * loaded (same libgomp).
 */
#include <omp.h>
#include <stdlib.h>

#include "common.h"

/* Y[m, :] = W X[m, :] for m < M, W [rows, cols] in either layout (see Matrix and par_gemv). */
void moeray_gemv(const float* W, long rows, long cols, long ldw, int column_major, const float* X, long ldx,
                 float* Y, long ldy, long M) {
    const Matrix matrix = {W, rows, cols, ldw, column_major};
    float* partial = column_major ? malloc(sizeof(float) * INNER_SLICES * M * rows) : NULL;
    #pragma omp parallel
    par_gemv(&matrix, X, ldx, Y, ldy, M, partial);
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
            const long b = job / H, h = job % H;
            mla_head(q_nope + job * dn, q_pe + job * dr, kv_b + h * (dn + dv) * r, cache, slots + b * slots_stride,
                     lengths[b], out + job * dv, dn, dr, dv, r, scale, q_lat, o_lat, probs);
        }
        free(q_lat);
        free(o_lat);
        free(probs);
    }
}

/*
 * Streaming read of n floats with all threads: the bandwidth probe for roofline figures. `wide`
 * reads with 512-bit loads (where the build has AVX-512), otherwise with the kernels' vectors:
 * which streams faster depends on the CPU, so callers take the best of both.
 */
double moeray_stream_sum(const float* a, long n, int wide) {
    double total = 0;
#ifdef __AVX512F__
    if (wide) {
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
        for (long i = n / 64 * 64; i < n; i++) total += a[i];
        return total;
    }
#endif
    (void)wide;
    const long whole = n / (4 * VEC) * (4 * VEC);
    #pragma omp parallel reduction(+ : total)
    {
        vec s0 = vec_zero(), s1 = s0, s2 = s0, s3 = s0;
        #pragma omp for schedule(static)
        for (long i = 0; i < whole; i += 4 * VEC) {
            s0 = vec_add(s0, vec_load(a + i));
            s1 = vec_add(s1, vec_load(a + i + VEC));
            s2 = vec_add(s2, vec_load(a + i + 2 * VEC));
            s3 = vec_add(s3, vec_load(a + i + 3 * VEC));
        }
        total += vec_sum(vec_add(vec_add(s0, s1), vec_add(s2, s3)));
    }
    for (long i = whole; i < n; i++) total += a[i];
    return total;
}
