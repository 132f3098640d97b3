/* fp32 <-> bf16 for the engine's C kernels (attention.c, layer_ops.c): an array holds fp32, or bf16 as
 * its raw 16 bits, and `bf16` says which; where it is a constant the branch is compiled away. A load
 * widens exactly; a store rounds to the nearest bf16, ties to even, as torch's .to(bfloat16). */
#ifndef PREFLOOP_BF16_H
#define PREFLOOP_BF16_H
#include <stdint.h>
#include <string.h>

static inline __attribute__((always_inline)) float load(const void *p, size_t i, const int bf16) {
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* f rounded to the nearest bf16 (ties to even), still as fp32; NaN stays NaN. */
static inline __attribute__((always_inline)) float round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u = (u & 0x7fffffffu) > 0x7f800000u ? u | 0x00400000u : u + 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) void store(void *p, size_t i, float f, const int bf16) {
    if (!bf16) {
        ((float *)p)[i] = f;
        return;
    }
    uint32_t u;
    f = round_bf16(f);
    memcpy(&u, &f, sizeof u);
    ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
}
#endif
