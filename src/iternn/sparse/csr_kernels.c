/*
 * iternn's compiled CSR kernels (see iternn/sparse/native.py, which builds and loads
 * this file, and iternn/sparse/kernels.py, which calls it).
 *
 * A block W (rows x srcs, row = destination index, column = source index) is stored as
 * CSR: crow (rows + 1), col (nnz) and val (nnz), int32 indices. Two products cover the
 * forward and backward of y = x W^T + b for a batch x (B x srcs):
 *
 *   iternn_spmm_*:  Y[b, i] = bias[i] + sum_k val[k] X[b, col[k]]   (k in row i)
 *       the forward (W, x -> y) and, with the transposed pattern, the input gradient
 *       (W^T, g -> dx);
 *   iternn_sdd_*:   dv[k] = sum_b G[b, row(k)] X[b, col[k]]
 *       the value gradient: the dense product G^T X sampled at the stored entries only.
 *
 * X, Y and G are addressed through (batch, feature) element strides, so row-major,
 * transposed, sliced or broadcast (stride 0) operands are read and written in place,
 * without the transposed copies a CSR x dense library call needs.
 *
 * Layout. The batch is cut into tiles of TILE columns (4 SIMD vectors: 32 floats or 16
 * doubles). For each tile the operand X is packed into a (srcs x TILE) buffer, one
 * aligned row of TILE numbers per source index, so every stored entry reads one
 * contiguous row of the pack (cache resident: 512 KB for 4096 sources in float32).
 * Rows are then processed in chunks of CHUNK: four (or eight) vector accumulators per
 * row, written to a small per-thread buffer and from there to Y with the batch stride.
 * The value gradient packs G the same way and reduces VL entries of a row at a time
 * with a transpose-and-add of their VL partial-sum vectors.
 *
 * Batches of one or two (a recurrence stepped per element, a dynamics probe) skip the
 * tiles, which would spend 32 lanes of work on one or two useful ones: one gather-dot
 * per row and batch element instead (measured, 2 threads: 1024 x 1024 at 10 %, batch 1,
 * 104 us vs 154 us tiled; 4096 x 4096 at 1 %, 148 us vs 544 us; at batch 4 the tiles win).
 *
 * Threads (OpenMP, the count passed by the caller): the pack is split over sources,
 * the rows over chunks. Every output number is computed by one thread in a fixed order,
 * so results do not depend on the thread count. Without OpenMP the pragmas are ignored
 * and the kernels run on one thread.
 *
 * Indices. The kernels read and write only memory they are handed, whatever the index
 * buffers hold: Python checks a pattern once and remembers it, but a write through .data
 * or a NumPy view changes a buffer without its version counter, behind that memo. Each
 * call is given nnz, the length of col and val (or dv), and requires crow[0] == 0 and
 * crow[rows] == nnz. Each chunk of rows then checks, before reading them, that its row
 * pointers are non-decreasing within [0, nnz] and that its column indices (contiguous:
 * col[crow[i0] .. crow[i1])) are in [0, srcs): two vectorised passes (compares, an
 * unsigned max), after which the product finds the indices in cache. A chunk that fails
 * is skipped and sets its thread's error flag (OR-reduced over the threads); the tiled
 * products check in their first batch tile only (the later tiles read the same indices)
 * and stop after it. The call then returns 2, its outputs partly written and
 * meaningless; native.py raises. For a valid pattern the checks change no number.
 * (Another thread writing the buffers during a call is a data race, not covered.)
 * Measured cost (2 threads): within noise for 4096 x 4096 at batch 256; about 4 % of
 * forward + backward at batch 1 (1024 x 1024 at 10 %).
 *
 * Return value: 0; 1 when a work buffer could not be allocated; 2 when an index was
 * out of range (see above).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define NVEC 4     /* SIMD vectors per batch tile */
#define CHUNK 64   /* rows (or sources) per unit of work */
#define PREFETCH 16 /* stored entries ahead to prefetch in the forward product */
#ifndef SMALL_BATCH
#define SMALL_BATCH 3 /* batches below this skip the tiles (see spmm_small_rows) */
#endif

/* may_alias: the vectors are read from and written to arrays of their element type */
typedef float vf32 __attribute__((vector_size(32), may_alias));
typedef double vf64 __attribute__((vector_size(32), may_alias));

