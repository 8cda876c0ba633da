/* Fused CPU kernels for the NRPM IRLS: forward and analytic backward, float32 and float64.
 *
 * The math is stated in robust_surgery/nn/functional.py (the reweighting functions phi and
 * their derivatives) and its vector-Jacobian product in robust_surgery/nn/kernels.py; this file
 * computes exactly that, one (row, output) pair at a time, streaming over the D product terms
 * u_d = x_d a_d without storing any of them. Built and loaded by cpu_kernels.py (ctypes), which
 * documents the layouts:
 *   rows gathered from xp (see the entry points), w (G, O, D), z tensors (G, R, O), contiguous;
 *   zs, ss: (K, G, R, O) = z_1..z_K and the weight sums S_0..S_{K-1} (kept for backward).
 * Rows are shared out over OpenMP threads dynamically; in backward each of a fixed number of work
 * partitions adds its weight gradient into its own slice of gw_scratch (parts, G, O, D), summed by
 * the caller, so the result does not depend on the thread count.
 *
 * The file includes itself once per dtype (REAL = float, double).
 */
#ifndef NRPM_BODY
#define NRPM_BODY
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#define NRPM_THREAD_ID() ((int64_t)omp_get_thread_num())
#else
#define NRPM_THREAD_ID() ((int64_t)0)
#endif

/* Denormal numbers (below 1.2e-38 in float32) cost a CPU about 30 times more per operation;
 * upstream gradients reach them (a confidently classified point's softmax tail), so the kernels
 * run with flush-to-zero and denormals-are-zero set in each thread, and restore the previous
 * state when they finish. On other architectures this is a no-op. */
#if defined(__SSE2__)
#include <xmmintrin.h>
#define NRPM_FLUSH_DENORMALS_BEGIN         \
    const unsigned int nrpm_csr = _mm_getcsr(); \
    _mm_setcsr(nrpm_csr | 0x8040u); /* FTZ (bit 15) and DAZ (bit 6) */
#define NRPM_FLUSH_DENORMALS_END _mm_setcsr(nrpm_csr);
#else
#define NRPM_FLUSH_DENORMALS_BEGIN
#define NRPM_FLUSH_DENORMALS_END
#endif

#define NRPM_ABS(v) ((v) < 0 ? -(v) : (v))
#define NRPM_SIGN(v) ((REAL)(((v) > 0) - ((v) < 0)))

/* norm codes: 0 L2, 1 L1, 2 MCP, 3 Huber, 4 HM (functional.NORM_CODES) */
#define NRPM_DISPATCH(norm, CALL) \
    switch (norm) {               \
    case 0: CALL(0); break;       \
    case 1: CALL(1); break;       \
    case 2: CALL(2); break;       \
    case 3: CALL(3); break;       \
    default: CALL(4); break;      \
    }

#define REAL float
#define NAME(n) n##_f32
#include "_nrpm_cpu.c"
#undef REAL
#undef NAME

#define REAL double
#define NAME(n) n##_f64
#include "_nrpm_cpu.c"
#undef REAL
#undef NAME

#else /* NRPM_BODY: the kernels for one REAL type */

/* phi(dist) and phi'(dist); phi' = 0 where a clamp is active or tied (torch's subgradient).
 * Every value is computed before it is selected, so each ?: is a blend, not a branch: without
 * masked vector operations (AVX2, NEON) a branch keeps the d loops scalar. */
static inline __attribute__((always_inline)) REAL NAME(phi)(REAL dist, const int norm, REAL eps, REAL gamma,
                                                            REAL delta, REAL *dw)
{
    const REAL zero = 0, one = 1;
    if (norm == 0) { /* L2 */
        *dw = zero;
        return one;
    }
    if (norm == 1) { /* L1 */
        const REAL t = one / (dist + eps), d1 = -t * t;
        *dw = d1;
        return t;
    }
    if (norm == 2) { /* MCP */
        const REAL t = one / (dist + eps), v = t - one / gamma, d1 = -t * t;
        const int active = v > eps;
        *dw = active ? d1 : zero;
        return active ? v : eps;
    }
    if (norm == 3) { /* Huber */
        const REAL t = delta / (dist + eps), d1 = -t * t / delta;
        const int active = t < one;
        *dw = active ? d1 : zero;
        return active ? t : one;
    }
    { /* HM */
        const REAL t = one / (dist + eps), c = delta / (gamma - delta);
        const REAL v = c * (gamma * t - one), d1 = -(c * gamma) * t * t;
        const int lo = v < eps, hi = v > one;
        *dw = (lo || hi) ? zero : d1;
        const REAL upper = hi ? one : v;
        return lo ? eps : upper;
    }
}

