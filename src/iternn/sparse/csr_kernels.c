/*
 * iternn's compiled CSR kernels (see iternn/sparse/native.py, which builds and loads
 * this file, and iternn/sparse/kernels.py, which calls it).
 *
 * A block W (rows x srcs, row = destination index, column = source index) is stored as
 * CSR: crow (rows + 1), col (nnz) and val (nnz), int32 indices. The products of
 * y = x W^T + b for a batch x (B x srcs) and its backward:
 *
 *   iternn_spmm_parts_*:  Y[b, i] = bias[i] + sum_p sum_k val_p[k] X_p[b, col_p[k]]
 *       (k in row i of part p) -- the forward over one or several parts W_p that share
 *       the destination (one pass: each output row's accumulators run over every
 *       part's entries of that row); with the transposed pattern, the input gradient
 *       (W^T, g -> dx). A part may read its values through a permutation: entry k
 *       uses val[perm[k]] (the transposed pattern's order of W's values);
 *   iternn_sdd_parts_*:   dv_p[k] = sum_b G[b, row(k)] X_p[b, col_p[k]]
 *       the value gradients: G^T X_p sampled at each part's stored entries only;
 *   iternn_linear_backward_*:  both gradients in one pass over the transposed pattern:
 *       for source j, each stored entry (j, i) reads the batch tile of G[:, i] once for
 *       dx[:, j] += val[perm[k]] G[:, i] and dv[perm[k]] = X[:, j] . G[:, i].
 *
 * X, Y and G are addressed through (batch, feature) element strides, so row-major,
 * transposed, sliced or broadcast (stride 0) operands are read and written in place,
 * without the transposed copies a CSR x dense library call needs.
 *
 * Layout. The batch is cut into tiles of TILE columns (4 SIMD vectors: 32 floats or 16
 * doubles). For each tile an operand is packed into a (srcs x TILE) buffer, one aligned
 * row of TILE numbers per source index, so every stored entry reads one contiguous row
 * of the pack (cache resident: 512 KB for 4096 sources in float32, this CPU's L2).
 * Rows are processed in chunks of CHUNK: the forward keeps two sets of four vector
 * accumulators per row (two entries at a time, so that the FMA latency chains
 * overlap), writes them to a small per-thread buffer and from there to Y with the
 * batch stride; row-major operands and results go through VL x VL transposes in
 * registers. Column indices are prefetched PREFETCH entries ahead, across row
 * boundaries. Products are fused multiply-adds where the CPU has them (an ISO C build
 * contracts nothing by itself). The value gradients reduce VL entries at a time with a
 * transpose-and-add of their VL partial-sum vectors. The fused backward keeps dv in the
 * transposed order across the batch tiles and permutes it into W's order at the end;
 * the values it reads through the permutation are gathered once, before the tiles.
 *
 * Measured (one thread, process CPU time, median of interleaved repetitions; 4096 x
 * 4096, batch 256, float32, row-major x and g): at density 0.1 the forward takes 31 ms
 * (the previous kernel 33-36 ms), the fused backward 57-70 ms where the separate input
 * and value gradients with a permuted copy of the values took 89-104 ms, and the input
 * gradient alone through the permutation 35 ms instead of 47 ms with the copy; at 0.01,
 * 4.8 ms (7.3) and 8.7 ms (12.0). Tried and dropped, each slower: source panels for L1
 * reuse (1.3-2.5x), tiles of 2 or 8 vectors (1.1-1.3x), every tile per row chunk
 * (1.2-1.4x), four entries per step (1.1x), two accumulator sets in the fused backward
 * (1.1x: they spill); results written batch-contiguous gain nothing measurable once
 * row-major ones are transposed in registers.
 *
 * Batches of one or two (a recurrence stepped per element, a dynamics probe) skip the
 * tiles, which would spend 32 lanes of work on one or two useful ones: one gather-dot
 * per row and batch element instead (measured, 2 threads: 1024 x 1024 at 10 %, batch 1,
 * 104 us vs 154 us tiled; 4096 x 4096 at 1 %, 148 us vs 544 us; at batch 4 the tiles win).
 *
 * Threads (OpenMP, the count passed by the caller): the packs are split over sources,
 * the rows over chunks, the permutation passes over entries. Every output number is
 * computed by one thread in a fixed order, so results do not depend on the thread
 * count. Without OpenMP the pragmas are ignored and the kernels run on one thread.
 *
 * Indices. The kernels read and write only memory they are handed, whatever the index
 * buffers hold: Python checks a pattern once and remembers it, but a write through .data
 * or a NumPy view changes a buffer without its version counter, behind that memo. Each
 * call is given nnz, the length of col and val (or dv), and requires crow[0] == 0 and
 * crow[rows] == nnz. Each chunk of rows then checks, before reading them, that its row
 * pointers are non-decreasing within [0, nnz] and that its column indices (contiguous:
 * col[crow[i0] .. crow[i1])) are in [0, srcs): two vectorised passes (compares, an
 * unsigned max), after which the product finds the indices in cache; a permutation's
 * entries must be in [0, nnz) (checked while the values are gathered through it). A
 * chunk that fails is skipped and sets its thread's error flags (OR-reduced over the
 * threads); the tiled products check in their first batch tile only (the later tiles
 * read the same indices) and stop after it. The call then returns ERR_INDEX and/or
 * ERR_PERM, its outputs partly written and meaningless; native.py raises. For a valid
 * pattern the checks change no number. (Another thread writing the buffers during a call
 * is a data race, not covered.) Measured cost (2 threads): within noise for 4096 x 4096
 * at batch 256; about 4 % of forward + backward at batch 1 (1024 x 1024 at 10 %).
 *
 * Return value: 0, or the OR of ERR_ALLOC (a work buffer could not be allocated),
 * ERR_INDEX (a row pointer or column index out of range, see above) and ERR_PERM (a
 * permutation entry out of range).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define NVEC 4     /* SIMD vectors per batch tile */