/* r[l] = sum of the lanes of s[l], for the VL vectors s[0..VL-1] */
static inline vf32 lane_sums_f32(const vf32 *s)
{
#if defined(__AVX__)
    __m256 h01 = _mm256_hadd_ps((__m256)s[0], (__m256)s[1]);
    __m256 h23 = _mm256_hadd_ps((__m256)s[2], (__m256)s[3]);
    __m256 h45 = _mm256_hadd_ps((__m256)s[4], (__m256)s[5]);
    __m256 h67 = _mm256_hadd_ps((__m256)s[6], (__m256)s[7]);
    __m256 a = _mm256_hadd_ps(h01, h23), b = _mm256_hadd_ps(h45, h67);
    return (vf32)_mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20),
                               _mm256_permute2f128_ps(a, b, 0x31));
#else
    vf32 r;
    for (int l = 0; l < 8; l++) {
        float t = 0;
        for (int m = 0; m < 8; m++) t += s[l][m];
        r[l] = t;
    }
    return r;
#endif
}

static inline vf64 lane_sums_f64(const vf64 *s)
{
#if defined(__AVX__)
    __m256d h01 = _mm256_hadd_pd((__m256d)s[0], (__m256d)s[1]);
    __m256d h23 = _mm256_hadd_pd((__m256d)s[2], (__m256d)s[3]);
    return (vf64)_mm256_add_pd(_mm256_permute2f128_pd(h01, h23, 0x20),
                               _mm256_permute2f128_pd(h01, h23, 0x31));
#else
    vf64 r;
    for (int l = 0; l < 4; l++) {
        double t = 0;
        for (int m = 0; m < 4; m++) t += s[l][m];
        r[l] = t;
    }
    return r;
#endif
}

static void *work_buffer(size_t bytes)
{
    return aligned_alloc(64, bytes ? (bytes + 63) / 64 * 64 : 64);
}

#define MIN(a, b) ((a) < (b) ? (a) : (b))

#define ERR_ALLOC 1
#define ERR_INDEX 2

static inline uint32_t col_limit(int64_t srcs)
{
    return srcs < ((int64_t)1 << 31) ? (uint32_t)srcs : (uint32_t)1 << 31;
}

/* whether rows [i0, i1) can be read: 0 <= crow[i0] <= ... <= crow[i1] <= nnz, and every
 * column index in [crow[i0], crow[i1]) (the rows' entries, contiguous) is in [0, srcs).
 * lim = min(srcs, 2^31): a negative index, read as unsigned, is >= 2^31. Two vectorised
 * passes (compares, an unsigned max) over the chunk's pointers and indices, which the
 * product then reads again from cache. */
static inline int rows_ok(const int32_t *crow, const int32_t *col, int64_t i0, int64_t i1,
                          int64_t nnz, int64_t srcs)
{
    const int32_t a = crow[i0], b = crow[i1];
    if (a < 0 || b < a || (int64_t)b > nnz) return 0;
    int up = 1;
    for (int64_t i = i0; i < i1; i++) up &= crow[i + 1] >= crow[i];
    if (!up) return 0;
    uint32_t m = 0;
    for (int32_t k = a; k < b; k++) {
        const uint32_t c = (uint32_t)col[k];
        m = c > m ? c : m;
    }
    return b == a || m < col_limit(srcs);
}

/* the whole-pattern conditions read once per call: crow[0] == 0, crow[rows] == nnz
 * (the length of col and val), and no stored entry without a source to read */
static inline int pattern_ends_ok(const int32_t *crow, int64_t rows, int64_t srcs, int64_t nnz)
{
    return crow[0] == 0 && (int64_t)crow[rows] == nnz && (nnz == 0 || srcs > 0);
}

