/*
 * The access floor of iternn's CSR forward (benchmarks/sparse.py --case floor).
 *
 * The forward (iternn/sparse/csr_kernels.c) reads, for every stored entry k of a row
 * and every batch tile, the packed tile row of the entry's source: TILE numbers (128
 * bytes in float32), at a random place in a (sources x TILE) buffer, and adds val[k]
 * times it to the row's accumulators. This loop does only that, with the pattern and the
 * packed buffer given: no index checks, no packing, no transposes, no prefetching, no
 * bias; one thread. Whatever the kernel's schedule, a product in this layout reads the
 * same rows in the same order, so the loop's time per entry and tile is the floor the
 * kernel is compared with.
 */
#include <stdint.h>
#if defined(__FMA__)
#include <immintrin.h>
#endif

typedef float vf32 __attribute__((vector_size(32), may_alias));
enum { TILE = 32 };

static inline vf32 madd(vf32 a, vf32 b, vf32 c)
{
#if defined(__FMA__)
    return (vf32)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* tiles times: out[i] = sum over row i's entries k of val[k] pack[col[k]] (TILE lanes);
 * two sets of accumulators (two entries at a time), as the kernel keeps */
void floor_rows(const float *pack, const int32_t *crow, const int32_t *col, const float *val,
                int64_t rows, int64_t tiles, float *out)
{
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t i = 0; i < rows; i++) {
            vf32 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            vf32 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
            int32_t k = crow[i];
            const int32_t e = crow[i + 1];
            for (; k + 1 < e; k += 2) {
                const vf32 *p = (const vf32 *)(pack + (int64_t)col[k] * TILE);
                const vf32 *r = (const vf32 *)(pack + (int64_t)col[k + 1] * TILE);
                const float v = val[k], w = val[k + 1];
                const vf32 vv = {v, v, v, v, v, v, v, v}, ww = {w, w, w, w, w, w, w, w};
                a0 = madd(vv, p[0], a0); a1 = madd(vv, p[1], a1);
                a2 = madd(vv, p[2], a2); a3 = madd(vv, p[3], a3);
                c0 = madd(ww, r[0], c0); c1 = madd(ww, r[1], c1);
                c2 = madd(ww, r[2], c2); c3 = madd(ww, r[3], c3);
            }
            if (k < e) {
                const vf32 *p = (const vf32 *)(pack + (int64_t)col[k] * TILE);
                const float v = val[k];
                const vf32 vv = {v, v, v, v, v, v, v, v};
                a0 = madd(vv, p[0], a0); a1 = madd(vv, p[1], a1);
                a2 = madd(vv, p[2], a2); a3 = madd(vv, p[3], a3);
            }
            vf32 *o = (vf32 *)(out + i * TILE);
            o[0] = a0 + c0; o[1] = a1 + c1; o[2] = a2 + c2; o[3] = a3 + c3;
        }
}

int floor_abi(void) { return 1; }
