/* The fused LSTM cell update for iternn.convert.gated (float32, x86-64 AVX2 + FMA).

   One call does one time step of one layer after the recurrent GEMM:
     g4 = (4, n) pre-activations in the order i, f, o, g (overwritten by the activations
     sigmoid(i), sigmoid(f), sigmoid(o), tanh(g)); c_out = f * c_prev + i * g;
     h_out = o * tanh(c_out).
   exp is Cephes' single-precision polynomial (range reduction by n ln 2, degree-6
   polynomial, scaling by 2^n through the exponent bits); tanh is Cephes' odd polynomial
   for |x| < 0.625 and 1 - 2 / (exp(2|x|) + 1) above. Both are within 2-3 ulp of the
   correctly rounded values (absolute error <= 2.5e-7 on [0, 1]): float rounding, not
   bitwise torch's values. The code is compiled for any CPU; iternn_lstm_cell_supported()
   says whether this CPU runs it (AVX2 and FMA), else the caller uses torch. */
#include <stdint.h>

#define ITERNN_LSTM_CELL_ABI 1

int iternn_lstm_cell_abi(void) { return ITERNN_LSTM_CELL_ABI; }

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

/* Returns 0, or -1 for a bad argument (n not positive). Any n: the last n % 8 elements
   go through the same vector code on a zero-padded copy. */
__attribute__((target("avx2,fma"))) int iternn_lstm_cell_f32(float *g4, const float *c_prev,
                                                             float *c_out, float *h_out,
                                                             int64_t n) {
    if (n <= 0) return -1;
    float *gi = g4, *gf = g4 + n, *go = g4 + 2 * n, *gg = g4 + 3 * n;
    int64_t full = n - n % 8;
    for (int64_t j = 0; j < full; j += 8) {
        __m256 i = sigmoid8(_mm256_loadu_ps(gi + j)), f = sigmoid8(_mm256_loadu_ps(gf + j));
        __m256 o = sigmoid8(_mm256_loadu_ps(go + j)), g = tanh8(_mm256_loadu_ps(gg + j));
        _mm256_storeu_ps(gi + j, i);
        _mm256_storeu_ps(gf + j, f);
        _mm256_storeu_ps(go + j, o);
        _mm256_storeu_ps(gg + j, g);
        __m256 c = _mm256_add_ps(_mm256_mul_ps(f, _mm256_loadu_ps(c_prev + j)), _mm256_mul_ps(i, g));
        _mm256_storeu_ps(c_out + j, c);
        _mm256_storeu_ps(h_out + j, _mm256_mul_ps(o, tanh8(c)));
    }
    if (full < n) {
        float t[6][8] = {{0}};
        int64_t r = n - full;
        for (int64_t k = 0; k < r; ++k) {
            t[0][k] = gi[full + k]; t[1][k] = gf[full + k]; t[2][k] = go[full + k];
            t[3][k] = gg[full + k]; t[4][k] = c_prev[full + k];
        }
        __m256 i = sigmoid8(_mm256_loadu_ps(t[0])), f = sigmoid8(_mm256_loadu_ps(t[1]));
        __m256 o = sigmoid8(_mm256_loadu_ps(t[2])), g = tanh8(_mm256_loadu_ps(t[3]));
        __m256 c = _mm256_add_ps(_mm256_mul_ps(f, _mm256_loadu_ps(t[4])), _mm256_mul_ps(i, g));
        _mm256_storeu_ps(t[0], i);
        _mm256_storeu_ps(t[1], f);
        _mm256_storeu_ps(t[2], o);
        _mm256_storeu_ps(t[3], g);
        _mm256_storeu_ps(t[4], c);
        _mm256_storeu_ps(t[5], _mm256_mul_ps(o, tanh8(c)));
        for (int64_t k = 0; k < r; ++k) {
            gi[full + k] = t[0][k]; gf[full + k] = t[1][k]; go[full + k] = t[2][k];
            gg[full + k] = t[3][k]; c_out[full + k] = t[4][k]; h_out[full + k] = t[5][k];
        }
    }
    return 0;
}

#else
int iternn_lstm_cell_supported(void) { return 0; }

int iternn_lstm_cell_f32(float *g4, const float *c_prev, float *c_out, float *h_out, int64_t n) {
    (void)g4; (void)c_prev; (void)c_out; (void)h_out; (void)n;
    return -1;
}
#endif