#define CHUNK 64   /* rows (or sources) per unit of work */
#define PREFETCH 16 /* stored entries ahead to prefetch */
#define SERIAL 65536 /* entries below which a permutation pass runs on one thread */
#define PERM_PREFETCH 128 /* entries ahead to prefetch in a permutation pass (7-14 % of */
                          /* the fused backward at 4096 x 4096, density 0.1, batch 256) */
#ifndef SMALL_BATCH
#define SMALL_BATCH 3 /* batches below this skip the tiles (see spmm_small_rows) */
#endif

/* may_alias: the vectors are read from and written to arrays of their element type */
typedef float vf32 __attribute__((vector_size(32), may_alias));
typedef double vf64 __attribute__((vector_size(32), may_alias));
/* the same at any element address: one unaligned 32-byte load or store. (A memcpy of a
 * vector through these arrays compiled to 16-byte halves through the stack, whose
 * 32-byte reloads missed store forwarding: half of the packs' time.) */
typedef float uf32 __attribute__((vector_size(32), aligned(4), may_alias));
typedef double uf64 __attribute__((vector_size(32), aligned(8), may_alias));

/* a * b + c, fused where the CPU has FMA (an ISO C build contracts nothing itself) */
static inline vf32 madd_f32(vf32 a, vf32 b, vf32 c)
{
#if defined(__FMA__)
    return (vf32)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

static inline vf64 madd_f64(vf64 a, vf64 b, vf64 c)
{
#if defined(__FMA__)
    return (vf64)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
    return a * b + c;
#endif
}

/* (v, v, ..., v): a broadcast from memory, not a scalar add of zero first */
static inline vf32 splat_f32(float v) { return (vf32){v, v, v, v, v, v, v, v}; }
static inline vf64 splat_f64(double v) { return (vf64){v, v, v, v}; }

/* Lane sums of VL vectors s[0..VL-1] in two steps, so that a loop can reduce each half
 * of its VL vectors as soon as they are computed (eight live vectors spilled in the
 * fused backward): half_sums(s)[m] and [VL/2 + m] are the sums of the low and the high
 * half of the lanes of s[m], m < VL/2; join(a, b) adds the halves: its first VL/2 lanes
 * are the sums of a's vectors, the others b's. (With AVX, horizontal adds.) */
static inline vf32 half_sums_f32(const vf32 *s)
{
#if defined(__AVX__)
    __m256 h01 = _mm256_hadd_ps((__m256)s[0], (__m256)s[1]);
    __m256 h23 = _mm256_hadd_ps((__m256)s[2], (__m256)s[3]);
    return (vf32)_mm256_hadd_ps(h01, h23);
#else
    vf32 r;
    for (int m = 0; m < 4; m++) {
        r[m] = (s[m][0] + s[m][1]) + (s[m][2] + s[m][3]);
        r[4 + m] = (s[m][4] + s[m][5]) + (s[m][6] + s[m][7]);
    }
    return r;
#endif
}

static inline vf64 half_sums_f64(const vf64 *s)
{
#if defined(__AVX__)
    return (vf64)_mm256_hadd_pd((__m256d)s[0], (__m256d)s[1]);
#else
    return (vf64){s[0][0] + s[0][1], s[1][0] + s[1][1], s[0][2] + s[0][3], s[1][2] + s[1][3]};
#endif
}

static inline vf32 join_sums_f32(vf32 a, vf32 b)
{
#if defined(__AVX__)
    return (vf32)_mm256_add_ps(_mm256_permute2f128_ps((__m256)a, (__m256)b, 0x20),
                               _mm256_permute2f128_ps((__m256)a, (__m256)b, 0x31));
#else
    return (vf32){a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7],
                  b[0] + b[4], b[1] + b[5], b[2] + b[6], b[3] + b[7]};
#endif
}

static inline vf64 join_sums_f64(vf64 a, vf64 b)
{
#if defined(__AVX__)
    return (vf64)_mm256_add_pd(_mm256_permute2f128_pd((__m256d)a, (__m256d)b, 0x20),
                               _mm256_permute2f128_pd((__m256d)a, (__m256d)b, 0x31));
#else
    return (vf64){a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]};
#endif
}

/* s[c][l] = r[l][c]: the VL x VL block held by the VL vectors r, transposed in place */
static inline void transpose_f32(vf32 *r)
{
#if defined(__AVX__)
    __m256 t[8], u[8];
    for (int l = 0; l < 8; l += 2) {
        t[l] = _mm256_unpacklo_ps((__m256)r[l], (__m256)r[l + 1]);
        t[l + 1] = _mm256_unpackhi_ps((__m256)r[l], (__m256)r[l + 1]);
    }
    for (int l = 0; l < 8; l += 4) {
        u[l] = _mm256_shuffle_ps(t[l], t[l + 2], 0x44);
        u[l + 1] = _mm256_shuffle_ps(t[l], t[l + 2], 0xEE);
        u[l + 2] = _mm256_shuffle_ps(t[l + 1], t[l + 3], 0x44);
        u[l + 3] = _mm256_shuffle_ps(t[l + 1], t[l + 3], 0xEE);
    }
    for (int l = 0; l < 4; l++) {
        r[l] = (vf32)_mm256_permute2f128_ps(u[l], u[l + 4], 0x20);
        r[l + 4] = (vf32)_mm256_permute2f128_ps(u[l], u[l + 4], 0x31);
    }
#else
    vf32 s[8];
    for (int l = 0; l < 8; l++)
        for (int c = 0; c < 8; c++) s[c][l] = r[l][c];
    memcpy(r, s, sizeof s);
#endif
}

