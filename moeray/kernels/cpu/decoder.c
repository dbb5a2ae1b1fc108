/*
 * The whole decoder stack for a few decode tokens (one new token per sequence) in one call: what
 * DeepseekForCausalLM.forward_tokens computes with StepAttention's decode path over the paged
 * latent cache, for float32 weights on CPU. At batch 1 a step is weight-bound, and on the torch
 * path a layer spends as long in ~40 small ops and ~10 kernel calls (each waking the thread pool)
 * as in reading its weights; here all layers run in one OpenMP region.
 *
 * Per layer, for each token (x: its residual stream):
 *   h = rmsnorm(x);  q = q_b(rmsnorm(q_a h)) (or q_proj h);  [latent, k_pe] = kv_a h
 *   latent = rmsnorm(latent);  rope on q_pe and k_pe;  cache[slot] = [latent, k_pe]
 *   x += o_proj(absorbed MLA of q over the token's cached keys)
 *   h = rmsnorm(x);  x += FFN(h)  (a dense SwiGLU MLP, or the top-k routed experts plus the
 *   shared experts)
 * starting from x = the token's embedding row, with rope's cos and sin computed from its position,
 * and at the end logits = lm_head(rmsnorm(x)) with the model's final norm: the whole step from
 * token ids to logits, so nothing of it runs in Python (after a step has streamed every weight,
 * the interpreter's own data is cold, and each small torch op costs tens of microseconds).
 *
 * Every piece of shared work writes its own output (a GEMV's row block or inner slice, one head
 * or group of heads, one expert or slice of one FFN), partial sums are added in a fixed order,
 * and the per-token work in between every thread repeats on its own copies: so the result does
 * not depend on the thread count.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

enum { TOPK_GREEDY = 0, TOPK_GROUP_LIMITED_GREEDY = 1, TOPK_NOAUX_TC = 2 };
#define FFN_SLICE 128  /* intermediate rows per FFN job */
#define MAX_FFN_SLICES 16

typedef struct {
    /* attention; without q LoRA, q_b is q_proj and q_a.w / q_a_norm are NULL */
    const float *input_norm, *q_a_norm, *kv_a_norm, *post_norm;
    Matrix q_a, q_b, kv_a, o_proj;
    const float* kv_b;  /* [H * (dn + dv), r] row-major */
    float* cache;       /* this layer's [slots, r + dr] */
    /* a dense SwiGLU MLP, or the MoE layer's shared experts (gate.w NULL: none) */
    Matrix gate, up, down;
    /* routed experts; router NULL: a dense layer */
    const float *router, *router_bias;            /* [E, D] row-major, [E] or NULL */
    const float *experts_gate_up, *experts_down;  /* [E, 2I, D]; down^T as [E, I, D] */
    long num_experts, expert_dim, top_k, n_group, topk_group, scoring_sigmoid, topk_method, norm_topk_prob;
    float routed_scaling_factor;
    long* routed_counts; /* [E], incremented for every routed token */
} Layer;

typedef struct {
    long hidden, heads, nope_dim, rope_dim, v_dim, kv_rank, q_rank, rope_interleave;
    float eps, softmax_scale;
    const float* final_norm;
    const float* embed;     /* [V, D] row-major */
    const float* inv_freq;  /* [dr / 2]: rope's angle per position */
    float rope_scale;       /* rope's attention factor, on cos and sin */
    Matrix lm_head;         /* [V, D] */
} Dims;

/* One slice [begin, end) of the intermediate rows of a SwiGLU FFN, for one token, times a weight. */
typedef struct {
    Matrix gate, up, down;
    long begin, end, token;
    float weight;
} FfnJob;

