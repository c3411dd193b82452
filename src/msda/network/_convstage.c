/* The convolution stage of DenseSM-E inference, fused per sample and member; below, the
 * training kernels of the first two convolutions (see "Training").
 *
 * msda/network/native.py compiles this file on first use (cc -O3 -march=native [-fopenmp]) and calls it
 * through ctypes; msda/network/fused.py and msda/network/stacked.py fall back to PyTorch operations when no C
 * compiler is present.
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
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* conv2 at T2 consecutive output steps: x points at the first step's window (rows of 32
 * channels, so a window of K steps is K*32 consecutive floats); W (K*32, 16) -> a[T2] */
static inline void conv2_block(const float *W, const float *x, v16 bias, v16 a[T2]) {
    for (int u = 0; u < T2; ++u) a[u] = bias;
    for (int i = 0; i < K * C1; ++i) {
        const v16 wv = load(W + i * C2);
        const float *xr = x + i;
        for (int u = 0; u < T2; ++u) a[u] += wv * splat(xr[u * C1]);
    }
}

static int conv_stage(const float *x, long row_stride, long offset, long n, int S, int L, int M,
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
            const v16 bias2 = load(b2 + (long)m * C2);
            for (int t0 = 0; t0 < L2c; t0 += T2) {
                v16 a[T2];
                conv2_block(W2, h1 + t0 * C1, bias2, a);
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

/* ---- Training: the first two convolutions of StackedEnsemble (stacked.py), fused -----------------
 *
 * conv1: every member sees the same windows and its batch norm is folded into its weights, so
 * it is a product of the windows `win` (n*L rows of KC = S*K + 1 values, the last 1 for the
 * bias) with wt1 (KC, M*32), then ReLU, dropout (p = 0.5, its x2 cancelling the pool's /2) and
 * a pool of step pairs. The dropout mask is the bits of `words` (torch draws them): element
 * (row r, channel c) is kept when bit r*M*32 + c is set; words == NULL is eval mode (no
 * dropout; the pool's 1/2 is `scale`).
 * conv2 (32 -> 16 channels, kernel 5, replicate padding) then reads that pooled output, with
 * w2 (M, K, 32, 16): w2[m][k][ci] is the row of 16 output weights of tap k, input channel ci;
 * b2 (M, 16). Output: z (n, L/2, M*16), conv2 before its batch norm.
 * Per sample and member, conv1's output lives only in a local buffer (L/2 + 4 rows of 32,
 * replicate-padded: a window of conv2 is K*32 consecutive floats); it is never written to
 * memory. The backward pass makes it again from the windows and takes the gradient g of z
 * back through conv2 and conv1 in cache, accumulating gw1 (KC, M*32) and gw2 (M, K, 32, 16);
 * w2t (M, K, 16, 32) is w2 with its last two axes swapped.
 * Samples are [first, first + n) of the batch (the mask's row numbers).
 */
#define TR 8     /* steps per register block of conv1 */
#define TI 8     /* weight rows per register block of conv2's weight gradient */
#define TG 9     /* rows per register block of conv2's input gradient: 27 = 23 + 4 rows in 3 blocks */
#define MAXKC 64 /* most window values (native.MAX_SERIES * K + 1 < 64) */
#define MAXH (MAXL / 2) /* longest input of conv2 */

typedef unsigned long long u64;

static inline int mask_bits(const u64 *words, long e) {
    /* bits e .. e+15 of the dropout mask (e a multiple of 16), or all set without a mask */
    return words ? (int)((words[e >> 6] >> (e & 63)) & 0xffff) : 0xffff;
}

#ifdef __AVX512F__
#include <immintrin.h>
/* relu(v) where the mask bits are set, else 0: one masked max */
static inline v16 relu_kept(v16 v, int bits) { return (v16)_mm512_maskz_max_ps((__mmask16)bits, (__m512)v, _mm512_setzero_ps()); }
/* g where v > 0 and the mask bits are set, else 0 */
static inline v16 grad_kept(v16 g, v16 v, int bits) {
    const __mmask16 pos = _mm512_mask_cmp_ps_mask((__mmask16)bits, (__m512)v, _mm512_setzero_ps(), _CMP_GT_OQ);
    return (v16)_mm512_maskz_mov_ps(pos, (__m512)g);
}
#else
static inline vi16 bit_lanes(int bits) {
    const vi16 sel = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
    const vi16 b = (vi16){bits, bits, bits, bits, bits, bits, bits, bits, bits, bits, bits, bits, bits, bits, bits, bits};
    return (b & sel) != 0;
}
static inline v16 relu_kept(v16 v, int bits) { return (v16)((vi16)relu(v) & bit_lanes(bits)); }
static inline v16 grad_kept(v16 g, v16 v, int bits) {
    const vi16 z = {0};
    return (v16)((vi16)g & ((vi16)v > z) & bit_lanes(bits));
}
#endif

typedef struct {
    const float *win, *wt1, *w2, *b2, *w2t;
    const u64 *words;
    int KC, L, M;
    float scale;
} Train;

/* the sample's windows, zero rows up to a multiple of TR; returns that row count */
static int load_windows(float *pl, const Train *T, long s) {
    const int Lc = ((T->L + TR - 1) / TR) * TR;
    memcpy(pl, T->win + s * T->L * T->KC, sizeof(float) * T->L * T->KC);
    memset(pl + T->L * T->KC, 0, sizeof(float) * (Lc - T->L) * T->KC);
    return Lc;
}

/* conv1 of member m on one sample: pre-activations z1 (Lc rows x 32, if not NULL) and the
 * pooled, kept, replicate-padded output xl (half + 4 rows x 32, then T2 zero rows) */
static void conv1_member(const Train *T, const float *pl, int Lc, long row0, int m, float *z1, float *xl) {
    const int L = T->L, half = L / 2, C = T->M * C1, c0 = m * C1;
    for (int t0 = 0; t0 < Lc; t0 += TR) {
        v16 a0[TR], a1[TR];
        for (int u = 0; u < TR; ++u) { a0[u] = splat(0.f); a1[u] = splat(0.f); }
        for (int k = 0; k < T->KC; ++k) {
            const v16 wa = load(T->wt1 + (long)k * C + c0), wb = load(T->wt1 + (long)k * C + c0 + 16);
            for (int u = 0; u < TR; ++u) {
                const v16 xv = splat(pl[(t0 + u) * T->KC + k]);
                a0[u] += wa * xv;
                a1[u] += wb * xv;
            }
        }
        for (int u = 0; u < TR; ++u) {
            if (z1) { store(z1 + (t0 + u) * C1, a0[u]); store(z1 + (t0 + u) * C1 + 16, a1[u]); }
            /* rows past L are zero windows (relu 0); their mask bits are never read */
            const long e = (row0 + t0 + u) * C + c0;
            a0[u] = relu_kept(a0[u], t0 + u < L ? mask_bits(T->words, e) : 0);
            a1[u] = relu_kept(a1[u], t0 + u < L ? mask_bits(T->words, e + 16) : 0);
        }
        for (int u = 0; u < TR; u += 2) {
            const int j = (t0 + u) / 2;
            if (j >= half) break;
            v16 p0 = a0[u] + a0[u + 1], p1 = a1[u] + a1[u + 1];
            if (!T->words) { p0 *= splat(T->scale); p1 *= splat(T->scale); }
            store(xl + (P + j) * C1, p0);
            store(xl + (P + j) * C1 + 16, p1);
        }
    }
    for (int t = 0; t < P; ++t) {
        store(xl + t * C1, load(xl + P * C1));
        store(xl + t * C1 + 16, load(xl + P * C1 + 16));
        store(xl + (P + half + t) * C1, load(xl + (P + half - 1) * C1));
        store(xl + (P + half + t) * C1 + 16, load(xl + (P + half - 1) * C1 + 16));
    }
    for (int t = half + 2 * P; t < half + 2 * P + T2; ++t) { store(xl + t * C1, splat(0.f)); store(xl + t * C1 + 16, splat(0.f)); }
}

static int conv12_forward(const Train *T, long first, long n, float *z, double *stats) {
    const int half = T->L / 2, Cout = T->M * C2;
    float pl[(MAXL + TR) * MAXKC];
    float xl[(MAXH + 2 * P + T2) * C1] __attribute__((aligned(64)));
    for (long s = 0; s < n; ++s) {
        const int Lc = load_windows(pl, T, first + s);
        for (int m = 0; m < T->M; ++m) {
            conv1_member(T, pl, Lc, (first + s) * T->L, m, NULL, xl);
            const float *W = T->w2 + (long)m * K * C1 * C2;
            const v16 bias = load(T->b2 + m * C2);
            float *out = z + s * half * Cout + m * C2;
            v16 sum = splat(0.f), sq = splat(0.f);
            for (int t0 = 0; t0 < half; t0 += T2) {
                v16 a[T2];
                conv2_block(W, xl + t0 * C1, bias, a);
                for (int u = 0; u < T2 && t0 + u < half; ++u) {
                    store(out + (long)(t0 + u) * Cout, a[u]);
                    sum += a[u];
                    sq += a[u] * a[u];
                }
            }
            { /* the sample's sums over its steps, then in double over samples */
                float fs[16], fq[16];
                store(fs, sum);
                store(fq, sq);
                for (int c = 0; c < C2; ++c) { stats[m * C2 + c] += fs[c]; stats[Cout + m * C2 + c] += fq[c]; }
            }
        }
    }
    return 0;
}

/* ---- conv2's batch norm, ReLU, dropout and pool of step pairs, applied where it is read ----------
 *
 * z (n, L1, C): conv2's output, C = M*16 channels; per channel y = z * a + c (a = gamma / std, c =
 * beta - mean * a). The pooled output h (n, L1/2, C) row t is the sum of relu(y) of rows 2t and
 * 2t+1, kept where the mask bit (row r, channel ch) = bit (s*L1 + r)*C + ch of `words` is set
 * (dropout's x2 and the pool's /2 cancel); words == NULL: no dropout, the pool's 1/2 is `scale`.
 * h is never stored: conv3 makes its rows from z (forward and backward), and conv2's gradient
 * gz = a * (gy - mean(gy) - xhat * mean(gy * xhat)) is made from z, the pooled gradient gh and the
 * two means where conv12's backward reads it (gy: gh where y > 0 and kept; xhat = (z - mean) * istd).
 */
typedef struct {
    const float *z, *a, *c, *mean, *istd;
    const u64 *words;
    float scale;
    int L1, C;
} Bn2;

/* row t of h, channels ch .. ch+15, of sample s */
static inline v16 bn2_h(const Bn2 *Q, long s, int t, int ch) {
    const v16 a = load(Q->a + ch), c = load(Q->c + ch);
    const long r0 = s * Q->L1 + 2 * t;
    const v16 y0 = relu_kept(load(Q->z + r0 * Q->C + ch) * a + c, mask_bits(Q->words, r0 * Q->C + ch));
    const v16 y1 = relu_kept(load(Q->z + (r0 + 1) * Q->C + ch) * a + c, mask_bits(Q->words, (r0 + 1) * Q->C + ch));
    return Q->words ? y0 + y1 : (y0 + y1) * splat(Q->scale);
}

/* gy of z's row r (sample s, channels ch ..) with value zv, from the gradient ghv of h's row r / 2 */
static inline v16 bn2_gy(const Bn2 *Q, long s, int r, int ch, v16 ghv, v16 zv) {
    if (r >= 2 * (Q->L1 / 2)) return splat(0.f); /* an odd last step is pooled away */
    const v16 y = zv * load(Q->a + ch) + load(Q->c + ch);
    return grad_kept(Q->words ? ghv : ghv * splat(Q->scale), y, mask_bits(Q->words, (s * Q->L1 + r) * (long)Q->C + ch));
}

static int conv12_backward(const Train *T, const Bn2 *Q, const float *gh, const float *means, long first, long n,
                           float *gw1, float *gw2, float *gb2) {
    const int L = T->L, half = L / 2, rows = half + 2 * P, Cout = T->M * C2, C = T->M * C1;
    float pl[(MAXL + TR) * MAXKC];
    float z1[(MAXL + TR) * C1] __attribute__((aligned(64)));
    float xl[(MAXH + 2 * P + T2) * C1] __attribute__((aligned(64)));
    float gl[(MAXH + 2 * P + TG + K) * C2] __attribute__((aligned(64))); /* g, K-1 zero rows before, zeros after */
    float gx[(MAXH + 2 * P + TG) * C1] __attribute__((aligned(64)));     /* gradient of xl */
    for (long s = 0; s < n; ++s) {
        const int Lc = load_windows(pl, T, first + s);
        const long row0 = (first + s) * L;
        for (int m = 0; m < T->M; ++m) {
            conv1_member(T, pl, Lc, row0, m, z1, xl);
            { /* conv2's output gradient from z and h's gradient (see Bn2), and the bias gradient */
                const int ch = m * C2;
                const v16 a = load(Q->a + ch), mu = load(Q->mean + ch), is = load(Q->istd + ch);
                const v16 m0 = load(means + ch), m1 = load(means + Cout + ch);
                v16 gb = load(gb2 + ch);
                for (int t = 0; t < half; ++t) {
                    const v16 zv = load(Q->z + ((first + s) * half + t) * Cout + ch);
                    const v16 gy = bn2_gy(Q, first + s, t, ch, load(gh + ((first + s) * (half / 2) + (t / 2 < half / 2 ? t / 2 : 0)) * Cout + ch), zv);
                    const v16 gz = a * (gy - m0 - (zv - mu) * is * m1);
                    store(gl + (t + K - 1) * C2, gz);
                    gb += gz;
                }
                store(gb2 + ch, gb);
            }
            for (int t = 0; t < K - 1; ++t) store(gl + t * C2, splat(0.f));
            for (int t = half + K - 1; t < rows + TG + K; ++t) store(gl + t * C2, splat(0.f));
            /* conv2's weight gradient: gw2[k*32 + ci] += sum_t xl[t + k][ci] g[t] */
            float *GW = gw2 + (long)m * K * C1 * C2;
            for (int i0 = 0; i0 < K * C1; i0 += TI) {
                v16 a[TI];
                for (int v = 0; v < TI; ++v) a[v] = load(GW + (i0 + v) * C2);
                for (int t = 0; t < half; ++t) {
                    const v16 gv = load(gl + (t + K - 1) * C2);
                    const float *xr = xl + t * C1 + i0;
                    for (int v = 0; v < TI; ++v) a[v] += gv * splat(xr[v]);
                }
                for (int v = 0; v < TI; ++v) store(GW + (i0 + v) * C2, a[v]);
            }
            /* conv2's input gradient: gx[r][ci] = sum_{k, co} g[r - k][co] w2[k][ci][co] */
            const float *WT = T->w2t + (long)m * K * C2 * C1;
            for (int r0 = 0; r0 < rows; r0 += TG) {
                v16 a0[TG], a1[TG];
                for (int u = 0; u < TG; ++u) { a0[u] = splat(0.f); a1[u] = splat(0.f); }
                for (int k = 0; k < K; ++k)
                    for (int co = 0; co < C2; ++co) {
                        const v16 wa = load(WT + (k * C2 + co) * C1), wb = load(WT + (k * C2 + co) * C1 + 16);
                        const float *gr = gl + (r0 - k + K - 1) * C2 + co; /* g[r - k], zero outside 0..half-1 */
                        for (int u = 0; u < TG; ++u) {
                            const v16 gv = splat(gr[u * C2]);
                            a0[u] += wa * gv;
                            a1[u] += wb * gv;
                        }
                    }
                for (int u = 0; u < TG; ++u) { store(gx + (r0 + u) * C1, a0[u]); store(gx + (r0 + u) * C1 + 16, a1[u]); }
            }
            /* the padding rows' gradients fold onto the edge steps; then the pool and dropout scale */
            for (int t = 0; t < P; ++t)
                for (int h = 0; h < C1; h += 16) {
                    store(gx + P * C1 + h, load(gx + P * C1 + h) + load(gx + t * C1 + h));
                    store(gx + (P + half - 1) * C1 + h, load(gx + (P + half - 1) * C1 + h) + load(gx + (P + half + t) * C1 + h));
                }
            /* conv1's weight gradient: the pooled gradient where z1 > 0 and kept, times the windows */
            const float sc = T->words ? 1.f : T->scale;
            for (int t0 = 0; t0 < Lc; t0 += TR) {
                v16 a0[TR], a1[TR];
                for (int u = 0; u < TR; ++u) {
                    const int t = t0 + u, live = t < 2 * half; /* an odd last step is pooled away */
                    const long e = (row0 + t) * C + m * C1;
                    const float *gp = gx + (P + (live ? t / 2 : 0)) * C1;
                    a0[u] = live ? grad_kept(load(gp) * splat(sc), load(z1 + t * C1), mask_bits(T->words, e)) : splat(0.f);
                    a1[u] = live ? grad_kept(load(gp + 16) * splat(sc), load(z1 + t * C1 + 16), mask_bits(T->words, e + 16)) : splat(0.f);
                }
                for (int k = 0; k < T->KC; ++k) {
                    float *wr = gw1 + (long)k * C + m * C1;
                    v16 s0 = load(wr), s1 = load(wr + 16);
                    for (int u = 0; u < TR; ++u) {
                        const v16 xv = splat(pl[(t0 + u) * T->KC + k]);
                        s0 += a0[u] * xv;
                        s1 += a1[u] * xv;
                    }
                    store(wr, s0);
                    store(wr + 16, s1);
                }
            }
        }
    }
    return 0;
}

#define MAXL3 (MAXL / 4) /* longest input of conv3 */

/* the first n (< 16) floats at p into lanes 0..n-1, the rest 0; and back */
static inline v16 load_n(const float *p, int n) {
#ifdef __AVX512F__
    return (v16)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
#else
    float r[16] __attribute__((aligned(64))) = {0};
    memcpy(r, p, sizeof(float) * n);
    return load(r);
#endif
}
static inline void store_n(float *p, v16 v, int n) {
#ifdef __AVX512F__
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
#else
    float r[16] __attribute__((aligned(64)));
    store(r, v);
    memcpy(p, r, sizeof(float) * n);
#endif
}

/* bits e .. e + n - 1 (n <= 16) of the dropout mask in the low bits, or n set bits without one */
static inline int mask_bits_at(const u64 *words, long e, int n) {
    const int lanes = (int)((1u << n) - 1);
    if (!words) return lanes;
    const int off = (int)(e & 63);
    u64 w = words[e >> 6] >> off;
    if (off + n > 64) w |= words[(e >> 6) + 1] << (64 - off);
    return (int)w & lanes;
}

static int conv3_forward(const Bn2 *Q, long first, long n, int M, const float *w3, const float *b3, float *y,
                         double *stats /* (2, M*4) */) {
    const int L = Q->L1 / 2;
    float ht[C2][MAXL3 + 2 * P + 16] __attribute__((aligned(64)));
    v16 acc_s[M * C3], acc_q[M * C3]; /* over this thread's samples, lanes = steps (masked to L) */
    for (int i = 0; i < M * C3; ++i) { acc_s[i] = splat(0.f); acc_q[i] = splat(0.f); }
    for (int c = 0; c < C2; ++c)
        for (int t = 0; t < MAXL3 + 2 * P + 16; ++t) ht[c][t] = 0.f;
    for (long s = first; s < first + n; ++s)
        for (int m = 0; m < M; ++m) {
            for (int t = 0; t < L; ++t) {
                float row[16] __attribute__((aligned(64)));
                store(row, bn2_h(Q, s, t, m * C2));
                for (int c = 0; c < C2; ++c) ht[c][P + t] = row[c];
            }
            for (int c = 0; c < C2; ++c) {
                ht[c][0] = ht[c][1] = ht[c][P];
                ht[c][P + L] = ht[c][P + L + 1] = ht[c][P + L - 1];
            }
            const float *W = w3 + (long)m * C3 * C2 * K;
            for (int tb = 0; tb < L; tb += 16) {
                v16 a0[C3], a1[C3]; /* two accumulators per output channel: 8 independent chains */
                for (int oc = 0; oc < C3; ++oc) { a0[oc] = splat(b3[m * C3 + oc]); a1[oc] = splat(0.f); }
                for (int c = 0; c < C2; c += 2)
                    for (int k = 0; k < K; ++k) {
                        const v16 x0 = load(&ht[c][tb + k]), x1 = load(&ht[c + 1][tb + k]);
                        for (int oc = 0; oc < C3; ++oc) {
                            a0[oc] += splat(W[(oc * C2 + c) * K + k]) * x0;
                            a1[oc] += splat(W[(oc * C2 + c + 1) * K + k]) * x1;
                        }
                    }
                const int e = L - tb < 16 ? L - tb : 16;
                const v16 live = load_n((const float[16]){1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, e);
                for (int oc = 0; oc < C3; ++oc) {
                    const v16 a = a0[oc] + a1[oc];
                    store_n(y + ((s * M + m) * C3 + oc) * L + tb, a, e);
                    const v16 am = a * live;
                    acc_s[m * C3 + oc] += am;
                    acc_q[m * C3 + oc] += am * am;
                }
            }
        }
    for (int i = 0; i < M * C3; ++i) {
        float fs[16], fq[16];
        store(fs, acc_s[i]);
        store(fq, acc_q[i]);
        double su = 0.0, sq = 0.0;
        for (int u = 0; u < 16; ++u) { su += fs[u]; sq += fq[u]; }
        stats[i] += su;
        stats[M * C3 + i] += sq;
    }
    return 0;
}

#define TJ 8 /* input-gradient rows per register block in conv3_backward */

/* also the first pass of conv2's batch-norm backward: sums (2, C) += (gy, gy * xhat) over z's rows */
static int conv3_backward(const Bn2 *Q, const float *gy, long first, long n, int M, const float *w3k, float *gh,
                          float *gw /* (M, 4, K, 16) */, float *sums) {
    const int L = Q->L1 / 2, C = M * C2, rows = L + 2 * P, rows_c = ((rows + TJ - 1) / TJ) * TJ;
    v16 hp[MAXL3 + 2 * P];
    v16 gp[MAXL3 + 2 * P + TJ];
    float gz[C3][MAXL3 + 2 * P + TJ + K]; /* g of each output channel, K - 1 zeros before, zeros after */
    for (int oc = 0; oc < C3; ++oc)
        for (int t = 0; t < MAXL3 + 2 * P + TJ + K; ++t) gz[oc][t] = 0.f;
    for (long s = first; s < first + n; ++s) /* samples outermost: z, gy and gh stream through memory once */
        for (int m = 0; m < M; ++m) {
            const int ch = m * C2;
            const float *Wm = w3k + (long)m * C3 * K * C2;
            float *Gm = gw + (long)m * C3 * K * C2; /* this thread's partial, in L1 for M <= 16 */
            for (int t = 0; t < L; ++t) hp[P + t] = bn2_h(Q, s, t, ch);
            for (int t = 0; t < P; ++t) { hp[t] = hp[P]; hp[P + L + t] = hp[P + L - 1]; }
            for (int oc = 0; oc < C3; ++oc) memcpy(&gz[oc][K - 1], gy + ((s * M + m) * C3 + oc) * L, sizeof(float) * L);
            /* weight gradient: G[oc][k] += g[oc][t] * hpad[t + k], one output channel at a time (5 registers) */
            for (int oc = 0; oc < C3; ++oc) {
                v16 acc[K];
                for (int k = 0; k < K; ++k) acc[k] = load(Gm + (oc * K + k) * C2);
                for (int t = 0; t < L; ++t) {
                    const v16 gv = splat(gz[oc][K - 1 + t]);
                    for (int k = 0; k < K; ++k) acc[k] += gv * hp[t + k];
                }
                for (int k = 0; k < K; ++k) store(Gm + (oc * K + k) * C2, acc[k]);
            }
            /* gradient of the padded input: gp[j] = sum_{oc, k} g[oc][j - k] * w[oc][k] */
            for (int j0 = 0; j0 < rows_c; j0 += TJ) {
                v16 a[TJ];
                for (int u = 0; u < TJ; ++u) a[u] = splat(0.f);
                for (int oc = 0; oc < C3; ++oc)
                    for (int k = 0; k < K; ++k) {
                        const v16 w = load(Wm + (oc * K + k) * C2);
                        const float *g = &gz[oc][K - 1 + j0 - k];
                        for (int u = 0; u < TJ; ++u) a[u] += splat(g[u]) * w;
                    }
                for (int u = 0; u < TJ; ++u) gp[j0 + u] = a[u];
            }
            for (int t = 0; t < P; ++t) { gp[P] += gp[t]; gp[P + L - 1] += gp[P + L + t]; } /* the padding's gradients */
            float *ghs = gh + s * L * C + ch;
            for (int t = 0; t < L; ++t) store(ghs + (long)t * C, gp[P + t]);
            /* conv2's batch norm, pass 1 */
            const v16 mu = load(Q->mean + ch), is = load(Q->istd + ch);
            v16 s0 = splat(0.f), s1 = splat(0.f);
            for (int r = 0; r < Q->L1; ++r) {
                const v16 zv = load(Q->z + (s * Q->L1 + r) * C + ch);
                const v16 g = bn2_gy(Q, s, r, ch, gp[P + (r / 2 < L ? r / 2 : L - 1)], zv);
                s0 += g;
                s1 += g * ((zv - mu) * is);
            }
            store(sums + ch, load(sums + ch) + s0);
            store(sums + C + ch, load(sums + C + ch) + s1);
        }
    return 0;
}

typedef struct {
    const float *y, *a, *c, *mean, *istd, *go;
    const u64 *words;
    int L, CH, W;
    float keep;
} BnPoolW;

static int bnpoolw_forward(const BnPoolW *B, long first, long n, float *out) {
    const int L = B->L, W = B->W, Lw = (L + W - 1) / W;
    float r[MAXL3 + 16] __attribute__((aligned(64)));
    for (long s = first; s < first + n; ++s)
        for (int ch = 0; ch < B->CH; ++ch) {
            const long row = s * B->CH + ch;
            const v16 a = splat(B->a[ch]), c = splat(B->c[ch]);
            for (int tb = 0; tb < L; tb += 16) {
                const int e = L - tb < 16 ? L - tb : 16;
                const v16 v = load_n(B->y + row * L + tb, e) * a + c;
                store(r + tb, relu_kept(v, mask_bits_at(B->words, row * L + tb, e)));
            }
            for (int p = 0; p < Lw; ++p) {
                const int lo = p * W, hi = lo + W < L ? lo + W : L;
                float sum = 0.f;
                for (int t = lo; t < hi; ++t) sum += r[t];
                out[row * Lw + p] = sum * (B->keep / (float)(hi - lo));
            }
        }
    return 0;
}

/* per step t: its window's output index and the gradient factor keep / (the window's length) */
static void bnw_windows(const BnPoolW *B, int *pidx, float *pinv) {
    for (int t = 0; t < B->L; ++t) {
        const int p = t / B->W, lo = p * B->W, hi = lo + B->W < B->L ? lo + B->W : B->L;
        pidx[t] = p;
        pinv[t] = B->keep / (float)(hi - lo);
    }
}

/* gy of steps tb .. tb + e - 1 of a row, and their xhat */
static inline v16 bnw_gy(const BnPoolW *B, const int *pidx, const float *pinv, long row, int ch, int tb, int e,
                         v16 *xhat) {
    const int Lw = (B->L + B->W - 1) / B->W;
    float g[16] __attribute__((aligned(64)));
    for (int u = 0; u < 16; ++u) g[u] = u < e ? B->go[row * Lw + pidx[tb + u]] * pinv[tb + u] : 0.f;
    const v16 yv = load_n(B->y + row * B->L + tb, e);
    *xhat = (yv - splat(B->mean[ch])) * splat(B->istd[ch]);
    return grad_kept(load(g), yv * splat(B->a[ch]) + splat(B->c[ch]), mask_bits_at(B->words, row * B->L + tb, e));
}

static int bnpoolw_sums(const BnPoolW *B, long first, long n, float *sums /* (2, CH) */) {
    int pidx[MAXL3];
    float pinv[MAXL3];
    bnw_windows(B, pidx, pinv);
    for (int ch = 0; ch < B->CH; ++ch) {
        v16 s0 = splat(0.f), s1 = splat(0.f);
        for (long s = first; s < first + n; ++s)
            for (int tb = 0; tb < B->L; tb += 16) {
                const int e = B->L - tb < 16 ? B->L - tb : 16;
                v16 xhat;
                const v16 gy = bnw_gy(B, pidx, pinv, s * B->CH + ch, ch, tb, e, &xhat);
                s0 += gy;
                s1 += gy * xhat;
            }
        float f0[16], f1[16];
        store(f0, s0);
        store(f1, s1);
        for (int u = 0; u < 16; ++u) { sums[ch] += f0[u]; sums[B->CH + ch] += f1[u]; }
    }
    return 0;
}

static int bnpoolw_backward(const BnPoolW *B, long first, long n, const float *means /* (2, CH) */, float *gz) {
    int pidx[MAXL3];
    float pinv[MAXL3];
    bnw_windows(B, pidx, pinv);
    for (long s = first; s < first + n; ++s)
        for (int ch = 0; ch < B->CH; ++ch) {
            const long row = s * B->CH + ch;
            for (int tb = 0; tb < B->L; tb += 16) {
                const int e = B->L - tb < 16 ? B->L - tb : 16;
                v16 xhat;
                const v16 gy = bnw_gy(B, pidx, pinv, row, ch, tb, e, &xhat);
                store_n(gz + row * B->L + tb, splat(B->a[ch]) * (gy - splat(means[ch]) - xhat * splat(means[B->CH + ch])), e);
            }
        }
    return 0;
}

/* ---- Training: batch norm + ReLU of the dense layers, in their (members, batch, width) layout ---
 *
 * y (G, B, W), W a multiple of 16 (at most MAXW): per member g and channel, the batch mean and
 * variance over the B rows (two passes), then out = relu(gamma * (y - mean) / std + beta);
 * mean and var (G, W) are returned for the running statistics. PyTorch's batch norm needs the
 * channels innermost in (B, G*W) rows, which cost a transposed copy each way per layer.
 * Backward, for the gradient go of out: gy = go where out > 0; pass 1 sums gy and gy * xhat per
 * channel (the gradients of beta and gamma), pass 2 writes gz = gamma / std * (gy - mean(gy) -
 * xhat * mean(gy * xhat)) and, if dbias is not NULL, its sum over the batch.
 */
#define MAXW 128

static int bnrelu_forward(const float *y, long g0, long G, long B, int W, const float *gamma, const float *beta,
                          float eps, float *mean, float *var, float *out) {
    if (W % 16 || W > MAXW) return -1;
    const int V = W / 16;
    for (long g = g0; g < g0 + G; ++g) {
        const float *yg = y + g * B * W;
        float *og = out + g * B * W;
        v16 s[MAXW / 16], q[MAXW / 16], mu[MAXW / 16], sc[MAXW / 16], sh[MAXW / 16];
        for (int v = 0; v < V; ++v) { s[v] = splat(0.f); q[v] = splat(0.f); }
        for (long b = 0; b < B; ++b)
            for (int v = 0; v < V; ++v) s[v] += load(yg + b * W + v * 16);
        for (int v = 0; v < V; ++v) mu[v] = s[v] * splat(1.f / (float)B);
        for (long b = 0; b < B; ++b)
            for (int v = 0; v < V; ++v) { const v16 d = load(yg + b * W + v * 16) - mu[v]; q[v] += d * d; }
        for (int v = 0; v < V; ++v) {
            const v16 vr = q[v] * splat(1.f / (float)B);
            float vv[16], is[16];
            store(vv, vr);
            for (int i = 0; i < 16; ++i) is[i] = 1.f / sqrtf(vv[i] + eps);
            sc[v] = load(is) * load(gamma + g * W + v * 16);
            sh[v] = load(beta + g * W + v * 16) - mu[v] * sc[v];
            store(mean + g * W + v * 16, mu[v]);
            store(var + g * W + v * 16, vr);
        }
        for (long b = 0; b < B; ++b)
            for (int v = 0; v < V; ++v) store(og + b * W + v * 16, relu(load(yg + b * W + v * 16) * sc[v] + sh[v]));
    }
    return 0;
}

static int bnrelu_backward(const float *y, const float *out, const float *go, long g0, long G, long B, int W,
                           const float *gamma, const float *mean, const float *istd, float *gz, float *dgamma,
                           float *dbeta, float *dbias) {
    if (W % 16 || W > MAXW) return -1;
    const int V = W / 16;
    const vi16 zero = {0};
    for (long g = g0; g < g0 + G; ++g) {
        const long off = g * B * W;
        v16 sg[MAXW / 16], sx[MAXW / 16];
        for (int v = 0; v < V; ++v) { sg[v] = splat(0.f); sx[v] = splat(0.f); }
        for (long b = 0; b < B; ++b)
            for (int v = 0; v < V; ++v) {
                const long e = off + b * W + v * 16;
                const v16 gy = (v16)((vi16)load(go + e) & ((vi16)load(out + e) > zero)); /* out >= 0: its bits order as ints */
                sg[v] += gy;
                sx[v] += gy * ((load(y + e) - load(mean + g * W + v * 16)) * load(istd + g * W + v * 16));
            }
        v16 k[MAXW / 16], m0[MAXW / 16], m1[MAXW / 16];
        for (int v = 0; v < V; ++v) {
            store(dbeta + g * W + v * 16, sg[v]);
            store(dgamma + g * W + v * 16, sx[v]);
            k[v] = load(gamma + g * W + v * 16) * load(istd + g * W + v * 16);
            m0[v] = sg[v] * splat(1.f / (float)B);
            m1[v] = sx[v] * splat(1.f / (float)B);
        }
        v16 sz[MAXW / 16];
        for (int v = 0; v < V; ++v) sz[v] = splat(0.f);
        for (long b = 0; b < B; ++b)
            for (int v = 0; v < V; ++v) {
                const long e = off + b * W + v * 16;
                const v16 gy = (v16)((vi16)load(go + e) & ((vi16)load(out + e) > zero));
                const v16 xhat = (load(y + e) - load(mean + g * W + v * 16)) * load(istd + g * W + v * 16);
                const v16 gzv = k[v] * (gy - m0[v] - xhat * m1[v]);
                store(gz + e, gzv);
                sz[v] += gzv;
            }
        if (dbias) /* the gradient of a bias before the batch norm: gz summed over the batch (round-off) */
            for (int v = 0; v < V; ++v) store(dbias + g * W + v * 16, sz[v]);
    }
    return 0;
}

/* ---- Entry points: samples split over `threads` parts. Built with OpenMP (native.py tries
 * -fopenmp first), the parts run on the OpenMP runtime PyTorch has loaded (same soname), so
 * its worker threads are not left spinning against ours; without OpenMP they run one after
 * another and native.py gives each part to a thread of its own instead (threads = 1). */
int msda_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#define SPLIT(threads, n, body)                                                                   \
    int rc = 0;                                                                                   \
    _Pragma("omp parallel for num_threads(threads) schedule(static, 1) reduction(| : rc)")         \
    for (int i = 0; i < threads; ++i) {                                                           \
        const long lo = n * i / threads, hi = n * (i + 1) / threads;                              \
        rc |= (body);                                                                             \
    }                                                                                             \
    return rc;

int msda_conv_stage(const float *x, long row_stride, long offset, long n, int S, int L, int M,
                    const float *w1, const float *w2, const float *b2, const float *w3,
                    const float *b3, float *out, int threads) {
    const long per_sample = (long)M * C3 * (((L / 2) / 2 + 3) / 4);
    SPLIT(threads, n, conv_stage(x + lo * row_stride, row_stride, offset, hi - lo, S, L, M, w1, w2, b2, w3, b3,
                                 out + lo * per_sample))
}

static int check(int KC, int L) { return KC > MAXKC || L > MAXL || L < 2 ? -1 : 0; }

/* samples [first, first + n) of the batch; win, z and g point at the batch's first sample;
 * stats: `threads` partial (sum, sum of squares) of z per channel, (2, M*16) each, zeroed */
int msda_conv12_forward(const float *win, int KC, long first, long n, int L, int M, const float *wt1,
                        const u64 *words, float scale, const float *w2, const float *b2, float *z, double *stats,
                        int threads) {
    if (check(KC, L)) return -1;
    const Train T = {win, wt1, w2, b2, NULL, words, KC, L, M, scale};
    const long per_out = (long)(L / 2) * M * C2;
    SPLIT(threads, n, conv12_forward(&T, first + lo, hi - lo, z + (first + lo) * per_out,
                                     stats + (long)i * 2 * M * C2))
}

/* conv2's batch norm (Bn2) as its arrays */
#define BN2(z, a, c, mean, istd, words, scale, L1, C) {z, a, c, mean, istd, words, scale, L1, C}

/* gw1 (KC, M*32), gw2 (M, K, 32, 16) and gb2 (M*16): `threads` partial gradients each, one per
 * part; conv2's output gradient is made from z (n, L/2, M*16), its batch norm (a, c, mean, istd,
 * mask words2 and scale2), the gradient gh (n, L/4, M*16) of its pooled output and means (2,
 * M*16), the means of gy and gy * xhat over z's rows (see Bn2) */
int msda_conv12_backward(const float *win, int KC, long first, long n, int L, int M, const float *wt1,
                         const u64 *words, float scale, const float *w2t, const float *z, const float *a,
                         const float *c, const float *mean, const float *istd, const u64 *words2, float scale2,
                         const float *gh, const float *means, float *gw1, float *gw2, float *gb2, int threads) {
    if (check(KC, L)) return -1;
    const Train T = {win, wt1, NULL, NULL, w2t, words, KC, L, M, scale};
    const Bn2 Q = BN2(z, a, c, mean, istd, words2, scale2, L / 2, M * C2);
    SPLIT(threads, n, conv12_backward(&T, &Q, gh, means, first + lo, hi - lo, gw1 + (long)i * KC * M * C1,
                                      gw2 + (long)i * M * K * C1 * C2, gb2 + (long)i * M * C2))
}

/* conv3 on conv2's pooled output, made from z (n, L1, M*16) and its batch norm (see Bn2);
 * samples [first, first + n) of the batch; y (n, M*4, L1/2); stats: `threads` partials (2, M*4) */
int msda_conv3_forward(const float *z, const float *a, const float *c, const u64 *words, float scale, int L1,
                       long first, long n, int M, const float *w3, const float *b3, float *y, double *stats,
                       int threads) {
    if (L1 / 2 < 1 || L1 / 2 > MAXL3) return -1;
    const Bn2 Q = BN2(z, a, c, NULL, NULL, words, scale, L1, M * C2);
    SPLIT(threads, n, conv3_forward(&Q, first + lo, hi - lo, M, w3, b3, y, stats + (long)i * 2 * M * C3))
}

/* gh (n, L1/2, M*16), and `threads` partials of gw (M, 4, K, 16) and sums (2, M*16), zeroed */
int msda_conv3_backward(const float *z, const float *a, const float *c, const float *mean, const float *istd,
                        const u64 *words, float scale, int L1, const float *gy, long first, long n, int M,
                        const float *w3k, float *gh, float *gw, float *sums, int threads) {
    if (L1 / 2 < 1 || L1 / 2 > MAXL3) return -1;
    const Bn2 Q = BN2(z, a, c, mean, istd, words, scale, L1, M * C2);
    SPLIT(threads, n, conv3_backward(&Q, gy, first + lo, hi - lo, M, w3k, gh, gw + (long)i * M * C3 * K * C2,
                                     sums + (long)i * 2 * M * C2))
}

/* y, go, out, gz point at the batch's first sample; samples [first, first + n) */
int msda_bnpoolw_forward(const float *y, long first, long n, int L, int CH, int W, const float *a, const float *c,
                         const u64 *words, float keep, float *out, int threads) {
    if (L < 1 || W < 1) return -1;
    const BnPoolW B = {y, a, c, NULL, NULL, NULL, words, L, CH, W, keep};
    SPLIT(threads, n, bnpoolw_forward(&B, first + lo, hi - lo, out))
}

int msda_bnpoolw_sums(const float *y, long first, long n, int L, int CH, int W, const float *a, const float *c,
                      const float *mean, const float *istd, const u64 *words, float keep, const float *go,
                      float *sums, int threads) {
    if (L < 1 || W < 1) return -1;
    const BnPoolW B = {y, a, c, mean, istd, go, words, L, CH, W, keep};
    SPLIT(threads, n, bnpoolw_sums(&B, first + lo, hi - lo, sums + (long)i * 2 * CH))
}

int msda_bnpoolw_backward(const float *y, long first, long n, int L, int CH, int W, const float *a, const float *c,
                          const float *mean, const float *istd, const u64 *words, float keep, const float *go,
                          const float *means, float *gz, int threads) {
    if (L < 1 || W < 1) return -1;
    const BnPoolW B = {y, a, c, mean, istd, go, words, L, CH, W, keep};
    SPLIT(threads, n, bnpoolw_backward(&B, first + lo, hi - lo, means, gz))
}

/* members split over threads */
int msda_bnrelu_forward(const float *y, long G, long B, int W, const float *gamma, const float *beta, float eps,
                        float *mean, float *var, float *out, int threads) {
    SPLIT(threads, G, bnrelu_forward(y, lo, hi - lo, B, W, gamma, beta, eps, mean, var, out))
}

int msda_bnrelu_backward(const float *y, const float *out, const float *go, long G, long B, int W,
                         const float *gamma, const float *mean, const float *istd, float *gz, float *dgamma,
                         float *dbeta, float *dbias, int threads) {
    SPLIT(threads, G, bnrelu_backward(y, out, go, lo, hi - lo, B, W, gamma, mean, istd, gz, dgamma, dbeta, dbias))
}