/* One IRLS step's sums for output j of a block: the term u = x_d a_jd, its weight, Σ w and Σ w u. */
#define NRPM_FWD_TERM(j)                                                          \
    {                                                                             \
        const REAL u = xd * a##j[d];                                              \
        REAL dw;                                                                  \
        const REAL wt = NAME(phi)(NRPM_ABS(u - c##j), norm, eps, gamma, delta, &dw); \
        den##j += wt;                                                             \
        num##j += wt * u;                                                         \
    }

/* K IRLS steps for every output of one row. Outputs go four at a time: one load of x_d serves
 * them all and their eight sums are independent chains; the rest one at a time. */
static inline __attribute__((always_inline)) void NAME(fwd_row)(
    const REAL *restrict xr, const REAL *restrict wg, const REAL *restrict z0r, REAL *restrict outr,
    REAL *restrict zsr, REAL *restrict ssr, int64_t O, int64_t D, int K, int64_t plane, int keep,
    const int norm, REAL eps, REAL gamma, REAL delta)
{
    const REAL Dr = (REAL)D;
    const REAL smin = (REAL)1e-12;
    int64_t o = 0;
    for (; o + 4 <= O; o += 4) {
        const REAL *restrict a0 = wg + o * D, *restrict a1 = a0 + D, *restrict a2 = a1 + D, *restrict a3 = a2 + D;
        REAL z[4] = {z0r[o], z0r[o + 1], z0r[o + 2], z0r[o + 3]};
        for (int k = 0; k < K; k++) {
            const REAL c0 = z[0] / Dr, c1 = z[1] / Dr, c2 = z[2] / Dr, c3 = z[3] / Dr;
            REAL num0 = 0, num1 = 0, num2 = 0, num3 = 0, den0 = 0, den1 = 0, den2 = 0, den3 = 0;
#pragma omp simd reduction(+ : num0, num1, num2, num3, den0, den1, den2, den3)
            for (int64_t d = 0; d < D; d++) {
                const REAL xd = xr[d];
                NRPM_FWD_TERM(0)
                NRPM_FWD_TERM(1)
                NRPM_FWD_TERM(2)
                NRPM_FWD_TERM(3)
            }
            const REAL nums[4] = {num0, num1, num2, num3}, dens[4] = {den0, den1, den2, den3};
            for (int j = 0; j < 4; j++) {
                z[j] = Dr * nums[j] / (dens[j] > smin ? dens[j] : smin);
                if (keep) {
                    zsr[k * plane + o + j] = z[j];
                    ssr[k * plane + o + j] = dens[j];
                }
            }
        }
        for (int j = 0; j < 4; j++)
            outr[o + j] = z[j];
    }
    for (; o < O; o++) {
        const REAL *restrict a0 = wg + o * D;
        REAL z = z0r[o];
        for (int k = 0; k < K; k++) {
            const REAL c0 = z / Dr;
            REAL num0 = 0, den0 = 0;
#pragma omp simd reduction(+ : num0, den0)
            for (int64_t d = 0; d < D; d++) {
                const REAL xd = xr[d];
                NRPM_FWD_TERM(0)
            }
            z = Dr * num0 / (den0 > smin ? den0 : smin);
            if (keep) {
                zsr[k * plane + o] = z;
                ssr[k * plane + o] = den0;
            }
        }
        outr[o] = z;
    }
}

/* Backward of one IRLS step k for output j (index oj) of a block: its scalars from the saved
 * iterates, then per term its weight, a = phi'·sign·(u − z_{k+1}/D), the term gradient
 * gu = (w + a)·g·D/S, and the two reductions (into gxd, the row's sum over the block, and gw). */
#define NRPM_BWD_PREP(j, oj)                                                                  \
    const REAL S##j = ssr[k * plane + (oj)];                                                   \
    const REAL Sc##j = S##j > smin ? S##j : smin;                                              \
    const REAL zn##j = S##j > smin ? zsr[k * plane + (oj)] / Dr : 0; /* clamp active: drops */ \
    const REAL c##j = (k == 0 ? z0r[oj] : zsr[(k - 1) * plane + (oj)]) / Dr;                   \
    const REAL gs##j = grad[j] * Dr / Sc##j;                                                   \
    REAL asum##j = 0;
#define NRPM_BWD_TERM(j)                                                              \
    {                                                                                 \
        const REAL u = xd * a##j[d];                                                  \
        const REAL r = u - c##j;                                                      \
        REAL dw;                                                                      \
        const REAL wt = NAME(phi)(NRPM_ABS(r), norm, eps, gamma, delta, &dw);         \
        const REAL av = dw * NRPM_SIGN(r) * (u - zn##j);                              \
        asum##j += av;                                                                \
        const REAL gu = (wt + av) * gs##j;                                            \
        gxd += gu * a##j[d];                                                          \
        if (need_w)                                                                   \
            gw##j[d] += gu * xd;                                                      \
    }

/* Analytic VJP of the K steps for every output of one row: adds into gxr (D) and gwg (O, D).
 * Outputs four at a time (as in fwd_row), the rest one at a time. */
static inline __attribute__((always_inline)) void NAME(bwd_row)(
    const REAL *restrict xr, const REAL *restrict wg, const REAL *restrict z0r, const REAL *restrict zsr,
    const REAL *restrict ssr, const REAL *restrict gr_in, REAL *restrict gxr, REAL *restrict gwg,
    REAL *restrict gz0r, int64_t O, int64_t D, int K, int64_t plane, int need_x, int need_w, const int norm,
    REAL eps, REAL gamma, REAL delta)
{
    const REAL Dr = (REAL)D;
    const REAL smin = (REAL)1e-12;
    int64_t o = 0;
    for (; o + 4 <= O; o += 4) {
        const REAL *restrict a0 = wg + o * D, *restrict a1 = a0 + D, *restrict a2 = a1 + D, *restrict a3 = a2 + D;
        REAL *restrict gw0 = gwg + o * D, *restrict gw1 = gw0 + D, *restrict gw2 = gw1 + D, *restrict gw3 = gw2 + D;
        REAL grad[4] = {gr_in[o], gr_in[o + 1], gr_in[o + 2], gr_in[o + 3]};
        for (int k = K - 1; k >= 0; k--) {
            NRPM_BWD_PREP(0, o)
            NRPM_BWD_PREP(1, o + 1)
            NRPM_BWD_PREP(2, o + 2)
            NRPM_BWD_PREP(3, o + 3)
#pragma omp simd reduction(+ : asum0, asum1, asum2, asum3)
            for (int64_t d = 0; d < D; d++) {
                const REAL xd = xr[d];
                REAL gxd = 0;
                NRPM_BWD_TERM(0)
                NRPM_BWD_TERM(1)
                NRPM_BWD_TERM(2)
                NRPM_BWD_TERM(3)
                if (need_x)
                    gxr[d] += gxd;
            }
            grad[0] = -(grad[0] / Sc0) * asum0;
            grad[1] = -(grad[1] / Sc1) * asum1;
            grad[2] = -(grad[2] / Sc2) * asum2;
            grad[3] = -(grad[3] / Sc3) * asum3;
        }
        for (int j = 0; j < 4; j++)
            gz0r[o + j] = grad[j];
    }
    for (; o < O; o++) {
        const REAL *restrict a0 = wg + o * D;
        REAL *restrict gw0 = gwg + o * D;
        REAL grad[1] = {gr_in[o]};
        for (int k = K - 1; k >= 0; k--) {
            NRPM_BWD_PREP(0, o)
#pragma omp simd reduction(+ : asum0)
            for (int64_t d = 0; d < D; d++) {
                const REAL xd = xr[d];
                REAL gxd = 0;
                NRPM_BWD_TERM(0)
                if (need_x)
                    gxr[d] += gxd;
            }
            grad[0] = -(grad[0] / Sc0) * asum0;
        }
        gz0r[o] = grad[0];
    }
}

/* ---- The entry points: rows gathered from the input xp ----
 * Row (g, b, l) holds the D values xp[b*item_stride + g*group_stride + loff[l] + koff[d]]. For a
 * convolution xp is the padded input, koff the offsets of the D = C/G * prod(kernel) taps inside
 * one item's group block and loff the offset of each output position's window; for dense rows
 * x (G, R, D) an "item" is one row (Lp = 1, loff = {0}, koff = 0..D-1). Each row is gathered into
 * a small per-thread buffer, then runs the row kernels above; backward scatters the row's input
 * gradient back the same way. Backward shares out whole (group, item) blocks, so no two threads add
 * into the same place, or, for few blocks (one image), single rows with a private input gradient
 * per partition. */
static inline __attribute__((always_inline)) void NAME(gather)(REAL *restrict buf, const REAL *restrict base,
                                                               const int64_t *restrict koff, int64_t D)
{
    for (int64_t d = 0; d < D; d++)
        buf[d] = base[koff[d]];
}

void NAME(nrpm_forward)(const REAL *xp, const int64_t *koff, const int64_t *loff, const REAL *w,
                             const REAL *z0, REAL *out, REAL *zs, REAL *ss, int64_t G, int64_t B, int64_t Lp,
                             int64_t O, int64_t D, int64_t item_stride, int64_t group_stride, int K, int norm,
                             double eps, double gamma, double delta, int keep, int threads)
{
    const int64_t R = B * Lp, plane = G * R * O, rows = G * R;
    const REAL e = (REAL)eps, ga = (REAL)gamma, de = (REAL)delta;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        NRPM_FLUSH_DENORMALS_BEGIN
        REAL *buf = (REAL *)malloc((size_t)D * sizeof(REAL));
#pragma omp for schedule(guided) /* rows are independent: any schedule gives the same numbers */
        for (int64_t gr = 0; gr < rows; gr++) {
            const int64_t g = gr / R, r = gr % R, b = r / Lp, l = r % Lp;
            NAME(gather)(buf, xp + b * item_stride + g * group_stride + loff[l], koff, D);
            const REAL *wg = w + g * O * D;
#define NRPM_FWD(N) \
    NAME(fwd_row)(buf, wg, z0 + gr * O, out + gr * O, zs + gr * O, ss + gr * O, O, D, K, plane, keep, N, e, ga, de)
            NRPM_DISPATCH(norm, NRPM_FWD)
#undef NRPM_FWD
        }
        free(buf);
        NRPM_FLUSH_DENORMALS_END
    }
}

void NAME(nrpm_backward)(const REAL *xp, const int64_t *koff, const int64_t *loff, const REAL *w,
                              const REAL *z0, const REAL *zs, const REAL *ss, const REAL *grad, REAL *gxp,
                              REAL *gw_scratch, REAL *gz0, int64_t G, int64_t B, int64_t Lp, int64_t O, int64_t D,
                              int64_t item_stride, int64_t group_stride, int64_t gx_stride, int64_t parts, int K,
                              int norm, double eps, double gamma, double delta, int need_x, int need_w, int threads)
{
    /* The work units (whole (group, item) blocks of rows, or, with gx_stride > 0, single rows) are
     * cut into `parts` fixed, contiguous partitions; partition p adds its weight gradient into its
     * own slice gw_scratch + p * G*O*D (and, with gx_stride, its input gradient into gxp + p *
     * gx_stride), and the caller sums the slices in order. Partitions go to threads dynamically, so
     * a thread slowed by another process hands its share to the others, and the result depends on
     * neither the thread count nor the schedule: bit for bit the same with 1 thread or 16. */
    const int64_t R = B * Lp, plane = G * R * O;
    const int64_t per = gx_stride ? 1 : Lp, units = gx_stride ? G * R : G * B;
    const REAL e = (REAL)eps, ga = (REAL)gamma, de = (REAL)delta;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        NRPM_FLUSH_DENORMALS_BEGIN
        REAL *buf = (REAL *)malloc(2 * (size_t)D * sizeof(REAL));
        REAL *gbuf = buf + D;
#pragma omp for schedule(dynamic, 1)
        for (int64_t part = 0; part < parts; part++) {
            REAL *gwt = gw_scratch + part * G * O * D;
            REAL *gxt = gxp + part * gx_stride;
            const int64_t first = part * units / parts, last = (part + 1) * units / parts;
            for (int64_t unit = first; unit < last; unit++) {
                for (int64_t j = 0; j < per; j++) {
                    const int64_t gr = unit * per + j; /* = g * R + b * Lp + l */
                    const int64_t g = gr / R, b = (gr % R) / Lp, l = gr % Lp;
                    const int64_t at = b * item_stride + g * group_stride + loff[l];
                    NAME(gather)(buf, xp + at, koff, D);
                    if (need_x)
                        for (int64_t d = 0; d < D; d++)
                            gbuf[d] = 0;
/* need_x / need_w are compile-time constants in each call, so no loop has a branch: without
 * masked stores (AVX2, NEON) a conditional store inside the d loop keeps it scalar. */
#define NRPM_BWD_CALL(N, NX, NW)                                                                            \
    NAME(bwd_row)(buf, w + g * O * D, z0 + gr * O, zs + gr * O, ss + gr * O, grad + gr * O, NX ? gbuf : NULL,  \
                  gwt + g * O * D, gz0 + gr * O, O, D, K, plane, NX, NW, N, e, ga, de)
#define NRPM_BWD(N)                    \
    if (need_x && need_w)              \
        NRPM_BWD_CALL(N, 1, 1);        \
    else if (need_x)                   \
        NRPM_BWD_CALL(N, 1, 0);        \
    else if (need_w)                   \
        NRPM_BWD_CALL(N, 0, 1);        \
    else                               \
        NRPM_BWD_CALL(N, 0, 0);
                    NRPM_DISPATCH(norm, NRPM_BWD)
#undef NRPM_BWD
#undef NRPM_BWD_CALL
                    if (need_x) {
                        REAL *gbase = gxt + at;
                        for (int64_t d = 0; d < D; d++)
                            gbase[koff[d]] += gbuf[d];
                    }
                }
            }
        }
        free(buf);
        NRPM_FLUSH_DENORMALS_END
    }
}

#endif /* NRPM_BODY */