/* T_: element type, V_: its 32-byte vector type, VL: lanes, S: name suffix */
#define DEFINE_KERNELS(S, T_, V_, VL)                                                       \
enum { TILE_##S = NVEC * VL };                                                              \
                                                                                            \
/* pack[j][t] = X[b0 + t, j] for j in [j0, j1); zeros past the tile's tb columns */        \
static void pack_##S(T_ *pack, const T_ *X, int64_t sxb, int64_t sxj,                       \
                     int64_t b0, int64_t tb, int64_t j0, int64_t j1)                        \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    if (tb < TL)                                                                            \
        for (int64_t j = j0; j < j1; j++)                                                   \
            memset(pack + j * TL + tb, 0, (size_t)(TL - tb) * sizeof(T_));                  \
    if (sxb == 1) {                                                                         \
        for (int64_t j = j0; j < j1; j++)                                                   \
            memcpy(pack + j * TL, X + b0 + j * sxj, (size_t)tb * sizeof(T_));               \
        return;                                                                             \
    }                                                                                       \
    for (int64_t t = 0; t < tb; t++) {                                                      \
        const T_ *x = X + (b0 + t) * sxb;                                                   \
        for (int64_t j = j0; j < j1; j++) pack[j * TL + t] = x[j * sxj];                    \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* rows [i0, i1) of Y[b0 + t, i] = bias[i] + sum_k val[k] pack[col[k]][t] */               \
static int spmm_rows_##S(T_ *Y, int64_t syb, int64_t syi, const T_ *bias,                   \
                         const int32_t *crow, const int32_t *col, const T_ *val,            \
                         int64_t srcs, int64_t nnz, int check,                              \
                         const T_ *pack, int64_t b0, int64_t tb, int64_t i0, int64_t i1)    \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    T_ buf[CHUNK * TL] __attribute__((aligned(64)));                                        \
    if (check && !rows_ok(crow, col, i0, i1, nnz, srcs)) return 1;                          \
    for (int64_t i = i0; i < i1; i++) {                                                     \
        const T_ b_ = bias ? bias[i] : (T_)0;                                               \
        V_ a0 = (V_){0} + b_, a1 = a0, a2 = a0, a3 = a0;                                    \
        V_ c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};                                          \
        int32_t k = crow[i];                                                                \
        const int32_t e = crow[i + 1];                                                      \
        /* two entries at a time into two accumulator sets: the FMA latency chains of */    \
        /* one row overlap */                                                               \
        for (; k + 1 < e; k += 2) {                                                         \
            if (k + PREFETCH + 1 < e) {                                                     \
                const T_ *f = pack + (int64_t)col[k + PREFETCH] * TL;                       \
                const T_ *h = pack + (int64_t)col[k + PREFETCH + 1] * TL;                   \
                __builtin_prefetch(f);                                                      \
                __builtin_prefetch(f + TL / 2);                                             \
                __builtin_prefetch(h);                                                      \
                __builtin_prefetch(h + TL / 2);                                             \
            }                                                                               \
            const T_ v = val[k], w = val[k + 1];                                            \
            const V_ *p = (const V_ *)(pack + (int64_t)col[k] * TL);                        \
            const V_ *q = (const V_ *)(pack + (int64_t)col[k + 1] * TL);                    \
            a0 += v * p[0]; a1 += v * p[1]; a2 += v * p[2]; a3 += v * p[3];                 \
            c0 += w * q[0]; c1 += w * q[1]; c2 += w * q[2]; c3 += w * q[3];                 \
        }                                                                                   \
        if (k < e) {                                                                        \
            const T_ v = val[k];                                                            \
            const V_ *p = (const V_ *)(pack + (int64_t)col[k] * TL);                        \
            a0 += v * p[0]; a1 += v * p[1]; a2 += v * p[2]; a3 += v * p[3];                 \
        }                                                                                   \
        V_ *o = (V_ *)(buf + (i - i0) * TL);                                                \
        o[0] = a0 + c0; o[1] = a1 + c1; o[2] = a2 + c2; o[3] = a3 + c3;                     \
    }                                                                                       \
    if (syb == 1) {                                                                         \
        for (int64_t i = i0; i < i1; i++)                                                   \
            memcpy(Y + b0 + i * syi, buf + (i - i0) * TL, (size_t)tb * sizeof(T_));         \
        return 0;                                                                           \
    }                                                                                       \
    for (int64_t t = 0; t < tb; t++) {                                                      \
        T_ *y = Y + (b0 + t) * syb;                                                         \
        for (int64_t i = i0; i < i1; i++) y[i * syi] = buf[(i - i0) * TL + t];              \
    }                                                                                       \
    return 0;                                                                               \
}                                                                                           \
                                                                                            \
