/* A sampling step's first look at each row: the `window` most likely tokens and their probabilities under
 * softmax(logits / temperature) over the whole vocabulary, in one pass over the logits and one over exp.
 *
 * Built by native_build.py; called by sampling.py, which keeps torch's path for a row whose top-k or
 * nucleus the window does not hold. Torch's way is four passes over [rows, vocab]: the division, the
 * softmax (max, exp and sum, normalize) and topk over the probabilities, each writing or reading a
 * 6 MB array at 32 rows of SmolLM2's 49k vocabulary. The window is ranked by the logits themselves, so it
 * holds the tokens torch's topk picks (but for ties); its probabilities equal torch's to within float
 * rounding: -ffast-math computes x / temperature - peak as a subtraction and a multiply by a reciprocal,
 * and expf and the sum's order differ in their last bits (relative 2e-7 at temperature 1, 1e-5 at 0.003).
 *
 * logits [rows, vocab] fp32; temperature [rows] (> 0); out: values [rows, window] fp32 descending,
 * ids [rows, window] int64 (a tie: the lower id first). window <= MAX_WINDOW, window <= vocab. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_WINDOW 256
#define BLOCK 16 /* logits compared against the window's smallest value at once */

typedef struct {
    float value;
    int64_t id;
} Entry;

/* a before b: larger value, then lower id */
static inline int before(Entry a, Entry b) { return a.value > b.value || (a.value == b.value && a.id < b.id); }

/* heap[0] comes after every other entry (the window's smallest); it is replaced by e, which sifts down */
static void replace_last(Entry *heap, int n, Entry e) {
    int i = 0;
    for (;;) {
        int child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && before(heap[child], heap[child + 1])) child++;
        if (!before(e, heap[child])) break;
        heap[i] = heap[child];
        i = child;
    }
    heap[i] = e;
}

static void sift_up(Entry *heap, int i) {
    Entry e = heap[i];
    while (i > 0 && before(heap[(i - 1) / 2], e)) {
        heap[i] = heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    heap[i] = e;
}

static int descending(const void *a, const void *b) {
    return before(*(const Entry *)a, *(const Entry *)b) ? -1 : before(*(const Entry *)b, *(const Entry *)a);
}

static void row(const float *logits, float temperature, int64_t vocab, int window, float *values, int64_t *ids) {
    Entry heap[MAX_WINDOW];
    int n = 0;
    float top = -FLT_MAX; /* not -INFINITY: -ffast-math assumes no infinities */
    int64_t i = 0;
    for (; i < vocab && n < window; i++) { /* the first `window` logits fill the heap */
        heap[n] = (Entry){logits[i], i};
        sift_up(heap, n++);
        top = logits[i] > top ? logits[i] : top;
    }
    for (; i < vocab; i += BLOCK) {
        const int64_t end = i + BLOCK < vocab ? i + BLOCK : vocab;
        const float last = heap[0].value;
        int any = 0;
        float block_top = -FLT_MAX;
        for (int64_t j = i; j < end; j++) {
            any |= logits[j] > last;
            block_top = logits[j] > block_top ? logits[j] : block_top;
        }
        top = block_top > top ? block_top : top;
        if (!any) continue;
        for (int64_t j = i; j < end; j++)
            if (logits[j] > heap[0].value) replace_last(heap, n, (Entry){logits[j], j});
    }
    /* softmax(logits / temperature), its maximum at the largest logit (temperature > 0) */
    const float peak = top / temperature;
    float sum = 0.f;
    for (int64_t j = 0; j < vocab; j++) sum += expf(logits[j] / temperature - peak);
    qsort(heap, n, sizeof(Entry), descending);
    for (int k = 0; k < n; k++) {
        values[k] = expf(heap[k].value / temperature - peak) / sum;
        ids[k] = heap[k].id;
    }
}

/* Returns 0, or -1 for what it does not take (before anything is written). */
int prefloop_top_probs(const float *logits, const float *temperature, int rows, int64_t vocab, int window,
                       float *values, int64_t *ids, int threads) {
    if (window < 1 || window > MAX_WINDOW || window > vocab) return -1;
    for (int r = 0; r < rows; r++)
        if (!(temperature[r] > 0.f)) return -1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows > 1)
    for (int r = 0; r < rows; r++)
        row(logits + (size_t)r * vocab, temperature[r], vocab, window, values + (size_t)r * window,
            ids + (size_t)r * window);
    return 0;
}
