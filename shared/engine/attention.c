/* One decode step's attention for every active row, reading the slot KV cache in place.
 *
 * Built and loaded by native_attention.py (the engine's CPU decode path). Torch's version of this
 * step is a dozen ops a layer: the rotary embedding, two indexed writes into the cache, a copy of
 * every row's keys and values out of it (a row's span is strided in it), two bmm over a 3-row
 * (grouped queries) by length problem per head, and a mask for rows shorter than the longest.
 * Here each (row, kv head) item rotates its new key and its queries, writes the new key and value
 * into its own cache slot and reads its own positions once, straight from the cache: scores in
 * fp32, softmax, values. OpenMP runs the items in the OpenMP runtime torch itself uses (the build
 * links that one), so no second thread team competes with torch's.
 *
 * Layouts (element strides; both dtypes, bf16 given as its raw 16 bits):
 *   qkv       [rows, (kv_heads * group + 2 * kv_heads) * head_dim]: the q, k and v projections'
 *             outputs side by side, before the rotary embedding
 *   cos, sin  [rows, head_dim]: the Llama rotary embedding's tables at each row's position
 *   k, v      [rows * kv_heads, capacity, head_dim], this layer's cache
 *   positions [rows]: where row r's new key and value go; it attends positions 0..positions[r]
 *   out       [rows, kv_heads * group * head_dim]
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#ifdef _OPENMP
#include <omp.h>
static int omp_thread(void) { return omp_get_thread_num(); }
#else
static int omp_thread(void) { return 0; }
#endif

#define PREFETCH_ROWS 16 /* positions ahead: with it a step read the cache about 25% faster */

/* Cache position l of one slot as fp32 into row, prefetching PREFETCH_ROWS positions ahead. */
static inline __attribute__((always_inline)) void cache_row(const void *slot, int l, float *row, const int D,
                                                            const int bf16) {
    const size_t width = bf16 ? 2 : 4;
    const char *at = (const char *)slot + (size_t)l * D * width;
    __builtin_prefetch(at + PREFETCH_ROWS * D * width);
    __builtin_prefetch(at + PREFETCH_ROWS * D * width + 64);
    for (int d = 0; d < D; d++) row[d] = load(at, d, bf16);
}

/* x rotated as `apply_rotary_pos_emb` does (x * cos + rotate_half(x) * sin), in fp32. */
static inline __attribute__((always_inline)) void rotate(const void *x, const void *cos, const void *sin,
                                                         float *out, const int D, const int bf16) {
    const int half = D / 2;
    for (int d = 0; d < half; d++)
        out[d] = load(x, d, bf16) * load(cos, d, bf16) - load(x, d + half, bf16) * load(sin, d, bf16);
    for (int d = half; d < D; d++)
        out[d] = load(x, d, bf16) * load(cos, d, bf16) + load(x, d - half, bf16) * load(sin, d, bf16);
}

/* One (row, kv head): its new key and value into the cache at `position`, then `group` queries over
 * positions 0..position. D and bf16 are constants where it is inlined, so each loop over D is a
 * fixed-width vector loop. */
