/* One decode step's attention for every active row, reading the slot KV cache in place.
 *
 * Built and loaded by native_attention.py (the engine's CPU decode path). Torch's version of this
 * step copies every layer's keys and values out of the cache (a row's span is strided in it) and
 * runs two bmm over a 3-row (grouped queries) by length problem per head, with a mask for rows
 * shorter than the longest. Here each (row, kv head) item reads its own positions once, straight
 * from the cache: scores in fp32, softmax, values; OpenMP over items, in the OpenMP runtime torch
 * itself uses (the build links that one), so no second thread team competes with torch's.
 *
 * Layouts (element strides; both dtypes, bf16 given as its raw 16 bits):
 *   q       [rows, kv_heads * group, head_dim], row r at q + r * q_row (heads contiguous)
 *   k, v    [rows * kv_heads, capacity, head_dim], this layer's cache
 *   out     [rows, kv_heads * group * head_dim]
 *   lengths [rows]: positions row r attends (its last written position + 1), 1..capacity
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define PREFETCH_ROWS 16 /* positions ahead: with it a step read the cache about 25% faster */

static inline __attribute__((always_inline)) float load(const void *p, size_t i, const int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) void store(void *p, size_t i, float f, const int bf16) {
    if (!bf16) {
        ((float *)p)[i] = f;
        return;
    }
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        ((uint16_t *)p)[i] = (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as torch's .to(bfloat16) */
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}

/* One (row, kv head): `group` queries over `length` positions. D and bf16 are constants where it
 * is inlined, so each loop over D is a fixed-width vector loop. */
static inline __attribute__((always_inline)) void item(const void *q, const void *k, const void *v,
                                                       void *out, int group, int length, float scale,
                                                       float *scores, const int D, const int bf16) {
    const size_t width = bf16 ? 2 : 4;
    float qf[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], row[MAX_HEAD_DIM], inv[MAX_GROUP];
    for (int g = 0; g < group; g++)
        for (int d = 0; d < D; d++) qf[g][d] = load(q, (size_t)g * D + d, bf16) * scale;
    for (int l = 0; l < length; l++) {
        const char *at = (const char *)k + (size_t)l * D * width;
        __builtin_prefetch(at + PREFETCH_ROWS * D * width);
        __builtin_prefetch(at + PREFETCH_ROWS * D * width + 64);
        for (int d = 0; d < D; d++) row[d] = load(at, d, bf16);
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
        const char *at = (const char *)v + (size_t)l * D * width;
        __builtin_prefetch(at + PREFETCH_ROWS * D * width);
        __builtin_prefetch(at + PREFETCH_ROWS * D * width + 64);
        for (int d = 0; d < D; d++) row[d] = load(at, d, bf16);
        for (int g = 0; g < group; g++) {
            float p = scores[(size_t)g * length + l];
            for (int d = 0; d < D; d++) acc[g][d] += p * row[d];
        }
    }
    for (int g = 0; g < group; g++)
        for (int d = 0; d < D; d++) store(out, (size_t)g * D + d, acc[g][d] * inv[g], bf16);
}

static void dispatch(const void *q, const void *k, const void *v, void *out, int group, int length,
                     float scale, float *scores, int head_dim, int bf16) {
#define CASE(D, B)                                                                                \
    if (head_dim == D && bf16 == B) {                                                             \
        item(q, k, v, out, group, length, scale, scores, D, B);                                   \
        return;                                                                                   \
    }
    CASE(64, 1) CASE(64, 0) CASE(128, 1) CASE(128, 0)
#undef CASE
    if (bf16)
        item(q, k, v, out, group, length, scale, scores, head_dim, 1);
    else
        item(q, k, v, out, group, length, scale, scores, head_dim, 0);
}

/* Returns 0, or -1 for a shape it does not take (the caller then runs torch's ops). */
int prefloop_decode_attention(const void *q, int64_t q_row, const void *k, const void *v,
                              int64_t capacity, void *out, const int64_t *lengths, int rows,
                              int kv_heads, int group, int head_dim, float scale, int bf16,
                              int threads) {
    if (group < 1 || group > MAX_GROUP || head_dim < 1 || head_dim > MAX_HEAD_DIM) return -1;
    int64_t longest = 0;
    for (int r = 0; r < rows; r++) {
        if (lengths[r] < 1 || lengths[r] > capacity) return -1;
        longest = lengths[r] > longest ? lengths[r] : longest;
    }
    const size_t width = bf16 ? 2 : 4, items = (size_t)rows * kv_heads;
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *scores = malloc(sizeof(float) * group * longest);
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (size_t it = 0; it < items; it++) {
            if (!scores) continue;
            size_t r = it / kv_heads, h = it % kv_heads, head = h * group * head_dim;
            dispatch((const char *)q + (r * q_row + head) * width,
                     (const char *)k + it * capacity * head_dim * width,
                     (const char *)v + it * capacity * head_dim * width,
                     (char *)out + (r * kv_heads * group * head_dim + head) * width,
                     group, (int)lengths[r], scale, scores, head_dim, bf16);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