static inline void transpose_f64(vf64 *r)
{
#if defined(__AVX__)
    __m256d t0 = _mm256_unpacklo_pd((__m256d)r[0], (__m256d)r[1]);
    __m256d t1 = _mm256_unpackhi_pd((__m256d)r[0], (__m256d)r[1]);
    __m256d t2 = _mm256_unpacklo_pd((__m256d)r[2], (__m256d)r[3]);
    __m256d t3 = _mm256_unpackhi_pd((__m256d)r[2], (__m256d)r[3]);
    r[0] = (vf64)_mm256_permute2f128_pd(t0, t2, 0x20);
    r[1] = (vf64)_mm256_permute2f128_pd(t1, t3, 0x20);
    r[2] = (vf64)_mm256_permute2f128_pd(t0, t2, 0x31);
    r[3] = (vf64)_mm256_permute2f128_pd(t1, t3, 0x31);
#else
    vf64 s[4];
    for (int l = 0; l < 4; l++)
        for (int c = 0; c < 4; c++) s[c][l] = r[l][c];
    memcpy(r, s, sizeof s);
#endif
}

static void *work_buffer(size_t bytes)
{
    return aligned_alloc(64, bytes ? (bytes + 63) / 64 * 64 : 64);
}

#define MIN(a, b) ((a) < (b) ? (a) : (b))

#define ERR_ALLOC 1
#define ERR_INDEX 2
#define ERR_PERM 4

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

/* One part of a product, as native.py passes it: PART_FIELDS int64 numbers per part,
 * pointers as integers. VAL is the values (spmm, linear_backward) or the value
 * gradient to write (sdd); PERM is 0 or the permutation the values are read through. */
enum { F_CROW, F_COL, F_PERM, F_VAL, F_X, F_SXB, F_SXJ, F_SRCS, F_NNZ, PART_FIELDS };

typedef struct {
    const int32_t *crow, *col;
    const int32_t *perm;
    void *val;
    const void *X;
    int64_t sxb, sxj, srcs, nnz;
    void *pack; /* the operand's batch tile: srcs x TILE */
    void *vt;   /* with perm: val[perm[k]] (see gather) */
} part_t;

static part_t *read_parts(int64_t nparts, const int64_t *desc)
{
    part_t *parts = (part_t *)calloc(nparts ? (size_t)nparts : 1, sizeof(part_t));
    if (!parts) return NULL;
    for (int64_t p = 0; p < nparts; p++) {
        const int64_t *d = desc + p * PART_FIELDS;
        parts[p].crow = (const int32_t *)(uintptr_t)d[F_CROW];
        parts[p].col = (const int32_t *)(uintptr_t)d[F_COL];
        parts[p].perm = (const int32_t *)(uintptr_t)d[F_PERM];
        parts[p].val = (void *)(uintptr_t)d[F_VAL];
        parts[p].X = (const void *)(uintptr_t)d[F_X];
        parts[p].sxb = d[F_SXB];
        parts[p].sxj = d[F_SXJ];
        parts[p].srcs = d[F_SRCS];
        parts[p].nnz = d[F_NNZ];
    }
    return parts;
}

static int parts_ends_ok(const part_t *parts, int64_t nparts, int64_t rows)
{
    for (int64_t p = 0; p < nparts; p++)
        if (!pattern_ends_ok(parts[p].crow, rows, parts[p].srcs, parts[p].nnz)) return 0;
    return 1;
}

/* rows_ok for rows [i0, i1) of every part: ERR_INDEX or 0 */
static int parts_rows_ok(const part_t *parts, int64_t nparts, int64_t i0, int64_t i1)
{
    for (int64_t p = 0; p < nparts; p++)
        if (!rows_ok(parts[p].crow, parts[p].col, i0, i1, parts[p].nnz, parts[p].srcs))
            return ERR_INDEX;
    return 0;
}