static inline __attribute__((always_inline)) void item(const void *q, const void *k_new, const void *v_new,
                                                       const void *cos, const void *sin, void *k, void *v,
                                                       int64_t position, void *out, int group, float scale,
                                                       float *scores, const int D, const int bf16) {
    const size_t width = bf16 ? 2 : 4;
    const int length = (int)position + 1;
    float qf[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], row[MAX_HEAD_DIM], inv[MAX_GROUP];
    rotate(k_new, cos, sin, row, D, bf16);
    for (int d = 0; d < D; d++) {
        store((char *)k + (size_t)position * D * width, d, row[d], bf16);
        store((char *)v + (size_t)position * D * width, d, load(v_new, d, bf16), bf16);
    }
    for (int g = 0; g < group; g++) {
        rotate((const char *)q + (size_t)g * D * width, cos, sin, qf[g], D, bf16);
        for (int d = 0; d < D; d++) qf[g][d] *= scale;
    }
    for (int l = 0; l < length; l++) {
        cache_row(k, l, row, D, bf16);
        for (int g = 0; g < group; g++) {
            float dot = 0.f;
            for (int d = 0; d < D; d++) dot += qf[g][d] * row[d];
            scores[(size_t)g * length + l] = dot;
        }
    }
    for (int g = 0; g < group; g++) {
        float *s = scores + (size_t)g * length, top = s[0], sum = 0.f;
        for (int l = 1; l < length; l++) top = s[l] > top ? s[l] : top;
        for (int l = 0; l < length; l++) s[l] = expf(s[l] - top);
        for (int l = 0; l < length; l++) sum += s[l];
        inv[g] = 1.f / sum;
        for (int d = 0; d < D; d++) acc[g][d] = 0.f;
    }
    for (int l = 0; l < length; l++) {
        cache_row(v, l, row, D, bf16);
        for (int g = 0; g < group; g++) {
            float p = scores[(size_t)g * length + l];
            for (int d = 0; d < D; d++) acc[g][d] += p * row[d];
        }
    }
    for (int g = 0; g < group; g++)
        for (int d = 0; d < D; d++) store(out, (size_t)g * D + d, acc[g][d] * inv[g], bf16);
}

static void dispatch(const void *q, const void *k_new, const void *v_new, const void *cos, const void *sin,
                     void *k, void *v, int64_t position, void *out, int group, float scale, float *scores,
                     int head_dim, int bf16) {
#define ITEM(D, B) item(q, k_new, v_new, cos, sin, k, v, position, out, group, scale, scores, D, B)
    if (head_dim == 64 && bf16) ITEM(64, 1);
    else if (head_dim == 64) ITEM(64, 0);
    else if (head_dim == 128 && bf16) ITEM(128, 1);
    else if (head_dim == 128) ITEM(128, 0);
    else if (bf16) ITEM(head_dim, 1);
    else ITEM(head_dim, 0);
#undef ITEM
}

/* Returns 0, or -1 for what it does not take (before anything is written; the caller then runs
 * torch's ops). */
int prefloop_decode_attention(const void *qkv, const void *cos, const void *sin, void *k, void *v,
                              int64_t capacity, const int64_t *positions, void *out, int rows,
                              int kv_heads, int group, int head_dim, float scale, int bf16, int threads) {
    if (group < 1 || group > MAX_GROUP || head_dim < 2 || head_dim > MAX_HEAD_DIM || head_dim % 2) return -1;
    int64_t longest = 0;
    for (int r = 0; r < rows; r++) {
        if (positions[r] < 0 || positions[r] >= capacity) return -1;
        longest = positions[r] + 1 > longest ? positions[r] + 1 : longest;
    }
    const size_t width = bf16 ? 2 : 4, items = (size_t)rows * kv_heads, heads = (size_t)kv_heads * group;
    const size_t qkv_row = (heads + 2 * (size_t)kv_heads) * head_dim;
    if (!items) return 0;
    const int team = (size_t)threads > items ? (int)items : threads > 1 ? threads : 1; /* a scores buffer each */
    float *scores = malloc(sizeof(float) * (size_t)team * group * longest); /* before anything is written */
    if (!scores) return -1;
/* dynamic: rows differ in length, and a static split left one thread idle at the end (micro-benchmark, 32 rows
 * at 120-240 positions, 30 layers: 8.5 and 10.0 ms a step against 8.8 and 10.7 static) */
#pragma omp parallel for schedule(dynamic, 2) num_threads(team)
    for (size_t it = 0; it < items; it++) {
        size_t r = it / kv_heads, h = it % kv_heads;
        const char *row = (const char *)qkv + r * qkv_row * width;
        dispatch(row + h * group * head_dim * width, row + (heads + h) * head_dim * width,
                 row + (heads + kv_heads + h) * head_dim * width,
                 (const char *)cos + r * head_dim * width, (const char *)sin + r * head_dim * width,
                 (char *)k + it * capacity * head_dim * width, (char *)v + it * capacity * head_dim * width,
                 positions[r], (char *)out + (r * heads + h * group) * head_dim * width, group, scale,
                 scores + (size_t)omp_thread() * group * longest, head_dim, bf16);
    }
    free(scores);
    return 0;
}
