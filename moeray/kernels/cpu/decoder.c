/*
 * The whole decoder stack for any number of tokens in one call (decoder.h has the layout and the
 * entry point): what DeepseekForCausalLM.forward_tokens computes with StepAttention over the
 * paged latent cache, from token ids to logits, for packed float32 or bfloat16 weights on CPU.
 * The engine's decode steps, 1 to max_num_seqs sequences, all run here; nothing of a step runs
 * in Python (each small torch op costs tens of microseconds, and a batch-1 step is a few ms).
 *
 * Per layer, for each token t (x: its residual stream):
 *   h = rmsnorm(x);  q = q_b(rmsnorm(q_a h)) (or q_proj h);  [latent, k_pe] = kv_a h
 *   latent = rmsnorm(latent);  rope on q_pe and k_pe;  cache[slot of t] = [latent, k_pe]
 *   x += o_proj(absorbed MLA of q over its sequence's cached keys up to t)
 *   h = rmsnorm(x);  x += FFN(h)  (a dense SwiGLU MLP, or the top-k routed experts plus the
 *   shared experts)
 * from x = the token's embedding row, and at the end logits = lm_head(rmsnorm(x)).
 *
 * Work is shared by weight: every product runs over all tokens a panel at a time (panels.h), the
 * absorbed attention's per-head products over all tokens a head at a time, and the routed
 * experts over the tokens routed to each, so each weight is read once per step however many
 * tokens there are. Per-token work (norms, rope, routing, residual adds) is shared by token.
 * Every output has one summation order, fixed by the shapes alone, so a token's logits depend
 * neither on the other tokens of the step nor on the thread count.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "decoder.h"
#include "panels.h"

enum { TOPK_GREEDY = 0, TOPK_GROUP_LIMITED_GREEDY = 1, TOPK_NOAUX_TC = 2 };
#define HEAD_GROUP ROWS_PER_BLOCK /* heads of one token whose attention reads each key once */