/* T_: element type, V_: its 32-byte vector type (U_: unaligned), VL: lanes, S: name suffix */
#define DEFINE_KERNELS(S, T_, V_, U_, VL)                                                   \
enum { TILE_##S = NVEC * VL };                                                              \
                                                                                            \
/* pack[j][t] = X[b0 + t, j] for j in [j0, j1); zeros past the tile's tb columns */         \
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
    int64_t t = 0;                                                                          \
    if (sxj == 1) /* row-major: VL x VL blocks, transposed in registers */                  \
        for (; t + VL <= tb; t += VL) {                                                     \
            int64_t j = j0;                                                                 \
            for (; j + VL <= j1; j += VL) {                                                 \
                V_ r[VL];                                                                   \
                for (int l = 0; l < VL; l++)                                                \
                    r[l] = *(const U_ *)(X + (b0 + t + l) * sxb + j);                       \
                transpose_##S(r);                                                           \
                for (int c = 0; c < VL; c++)                                                \
                    *(V_ *)(pack + (j + c) * TL + t) = r[c];                                \
            }                                                                               \
            for (; j < j1; j++)                                                             \
                for (int l = 0; l < VL; l++)                                                \
                    pack[j * TL + t + l] = X[(b0 + t + l) * sxb + j];                       \
        }                                                                                   \
    for (; t < tb; t++) {                                                                   \
        const T_ *x = X + (b0 + t) * sxb;                                                   \
        for (int64_t j = j0; j < j1; j++) pack[j * TL + t] = x[j * sxj];                    \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* Y[b0 + t, i] = buf[i - i0][t] for rows [i0, i1) and the tile's tb columns */             \
static void unpack_##S(T_ *Y, int64_t syb, int64_t syi, const T_ *buf,                      \
                       int64_t b0, int64_t tb, int64_t i0, int64_t i1)                      \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    if (syb == 1) {                                                                         \
        for (int64_t i = i0; i < i1; i++)                                                   \
            memcpy(Y + b0 + i * syi, buf + (i - i0) * TL, (size_t)tb * sizeof(T_));         \
        return;                                                                             \
    }                                                                                       \
    int64_t t = 0;                                                                          \
    if (syi == 1) /* row-major: VL x VL blocks, transposed in registers */                  \
        for (; t + VL <= tb; t += VL) {                                                     \
            int64_t i = i0;                                                                 \
            for (; i + VL <= i1; i += VL) {                                                 \
                V_ r[VL];                                                                   \
                for (int l = 0; l < VL; l++)                                                \
                    r[l] = *(const V_ *)(buf + (i - i0 + l) * TL + t);                      \
                transpose_##S(r);                                                           \
                for (int c = 0; c < VL; c++)                                                \
                    *(U_ *)(Y + (b0 + t + c) * syb + i) = r[c];                             \
            }                                                                               \
            for (; i < i1; i++)                                                             \
                for (int c = 0; c < VL; c++)                                                \
                    Y[(b0 + t + c) * syb + i] = buf[(i - i0) * TL + t + c];                 \
        }                                                                                   \
    for (; t < tb; t++) {                                                                   \
        T_ *y = Y + (b0 + t) * syb;                                                         \
        for (int64_t i = i0; i < i1; i++) y[i * syi] = buf[(i - i0) * TL + t];              \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* vt[k] = val[perm[k]] for every entry of a part with a permutation: ERR_PERM when one */  \
/* of perm's entries is outside [0, nnz). A pass of its own, before the tiles: done in  */  \
/* the first tile, chunk by chunk, this gather and the fused backward's final writes    */  \
/* to dv[perm[k]] competed with the pack for the cache and cost 17 ms of that backward  */  \
/* (one thread, 4096 x 4096 at density 0.1, batch 256) against 10 ms as separate passes */  \
static int gather_##S(const part_t *q, int threads)                                         \
{                                                                                           \
    const T_ *val = (const T_ *)q->val;                                                     \
    T_ *vt = (T_ *)q->vt;                                                                   \
    const int32_t *perm = q->perm;                                                          \
    const int64_t nnz = q->nnz;                                                             \
    const uint32_t n = (uint32_t)nnz; /* < 2^31: int32 indices */                           \
    uint32_t bad = 0;                                                                       \
    _Pragma("omp parallel for num_threads(threads) if (nnz > SERIAL) schedule(static) reduction(|:bad)") \
    for (int64_t k = 0; k < nnz; k++) {                                                     \
        if (k + PERM_PREFETCH < nnz) {                                                      \
            const uint32_t ahead = (uint32_t)perm[k + PERM_PREFETCH];                       \
            __builtin_prefetch(val + (ahead < n ? ahead : 0));                              \
        }                                                                                   \
        const uint32_t pk = (uint32_t)perm[k];                                              \
        bad |= pk >= n;                                                                     \
        vt[k] = val[pk < n ? pk : 0];                                                       \
    }                                                                                       \
    return bad ? ERR_PERM : 0;                                                              \
}                                                                                           \
                                                                                            \
/* acc += sum over entries [k, e) of vals[k] pack[col[k]]; prefetching stays below kpf */   \
/* (the chunk's last entry minus PREFETCH: indices the chunk's check covered) */            \
static inline void axpy_entries_##S(V_ *acc, const int32_t *col, const T_ *vals,            \
                                    const T_ *pack, int32_t k, int32_t e, int32_t kpf)      \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    V_ a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];                                  \
    V_ c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};                                              \
    for (; k + 1 < e; k += 2) {                                                             \
        if (k < kpf) {                                                                      \
            const T_ *f = pack + (int64_t)col[k + PREFETCH] * TL;                           \
            const T_ *h = pack + (int64_t)col[k + PREFETCH + 1] * TL;                       \
            __builtin_prefetch(f);                                                          \
            __builtin_prefetch(f + TL / 2);                                                 \
            __builtin_prefetch(h);                                                          \
            __builtin_prefetch(h + TL / 2);                                                 \
        }                                                                                   \
        const V_ v = splat_##S(vals[k]), w = splat_##S(vals[k + 1]);                        \
        const V_ *p = (const V_ *)(pack + (int64_t)col[k] * TL);                            \
        const V_ *r = (const V_ *)(pack + (int64_t)col[k + 1] * TL);                        \
        a0 = madd_##S(v, p[0], a0); a1 = madd_##S(v, p[1], a1);                             \
        a2 = madd_##S(v, p[2], a2); a3 = madd_##S(v, p[3], a3);                             \
        c0 = madd_##S(w, r[0], c0); c1 = madd_##S(w, r[1], c1);                             \
        c2 = madd_##S(w, r[2], c2); c3 = madd_##S(w, r[3], c3);                             \
    }                                                                                       \
    if (k < e) {                                                                            \
        const V_ v = splat_##S(vals[k]);                                                    \
        const V_ *p = (const V_ *)(pack + (int64_t)col[k] * TL);                            \
        a0 = madd_##S(v, p[0], a0); a1 = madd_##S(v, p[1], a1);                             \
        a2 = madd_##S(v, p[2], a2); a3 = madd_##S(v, p[3], a3);                             \
    }                                                                                       \
    acc[0] = a0 + c0; acc[1] = a1 + c1; acc[2] = a2 + c2; acc[3] = a3 + c3;                 \
}                                                                                           \
                                                                                            \
/* rows [i0, i1) of Y[b0 + t, i] = bias[i] + sum_p sum_k val_p[k] pack_p[col_p[k]][t] */    \
static int spmm_rows_##S(T_ *Y, int64_t syb, int64_t syi, const T_ *bias,                   \
                         const part_t *parts, int64_t nparts, int check,                    \
                         int64_t b0, int64_t tb, int64_t i0, int64_t i1)                    \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    T_ buf[CHUNK * TL] __attribute__((aligned(64)));                                        \
    if (check) {                                                                            \
        const int err = parts_rows_ok(parts, nparts, i0, i1);                               \
        if (err) return err;                                                                \
    }                                                                                       \
    for (int64_t i = i0; i < i1; i++) {                                                     \
        const T_ b_ = bias ? bias[i] : (T_)0;                                               \
        V_ *acc = (V_ *)(buf + (i - i0) * TL);                                              \
        acc[0] = acc[1] = acc[2] = acc[3] = splat_##S(b_);                                  \
        for (int64_t p = 0; p < nparts; p++) {                                              \
            const part_t *q = parts + p;                                                    \
            const T_ *vals = (const T_ *)(q->perm ? q->vt : q->val);                        \
            axpy_entries_##S(acc, q->col, vals, (const T_ *)q->pack, q->crow[i],            \
                             q->crow[i + 1], q->crow[i1] - PREFETCH - 1);                   \
        }                                                                                   \
    }                                                                                       \
    unpack_##S(Y, syb, syi, buf, b0, tb, i0, i1);                                           \
    return 0;                                                                               \
}                                                                                           \
                                                                                            \