/* small batches (B < SMALL_BATCH): no tile, one gather-dot per (row, batch element): */  \
/* a tile would spend TILE lanes of work on B useful ones */                               \
static int spmm_small_rows_##S(T_ *Y, int64_t syb, int64_t syi, const T_ *bias,             \
                               const int32_t *crow, const int32_t *col, const T_ *val,      \
                               int64_t srcs, int64_t nnz,                                   \
                               const T_ *X, int64_t sxb, int64_t sxj, int64_t B,            \
                               int64_t i0, int64_t i1)                                      \
{                                                                                           \
    if (!rows_ok(crow, col, i0, i1, nnz, srcs)) return 1;                                   \
    for (int64_t i = i0; i < i1; i++) {                                                     \
        const int32_t k0 = crow[i], e = crow[i + 1];                                        \
        for (int64_t b = 0; b < B; b++) {                                                   \
            const T_ *x = X + b * sxb;                                                      \
            T_ s0 = bias ? bias[i] : (T_)0, s1 = 0, s2 = 0, s3 = 0;                         \
            int32_t k = k0;                                                                 \
            for (; k + 3 < e; k += 4) {                                                     \
                s0 += val[k] * x[(int64_t)col[k] * sxj];                                    \
                s1 += val[k + 1] * x[(int64_t)col[k + 1] * sxj];                            \
                s2 += val[k + 2] * x[(int64_t)col[k + 2] * sxj];                            \
                s3 += val[k + 3] * x[(int64_t)col[k + 3] * sxj];                            \
            }                                                                               \
            for (; k < e; k++) s0 += val[k] * x[(int64_t)col[k] * sxj];                     \
            Y[b * syb + i * syi] = (s0 + s1) + (s2 + s3);                                   \
        }                                                                                   \
    }                                                                                       \
    return 0;                                                                               \
}                                                                                           \
                                                                                            \
