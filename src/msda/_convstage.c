/* The convolution stage of DenseSM-E inference, fused per sample and member.
 *
 * msda/native.py compiles this file on first use (cc -O3 -march=native) and calls it through
 * ctypes; msda/predict.py falls back to PyTorch operations when no C compiler is present.
 * Each member runs conv1 -> ReLU -> pool 2 -> conv2 -> ReLU -> pool 2 -> conv3 -> ReLU ->
 * pool 4 (ceil) on one sample with every intermediate in L1 cache, where the PyTorch path
 * writes each stage's output for a whole batch to memory and reads it back.
 *
 * Weights come folded by FusedEnsemble (BatchNorms folded, the 1/2 of the first two pools in
 * the weights, so a pool is a pair sum):
 *   w1 (M, S*K + 1, 32): input rows ordered (series, tap), the last row the bias;
 *   w2 (M, K*32, 16): rows ordered (tap, channel), matching a window of the step-major buffer;
 *   b2 (M, 16); w3 (M, 4, 16, K) as Conv1d stores it; b3 (M, 4).
 * Output: (n, M, 4 * L3) features, channel-major per member like Conv1d's flatten.
 * GCC/Clang vector extensions: AVX-512 with -march=native where the CPU has it, else the
 * compiler splits the 16-lane vectors.
 */
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

#define K 5
#define P 2 /* replicate padding, K / 2 */
#define C1 32
#define C2 16
#define C3 4
#ifndef T1
#define T1 8  /* conv1 steps per register block (16 accumulators) */
#endif
#ifndef T2
#define T2 12 /* conv2 steps per register block (12 accumulators), even: pools pairs */
#endif
#define MAXL 256 /* longest series (native.MAX_LENGTH) */
#define MAXS 8   /* most series (native.MAX_SERIES) */