/* small batches (B < SMALL_BATCH): no tile, one gather-dot per (row, batch element): */    \
/* a tile would spend TILE lanes of work on B useful ones */                                \
static int spmm_small_rows_##S(T_ *Y, int64_t syb, int64_t syi, const T_ *bias,             \
                               const part_t *parts, int64_t nparts, int64_t B,              \
                               int64_t i0, int64_t i1)                                      \
{                                                                                           \
    const int err = parts_rows_ok(parts, nparts, i0, i1);                                   \
    if (err) return err;                                                                    \
    for (int64_t i = i0; i < i1; i++) {                                                     \
        for (int64_t b = 0; b < B; b++) {                                                   \
            T_ s0 = bias ? bias[i] : (T_)0, s1 = 0, s2 = 0, s3 = 0;                         \
            for (int64_t p = 0; p < nparts; p++) {                                          \
                const part_t *q = parts + p;                                                \
                const T_ *val = (const T_ *)(q->perm ? q->vt : q->val);                     \
                const int32_t *col = q->col;                                                \
                const int64_t sxj = q->sxj;                                                 \
                const T_ *x = (const T_ *)q->X + b * q->sxb;                                \
                int32_t k = q->crow[i];                                                     \
                const int32_t e = q->crow[i + 1];                                           \
                for (; k + 3 < e; k += 4) {                                                 \
                    s0 += val[k] * x[(int64_t)col[k] * sxj];                                \
                    s1 += val[k + 1] * x[(int64_t)col[k + 1] * sxj];                        \
                    s2 += val[k + 2] * x[(int64_t)col[k + 2] * sxj];                        \
                    s3 += val[k + 3] * x[(int64_t)col[k + 3] * sxj];                        \
                }                                                                           \
                for (; k < e; k++) s0 += val[k] * x[(int64_t)col[k] * sxj];                 \
            }                                                                               \
            Y[b * syb + i * syi] = (s0 + s1) + (s2 + s3);                                   \
        }                                                                                   \
    }                                                                                       \
    return 0;                                                                               \
}                                                                                           \
                                                                                            \
/* batch tile [b0, b0 + tb) of every part's operand into its pack; called by every thread   \
 * of a parallel region (the sources are shared out, no barrier at the end) */              \
static inline void pack_parts_##S(const part_t *parts, int64_t nparts, int64_t b0, int64_t tb)\
{                                                                                           \
    for (int64_t p = 0; p < nparts; p++) {                                                  \
        const part_t *q = parts + p;                                                        \
        _Pragma("omp for schedule(static) nowait")                                          \
        for (int64_t j0 = 0; j0 < q->srcs; j0 += CHUNK)                                     \
            pack_##S((T_ *)q->pack, (const T_ *)q->X, q->sxb, q->sxj, b0, tb, j0,           \
                     MIN(j0 + CHUNK, q->srcs));                                             \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* the work buffers of the parts: packs (tiled) and gathered values (with perm) */          \
static T_ *part_buffers_##S(part_t *parts, int64_t nparts, int tiled)                       \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    size_t n = 0;                                                                           \
    for (int64_t p = 0; p < nparts; p++)                                                    \
        n += (tiled ? (size_t)parts[p].srcs * TL : 0)                                       \
             + (parts[p].perm ? ((size_t)parts[p].nnz + VL - 1) / VL * VL : 0);             \
    T_ *work = (T_ *)work_buffer(n * sizeof(T_));                                           \
    if (!work) return NULL;                                                                 \
    T_ *w = work;                                                                           \
    for (int64_t p = 0; p < nparts; p++) {                                                  \
        if (tiled) {                                                                        \
            parts[p].pack = w;                                                              \
            w += (size_t)parts[p].srcs * TL;                                                \
        }                                                                                   \
        if (parts[p].perm) {                                                                \
            parts[p].vt = w;                                                                \
            w += ((size_t)parts[p].nnz + VL - 1) / VL * VL;                                 \
        }                                                                                   \
    }                                                                                       \
    return work;                                                                            \
}                                                                                           \
                                                                                            \
