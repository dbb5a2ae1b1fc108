/*
 * The native decoder's data layout: the one declaration of it. decoder.c includes this file and
 * decoder.py hands the same text to cffi (lines starting with '#' dropped), so the C structs and
 * the Python binding cannot drift apart. Plain C types only: cffi parses no macros.
 *
 * Weights are packed into panels (decoder.py `pack_panels`): a matrix W [rows, cols] (the
 * Hugging Face [out, in] layout) is cut into panels of 32 consecutive rows, each stored
 * input-major, so one panel is one sequential stream and its 32 rows are the lanes of the
 * kernel's vectors:
 *   float32:  panel p, input k, lane j at  data[m * matrix_stride + p * panel_stride + k * 32 + j]
 *   bfloat16: inputs in pairs,             data[m * matrix_stride + p * panel_stride + (k / 2) * 64 + j * 2 + k % 2]
 * (rows padded with zeros to a multiple of 32, cols to a multiple of 2 for bfloat16). m indexes
 * a stack of same-shaped matrices (the heads of kv_b, the routed experts); 0 for one matrix.
 */
#ifndef MOERAY_DECODER_H
#define MOERAY_DECODER_H

typedef struct {
    const void* data;    /* NULL: absent */
    long rows, cols;     /* of one matrix, before padding */
    long panel_stride;   /* elements from one panel to the next */
    long matrix_stride;  /* elements from one matrix of the stack to the next */
    long bf16;           /* 1: bfloat16 elements, 0: float32 */
} Panels;

typedef struct {
    const float* input_norm;
    const float* q_a_norm;   /* NULL without q LoRA (q_b is then q_proj) */
    const float* kv_a_norm;
    const float* post_norm;
    Panels q_a, q_b, kv_a, o_proj;
    Panels w_uk;             /* heads stacked: [r rows, dn] = kv_b's key rows of a head, transposed */
    Panels w_uv;             /* heads stacked: [dv rows, r] = kv_b's value rows of a head */
    void* cache;             /* this layer's latent cache [slots, r + dr] */
    long cache_bf16;
    Panels gate, up, down;   /* a dense SwiGLU MLP, or the MoE layer's shared experts (gate absent: none) */
    Panels router;           /* [E, D]; absent: a dense layer */
    const float* router_bias;  /* [E] or NULL */
    Panels experts_gate, experts_up, experts_down;  /* E matrices each: [I, D], [I, D], [D, I] */
    long num_experts, top_k, n_group, topk_group, scoring_sigmoid, topk_method, norm_topk_prob;
    float routed_scaling_factor;
    long* routed_counts;     /* [E] int64, incremented by one for every routed token */
} DecoderLayer;

typedef struct {
    long hidden, heads, nope_dim, rope_dim, v_dim, kv_rank, q_rank, rope_interleave, vocab;
    float eps, softmax_scale, rope_scale;
    const float* final_norm;
    const float* inv_freq;   /* [dr / 2]: rope's angle per position */
    const void* embed;       /* [V, D] row-major */
    long embed_bf16;
    Panels lm_head;
    long num_layers;
    DecoderLayer* layers;
    /* A multi-token-prediction depth (DeepSeek-V3's MTP layer) when eh_proj is present: its input
     * is x = eh_proj([enorm(embed[token]) ; hnorm(previous hidden)]) rather than the embedding,
     * final_norm is its shared_head norm and the hidden state it hands on is x before that norm. */
    const float* enorm;
    const float* hnorm;
    Panels eh_proj;          /* [D, 2D]; absent: the main model */
} Decoder;

/*
 * logits [T, V] for T tokens. Token t is token_ids[t] at positions[t] of sequence token_seq[t]; it
 * attends to its sequence's positions 0..positions[t], whose cache slots come from the sequence's
 * block table (block_tables[s * table_stride + p / block_size] * block_size + p % block_size),
 * and its own latent entry is written at its position's slot first. Tokens of one sequence may
 * be several consecutive positions (a chunk or a draft to verify): they see each other causally.
 */
void moeray_decoder_step(const Decoder* decoder, long num_tokens, const long* token_ids, const long* positions,
                         const long* token_seq, const long* block_tables, long table_stride, long block_size,
                         float* logits);

/*
 * moeray_decoder_step with three additions, for speculative decoding:
 * - previous_hidden [T, D]: an MTP decoder's second input (the previous depth's hidden state of
 *   the token before each; NULL for the main model);
 * - hidden_out [T, D] (NULL: not wanted): what the next MTP depth takes, the final-normed state
 *   of the main model or an MTP depth's state before its head norm;
 * - logit_rows [num_logit_rows] (NULL: all T rows, in order): logits only for these tokens,
 *   ascending, written as rows 0..num_logit_rows-1 of logits.
 */
void moeray_decoder_run(const Decoder* decoder, long num_tokens, const long* token_ids, const float* previous_hidden,
                        const long* positions, const long* token_seq, const long* block_tables, long table_stride,
                        long block_size, long num_logit_rows, const long* logit_rows, float* logits,
                        float* hidden_out);

/* 1 when this build computes bfloat16 products with AVX512_BF16 (vdpbf16ps), 0 on the portable path. */
long moeray_decoder_bf16_dot(void);

#endif