static inline v16 load(const float *p) { return *(const v16u *)p; }
static inline void store(float *p, v16 v) { *(v16u *)p = v; }
typedef int vi16 __attribute__((vector_size(64)));
static inline v16 relu(v16 v) { v16 z = {0}; return (v16)((vi16)v & (v > z)); }
static inline v16 splat(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

int msda_conv_stage(const float *x, long row_stride, long offset, long n, int S, int L, int M,
                    const float *w1, const float *w2, const float *b2, const float *w3,
                    const float *b3, float *out) {
    const int L1 = L / 2, L2 = L1 / 2, L3 = (L2 + 3) / 4;
    const int L1c = ((L + T1 - 1) / T1) * T1;   /* conv1 steps computed (multiple of T1) */
    const int L2c = ((2 * L2 + T2 - 1) / T2) * T2; /* conv2 steps the pool keeps, rounded up */
    if (L > MAXL || L < 8 || S < 1 || S > MAXS) return -1;
    const int nfeat = C3 * L3;
    float xp[MAXS][MAXL + 2 * P + T1];         /* padded series of one sample */
    float h1[(MAXL / 2 + 2 * P + T2) * C1];    /* pooled conv1, step-major, padded */
    float h2t[C2][MAXL / 4 + 2 * P + 16];      /* pooled conv2, channel-major, padded */
    float acc1[T1][C1] __attribute__((aligned(64)));
    for (long b = 0; b < n; ++b) {
        const float *xs = x + b * row_stride + offset;
        for (int s = 0; s < S; ++s) {
            const float *src = xs + (long)s * L;
            for (int t = 0; t < P; ++t) xp[s][t] = src[0];
            memcpy(&xp[s][P], src, sizeof(float) * L);
            for (int t = L + P; t < L1c + 2 * P; ++t) xp[s][t] = src[L - 1];
        }
        for (int m = 0; m < M; ++m) {
            const float *W1 = w1 + (long)m * (S * K + 1) * C1;
            const float *W2 = w2 + (long)m * K * C1 * C2;
            const float *W3 = w3 + (long)m * C3 * C2 * K;
            /* conv1 (+ bias row) -> relu -> pair sums into h1 rows P.. */
            for (int t0 = 0; t0 < L1c; t0 += T1) {
                v16 a0[T1], a1[T1];
                const v16 bias0 = load(W1 + S * K * C1), bias1 = load(W1 + S * K * C1 + 16);
                for (int u = 0; u < T1; ++u) { a0[u] = bias0; a1[u] = bias1; }
                for (int s = 0; s < S; ++s)
                    for (int k = 0; k < K; ++k) {
                        const float *wr = W1 + (s * K + k) * C1;
                        const v16 wa = load(wr), wb = load(wr + 16);
                        const float *xr = &xp[s][t0 + k];
                        for (int u = 0; u < T1; ++u) {
                            const v16 xv = splat(xr[u]);
                            a0[u] += wa * xv;
                            a1[u] += wb * xv;
                        }
                    }
                for (int u = 0; u < T1; ++u) { store(acc1[u], relu(a0[u])); store(acc1[u] + 16, relu(a1[u])); }
                for (int u = 0; u + 1 < T1; u += 2) {
                    const int j = (t0 + u) / 2;
                    if (j >= L1) break;
                    float *dst = h1 + (P + j) * C1;
                    store(dst, load(acc1[u]) + load(acc1[u + 1]));
                    store(dst + 16, load(acc1[u] + 16) + load(acc1[u + 1] + 16));
                }
            }
            for (int t = 0; t < P; ++t) memcpy(h1 + t * C1, h1 + P * C1, sizeof(float) * C1);
            for (int t = P + L1; t < L2c + 2 * P; ++t)
                memcpy(h1 + t * C1, h1 + (P + L1 - 1) * C1, sizeof(float) * C1);
            /* conv2: a window of K steps x 32 channels is K*32 consecutive floats of h1 */
            const v16 bias2 = load(b2 + (long)m * C2);
            for (int t0 = 0; t0 < L2c; t0 += T2) {
                v16 a[T2];
                for (int u = 0; u < T2; ++u) a[u] = bias2;
                for (int i = 0; i < K * C1; ++i) {
                    const v16 wv = load(W2 + i * C2);
                    const float *xr = h1 + t0 * C1 + i;
                    for (int u = 0; u < T2; ++u) a[u] += wv * splat(xr[u * C1]);
                }
                for (int u = 0; u < T2; u += 2) {
                    const int j = (t0 + u) / 2;
                    if (j >= L2) break;
                    float pooled[C2] __attribute__((aligned(64)));
                    store(pooled, relu(a[u]) + relu(a[u + 1]));
                    for (int c = 0; c < C2; ++c) h2t[c][P + j] = pooled[c];
                }
            }
            for (int c = 0; c < C2; ++c) {
                for (int t = 0; t < P; ++t) h2t[c][t] = h2t[c][P];
                for (int t = P + L2; t < L2 + 2 * P + 16; ++t) h2t[c][t] = h2t[c][P + L2 - 1];
            }
            /* conv3: lanes are output steps; 4 output channels */
            float *o = out + (b * M + m) * nfeat;
            for (int oc = 0; oc < C3; ++oc) {
                for (int tb = 0; tb < L2; tb += 16) {
                    v16 a = splat(b3[m * C3 + oc]);
                    for (int c = 0; c < C2; ++c)
                        for (int k = 0; k < K; ++k) a += splat(W3[(oc * C2 + c) * K + k]) * load(&h2t[c][tb + k]);
                    float r[16];
                    store(r, relu(a));
                    for (int p = tb / 4; p < L3 && p * 4 < tb + 16; ++p) {
                        const int lo = p * 4, hi = lo + 4 < L2 ? lo + 4 : L2;
                        float sum = 0.f;
                        for (int t = lo; t < hi; ++t) sum += r[t - tb];
                        o[oc * L3 + p] = sum / (float)(hi - lo);
                    }
                }
            }
        }
    }
    return 0;
}