int iternn_spmm_parts_##S(int64_t rows, int64_t B, int64_t nparts, const int64_t *desc,     \
                          T_ *Y, int64_t syb, int64_t syi, const T_ *bias, int threads)     \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    int err = 0;                                                                            \
    part_t *parts = read_parts(nparts, desc);                                               \
    if (!parts) return ERR_ALLOC;                                                           \
    if (!parts_ends_ok(parts, nparts, rows)) {                                              \
        free(parts);                                                                        \
        return ERR_INDEX;                                                                   \
    }                                                                                       \
    const int tiled = B >= SMALL_BATCH;                                                     \
    T_ *work = part_buffers_##S(parts, nparts, tiled);                                      \
    if (!work) {                                                                            \
        free(parts);                                                                        \
        return ERR_ALLOC;                                                                   \
    }                                                                                       \
    for (int64_t p = 0; p < nparts; p++)                                                    \
        if (parts[p].perm) err |= gather_##S(parts + p, threads);                           \
    if (!err && !tiled) {                                                                   \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(|:err)") \
        for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                        \
            err |= spmm_small_rows_##S(Y, syb, syi, bias, parts, nparts, B, i0,             \
                                       MIN(i0 + CHUNK, rows));                              \
    } else if (!err) {                                                                      \
        _Pragma("omp parallel num_threads(threads)")                                        \
        for (int64_t b0 = 0; b0 < B; b0 += TL) {                                            \
            const int64_t tb = MIN(B - b0, (int64_t)TL);                                    \
            pack_parts_##S(parts, nparts, b0, tb);                                          \
            _Pragma("omp barrier")                                                          \
            /* the first tile checks the indices (see rows_ok); the later ones read the */  \
            /* same */                                                                      \
            if (b0 == 0) {                                                                  \
                _Pragma("omp for schedule(dynamic, 1) reduction(|:err)")                    \
                for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                \
                    err |= spmm_rows_##S(Y, syb, syi, bias, parts, nparts, 1, b0, tb, i0,   \
                                         MIN(i0 + CHUNK, rows));                            \
                if (err) break; /* the same for every thread: read after the barrier */     \
            } else {                                                                        \
                _Pragma("omp for schedule(dynamic, 1)")                                     \
                for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                \
                    spmm_rows_##S(Y, syb, syi, bias, parts, nparts, 0, b0, tb, i0,          \
                                  MIN(i0 + CHUNK, rows));                                   \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    free(work);                                                                             \
    free(parts);                                                                            \
    return err;                                                                             \
}                                                                                           \
                                                                                            \
/* the lane-wise products of a tile row (g0 .. g3) and the tile row p, summed */            \
static inline V_ dot4_##S(V_ g0, V_ g1, V_ g2, V_ g3, const V_ *p)                          \
{                                                                                           \
    return madd_##S(g3, p[3], madd_##S(g2, p[2], madd_##S(g1, p[1], g0 * p[0])));           \
}                                                                                           \
                                                                                            \
/* VL sums into dst[0 .. VL) (unaligned): stored by the first tile, added by the later */   \
static inline void put_sums_##S(T_ *dst, V_ r, int first)                                   \
{                                                                                           \
    if (!first) r += *(const U_ *)dst;                                                      \
    *(U_ *)dst = r;                                                                         \
}                                                                                           \
                                                                                            \
/* dv[k] (first tile: =, later tiles: +=) sum_t gpack[row][t] xpack[col[k]][t] */           \
static inline void sdd_entries_##S(T_ *dv, const int32_t *col, const T_ *xpack,             \
                                   const V_ *g, int first, int32_t k, int32_t e)            \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    const V_ g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3];                                    \
    for (; k + VL <= e; k += VL) {                                                          \
        V_ q[2];                                                                            \
        for (int h = 0; h < 2; h++) {                                                       \
            V_ s[VL / 2];                                                                   \
            for (int l = 0; l < VL / 2; l++) {                                              \
                const int32_t c = col[k + h * VL / 2 + l];                                  \
                s[l] = dot4_##S(g0, g1, g2, g3, (const V_ *)(xpack + (int64_t)c * TL));     \
            }                                                                               \
            q[h] = half_sums_##S(s);                                                        \
        }                                                                                   \
        put_sums_##S(dv + k, join_sums_##S(q[0], q[1]), first);                             \
    }                                                                                       \
    for (; k < e; k++) {                                                                    \
        const V_ *p = (const V_ *)(xpack + (int64_t)col[k] * TL);                           \
        const V_ s = dot4_##S(g0, g1, g2, g3, p);                                           \
        T_ r = 0;                                                                           \
        for (int l = 0; l < VL; l++) r += s[l];                                             \
        dv[k] = first ? r : dv[k] + r;                                                      \
    }                                                                                       \
}                                                                                           \
                                                                                            \
static int sdd_rows_##S(const part_t *parts, int64_t nparts, const T_ *gpack, int check,    \
                        int first, int64_t i0, int64_t i1)                                  \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    if (check) {                                                                            \
        const int err = parts_rows_ok(parts, nparts, i0, i1);                               \
        if (err) return err;                                                                \
    }                                                                                       \
    for (int64_t i = i0; i < i1; i++)                                                       \
        for (int64_t p = 0; p < nparts; p++) {                                              \
            const part_t *q = parts + p;                                                    \
            sdd_entries_##S((T_ *)q->val, q->col, (const T_ *)q->pack,                      \
                            (const V_ *)(gpack + i * TL), first, q->crow[i], q->crow[i + 1]); \
        }                                                                                   \
    return 0;                                                                               \
}                                                                                           \
                                                                                            \
/* small batches: dv_p[k] = sum_b G[b, i] X_p[b, col_p[k]], one entry at a time */          \
static int sdd_small_rows_##S(const part_t *parts, int64_t nparts, const T_ *G, int64_t sgb, \
                              int64_t sgi, int64_t B, int64_t i0, int64_t i1)               \
{                                                                                           \
    const int err = parts_rows_ok(parts, nparts, i0, i1);                                   \
    if (err) return err;                                                                    \
    for (int64_t i = i0; i < i1; i++)                                                       \
        for (int64_t p = 0; p < nparts; p++) {                                              \
            const part_t *q = parts + p;                                                    \
            T_ *dv = (T_ *)q->val;                                                          \
            const T_ *X = (const T_ *)q->X;                                                 \
            for (int32_t k = q->crow[i]; k < q->crow[i + 1]; k++) {                         \
                const int64_t j = (int64_t)q->col[k] * q->sxj;                              \
                T_ s = 0;                                                                   \
                for (int64_t b = 0; b < B; b++)                                             \
                    s += G[b * sgb + i * sgi] * X[b * q->sxb + j];                          \
                dv[k] = s;                                                                  \
            }                                                                               \
        }                                                                                   \
    return 0;                                                                               \
}                                                                                           \
                                                                                            \
int iternn_sdd_parts_##S(int64_t rows, int64_t B, int64_t nparts, const int64_t *desc,      \
                         const T_ *G, int64_t sgb, int64_t sgi, int threads)                \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    int err = 0;                                                                            \
    part_t *parts = read_parts(nparts, desc);                                               \
    if (!parts) return ERR_ALLOC;                                                           \
    for (int64_t p = 0; p < nparts; p++) parts[p].perm = NULL; /* no values to read */      \
    if (!parts_ends_ok(parts, nparts, rows)) {                                              \
        free(parts);                                                                        \
        return ERR_INDEX;                                                                   \
    }                                                                                       \
    if (B < SMALL_BATCH) {                                                                  \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(|:err)") \
        for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                        \
            err |= sdd_small_rows_##S(parts, nparts, G, sgb, sgi, B, i0, MIN(i0 + CHUNK, rows)); \
        free(parts);                                                                        \
        return err;                                                                         \
    }                                                                                       \
    T_ *work = part_buffers_##S(parts, nparts, 1);                                          \
    T_ *gpack = (T_ *)work_buffer((size_t)rows * TL * sizeof(T_));                          \
    if (!work || !gpack) {                                                                  \
        free(work);                                                                         \
        free(gpack);                                                                        \
        free(parts);                                                                        \
        return ERR_ALLOC;                                                                   \
    }                                                                                       \
    _Pragma("omp parallel num_threads(threads)")                                            \
    for (int64_t b0 = 0; b0 < B; b0 += TL) {                                                \
        const int64_t tb = MIN(B - b0, (int64_t)TL);                                        \
        pack_parts_##S(parts, nparts, b0, tb);                                              \
        _Pragma("omp for schedule(static)")                                                 \
        for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                        \
            pack_##S(gpack, G, sgb, sgi, b0, tb, i0, MIN(i0 + CHUNK, rows));                \
        if (b0 == 0) { /* as in iternn_spmm_parts: the first tile checks the indices */     \
            _Pragma("omp for schedule(dynamic, 1) reduction(|:err)")                        \
            for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                    \
                err |= sdd_rows_##S(parts, nparts, gpack, 1, 1, i0, MIN(i0 + CHUNK, rows)); \
            if (err) break;                                                                 \
        } else {                                                                            \
            _Pragma("omp for schedule(dynamic, 1)")                                         \
            for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                    \
                sdd_rows_##S(parts, nparts, gpack, 0, 0, i0, MIN(i0 + CHUNK, rows));        \
        }                                                                                   \
    }                                                                                       \
    free(work);                                                                             \
    free(gpack);                                                                            \
    free(parts);                                                                            \
    return err;                                                                             \
}                                                                                           \
                                                                                            \