int iternn_spmm_##S(int64_t rows, int64_t srcs, int64_t B, int64_t nnz,                     \
                    const int32_t *crow, const int32_t *col, const T_ *val,                 \
                    const T_ *X, int64_t sxb, int64_t sxj,                                  \
                    T_ *Y, int64_t syb, int64_t syi, const T_ *bias, int threads)           \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    int err = 0;                                                                            \
    if (!pattern_ends_ok(crow, rows, srcs, nnz)) return ERR_INDEX;                          \
    if (B < SMALL_BATCH) {                                                                  \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(|:err)") \
        for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                        \
            err |= spmm_small_rows_##S(Y, syb, syi, bias, crow, col, val, srcs, nnz, X,     \
                                       sxb, sxj, B, i0, MIN(i0 + CHUNK, rows));             \
        return err ? ERR_INDEX : 0;                                                         \
    }                                                                                       \
    T_ *pack = (T_ *)work_buffer((size_t)srcs * TL * sizeof(T_));                           \
    if (!pack) return ERR_ALLOC;                                                            \
    _Pragma("omp parallel num_threads(threads)")                                            \
    for (int64_t b0 = 0; b0 < B; b0 += TL) {                                                \
        const int64_t tb = MIN(B - b0, (int64_t)TL);                                        \
        _Pragma("omp for schedule(static)")                                                 \
        for (int64_t j0 = 0; j0 < srcs; j0 += CHUNK)                                        \
            pack_##S(pack, X, sxb, sxj, b0, tb, j0, MIN(j0 + CHUNK, srcs));                 \
        /* the first tile checks the indices (see rows_ok); the later ones read the same */ \
        if (b0 == 0) {                                                                      \
            _Pragma("omp for schedule(dynamic, 1) reduction(|:err)")                        \
            for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                    \
                err |= spmm_rows_##S(Y, syb, syi, bias, crow, col, val, srcs, nnz, 1, pack, \
                                     b0, tb, i0, MIN(i0 + CHUNK, rows));                    \
            if (err) break; /* the same for every thread: read after the barrier */         \
        } else {                                                                            \
            _Pragma("omp for schedule(dynamic, 1)")                                         \
            for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                    \
                spmm_rows_##S(Y, syb, syi, bias, crow, col, val, srcs, nnz, 0, pack, b0,    \
                              tb, i0, MIN(i0 + CHUNK, rows));                               \
        }                                                                                   \
    }                                                                                       \
    free(pack);                                                                             \
    return err ? ERR_INDEX : 0;                                                             \
}                                                                                           \
                                                                                            \
/* dv[k] (first tile: =, later tiles: +=) sum_t gpack[row][t] xpack[col[k]][t] */          \
static int sdd_rows_##S(T_ *dv, const int32_t *crow, const int32_t *col,                    \
                        int64_t srcs, int64_t nnz, int check,                               \
                        const T_ *gpack, const T_ *xpack,                                   \
                        int first, int64_t i0, int64_t i1)                                  \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    if (check && !rows_ok(crow, col, i0, i1, nnz, srcs)) return 1;                          \
    for (int64_t i = i0; i < i1; i++) {                                                     \
        const V_ *g = (const V_ *)(gpack + i * TL);                                         \
        const V_ g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3];                                \
        int32_t k = crow[i];                                                                \
        const int32_t e = crow[i + 1];                                                      \
        for (; k + VL <= e; k += VL) {                                                      \
            V_ s[VL];                                                                       \
            for (int l = 0; l < VL; l++) {                                                  \
                const V_ *p = (const V_ *)(xpack + (int64_t)col[k + l] * TL);               \
                s[l] = (g0 * p[0] + g1 * p[1]) + (g2 * p[2] + g3 * p[3]);                   \
            }                                                                               \
            V_ r = lane_sums_##S(s);                                                        \
            if (!first) {                                                                   \
                V_ old;                                                                     \
                memcpy(&old, dv + k, sizeof old);                                           \
                r += old;                                                                   \
            }                                                                               \
            memcpy(dv + k, &r, sizeof r);                                                   \
        }                                                                                   \
        for (; k < e; k++) {                                                                \
            const V_ *p = (const V_ *)(xpack + (int64_t)col[k] * TL);                       \
            const V_ s = (g0 * p[0] + g1 * p[1]) + (g2 * p[2] + g3 * p[3]);                 \
            T_ r = 0;                                                                       \
            for (int l = 0; l < VL; l++) r += s[l];                                         \
            dv[k] = first ? r : dv[k] + r;                                                  \
        }                                                                                   \
    }                                                                                       \
    return 0;                                                                               \
}                                                                                           \
                                                                                            \
int iternn_sdd_##S(int64_t rows, int64_t srcs, int64_t B, int64_t nnz,                      \
                   const int32_t *crow, const int32_t *col, T_ *dv,                         \
                   const T_ *G, int64_t sgb, int64_t sgi,                                   \
                   const T_ *X, int64_t sxb, int64_t sxj, int threads)                      \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    int err = 0;                                                                            \
    if (!pattern_ends_ok(crow, rows, srcs, nnz)) return ERR_INDEX;                          \
    T_ *xpack = (T_ *)work_buffer((size_t)srcs * TL * sizeof(T_));                          \
    T_ *gpack = (T_ *)work_buffer((size_t)rows * TL * sizeof(T_));                          \
    if (!xpack || !gpack) {                                                                 \
        free(xpack);                                                                        \
        free(gpack);                                                                        \
        return ERR_ALLOC;                                                                   \
    }                                                                                       \
    _Pragma("omp parallel num_threads(threads)")                                            \
    for (int64_t b0 = 0; b0 < B; b0 += TL) {                                                \
        const int64_t tb = MIN(B - b0, (int64_t)TL);                                        \
        _Pragma("omp for schedule(static) nowait")                                          \
        for (int64_t j0 = 0; j0 < srcs; j0 += CHUNK)                                        \
            pack_##S(xpack, X, sxb, sxj, b0, tb, j0, MIN(j0 + CHUNK, srcs));                \
        _Pragma("omp for schedule(static)")                                                 \
        for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                        \
            pack_##S(gpack, G, sgb, sgi, b0, tb, i0, MIN(i0 + CHUNK, rows));                \
        if (b0 == 0) { /* as in iternn_spmm: the first tile checks the indices */           \
            _Pragma("omp for schedule(dynamic, 1) reduction(|:err)")                        \
            for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                    \
                err |= sdd_rows_##S(dv, crow, col, srcs, nnz, 1, gpack, xpack, 1, i0,       \
                                    MIN(i0 + CHUNK, rows));                                 \
            if (err) break;                                                                 \
        } else {                                                                            \
            _Pragma("omp for schedule(dynamic, 1)")                                         \
            for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                    \
                sdd_rows_##S(dv, crow, col, srcs, nnz, 0, gpack, xpack, 0, i0,              \
                             MIN(i0 + CHUNK, rows));                                        \
        }                                                                                   \
    }                                                                                       \
    free(xpack);                                                                            \
    free(gpack);                                                                            \
    return err ? ERR_INDEX : 0;                                                             \
}

DEFINE_KERNELS(f32, float, vf32, 8)
DEFINE_KERNELS(f64, double, vf64, 4)

/* the interface version native.py checks after loading */
int iternn_kernels_abi(void) { return 2; }