long moeray_decoder_bf16_dot(void) { return HAS_BF16_DOT; }

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
static void route(const DecoderLayer* L, const float* logits, long* ids, float* weights) {
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


/*
 * The absorbed attention of g <= HEAD_GROUP heads of one token over its n cached keys (rows
 * keys[s] of cache [slots, r + dr]): each key is read once for all of them. q_lat [g, r] and
 * o_lat [g, r] are contiguous per head; q_pe of head i at q_pe + i * pe_stride; probs: scratch of
 * HEAD_GROUP * n floats.
 */
static void attend_group_f32(long g, const float* q_lat, const float* q_pe, long pe_stride, const float* cache,
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


/* The same for a bfloat16 cache: each key row is widened once per use into `row` [r + dr]. */
static void attend_group_bf16(long g, const float* q_lat, const float* q_pe, long pe_stride, const uint16_t* cache,
                              const long* keys, long n, long dr, long r, float scale, float* probs, float* row,
                              float* o_lat) {
    const float *lat_rows[HEAD_GROUP], *pe_rows[HEAD_GROUP];
    for (long i = 0; i < HEAD_GROUP; i++) {
        lat_rows[i] = q_lat + (i < g ? i : 0) * r;
        pe_rows[i] = q_pe + (i < g ? i : 0) * pe_stride;
    }
    for (long s = 0; s < n; s++) {
        const uint16_t* key = cache + keys[s] * (r + dr);
        for (long c = 0; c < r + dr; c++) row[c] = bf16_to_f32(key[c]);
        float latent_part[HEAD_GROUP], rope_part[HEAD_GROUP];
        dot8(lat_rows, row, r, latent_part);
        dot8(pe_rows, row + r, dr, rope_part);
        for (long i = 0; i < g; i++) probs[i * n + s] = (latent_part[i] + rope_part[i]) * scale;
    }
    for (long i = 0; i < g; i++) {
        float* p = probs + i * n, top = -INFINITY, total = 0.0f;
        for (long s = 0; s < n; s++) top = p[s] > top ? p[s] : top;
        for (long s = 0; s < n; s++) total += (p[s] = expf(p[s] - top));
        for (long s = 0; s < n; s++) p[s] /= total;
    }
    memset(o_lat, 0, sizeof(float) * g * r);
    for (long s = 0; s < n; s++) {
        const uint16_t* key = cache + keys[s] * (r + dr);
        for (long c = 0; c < r; c++) row[c] = bf16_to_f32(key[c]);
        for (long i = 0; i < g; i++) {
            const float p = probs[i * n + s];
            float* o = o_lat + i * r;
            #pragma omp simd
            for (long c = 0; c < r; c++) o[c] += p * row[c];
        }
    }
}

/* One feed-forward network applied to a list of tokens: a routed expert, the shared experts or a
 * dense MLP. Its tokens' activations live at act[offset ...] ([count, I]); its outputs go to
 * rows out_index[...] of `out`. */
typedef struct {
    const Panels *gate, *up, *down;
    long matrix;            /* which matrix of the stack (the expert id; 0 for shared or dense) */
    long first, count;      /* its tokens: token_list[first .. first + count) */
    long act_offset;
    float* out;             /* [*, D] */
    const long* out_index;  /* rows of `out`, one per token of the job */
} FfnJob;

typedef struct {
    long job, panel;
} FfnItem;

static long max_l(long a, long b) { return a > b ? a : b; }

static long widest_input(const Decoder* d) {
    long widest = d->eh_proj.data ? max_l(d->lm_head.cols, d->eh_proj.cols) : d->lm_head.cols;
    for (long l = 0; l < d->num_layers; l++) {
        const DecoderLayer* L = d->layers + l;
        const Panels* all[] = {&L->q_a, &L->q_b, &L->kv_a, &L->o_proj, &L->w_uk, &L->w_uv, &L->gate,
                               &L->down, &L->router, &L->experts_gate, &L->experts_down};
        for (unsigned i = 0; i < sizeof(all) / sizeof(all[0]); i++)
            if (all[i]->data) widest = max_l(widest, all[i]->cols);
    }
    return widest + 2;
}

static void write_cache(const DecoderLayer* L, long slot, const float* entry, long width) {
    if (L->cache_bf16) {
        uint16_t* dst = (uint16_t*)L->cache + slot * width;
        for (long c = 0; c < width; c++) dst[c] = f32_to_bf16(entry[c]);
    } else {
        memcpy((float*)L->cache + slot * width, entry, sizeof(float) * width);
    }
}

void moeray_decoder_step(const Decoder* d, long T, const long* token_ids, const long* positions,
                         const long* token_seq, const long* block_tables, long table_stride, long block_size,
                         float* logits) {
    moeray_decoder_run(d, T, token_ids, NULL, positions, token_seq, block_tables, table_stride, block_size, T, NULL,
                       logits, NULL);
}

void moeray_decoder_run(const Decoder* d, long T, const long* token_ids, const float* previous_hidden,
                        const long* positions, const long* token_seq, const long* block_tables, long table_stride,
                        long block_size, long num_logit_rows, const long* logit_rows, float* logits,
                        float* hidden_out) {
    const long D = d->hidden, H = d->heads, dn = d->nope_dim, dr = d->rope_dim, dv = d->v_dim;
    const long r = d->kv_rank, qr = d->q_rank, qk = dn + dr, kvw = r + dr, half = dr / 2;
    const float eps = d->eps;
    const long groups = (H + HEAD_GROUP - 1) / HEAD_GROUP;

    long longest = 1, most_experts = 1, most_top_k = 1, widest_expert = 1, widest_dense = 1, most_panels = 1;
    for (long t = 0; t < T; t++) longest = max_l(longest, positions[t] + 1);
    for (long l = 0; l < d->num_layers; l++) {
        const DecoderLayer* L = d->layers + l;
        if (L->router.data) {
            most_experts = max_l(most_experts, L->num_experts);
            most_top_k = max_l(most_top_k, L->top_k);
            widest_expert = max_l(widest_expert, L->experts_gate.rows);
            most_panels = max_l(most_panels, max_l(panel_count(&L->experts_gate), panel_count(&L->experts_down)));
        }
        if (L->gate.data) {
            widest_dense = max_l(widest_dense, L->gate.rows);
            most_panels = max_l(most_panels, max_l(panel_count(&L->gate), panel_count(&L->down)));
        }
    }
    const long most_jobs = most_experts + 1, most_pairs = T * most_top_k;

    float* cos = malloc(sizeof(float) * T * half);
    float* sin = malloc(sizeof(float) * T * half);
    float* x = malloc(sizeof(float) * T * D);   /* the residual stream */
    float* h = malloc(sizeof(float) * T * D);   /* its normalised form, the products' input */
    float* q_a_out = malloc(sizeof(float) * T * max_l(qr, 1));
    float* q_a = malloc(sizeof(float) * T * max_l(qr, 1));
    float* kv_out = malloc(sizeof(float) * T * kvw);
    float* q = malloc(sizeof(float) * T * H * qk);
    float* q_lat = malloc(sizeof(float) * T * H * r);  /* per (token, head): W_uk^T q_nope */
    float* o_lat = malloc(sizeof(float) * T * H * r);  /* per (token, head): attention-weighted latents */
    float* attn = malloc(sizeof(float) * T * H * dv);
    float* o = malloc(sizeof(float) * T * D);
    float* router_logits = malloc(sizeof(float) * T * most_experts);
    long* expert_ids = malloc(sizeof(long) * most_pairs);
    float* expert_weights = malloc(sizeof(float) * most_pairs);
    long* token_list = malloc(sizeof(long) * (most_pairs + T));  /* each job's tokens, job after job */
    long* out_rows = malloc(sizeof(long) * (most_pairs + T));    /* and the output row of each */
    float* act = malloc(sizeof(float) * (most_pairs * widest_expert + T * widest_dense));
    float* up_act = malloc(sizeof(float) * (most_pairs * widest_expert + T * widest_dense));
    float* pair_out = malloc(sizeof(float) * most_pairs * D);  /* routed outputs, row t * top_k + k */
    float* ffn_out = malloc(sizeof(float) * T * D);            /* shared experts' or dense MLP's */
    FfnJob* jobs = malloc(sizeof(FfnJob) * most_jobs);
    FfnItem* items = malloc(sizeof(FfnItem) * most_jobs * most_panels);
    long* counts = malloc(sizeof(long) * (most_experts + 1));
    long num_jobs = 0, num_up_items = 0, num_down_items = 0;
    FfnItem* down_items = malloc(sizeof(FfnItem) * most_jobs * most_panels);
    const long mtp = d->eh_proj.data != NULL;
    float* joined = mtp ? malloc(sizeof(float) * T * 2 * D) : NULL;  /* [enorm(embedding) | hnorm(previous)] */
    const long widest = widest_input(d);

    #pragma omp parallel
    {
        /* room for every token's inputs: a product's are converted once for all its panels */
        TileScratch scratch = {malloc(sizeof(float) * (T > TILE_MAX ? T : TILE_MAX) * widest), widest};
        float* probs = malloc(sizeof(float) * HEAD_GROUP * longest);
        long* slots = malloc(sizeof(long) * longest);
        float* key_row = malloc(sizeof(float) * kvw);

        #pragma omp for schedule(static)
        for (long t = 0; t < T; t++) {
            for (long i = 0; i < half; i++) {
                const float angle = (float)positions[t] * d->inv_freq[i];
                cos[t * half + i] = cosf(angle) * d->rope_scale;
                sin[t * half + i] = sinf(angle) * d->rope_scale;
            }
            if (d->embed_bf16) {
                const uint16_t* row = (const uint16_t*)d->embed + token_ids[t] * D;
                for (long i = 0; i < D; i++) x[t * D + i] = bf16_to_f32(row[i]);
            } else {
                memcpy(x + t * D, (const float*)d->embed + token_ids[t] * D, sizeof(float) * D);
            }
            if (mtp) {
                rmsnorm(x + t * D, d->enorm, joined + t * 2 * D, D, eps);
                rmsnorm(previous_hidden + t * D, d->hnorm, joined + t * 2 * D + D, D, eps);
            }
        }
        if (mtp) par_panels(&d->eh_proj, T, joined, 2 * D, x, D, &scratch);
        for (long l = 0; l < d->num_layers; l++) {
            const DecoderLayer* L = d->layers + l;
            /* ---- attention ---- */
            #pragma omp for schedule(static)
            for (long t = 0; t < T; t++) rmsnorm(x + t * D, L->input_norm, h + t * D, D, eps);
            if (qr) par_panels(&L->q_a, T, h, D, q_a_out, qr, &scratch);
            par_panels(&L->kv_a, T, h, D, kv_out, kvw, &scratch);
            #pragma omp for schedule(static)
            for (long t = 0; t < T; t++) {
                float entry[kvw];  /* [latent | k_pe] */
                if (qr) rmsnorm(q_a_out + t * qr, L->q_a_norm, q_a + t * qr, qr, eps);
                rmsnorm(kv_out + t * kvw, L->kv_a_norm, entry, r, eps);
                memcpy(entry + r, kv_out + t * kvw + r, sizeof(float) * dr);
                rope(entry + r, cos + t * half, sin + t * half, dr, d->rope_interleave);
                const long p = positions[t];
                write_cache(L, block_tables[token_seq[t] * table_stride + p / block_size] * block_size + p % block_size,
                            entry, kvw);
            }
            par_panels(&L->q_b, T, qr ? q_a : h, qr ? qr : D, q, H * qk, &scratch);
            #pragma omp for schedule(static)
            for (long job = 0; job < T * H; job++)
                rope(q + job * qk + dn, cos + job / H * half, sin + job / H * half, dr, d->rope_interleave);
            /* q_lat[t, head] = W_uk[head]^T q_nope[t, head], a head at a time over all tokens */
            const long uk_panels = panel_count(&L->w_uk), uv_panels = panel_count(&L->w_uv);
            new_product(&scratch);
            #pragma omp for schedule(static)
            for (long item = 0; item < H * uk_panels; item++) {
                const long head = item / uk_panels;
                panel_product(&L->w_uk, head, item % uk_panels, T, q + head * qk, H * qk, NULL, q_lat + head * r,
                              H * r, NULL, &scratch);
            }
            #pragma omp for schedule(dynamic, 1)
            for (long job = 0; job < T * groups; job++) {
                const long t = job / groups, head = job % groups * HEAD_GROUP, n = positions[t] + 1;
                const long g = H - head < HEAD_GROUP ? H - head : HEAD_GROUP;
                const long* table = block_tables + token_seq[t] * table_stride;
                for (long s = 0; s < n; s++) slots[s] = table[s / block_size] * block_size + s % block_size;
                const float* qt = q + (t * H + head) * qk;
                if (L->cache_bf16)
                    attend_group_bf16(g, q_lat + (t * H + head) * r, qt + dn, qk, (const uint16_t*)L->cache, slots,
                                      n, dr, r, d->softmax_scale, probs, key_row, o_lat + (t * H + head) * r);
                else
                    attend_group_f32(g, q_lat + (t * H + head) * r, qt + dn, qk, (const float*)L->cache, slots, n,
                                     dr, r, d->softmax_scale, probs, o_lat + (t * H + head) * r);
            }
            new_product(&scratch);
            #pragma omp for schedule(static)
            for (long item = 0; item < H * uv_panels; item++) {
                const long head = item / uv_panels;
                panel_product(&L->w_uv, head, item % uv_panels, T, o_lat + head * r, H * r, NULL, attn + head * dv,
                              H * dv, NULL, &scratch);
            }
            par_panels(&L->o_proj, T, attn, H * dv, o, D, &scratch);
            #pragma omp for schedule(static)
            for (long t = 0; t < T; t++) {
                for (long i = 0; i < D; i++) x[t * D + i] += o[t * D + i];
                rmsnorm(x + t * D, L->post_norm, h + t * D, D, eps);
            }
            /* ---- feed-forward ---- */
            const long E = L->num_experts, K = L->top_k;
            if (L->router.data) {
                par_panels(&L->router, T, h, D, router_logits, E, &scratch);
                #pragma omp for schedule(static)
                for (long t = 0; t < T; t++) route(L, router_logits + t * E, expert_ids + t * K, expert_weights + t * K);
            }
            #pragma omp single
            {
                /* Jobs: each routed expert with its tokens in token order (a counting sort), then the
                 * shared experts or the dense MLP over all tokens; work items: (job, panel). */
                long next = 0, act_used = 0;
                num_jobs = num_up_items = num_down_items = 0;
                if (L->router.data) {
                    memset(counts, 0, sizeof(long) * (E + 1));
                    for (long pair = 0; pair < T * K; pair++) counts[expert_ids[pair] + 1] += 1;
                    for (long e = 0; e < E; e++) counts[e + 1] += counts[e];  /* counts[e]: first of expert e */
                    for (long e = 0; e < E; e++) {
                        const long n = counts[e + 1] - counts[e];
                        if (!n) continue;
                        FfnJob job = {&L->experts_gate, &L->experts_up, &L->experts_down, e, counts[e], n, act_used,
                                      pair_out, out_rows + counts[e]};
                        jobs[num_jobs++] = job;
                        act_used += n * L->experts_gate.rows;
                        L->routed_counts[e] += n;
                    }
                    for (long pair = 0; pair < T * K; pair++) {  /* pairs in (token, k) order: stable per expert */
                        const long slot = counts[expert_ids[pair]]++;
                        token_list[slot] = pair / K;
                        out_rows[slot] = pair;
                    }
                    next = T * K;
                }
                if (L->gate.data) {
                    for (long t = 0; t < T; t++) token_list[next + t] = out_rows[next + t] = t;
                    FfnJob job = {&L->gate, &L->up, &L->down, 0, next, T, act_used, ffn_out, out_rows + next};
                    jobs[num_jobs++] = job;
                }
                for (long j = 0; j < num_jobs; j++) {
                    for (long p = 0; p < panel_count(jobs[j].gate); p++) items[num_up_items++] = (FfnItem){j, p};
                    for (long p = 0; p < panel_count(jobs[j].down); p++) down_items[num_down_items++] = (FfnItem){j, p};
                }
            }
            new_product(&scratch);
            #pragma omp for schedule(dynamic, 1)
            for (long i = 0; i < num_up_items; i++) {
                const FfnJob* job = jobs + items[i].job;
                const long I = job->gate->rows, p = items[i].panel;
                const long* tokens = token_list + job->first;
                float* a = act + job->act_offset;
                float* u = up_act + job->act_offset;
                panel_product(job->gate, job->matrix, p, job->count, h, D, tokens, a, I, NULL, &scratch);
                panel_product(job->up, job->matrix, p, job->count, h, D, tokens, u, I, NULL, &scratch);
                const long end = (p + 1) * LANES < I ? (p + 1) * LANES : I;
                for (long n = 0; n < job->count; n++)
                    for (long c = p * LANES; c < end; c++) {
                        const float g = a[n * I + c];
                        a[n * I + c] = g / (1.0f + expf(-g)) * u[n * I + c];
                    }
            }
            new_product(&scratch);
            #pragma omp for schedule(dynamic, 1)
            for (long i = 0; i < num_down_items; i++) {
                const FfnJob* job = jobs + down_items[i].job;
                panel_product(job->down, job->matrix, down_items[i].panel, job->count, act + job->act_offset,
                              job->gate->rows, NULL, job->out, D, job->out_index, &scratch);
            }
            #pragma omp for schedule(static)
            for (long t = 0; t < T; t++) {
                float* dst = x + t * D;
                for (long k = 0; L->router.data && k < K; k++) {
                    const float* src = pair_out + (t * K + k) * D, weight = expert_weights[t * K + k];
                    for (long i = 0; i < D; i++) dst[i] += weight * src[i];
                }
                if (L->gate.data)
                    for (long i = 0; i < D; i++) dst[i] += ffn_out[t * D + i];
            }
        }
        #pragma omp for schedule(static)
        for (long t = 0; t < T; t++) {
            rmsnorm(x + t * D, d->final_norm, h + t * D, D, eps);
            if (hidden_out) memcpy(hidden_out + t * D, (mtp ? x : h) + t * D, sizeof(float) * D);
        }
        if (logit_rows) {
            #pragma omp single
            for (long row = 0; row < num_logit_rows; row++)  /* ascending, so row <= logit_rows[row] */
                memmove(h + row * D, h + logit_rows[row] * D, sizeof(float) * D);
        }
        par_panels(&d->lm_head, num_logit_rows, h, D, logits, d->lm_head.rows, &scratch);
        free(scratch.inputs);
        free(probs);
        free(slots);
        free(key_row);
    }
    void* buffers[] = {cos, sin, x, h, q_a_out, q_a, kv_out, q, q_lat, o_lat, attn, o, router_logits, expert_ids,
                       expert_weights, token_list, out_rows, act, up_act, pair_out, ffn_out, jobs, items, counts,
                       down_items, joined};
    for (unsigned i = 0; i < sizeof(buffers) / sizeof(buffers[0]); i++) free(buffers[i]);
}
