/* The fused LSTM cell update for iternn.convert.gated (float32, x86-64 AVX2 + FMA).

   One call does one time step of one layer after the recurrent GEMM: it adds the step's
   input drive and recurrent part of each gate (order i, f, o, g), applies sigmoid(i),
   sigmoid(f), sigmoid(o), tanh(g) and writes them, c = f * c_prev + i * g and
   h = o * tanh(c): one pass where torch needs an add and six element-wise ops.
   exp is Cephes' single-precision polynomial (range reduction by n ln 2, degree-6
   polynomial, scaling by 2^n through the exponent bits); tanh is Cephes' odd polynomial
   for |x| < 0.625 and 1 - 2 / (exp(2|x|) + 1) above. Both are within 2-3 ulp of the
   correctly rounded values (absolute error <= 2.5e-7 on [0, 1]): float rounding, not
   bitwise torch's values. The code is compiled for any CPU; iternn_lstm_cell_supported()
   says whether this CPU runs it (AVX2 and FMA), else the caller uses torch. */
#include <stdint.h>

#define ITERNN_LSTM_CELL_ABI 2

int iternn_lstm_cell_abi(void) { return ITERNN_LSTM_CELL_ABI; }

/* One layer's buffers, laid out by the caller (iternn.convert.lstm_native.LayerKernel).
   Gate order everywhere: i, f, o, g. Drive element (t, b, j) of gate k is
   d[k][t * d_step[k] + b * d_row[k] + j] (a step stride of 0: the same drive every
   step); r is (4, rows, H) (h_{t-1} W^T, written by the caller's GEMM before each
   step); a is (steps, 4, rows, H); c and h are (steps, rows, H); c0 is (rows, H). */
typedef struct {
    const float *d[4];
    int64_t d_step[4], d_row[4];
    const float *r, *c0;
    float *a, *c, *h;
    int64_t steps, rows, H;
} iternn_lstm_layer;

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

int iternn_lstm_cell_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* exp(x), Cephes-style: x = n ln2 + r, exp(r) by a degree-6 polynomial, times 2^n. */
__attribute__((target("avx2,fma"))) static inline __m256 exp8(__m256 x) {
    /* clamp to [-87, 88] (2^n stays a normal number); NaN passes through: max/min
       return their second operand when either is NaN */
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

__attribute__((target("avx2,fma"))) static inline __m256 sigmoid8(__m256 x) {
    __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

__attribute__((target("avx2,fma"))) static inline __m256 tanh8(__m256 x) {
    __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_andnot_ps(sign, x);
    __m256 z = _mm256_mul_ps(x, x);
    __m256 p = _mm256_set1_ps(-5.70498872745E-3f);
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.06390887954E-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-5.37397155531E-2f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(1.33314422036E-1f));
    p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-3.33332819422E-1f));
    __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), x, x);
    __m256 e = exp8(_mm256_add_ps(a, a));
    __m256 big = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                               _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
    big = _mm256_or_ps(big, _mm256_and_ps(sign, x));
    return _mm256_blendv_ps(small, big, _mm256_cmp_ps(a, _mm256_set1_ps(0.625f), _CMP_GE_OQ));
}

/* One element block of 8: pre-activations (i, f, o, g) and c_prev in; the activated
   gates, c and h = o * tanh(c) out. */
__attribute__((target("avx2,fma"))) static inline void cell8(const __m256 x[4], __m256 c_prev,
                                                             __m256 act[4], __m256 *c, __m256 *h) {
    act[0] = sigmoid8(x[0]);
    act[1] = sigmoid8(x[1]);
    act[2] = sigmoid8(x[2]);
    act[3] = tanh8(x[3]);
    *c = _mm256_fmadd_ps(act[1], c_prev, _mm256_mul_ps(act[0], act[3]));
    *h = _mm256_mul_ps(act[2], tanh8(*c));
}

/* Returns 0, or -1 for a bad argument. Any H: the last H % 8 elements of a row go
   through the same vector code on a zero-padded copy. */
__attribute__((target("avx2,fma"))) int iternn_lstm_step_f32(const iternn_lstm_layer *L,
                                                             int64_t t) {
    if (!L || t < 0 || t >= L->steps || L->rows <= 0 || L->H <= 0 || !L->r || !L->c0 || !L->a
        || !L->c || !L->h)
        return -1;
    for (int k = 0; k < 4; ++k)
        if (!L->d[k]) return -1;
    const int64_t rows = L->rows, H = L->H, n = rows * H, full = H - H % 8;
    const float *c_prev = t == 0 ? L->c0 : L->c + (t - 1) * n;
    float *a = L->a + t * 4 * n, *c = L->c + t * n, *h = L->h + t * n;
    for (int64_t b = 0; b < rows; ++b) {
        const float *d[4], *r[4];
        float *out[4];
        for (int k = 0; k < 4; ++k) {
            d[k] = L->d[k] + t * L->d_step[k] + b * L->d_row[k];
            r[k] = L->r + k * n + b * H;
            out[k] = a + k * n + b * H;
        }
        const float *cp = c_prev + b * H;
        float *cb = c + b * H, *hb = h + b * H;
        __m256 x[4], act[4], cv, hv;
        for (int64_t j = 0; j < full; j += 8) {
            for (int k = 0; k < 4; ++k)
                x[k] = _mm256_add_ps(_mm256_loadu_ps(d[k] + j), _mm256_loadu_ps(r[k] + j));
            cell8(x, _mm256_loadu_ps(cp + j), act, &cv, &hv);
            for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out[k] + j, act[k]);
            _mm256_storeu_ps(cb + j, cv);
            _mm256_storeu_ps(hb + j, hv);
        }
        if (full < H) {
            float tmp[7][8] = {{0}};
            const int64_t rest = H - full;
            for (int64_t j = 0; j < rest; ++j) {
                for (int k = 0; k < 4; ++k) tmp[k][j] = d[k][full + j] + r[k][full + j];
                tmp[4][j] = cp[full + j];
            }
            for (int k = 0; k < 4; ++k) x[k] = _mm256_loadu_ps(tmp[k]);
            cell8(x, _mm256_loadu_ps(tmp[4]), act, &cv, &hv);
            for (int k = 0; k < 4; ++k) _mm256_storeu_ps(tmp[k], act[k]);
            _mm256_storeu_ps(tmp[5], cv);
            _mm256_storeu_ps(tmp[6], hv);
            for (int64_t j = 0; j < rest; ++j) {
                for (int k = 0; k < 4; ++k) out[k][full + j] = tmp[k][j];
                cb[full + j] = tmp[5][j];
                hb[full + j] = tmp[6][j];
            }
        }
    }
    return 0;
}

#else
int iternn_lstm_cell_supported(void) { return 0; }

int iternn_lstm_step_f32(const iternn_lstm_layer *L, int64_t t) {
    (void)L; (void)t;
    return -1;
}
#endif
