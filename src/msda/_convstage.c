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

/* ---- Training: the first convolution of StackedEnsemble (stacked.py) --------------------------
 *
 * Every member sees the same windows, and its batch norm is folded into the weights, so the
 * layer is one product of the windows `win` (n*L rows of KC = S*K + 1 values, the last 1 for the
 * bias) with wt (KC, C), C = members x 32 channels, followed by ReLU, dropout (p = 0.5, its x2
 * cancelling the pool's /2) and a pool of pairs of steps, written replicate-padded by `pad`
 * steps: out (n, L/2 + 2 pad, C). The dropout mask is the bits of `words` (torch draws them):
 * element (row r, channel c) is kept when bit r*C + c is set; words == NULL is eval mode (no
 * dropout; the pool's 1/2 is `scale`). The backward pass makes the activation again from the windows
 * (never stored) and accumulates the weight gradient into gw (KC, C).
 * Samples are [first, first + n) of the batch (the mask's row numbers); C a multiple of 32.
 */
#define TR 8     /* steps per register block */
#define MAXKC 64 /* most window values (native.MAX_SERIES * K + 1 < 64) */

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

/* rows t0 .. t0+TR of one sample's windows (local, zero-padded) times channels c0 .. c0+31 */
static inline void conv1_block(const float *pl, int KC, const float *wt, int C, int c0, int t0, v16 a0[TR], v16 a1[TR]) {
    for (int u = 0; u < TR; ++u) { a0[u] = splat(0.f); a1[u] = splat(0.f); }
    for (int k = 0; k < KC; ++k) {
        const v16 wa = load(wt + (long)k * C + c0), wb = load(wt + (long)k * C + c0 + 16);
        for (int u = 0; u < TR; ++u) {
            const v16 xv = splat(pl[(t0 + u) * KC + k]);
            a0[u] += wa * xv;
            a1[u] += wb * xv;
        }
    }
}

static int load_windows(float *pl, const float *win, long b, int L, int KC) {
    const int Lc = ((L + TR - 1) / TR) * TR;
    memcpy(pl, win + b * L * KC, sizeof(float) * L * KC);
    memset(pl + L * KC, 0, sizeof(float) * (Lc - L) * KC);
    return Lc;
}

static int conv1_forward(const float *win, int KC, long first, long n, int L, int C, const float *wt,
                       const u64 *words, int pad, float scale, float *out) {
    if (KC > MAXKC || L > MAXL || L < 2 || C % 32) return -1;
    const int half = L / 2, rows_out = half + 2 * pad;
    float pl[(MAXL + TR) * MAXKC];
    for (long b = 0; b < n; ++b) {
        const int Lc = load_windows(pl, win, b, L, KC);
        float *o = out + b * rows_out * C;
        for (int c0 = 0; c0 < C; c0 += 32)
            for (int t0 = 0; t0 < Lc; t0 += TR) {
                v16 a0[TR], a1[TR];
                conv1_block(pl, KC, wt, C, c0, t0, a0, a1);
                for (int u = 0; u < TR; ++u) {
                    /* rows past L are zero windows (relu 0), their mask bits never read */
                    const long e = ((first + b) * L + t0 + u) * (long)C + c0;
                    a0[u] = relu_kept(a0[u], t0 + u < L ? mask_bits(words, e) : 0);
                    a1[u] = relu_kept(a1[u], t0 + u < L ? mask_bits(words, e + 16) : 0);
                }
                for (int u = 0; u < TR; u += 2) {
                    const int j = (t0 + u) / 2;
                    if (j >= half) break;
                    v16 p0 = a0[u] + a0[u + 1], p1 = a1[u] + a1[u + 1];
                    if (!words) { p0 *= splat(scale); p1 *= splat(scale); }
                    store(o + (pad + j) * C + c0, p0);
                    store(o + (pad + j) * C + c0 + 16, p1);
                }
            }
        for (int t = 0; t < pad; ++t) {
            memcpy(o + t * C, o + pad * C, sizeof(float) * C);
            memcpy(o + (pad + half + t) * C, o + (pad + half - 1) * C, sizeof(float) * C);
        }
    }
    return 0;
}

static int conv1_backward(const float *win, int KC, long first, long n, int L, int C, const float *wt,
                        const u64 *words, int pad, float scale, const float *grad, float *gw) {
    if (KC > MAXKC || L > MAXL || L < 2 || C % 32) return -1;
    const int half = L / 2, rows_out = half + 2 * pad;
    float pl[(MAXL + TR) * MAXKC];
    float gp[MAXL / 2 + TR][32] __attribute__((aligned(64))); /* pooled gradient, padding folded */
    for (long b = 0; b < n; ++b) {
        const int Lc = load_windows(pl, win, b, L, KC);
        const float *g = grad + b * rows_out * C;
        for (int c0 = 0; c0 < C; c0 += 32) {
            for (int j = 0; j < half; ++j) {
                v16 x0 = load(g + (pad + j) * C + c0), x1 = load(g + (pad + j) * C + c0 + 16);
                if (j == 0)
                    for (int t = 0; t < pad; ++t) { x0 += load(g + t * C + c0); x1 += load(g + t * C + c0 + 16); }
                if (j == half - 1)
                    for (int t = pad + half; t < rows_out; ++t) { x0 += load(g + t * C + c0); x1 += load(g + t * C + c0 + 16); }
                store(gp[j], x0 * splat(scale));
                store(gp[j] + 16, x1 * splat(scale));
            }
            for (int j = half; j < half + TR; ++j) { store(gp[j], splat(0.f)); store(gp[j] + 16, splat(0.f)); }
            for (int t0 = 0; t0 < Lc; t0 += TR) {
                v16 a0[TR], a1[TR];
                conv1_block(pl, KC, wt, C, c0, t0, a0, a1);
                for (int u = 0; u < TR; ++u) {
                    /* the pooled gradient where z > 0 and kept; rows past 2*half (pooled away) get 0 */
                    const int j = (t0 + u) / 2, live = t0 + u < 2 * half;
                    const long e = ((first + b) * L + t0 + u) * (long)C + c0;
                    a0[u] = grad_kept(load(gp[j]), a0[u], live ? mask_bits(words, e) : 0);
                    a1[u] = grad_kept(load(gp[j] + 16), a1[u], live ? mask_bits(words, e + 16) : 0);
                }
                for (int k = 0; k < KC; ++k) {
                    float *wr = gw + (long)k * C + c0;
                    v16 s0 = load(wr), s1 = load(wr + 16);
                    for (int u = 0; u < TR; ++u) {
                        const v16 xv = splat(pl[(t0 + u) * KC + k]);
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

int msda_conv1_forward(const float *win, int KC, long first, long n, int L, int C, const float *wt,
                       const u64 *words, int pad, float scale, float *out, int threads) {
    const long per_out = (long)(L / 2 + 2 * pad) * C;
    SPLIT(threads, n, conv1_forward(win + lo * L * KC, KC, first + lo, hi - lo, L, C, wt, words, pad, scale,
                                    out + lo * per_out))
}

/* gw: `threads` partial gradients (KC, C), one per part, to be summed by the caller */
int msda_conv1_backward(const float *win, int KC, long first, long n, int L, int C, const float *wt,
                        const u64 *words, int pad, float scale, const float *grad, float *gw, int threads) {
    const long per_out = (long)(L / 2 + 2 * pad) * C;
    SPLIT(threads, n, conv1_backward(win + lo * L * KC, KC, first + lo, hi - lo, L, C, wt, words, pad, scale,
                                     grad + lo * per_out, gw + (long)i * KC * C))
}
