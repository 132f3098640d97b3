/* A decoder layer's elementwise steps, fused: the residual add with the RMS norm that follows it, and
 * the MLP's silu(gate) * up.
 *
 * Built and loaded by native_build.py; called through native_layer_ops.py. In torch these are seven
 * ops a norm (to fp32, pow, mean, add, rsqrt, mul, to bf16, times the weight) and three for the MLP
 * (chunk, silu, mul), each a dispatch and a pass over memory: on SmolLM2 (61 norms and 30 MLPs a
 * step) about 3 ms of a 32-row decode step on 2 cores. Each step here rounds where torch rounds
 * (a bf16 op computes in fp32 and rounds to bf16 once), so a bf16 result differs from torch's only
 * where the sum of squares, added in another order, lands on the other side of a rounding.
 *
 * Layouts: rows of `hidden` (norm) or `2 * inter` / `inter` (silu) elements, contiguous, fp32 or
 * bf16 (its raw 16 bits); the norm's weight [hidden] in the same dtype. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define EXP_ARG_MAX 88.f /* expf(88) is finite in fp32; expf(89) is not */

/* One row: s = x (+ residual), written to sum when there is a residual; out = weight * (s * rsqrt(mean(s^2)
 * + eps)), as LlamaRMSNorm computes it (the normalized row rounded to the dtype before the weight). */
static inline __attribute__((always_inline)) void norm_row(const void *x, const void *residual, void *sum,
                                                           const void *weight, void *out, int hidden, float eps,
                                                           const int bf16) {
    float s[hidden];
    float squares = 0.f;
    for (int i = 0; i < hidden; i++) {
        float v = load(x, i, bf16);
        if (residual) {
            v += load(residual, i, bf16);
            if (bf16) v = round_bf16(v);
        }
        s[i] = v;
        squares += v * v;
    }
    if (residual)
        for (int i = 0; i < hidden; i++) store(sum, i, s[i], bf16);
    volatile float root = sqrtf(squares / hidden + eps); /* volatile: -ffast-math would take rsqrtss's estimate */
    const float r = 1.f / root;
    for (int i = 0; i < hidden; i++) {
        float y = s[i] * r;
        if (bf16) y = round_bf16(y);
        store(out, i, load(weight, i, bf16) * y, bf16);
    }
}

/* residual may be NULL (then sum is not written); out must not overlap x, residual or sum. */
void prefloop_add_rms_norm(const void *x, const void *residual, void *sum, const void *weight, void *out, int rows,
                           int hidden, float eps, int bf16, int threads) {
    const size_t stride = (size_t)hidden * (bf16 ? 2 : 4);
#pragma omp parallel for num_threads(threads) if (threads > 1 && (size_t)rows * hidden >= 8192)
    for (int r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * stride, *rr = residual ? (const char *)residual + r * stride : NULL;
        char *sr = residual ? (char *)sum + r * stride : NULL, *o = (char *)out + r * stride;
        if (bf16) norm_row(xr, rr, sr, weight, o, hidden, eps, 1);
        else norm_row(xr, rr, sr, weight, o, hidden, eps, 0);
    }
}

/* gate_up [rows, 2 * inter] (the gate's outputs, then up's) -> out [rows, inter] = silu(gate) * up. Below a
 * gate of -88 the exponent is held at 88 so that it stays finite: -ffast-math divides by a reciprocal
 * estimate, which gives NaN for an infinite divisor where torch's division gives -0. Silu there is
 * a / 1.7e38 or 0, where torch gives a * exp(a): all within 1e-36 of 0. */
void prefloop_silu_mul(const void *gate_up, void *out, int rows, int inter, int bf16, int threads) {
    const size_t width = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) if (threads > 1 && (size_t)rows * inter >= 8192)
    for (int r = 0; r < rows; r++) {
        const char *g = (const char *)gate_up + (size_t)r * 2 * inter * width, *u = g + (size_t)inter * width;
        char *o = (char *)out + (size_t)r * inter * width;
        if (bf16)
            for (int i = 0; i < inter; i++) {
                float a = load(g, i, 1);
                store(o, i, round_bf16(a / (1.f + expf(-fmaxf(a, -EXP_ARG_MAX)))) * load(u, i, 1), 1);
            }
        else
            for (int i = 0; i < inter; i++) {
                float a = load(g, i, 0);
                store(o, i, a / (1.f + expf(-fmaxf(a, -EXP_ARG_MAX))) * load(u, i, 0), 0);
            }
    }
}
