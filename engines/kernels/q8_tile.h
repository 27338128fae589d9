// The 8-bit tile loop of q4_matmul.cc's MatMulQ8Dynamic, compiled twice there like q4_tile.h: once
// for AVX2 and once with AVX-512 VNNI, each with its own Q8_DOT4 (one row's 4 uint8 inputs, broadcast,
// times 4 int8 weights of each of 8 columns, added into int32 lanes). Not a standalone header.

// Rows [m0, m0+R) x column groups [g0, g1) of Y = (float(sum_k (xq - 128) w) * x_scale) * w_scale.
// A group is K/4 steps of 32 weight bytes (byte 4c + j: weight k = 4t + j of column c), then its 8
// fp32 column scales, then 8 int32 sums of -128 x the column's weights (the input's zero point).
// The lanes are outputs, so the only float work is two products per 8 outputs, in the order the
// graph this replaces does them (DequantizeLinear by x_scale, then Mul by w_scale).
template <int R, int G>
void tile8(const Q8Input& in, int64_t m0, const uint8_t* B, int64_t K, int64_t N, int64_t g0, int64_t g1,
           float* Y) {
  constexpr bool kSplit = R * G <= 2;  // two int32 chains where the tile is too small to hide latency
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);  // Q8_DOT4's (AVX2)
  const int64_t steps = K / 4, group_bytes = K * 8 + 64;
  const uint8_t* q[R];
  __m256 sx[R];
  for (int r = 0; r < R; ++r) {
    q[r] = in.q_row(m0 + r);
    sx[r] = _mm256_set1_ps(in.scale[m0 + r]);
  }
  for (int64_t g = g0; g + G <= g1; g += G) {
    const uint8_t* w[G];
    __m256i acc[R][G], acc2[R][G];
    for (int c = 0; c < G; ++c) {
      w[c] = B + (g + c) * group_bytes;
      const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[c] + K * 8 + 32));
      for (int r = 0; r < R; ++r) {
        acc[r][c] = corr;
        acc2[r][c] = _mm256_setzero_si256();
      }
    }
    for (int64_t t = 0; t < steps; t += 2) {  // K % 8 == 0
      __m256i x0[G], x1[G];
      for (int c = 0; c < G; ++c) {
        const uint8_t* p = w[c] + t * 32;
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch, _MM_HINT_T0);
        x0[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        x1[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
      }
      for (int r = 0; r < R; ++r) {
        const __m256i a0 = _mm256_set1_epi32(load32(q[r] + t * 4)), a1 = _mm256_set1_epi32(load32(q[r] + t * 4 + 4));
        for (int c = 0; c < G; ++c) {
          if constexpr (kSplit) {
            acc[r][c] = Q8_DOT4(acc[r][c], a0, x0[c]);
            acc2[r][c] = Q8_DOT4(acc2[r][c], a1, x1[c]);
          } else {
            acc[r][c] = Q8_DOT4(Q8_DOT4(acc[r][c], a0, x0[c]), a1, x1[c]);
          }
        }
      }
    }
    for (int c = 0; c < G; ++c) {
      const __m256 ws = _mm256_loadu_ps(reinterpret_cast<const float*>(w[c] + K * 8));
      for (int r = 0; r < R; ++r) {
        const __m256i sum = kSplit ? _mm256_add_epi32(acc[r][c], acc2[r][c]) : acc[r][c];
        store_columns(Y + (m0 + r) * N, 8 * (g + c), N, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sum), sx[r]), ws));
      }
    }
  }
}

template <int R, int G>
void rows_of8(const Q8Input& in, int64_t m0, const uint8_t* B, int64_t K, int64_t N, int64_t g0, int64_t g1, float* Y) {
  const int64_t g_main = g0 + (g1 - g0) / G * G;
  tile8<R, G>(in, m0, B, K, N, g0, g_main, Y);
  if (g_main < g1) tile8<R, 1>(in, m0, B, K, N, g_main, g1, Y);
}

void groups8(const Q8Input& in, int64_t M, const uint8_t* B, int64_t K, int64_t N, int64_t g0, int64_t g1, float* Y) {
  int64_t m = 0;
  for (; m + Q4_ROWS <= M; m += Q4_ROWS) rows_of8<Q4_ROWS, Q4_GROUPS>(in, m, B, K, N, g0, g1, Y);
  for (; m + 2 <= M; m += 2) rows_of8<2, Q4_GROUPS>(in, m, B, K, N, g0, g1, Y);
  if (m < M) rows_of8<1, Q4_GROUPS1>(in, m, B, K, N, g0, g1, Y);
}
