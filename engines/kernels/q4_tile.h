// The 4-bit tile loops of q4_matmul.cc, compiled twice there: once for AVX2 and once with
// AVX-512 VNNI enabled, each with its own Q4_DOT (the int32 sums of one row x 64 weights, the
// zero-point correction included). Not a standalone header.

// Where rows m0.. of the quantised input start: activations, their scales, their corrections.
template <int R>
struct Rows {
  const int8_t* q[R];
  const float* sa[R];
  const int32_t* corr[R];
  Rows(const QuantizedInput& in, int64_t m0) {
    for (int r = 0; r < R; ++r) {
      q[r] = in.q_row(m0 + r);
      sa[r] = in.scale_row(m0 + r);
      corr[r] = in.corr_row(m0 + r);
    }
  }
};

// A column's weight scales for pair pp, lane-matched to Q4_DOT's sums: [s0 x4, s1 x4] when each
// 32-weight unit has its own scale (block 32), else the one scale of the pair's block.
template <bool kBlock32>
inline __m256 pair_scales(const float* sw, int64_t pp, int pair_shift, __m256i dup) {
  if constexpr (kBlock32)
    return _mm256_permutevar8x32_ps(
        _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sw + 2 * pp)))), dup);
  else
    return _mm256_broadcast_ss(sw + (pp >> pair_shift));
}

// Rows [m0, m0+R) x columns [n0, n1) of Y. One column at a time: B is then read as one sequential
// stream (columns are contiguous), prefetched kPrefetch bytes ahead, which is what lets one core
// stream at ~17 GB/s here; reading 4 columns side by side (4 streams) halved that. With one or
// two rows each row keeps two accumulators (even and odd pairs) so no fma waits on the last.
template <int R, bool kBlock32>
void tile(const QuantizedInput& in, int64_t m0, const uint8_t* B, const float* scales, int64_t K,
          int64_t N, int64_t block, int64_t n0, int64_t n1, float* Y) {
  constexpr int kAcc = R <= 2 ? 2 : 1;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);  // Q4_DOT's (AVX2)
  const __m256i dup = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const int64_t pairs = K / 64, blocks = K / block, row_bytes = K / 2;
  const int pair_shift = __builtin_ctzll(static_cast<uint64_t>(block / 64 ? block / 64 : 1));  // pairs per block, log2
  const Rows<R> rows(in, m0);
  const auto& q = rows.q;
  const auto& sa = rows.sa;
  const auto& corr = rows.corr;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = B + n * row_bytes;
    const float* sw = scales + n * blocks;
    __m256 acc[R][kAcc];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < kAcc; ++h) acc[r][h] = _mm256_setzero_ps();
    for (int64_t p = 0; p < pairs; p += 2) {  // K % 128 == 0: pairs is even
      _mm_prefetch(reinterpret_cast<const char*>(w + p * 32) + kPrefetch, _MM_HINT_T0);
      if ((p & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(sw + 2 * p) + kPrefetch / 4, _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {
        const int64_t pp = p + h;
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + pp * 32));
        const __m256i lo = _mm256_and_si256(x, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
        const __m256 s = pair_scales<kBlock32>(sw, pp, pair_shift, dup);
        for (int r = 0; r < R; ++r) {
          const __m256i i32 = Q4_DOT(lo, hi, q[r] + pp * 64, corr[r] + pp * 8);
          __m256& a = acc[r][kAcc == 2 ? h : 0];
          a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_mul_ps(s, _mm256_loadu_ps(sa[r] + pp * 8)), a);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      Y[(m0 + r) * N + n] = hsum(kAcc == 2 ? _mm256_add_ps(acc[r][0], acc[r][kAcc - 1]) : acc[r][0]);
  }
}

// Rows [m0, m0+4) x C columns side by side (Q4_COLS > 1: only where 32 vector registers hold the
// 4*C accumulators): each row's activations are loaded once for C columns instead of once per
// column. Per (row, column) the operations and their order are tile<4>'s, so the results are too.
template <int C, bool kBlock32>
void tile4(const QuantizedInput& in, int64_t m0, const uint8_t* B, const float* scales, int64_t K,
           int64_t N, int64_t block, int64_t n0, int64_t n1, float* Y) {
  constexpr int R = 4;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  const __m256i dup = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const int64_t pairs = K / 64, blocks = K / block, row_bytes = K / 2;
  const int pair_shift = __builtin_ctzll(static_cast<uint64_t>(block / 64 ? block / 64 : 1));
  const Rows<R> rows(in, m0);
  const auto& q = rows.q;
  const auto& sa = rows.sa;
  const auto& corr = rows.corr;
  int64_t n = n0;
  for (; n + C <= n1; n += C) {
    const uint8_t* w[C];
    const float* sw[C];
    __m256 acc[R][C];
    for (int c = 0; c < C; ++c) {
      w[c] = B + (n + c) * row_bytes;
      sw[c] = scales + (n + c) * blocks;
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_setzero_ps();
    }
    for (int64_t pp = 0; pp < pairs; ++pp) {
      __m256i lo[C], hi[C];
      __m256 s[C];
      for (int c = 0; c < C; ++c) {
        if ((pp & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(w[c] + pp * 32) + kPrefetch, _MM_HINT_T0);
        if ((pp & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(sw[c] + 2 * pp) + kPrefetch / 4, _MM_HINT_T0);
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[c] + pp * 32));
        lo[c] = _mm256_and_si256(x, low4);
        hi[c] = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
        s[c] = pair_scales<kBlock32>(sw[c], pp, pair_shift, dup);
      }
      for (int r = 0; r < R; ++r) {
        const __m256 a_scale = _mm256_loadu_ps(sa[r] + pp * 8);
        for (int c = 0; c < C; ++c) {
          const __m256i i32 = Q4_DOT(lo[c], hi[c], q[r] + pp * 64, corr[r] + pp * 8);
          acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_mul_ps(s[c], a_scale), acc[r][c]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) Y[(m0 + r) * N + n + c] = hsum(acc[r][c]);
  }
  if (n < n1) tile<4, kBlock32>(in, m0, B, scales, K, N, block, n, n1, Y);
}

template <bool kBlock32>
void columns(const QuantizedInput& in, int64_t M, const uint8_t* B, const float* scales, int64_t K, int64_t N,
             int64_t block, int64_t n0, int64_t n1, float* Y) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    if constexpr (Q4_COLS > 1)
      tile4<Q4_COLS, kBlock32>(in, m, B, scales, K, N, block, n0, n1, Y);
    else
      tile<4, kBlock32>(in, m, B, scales, K, N, block, n0, n1, Y);
  }
  switch (M - m) {
    case 3: tile<3, kBlock32>(in, m, B, scales, K, N, block, n0, n1, Y); break;
    case 2: tile<2, kBlock32>(in, m, B, scales, K, N, block, n0, n1, Y); break;
    case 1: tile<1, kBlock32>(in, m, B, scales, K, N, block, n0, n1, Y); break;
    default: break;
  }
}