/* The fused backward over the transposed pattern (t: one row per source j, each entry  */  \
/* k a destination i = col[k]) for sources [j0, j1) and one tile: dxbuf[j] = sum_k vt[k] */ \
/* gpack[i], and the partial sums of xbuf[j] . gpack[i] into dvt[k] (= in the tile      */  \
/* `first`, += in the later ones) */                                                        \
static void backward_rows_##S(const part_t *t, const T_ *gpack, T_ *dvt, int first,         \
                              int64_t b0, int64_t tb, T_ *DX, int64_t sdb, int64_t sdj,     \
                              int64_t j0, int64_t j1)                                       \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    T_ xbuf[CHUNK * TL] __attribute__((aligned(64)));                                       \
    T_ dxbuf[CHUNK * TL] __attribute__((aligned(64)));                                      \
    pack_##S(xbuf, (const T_ *)t->X + j0 * t->sxj, t->sxb, t->sxj, b0, tb, 0, j1 - j0);     \
    const int32_t *col = t->col;                                                            \
    const T_ *vt = (const T_ *)t->vt;                                                       \
    const int32_t kpf = t->crow[j1] - PREFETCH - VL;                                        \
    for (int64_t j = j0; j < j1; j++) {                                                     \
        const V_ *xr = (const V_ *)(xbuf + (j - j0) * TL);                                  \
        const V_ x0 = xr[0], x1 = xr[1], x2 = xr[2], x3 = xr[3];                            \
        V_ a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                          \
        int32_t k = t->crow[j];                                                             \
        const int32_t e = t->crow[j + 1];                                                   \
        for (; k + VL <= e; k += VL) {                                                      \
            if (k < kpf)                                                                    \
                for (int l = 0; l < VL; l++) {                                              \
                    const T_ *f = gpack + (int64_t)col[k + l + PREFETCH] * TL;              \
                    __builtin_prefetch(f);                                                  \
                    __builtin_prefetch(f + TL / 2);                                         \
                }                                                                           \
            /* one accumulator set: two (as in the forward) spill here, 10 % slower */      \
            V_ q[2];                                                                        \
            for (int h = 0; h < 2; h++) {                                                   \
                V_ s[VL / 2];                                                               \
                _Pragma("GCC unroll 4")                                                     \
                for (int l = 0; l < VL / 2; l++) {                                          \
                    const int32_t m = k + h * VL / 2 + l;                                   \
                    const V_ *g = (const V_ *)(gpack + (int64_t)col[m] * TL);               \
                    const V_ v = splat_##S(vt[m]);                                          \
                    a0 = madd_##S(v, g[0], a0); a1 = madd_##S(v, g[1], a1);                 \
                    a2 = madd_##S(v, g[2], a2); a3 = madd_##S(v, g[3], a3);                 \
                    s[l] = dot4_##S(x0, x1, x2, x3, g);                                     \
                }                                                                           \
                q[h] = half_sums_##S(s);                                                    \
            }                                                                               \
            put_sums_##S(dvt + k, join_sums_##S(q[0], q[1]), first);                        \
        }                                                                                   \
        for (; k < e; k++) {                                                                \
            const V_ *g = (const V_ *)(gpack + (int64_t)col[k] * TL);                       \
            const V_ v = splat_##S(vt[k]);                                                  \
            a0 = madd_##S(v, g[0], a0); a1 = madd_##S(v, g[1], a1);                         \
            a2 = madd_##S(v, g[2], a2); a3 = madd_##S(v, g[3], a3);                         \
            const V_ s = dot4_##S(x0, x1, x2, x3, g);                                       \
            T_ r = 0;                                                                       \
            for (int l = 0; l < VL; l++) r += s[l];                                         \
            dvt[k] = first ? r : dvt[k] + r;                                                \
        }                                                                                   \
        V_ *o = (V_ *)(dxbuf + (j - j0) * TL);                                              \
        o[0] = a0; o[1] = a1; o[2] = a2; o[3] = a3;                                         \
    }                                                                                       \
    unpack_##S(DX, sdb, sdj, dxbuf, b0, tb, j0, j1);                                        \
}                                                                                           \
                                                                                            \