static void rmsnorm(const float* x, const float* weight, float* out, long n, float eps) {
    double squares = 0.0;
    for (long i = 0; i < n; i++) squares += (double)x[i] * x[i];
    const float scale = 1.0f / sqrtf((float)(squares / n) + eps);
    for (long i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
}

/* Rotate v [dr] in place as model.rope.apply_rotary does: pairs (v_i, v_{i+dr/2}) or, interleaved,
 * (v_2i, v_2i+1); the result is laid out [rotated firsts | rotated seconds] either way. */
static void rope(float* v, const float* cos, const float* sin, long dr, long interleaved) {
    const long half = dr / 2;
    float first[half], second[half];
    for (long i = 0; i < half; i++) {
        first[i] = interleaved ? v[2 * i] : v[i];
        second[i] = interleaved ? v[2 * i + 1] : v[half + i];
    }
    for (long i = 0; i < half; i++) {
        v[i] = first[i] * cos[i] - second[i] * sin[i];
        v[half + i] = second[i] * cos[i] + first[i] * sin[i];
    }
}

/* Index of the largest value among those not yet taken (the first on ties); marks it taken.
 * Callers take at most n (the config guarantees top_k <= E and topk_group <= n_group). */
static long take_max(const float* values, char* taken, long n) {
    long best = 0;
    while (best < n - 1 && taken[best]) best++;
    for (long i = best + 1; i < n; i++)
        if (!taken[i] && values[i] > values[best]) best = i;
    taken[best] = 1;
    return best;
}

/* model.moe.TopkGate for one token: logits [E] -> expert ids and weights [top_k]. */
static void route(const Layer* L, const float* logits, long* ids, float* weights) {
    const long E = L->num_experts;
    float scores[E], choice[E];
    char taken[E];
    if (L->scoring_sigmoid) {
        for (long e = 0; e < E; e++) scores[e] = 1.0f / (1.0f + expf(-logits[e]));
    } else {
        float top = -INFINITY, total = 0.0f;
        for (long e = 0; e < E; e++) top = logits[e] > top ? logits[e] : top;
        for (long e = 0; e < E; e++) total += (scores[e] = expf(logits[e] - top));
        for (long e = 0; e < E; e++) scores[e] /= total;
    }
    for (long e = 0; e < E; e++) choice[e] = scores[e] + (L->router_bias ? L->router_bias[e] : 0.0f);
    if (L->topk_method != TOPK_GREEDY && L->n_group > 1) {
        const long groups = L->n_group, per_group = E / groups;
        float group_score[groups];
        char kept[groups];
        for (long g = 0; g < groups; g++) {
            const float* c = choice + g * per_group;
            memset(taken, 0, per_group);
            if (L->topk_method == TOPK_NOAUX_TC) {  /* the sum of the group's two best */
                group_score[g] = c[take_max(c, taken, per_group)];
                group_score[g] += per_group > 1 ? c[take_max(c, taken, per_group)] : 0.0f;
            } else {
                group_score[g] = c[take_max(c, taken, per_group)];
            }
        }
        memset(kept, 0, groups);
        for (long k = 0; k < L->topk_group; k++) take_max(group_score, kept, groups);
        for (long e = 0; e < E; e++)
            if (!kept[e / per_group]) choice[e] = -INFINITY;
    }
    memset(taken, 0, E);
    float total = 0.0f;
    for (long k = 0; k < L->top_k; k++) {
        ids[k] = take_max(choice, taken, E);
        total += (weights[k] = scores[ids[k]]);
    }
    for (long k = 0; k < L->top_k; k++) {
        if (L->norm_topk_prob) weights[k] /= total + 1e-20f;
        weights[k] *= L->routed_scaling_factor;
    }
}

#define HEAD_GROUP ROWS_PER_BLOCK /* heads of one token whose attention reads each key once */

/*
 * mla_attend_latent for g <= HEAD_GROUP heads of one token at once: each key is read once for
 * all of them (the per-head form reads every key once per head, from L2, and its dot products
 * and weighted sums are latency-bound). q_lat [g, r] and o_lat [g, r] are contiguous per head;
 * q_pe of head i at q_pe + i * pe_stride; probs: scratch of HEAD_GROUP * n floats.
 */
static void attend_head_group(long g, const float* q_lat, const float* q_pe, long pe_stride, const float* cache,
                              const long* keys, long n, long dr, long r, float scale, float* probs, float* o_lat) {
    const float *lat_rows[HEAD_GROUP], *pe_rows[HEAD_GROUP];
    for (long i = 0; i < HEAD_GROUP; i++) {  /* unused lanes repeat head 0; their results are dropped */
        lat_rows[i] = q_lat + (i < g ? i : 0) * r;
        pe_rows[i] = q_pe + (i < g ? i : 0) * pe_stride;
    }
    for (long s = 0; s < n; s++) {
        const float* key = cache + keys[s] * (r + dr);
        float latent_part[HEAD_GROUP], rope_part[HEAD_GROUP];
        dot8(lat_rows, key, r, latent_part);
        dot8(pe_rows, key + r, dr, rope_part);
        for (long i = 0; i < g; i++) probs[i * n + s] = (latent_part[i] + rope_part[i]) * scale;
    }
    for (long i = 0; i < g; i++) {
        float* p = probs + i * n, top = -INFINITY, total = 0.0f;
        for (long s = 0; s < n; s++) top = p[s] > top ? p[s] : top;
        for (long s = 0; s < n; s++) total += (p[s] = expf(p[s] - top));
        for (long s = 0; s < n; s++) p[s] /= total;
    }
    /* o_lat[i] = sum_s p[i, s] latent_s, two vectors of columns at a time for all heads. */
    long c = 0;
    for (; c + 2 * VEC <= r; c += 2 * VEC) {
        vec lo[HEAD_GROUP], hi[HEAD_GROUP];
        for (long i = 0; i < HEAD_GROUP; i++) lo[i] = hi[i] = vec_zero();
        for (long s = 0; s < n; s++) {
            const float* latent = cache + keys[s] * (r + dr) + c;
            const vec first = vec_load(latent), second = vec_load(latent + VEC);
            for (long i = 0; i < HEAD_GROUP; i++) {
                const vec p = vec_set1(probs[(i < g ? i : 0) * n + s]);
                lo[i] = vec_fmadd(p, first, lo[i]);
                hi[i] = vec_fmadd(p, second, hi[i]);
            }
        }
        for (long i = 0; i < g; i++) {
            vec_store(o_lat + i * r + c, lo[i]);
            vec_store(o_lat + i * r + c + VEC, hi[i]);
        }
    }
    for (; c < r; c++)
        for (long i = 0; i < g; i++) {
            float sum = 0.0f;
            for (long s = 0; s < n; s++) sum += probs[i * n + s] * cache[keys[s] * (r + dr) + c];
            o_lat[i * r + c] = sum;
        }
}

/* out[r - begin] = (W x)[r] for rows r in [begin, end) of W, either layout. */
static void gemv_row_range(const Matrix* W, const float* x, long begin, long end, float* out) {
    if (W->column_major) gemv_cols(W->w + begin, W->ld, x, W->cols, out, 0, end - begin);
    else gemv_rows(W->w + begin * W->ld, W->ld, x, W->cols, out, 0, end - begin);
}

/* y [D] = down[:, begin:end] (silu(gate[begin:end] x) * up[begin:end] x); act, up_out: scratch. */
static void ffn_slice(const FfnJob* job, const float* x, float* y, float* act, float* up_out) {
    const long n = job->end - job->begin, D = job->down.rows, ld = job->down.ld;
    gemv_row_range(&job->gate, x, job->begin, job->end, act);
    gemv_row_range(&job->up, x, job->begin, job->end, up_out);
    for (long i = 0; i < n; i++) act[i] = act[i] / (1.0f + expf(-act[i])) * up_out[i];
    if (job->down.column_major) {
        for (long d = 0; d < D; d++) y[d] = 0.0f;
        axpy_rows(job->down.w + job->begin * ld, ld, act, 0, n, y, D);
    } else {
        gemv_rows(job->down.w + job->begin, ld, act, n, y, 0, D);
    }
}

static long clamp_slices(long slices) {
    return slices < 1 ? 1 : slices > MAX_FFN_SLICES ? MAX_FFN_SLICES : slices;
}

/* A dense MLP or the shared experts: slices of about FFN_SLICE rows. */
static long ffn_slices(long width) {
    return clamp_slices(width / FFN_SLICE);
}

/* A routed expert: whole once the step has ROUTED_JOBS (token, expert) pairs, else cut so that
 * there are about that many jobs. Whole experts read three 1 MB streams (on the small preset)
 * instead of six of 512 KB, 4% faster in the fast-bandwidth periods, and 8 of them (plus the
 * shared experts' slices, queued last) still spread evenly over a few threads. A constant, not
 * the thread count, so that the slicing, and so the sums, do not depend on the thread count. */
#define ROUTED_JOBS 8
static long routed_slices(long width, long pairs) {
    const long slices = clamp_slices((ROUTED_JOBS + pairs - 1) / pairs);
    return slices < width ? slices : width;
}

/* Appends the jobs of one FFN of `width` intermediate rows for `token`, in `slices` slices;
 * returns the new count. */
static long add_ffn_jobs(FfnJob* jobs, long count, Matrix gate, Matrix up, Matrix down, long width, long token,
                         float weight, long slices) {
    const long step = (width + slices - 1) / slices;
    for (long begin = 0; begin < width; begin += step) {
        FfnJob job = {gate, up, down, begin, begin + step < width ? begin + step : width, token, weight};
        jobs[count++] = job;
    }
    return count;
}

static long max_ffn_jobs(const Layer* L, long B) {
    long per_token = L->gate.w ? MAX_FFN_SLICES : 0;
    if (L->router) per_token += L->top_k * MAX_FFN_SLICES;
    return B * per_token;
}

static long widest_ffn_slice(const Layer* L) {
    long widest = 1;
    if (L->gate.w) widest = (L->gate.rows + ffn_slices(L->gate.rows) - 1) / ffn_slices(L->gate.rows);
    if (L->router) widest = L->expert_dim > widest ? L->expert_dim : widest;  /* a whole expert */
    return widest;
}

/*
 * logits [B, V] for B decode tokens: token_ids [B] at positions [B]; key_slots [B, slots_stride]:
 * the first lengths[b] are the cache slots of token b's keys, its own last (where its key is
 * written).
 */
void moeray_decode_stack(const Layer* layers, long num_layers, const Dims* dims, long B, const long* token_ids,
                         const long* positions, const long* key_slots, long slots_stride, const long* lengths,
                         float* logits) {
    const long D = dims->hidden, H = dims->heads, dn = dims->nope_dim, dr = dims->rope_dim, dv = dims->v_dim;
    const long r = dims->kv_rank, qr = dims->q_rank, qk = dn + dr, kv_width = r + dr;
    const float eps = dims->eps;
    const long groups = (H + HEAD_GROUP - 1) / HEAD_GROUP;  /* head groups per token in the attention */

    long widest = D > H * qk ? D : H * qk, most_jobs = 1, most_experts = 1, longest = 1, slice_width = 1;
    if (dims->lm_head.column_major && dims->lm_head.rows > widest) widest = dims->lm_head.rows;
    for (long l = 0; l < num_layers; l++) {
        const Layer* L = layers + l;
        const Matrix* matrices[] = {&L->q_a, &L->q_b, &L->kv_a, &L->o_proj};
        for (int m = 0; m < 4; m++) widest = matrices[m]->rows > widest ? matrices[m]->rows : widest;
        most_jobs = max_ffn_jobs(L, B) > most_jobs ? max_ffn_jobs(L, B) : most_jobs;
        most_experts = L->num_experts > most_experts ? L->num_experts : most_experts;
        slice_width = widest_ffn_slice(L) > slice_width ? widest_ffn_slice(L) : slice_width;
    }
    for (long b = 0; b < B; b++) longest = lengths[b] > longest ? lengths[b] : longest;

    float* cos = malloc(sizeof(float) * B * (dr / 2));
    float* sin = malloc(sizeof(float) * B * (dr / 2));
    for (long b = 0; b < B; b++) {
        for (long i = 0; i < dr / 2; i++) {
            const float angle = (float)positions[b] * dims->inv_freq[i];
            cos[b * (dr / 2) + i] = cosf(angle) * dims->rope_scale;
            sin[b * (dr / 2) + i] = sinf(angle) * dims->rope_scale;
        }
    }
    float* q_a_out = malloc(sizeof(float) * B * (qr > 0 ? qr : 1));
    float* kv_out = malloc(sizeof(float) * B * kv_width);
    float* q = malloc(sizeof(float) * B * H * qk);
    float* q_lat = malloc(sizeof(float) * B * H * r);  /* per (token, head): W_uk^T q_nope */
    float* o_lat = malloc(sizeof(float) * B * H * r);  /* per (token, head): attention-weighted latents */
    float* attn = malloc(sizeof(float) * B * H * dv);
    float* o = malloc(sizeof(float) * B * D);
    float* router_logits = malloc(sizeof(float) * B * most_experts);
    float* partial = malloc(sizeof(float) * INNER_SLICES * B * widest);
    float* job_out = malloc(sizeof(float) * most_jobs * D);

    /* The products are shared out over the threads; the small per-token work between them (norms,
     * rope, the residual adds, routing) every thread does for itself on its own copies of the
     * vectors, identically: cheaper than one thread doing it while the others wait at a barrier. */
    #pragma omp parallel
    {
        const int leader = omp_get_thread_num() == 0;  /* the one that writes shared state */
        float* x = malloc(sizeof(float) * B * D);  /* the residual stream */
        float* h = malloc(sizeof(float) * B * D);  /* its normalised form, the products' input */
        float* q_a = malloc(sizeof(float) * B * (qr > 0 ? qr : 1));
        float* kv = malloc(sizeof(float) * B * kv_width);
        FfnJob* jobs = malloc(sizeof(FfnJob) * most_jobs);
        float* probs = malloc(sizeof(float) * HEAD_GROUP * longest);
        float* act = malloc(sizeof(float) * slice_width);
        float* up_out = malloc(sizeof(float) * slice_width);
        for (long b = 0; b < B; b++) memcpy(x + b * D, dims->embed + token_ids[b] * D, sizeof(float) * D);
        for (long l = 0; l < num_layers; l++) {
            const Layer* L = layers + l;
            /* ---- attention ---- */
            for (long b = 0; b < B; b++) rmsnorm(x + b * D, L->input_norm, h + b * D, D, eps);
            if (qr) par_gemv(&L->q_a, h, D, q_a_out, qr, B, partial);
            par_gemv(&L->kv_a, h, D, kv_out, kv_width, B, partial);
            for (long b = 0; b < B; b++) {
                float* entry = kv + b * kv_width;  /* [latent | k_pe] */
                if (qr) rmsnorm(q_a_out + b * qr, L->q_a_norm, q_a + b * qr, qr, eps);
                rmsnorm(kv_out + b * kv_width, L->kv_a_norm, entry, r, eps);
                memcpy(entry + r, kv_out + b * kv_width + r, sizeof(float) * dr);
                rope(entry + r, cos + b * (dr / 2), sin + b * (dr / 2), dr, dims->rope_interleave);
                const long slot = key_slots[b * slots_stride + lengths[b] - 1];
                if (leader) memcpy(L->cache + slot * kv_width, entry, sizeof(float) * kv_width);
            }
            /* (the barrier that ends this product also publishes the leader's cache write) */
            par_gemv(&L->q_b, qr ? q_a : h, qr ? qr : D, q, H * qk, B, partial);
            /* The absorbed MLA, one step at a time for all (token, head) jobs: the weight-streaming
             * steps are not interleaved with the cache-bound one. */
            #pragma omp for schedule(static)
            for (long job = 0; job < B * H; job++) {
                float* q_head = q + job * qk;  /* [q_nope | q_pe] */
                rope(q_head + dn, cos + job / H * (dr / 2), sin + job / H * (dr / 2), dr, dims->rope_interleave);
                mla_query_latent(q_head, L->kv_b + job % H * (dn + dv) * r, dn, r, q_lat + job * r);
            }
            #pragma omp for schedule(static)
            for (long job = 0; job < B * groups; job++) {
                const long b = job / groups, head = job % groups * HEAD_GROUP;
                const long g = H - head < HEAD_GROUP ? H - head : HEAD_GROUP;
                attend_head_group(g, q_lat + (b * H + head) * r, q + (b * H + head) * qk + dn, qk, L->cache,
                                  key_slots + b * slots_stride, lengths[b], dr, r, dims->softmax_scale, probs,
                                  o_lat + (b * H + head) * r);
            }
            #pragma omp for schedule(static)
            for (long job = 0; job < B * H; job++)
                mla_value_out(L->kv_b + job % H * (dn + dv) * r, o_lat + job * r, dn, dv, r, attn + job * dv);
            par_gemv(&L->o_proj, attn, H * dv, o, D, B, partial);
            for (long b = 0; b < B; b++) {
                for (long i = 0; i < D; i++) x[b * D + i] += o[b * D + i];
                rmsnorm(x + b * D, L->post_norm, h + b * D, D, eps);
            }
            /* ---- feed-forward ---- */
            if (L->router) {
                const Matrix router = {L->router, L->num_experts, D, D, 0};
                par_gemv(&router, h, D, router_logits, L->num_experts, B, partial);
            }
            long num_jobs = 0;
            for (long b = 0; L->router && b < B; b++) {  /* the routed experts' jobs, the larger, first */
                const long E = L->num_experts, I = L->expert_dim;
                long ids[L->top_k];
                float weights[L->top_k];
                route(L, router_logits + b * E, ids, weights);
                for (long k = 0; k < L->top_k; k++) {
                    const float* gate_up = L->experts_gate_up + ids[k] * 2 * I * D;
                    const Matrix gate = {gate_up, I, D, D, 0}, up = {gate_up + I * D, I, D, D, 0};
                    const Matrix down = {L->experts_down + ids[k] * I * D, D, I, D, 1};
                    num_jobs = add_ffn_jobs(jobs, num_jobs, gate, up, down, I, b, weights[k],
                                            routed_slices(I, B * L->top_k));
                    if (leader) L->routed_counts[ids[k]] += 1;
                }
            }
            for (long b = 0; L->gate.w && b < B; b++)
                num_jobs = add_ffn_jobs(jobs, num_jobs, L->gate, L->up, L->down, L->gate.rows, b, 1.0f,
                                        ffn_slices(L->gate.rows));
            #pragma omp for schedule(dynamic, 1)
            for (long j = 0; j < num_jobs; j++)
                ffn_slice(jobs + j, h + jobs[j].token * D, job_out + j * D, act, up_out);
            for (long j = 0; j < num_jobs; j++) {
                float* dst = x + jobs[j].token * D;
                const float* src = job_out + j * D, weight = jobs[j].weight;
                for (long i = 0; i < D; i++) dst[i] += weight * src[i];
            }
        }
        for (long b = 0; b < B; b++) rmsnorm(x + b * D, dims->final_norm, h + b * D, D, eps);
        par_gemv(&dims->lm_head, h, D, logits, dims->lm_head.rows, B, partial);
        free(x);
        free(h);
        free(q_a);
        free(kv);
        free(jobs);
        free(probs);
        free(act);
        free(up_out);
    }
    free(cos);
    free(sin);
    free(q_a_out);
    free(kv_out);
    free(q);
    free(q_lat);
    free(o_lat);
    free(attn);
    free(o);
    free(router_logits);
    free(partial);
    free(job_out);
}
