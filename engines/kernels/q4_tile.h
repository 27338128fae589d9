// The 4-bit tile loop of q4_matmul.cc, compiled twice there: once for AVX2 and once with AVX-512
// VNNI enabled, each with its own Q4_DOT8 (one row's int32 sums over 8 weights of 8 columns, added
// into the running block sum) and Q4_ROWS x Q4_GROUPS tile. Not a standalone header.

// Rows [m0, m0+R) x column groups [g0, g1) (G groups side by side) of Y. Per block, each
// (row, group) sum starts at the row's zero-point correction and takes block/8 steps of
// Q4_DOT8: the weights are loaded and unpacked once for R rows, each row's 8 input bytes are
// broadcast once for G groups, and the 8 lanes are 8 columns, so a block ends in one convert,
// one scale product and one fma per 8 outputs (no horizontal sums). Per output the operations
// and their order do not depend on R or G, so neither do the results.
template <int R, int G>
void tile(const QuantizedInput& in, int64_t m0, const uint8_t* B, int64_t K, int64_t N, int64_t block,
          int64_t g0, int64_t g1, float* Y) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);  // Q4_DOT8's (AVX2)
  const int64_t blocks = K / block, steps = block / 8, block_bytes = q4_block_bytes(block);
  const int8_t* q[R];
  const float* sa[R];
  const int32_t* corr[R];
  for (int r = 0; r < R; ++r) {
    q[r] = in.q_row(m0 + r);
    sa[r] = in.scale_row(m0 + r);
    corr[r] = in.corr_row(m0 + r);
  }
  for (int64_t g = g0; g + G <= g1; g += G) {
    const uint8_t* w[G];
    __m256 acc[R][G];
    for (int c = 0; c < G; ++c) {
      w[c] = B + (g + c) * blocks * block_bytes;
      for (int r = 0; r < R; ++r) acc[r][c] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i isum[R][G];
      for (int r = 0; r < R; ++r) {
        const __m256i c0 = _mm256_set1_epi32(corr[r][b]);
        for (int c = 0; c < G; ++c) isum[r][c] = c0;
      }
      for (int64_t t = 0; t < steps; ++t) {
        __m256i lo[G], hi[G];
        for (int c = 0; c < G; ++c) {
          const uint8_t* p = w[c] + b * block_bytes + t * 32;
          if ((t & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          lo[c] = _mm256_and_si256(x, low4);
          hi[c] = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* a = q[r] + b * block + t * 8;
          const __m256i a0 = _mm256_set1_epi32(load32(a)), a1 = _mm256_set1_epi32(load32(a + 4));
          for (int c = 0; c < G; ++c) isum[r][c] = Q4_DOT8(isum[r][c], lo[c], hi[c], a0, a1);
        }
      }
      __m256 s[G];
      for (int c = 0; c < G; ++c)
        s[c] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[c] + b * block_bytes + block * 4)));
      for (int r = 0; r < R; ++r) {
        const __m256 a_scale = _mm256_set1_ps(sa[r][b]);
        for (int c = 0; c < G; ++c)
          acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][c]), _mm256_mul_ps(s[c], a_scale), acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < G; ++c) store_columns(Y + (m0 + r) * N, 8 * (g + c), N, acc[r][c]);
  }
}

// Groups [g0, g1) for all M rows: Q4_ROWS-row tiles of Q4_GROUPS groups, then the leftovers.
template <int R, int G>
void rows_of(const QuantizedInput& in, int64_t m0, const uint8_t* B, int64_t K, int64_t N, int64_t block,
             int64_t g0, int64_t g1, float* Y) {
  const int64_t g_main = g0 + (g1 - g0) / G * G;
  tile<R, G>(in, m0, B, K, N, block, g0, g_main, Y);
  if (g_main < g1) tile<R, 1>(in, m0, B, K, N, block, g_main, g1, Y);
}

void groups(const QuantizedInput& in, int64_t M, const uint8_t* B, int64_t K, int64_t N, int64_t block,
            int64_t g0, int64_t g1, float* Y) {
  int64_t m = 0;
  for (; m + Q4_ROWS <= M; m += Q4_ROWS) rows_of<Q4_ROWS, Q4_GROUPS>(in, m, B, K, N, block, g0, g1, Y);
  for (; m + 2 <= M; m += 2) rows_of<2, Q4_GROUPS>(in, m, B, K, N, block, g0, g1, Y);
  if (m < M) rows_of<1, Q4_GROUPS1>(in, m, B, K, N, block, g0, g1, Y);
}