/* small batches: the same, one entry and batch element at a time, dvt = dv's entries   */  \
/* in the transposed order */                                                               \
static void backward_small_rows_##S(const part_t *t, const T_ *G, int64_t sgb, int64_t sgi, \
                                    T_ *dvt, int64_t B, T_ *DX, int64_t sdb, int64_t sdj,   \
                                    int64_t j0, int64_t j1)                                 \
{                                                                                           \
    const T_ *X = (const T_ *)t->X;                                                         \
    const T_ *vt = (const T_ *)t->vt;                                                       \
    for (int64_t j = j0; j < j1; j++) {                                                     \
        T_ d[SMALL_BATCH] = {0};                                                            \
        for (int32_t k = t->crow[j]; k < t->crow[j + 1]; k++) {                             \
            const int64_t i = t->col[k];                                                    \
            T_ s = 0;                                                                       \
            for (int64_t b = 0; b < B; b++) {                                               \
                const T_ g = G[b * sgb + i * sgi];                                          \
                d[b] += vt[k] * g;                                                          \
                s += X[b * t->sxb + j * t->sxj] * g;                                        \
            }                                                                               \
            dvt[k] = s;                                                                     \
        }                                                                                   \
        for (int64_t b = 0; b < B; b++) DX[b * sdb + j * sdj] = d[b];                       \
    }                                                                                       \
}                                                                                           \
                                                                                            \
/* desc: one part, the transposed pattern (srcs rows; its F_SRCS: W's rows, the width  */   \
/* of G), its permutation and W's values; F_X: the forward's input x (B x srcs). dv is  */  \
/* computed in the transposed order and written to dv[perm[k]] at the end, in a pass   */   \
/* of its own (see gather) */                                                               \
int iternn_linear_backward_##S(int64_t srcs, int64_t B, const int64_t *desc,                \
                               const T_ *G, int64_t sgb, int64_t sgi,                       \
                               T_ *DX, int64_t sdb, int64_t sdj, T_ *dv, int threads)       \
{                                                                                           \
    enum { TL = TILE_##S };                                                                 \
    part_t *t = read_parts(1, desc);                                                        \
    if (!t) return ERR_ALLOC;                                                               \
    const int64_t rows = t->srcs, nnz = t->nnz;                                             \
    if ((nnz && !t->perm) || !pattern_ends_ok(t->crow, srcs, rows, nnz)) {                  \
        free(t);                                                                            \
        return ERR_INDEX;                                                                   \
    }                                                                                       \
    const int tiled = B >= SMALL_BATCH;                                                     \
    T_ *work = part_buffers_##S(t, 1, 0);                                                   \
    T_ *gpack = tiled ? (T_ *)work_buffer((size_t)rows * TL * sizeof(T_)) : NULL;           \
    T_ *dvt = (T_ *)work_buffer(((size_t)nnz + VL - 1) / VL * VL * sizeof(T_));             \
    if (!work || (tiled && !gpack) || !dvt) {                                               \
        free(work);                                                                         \
        free(gpack);                                                                        \
        free(dvt);                                                                          \
        free(t);                                                                            \
        return ERR_ALLOC;                                                                   \
    }                                                                                       \
    int err = gather_##S(t, threads);                                                       \
    if (!err && !tiled) {                                                                   \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(|:err)") \
        for (int64_t j0 = 0; j0 < srcs; j0 += CHUNK) {                                      \
            const int64_t j1 = MIN(j0 + CHUNK, srcs);                                       \
            const int e = parts_rows_ok(t, 1, j0, j1);                                      \
            if (e) err |= e;                                                                \
            else backward_small_rows_##S(t, G, sgb, sgi, dvt, B, DX, sdb, sdj, j0, j1);     \
        }                                                                                   \
    } else if (!err) {                                                                      \
        _Pragma("omp parallel num_threads(threads)")                                        \
        for (int64_t b0 = 0; b0 < B; b0 += TL) {                                            \
            const int64_t tb = MIN(B - b0, (int64_t)TL);                                    \
            _Pragma("omp for schedule(static)")                                             \
            for (int64_t i0 = 0; i0 < rows; i0 += CHUNK)                                    \
                pack_##S(gpack, G, sgb, sgi, b0, tb, i0, MIN(i0 + CHUNK, rows));            \
            if (b0 == 0) { /* as in iternn_spmm_parts: the first tile checks the indices */ \
                _Pragma("omp for schedule(dynamic, 1) reduction(|:err)")                    \
                for (int64_t j0 = 0; j0 < srcs; j0 += CHUNK) {                              \
                    const int64_t j1 = MIN(j0 + CHUNK, srcs);                               \
                    const int e = parts_rows_ok(t, 1, j0, j1);                              \
                    if (e) err |= e;                                                        \
                    else backward_rows_##S(t, gpack, dvt, 1, b0, tb, DX, sdb, sdj, j0, j1); \
                }                                                                           \
                if (err) break;                                                             \
            } else {                                                                        \
                _Pragma("omp for schedule(dynamic, 1)")                                     \
                for (int64_t j0 = 0; j0 < srcs; j0 += CHUNK)                                \
                    backward_rows_##S(t, gpack, dvt, 0, b0, tb, DX, sdb, sdj, j0,           \
                                      MIN(j0 + CHUNK, srcs));                               \
            }                                                                               \
        }                                                                                   \
    }                                                                                       \
    if (!err) { /* gather checked perm's entries */                                         \
        const int32_t *perm = t->perm;                                                      \
        _Pragma("omp parallel for num_threads(threads) if (nnz > SERIAL) schedule(static)") \
        for (int64_t k = 0; k < nnz; k++) {                                                 \
            if (k + PERM_PREFETCH < nnz) __builtin_prefetch(dv + perm[k + PERM_PREFETCH], 1); \
            dv[perm[k]] = dvt[k];                                                           \
        }                                                                                   \
    }                                                                                       \
    free(work);                                                                             \
    free(gpack);                                                                            \
    free(dvt);                                                                              \
    free(t);                                                                                \
    return err;                                                                             \
}

DEFINE_KERNELS(f32, float, vf32, uf32, 8)
DEFINE_KERNELS(f64, double, vf64, uf64, 4)

/* the interface version native.py checks after loading */
int iternn_kernels_abi(void) { return 3; }
