// ai.granite_deploy.MatMulF32's loop (q4_matmul.cc includes it inside an AVX-512F namespace; not a
// standalone header): Y = A (M x K) x B, fp32, over B tiled in strips of 48 columns, each strip K x 48
// floats, k-major, so a strip is one contiguous stream (the last strip padded with zero columns).
//
// Why: at 8 rows ONNX Runtime's MatMul (MLAS, prepacked B) streamed the weights at 20-28 GB/s on this
// Zen 4 host, this tile (8 rows x 3 vectors = 24 accumulators) at 26-31 GB/s in the same minutes
// (a /tmp microbenchmark over 1.7 GB of the 1B's layer shapes); in the engine, batch-8 decode went
// from 1.00x to 1.25x onnxruntime-genai. At one row MLAS's GEMV is as fast or a little faster, and
// prefill moved within the host's noise (K runs in blocks of 256 there, so a strip's block stays in
// L2 while every row tile reuses it).
constexpr int64_t kF32Strip = 48;
constexpr int64_t kF32KBlock = 256;
constexpr int64_t kF32Prefetch = 512;  // bytes ahead in the strip's stream (512-4096 measured alike)

inline __mmask16 f32_mask(int64_t cols, int64_t from) {
  const int64_t n = std::min<int64_t>(16, std::max<int64_t>(0, cols - from));
  return static_cast<__mmask16>((1u << n) - 1);
}

// Rows [0, R) of C (row stride ldc) over k in [k0, k1) of one strip; cols real columns (<= 48).
template <int R>
void f32_tile(const float* A, int64_t lda, const float* B, int64_t k0, int64_t k1, float* C, int64_t ldc,
              int64_t cols, bool accumulate) {
  const __mmask16 m0 = f32_mask(cols, 0), m1 = f32_mask(cols, 16), m2 = f32_mask(cols, 32);
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r) {
    if (accumulate) {
      acc[r][0] = _mm512_maskz_loadu_ps(m0, C + r * ldc);
      acc[r][1] = _mm512_maskz_loadu_ps(m1, C + r * ldc + 16);
      acc[r][2] = _mm512_maskz_loadu_ps(m2, C + r * ldc + 32);
    } else {
      acc[r][0] = acc[r][1] = acc[r][2] = _mm512_setzero_ps();
    }
  }
  const float* b = B + k0 * kF32Strip;
  for (int64_t k = k0; k < k1; ++k, b += kF32Strip) {
    const char* ahead = reinterpret_cast<const char*>(b) + kF32Prefetch;
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    _mm_prefetch(ahead + 128, _MM_HINT_T0);
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), b2 = _mm512_loadu_ps(b + 32);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(C + r * ldc, m0, acc[r][0]);
    _mm512_mask_storeu_ps(C + r * ldc + 16, m1, acc[r][1]);
    _mm512_mask_storeu_ps(C + r * ldc + 32, m2, acc[r][2]);
  }
}

void f32_rows(int64_t rows, const float* A, int64_t lda, const float* B, int64_t k0, int64_t k1, float* C,
              int64_t ldc, int64_t cols, bool accumulate) {
  switch (rows) {
    case 1: f32_tile<1>(A, lda, B, k0, k1, C, ldc, cols, accumulate); break;
    case 2: f32_tile<2>(A, lda, B, k0, k1, C, ldc, cols, accumulate); break;
    case 3: f32_tile<3>(A, lda, B, k0, k1, C, ldc, cols, accumulate); break;
    case 4: f32_tile<4>(A, lda, B, k0, k1, C, ldc, cols, accumulate); break;
    case 5: f32_tile<5>(A, lda, B, k0, k1, C, ldc, cols, accumulate); break;
    case 6: f32_tile<6>(A, lda, B, k0, k1, C, ldc, cols, accumulate); break;
    case 7: f32_tile<7>(A, lda, B, k0, k1, C, ldc, cols, accumulate); break;
    default: f32_tile<8>(A, lda, B, k0, k1, C, ldc, cols, accumulate); break;
  }
}

// Strip s of Y for all M rows. Up to 8 rows the whole K runs at once (the strip streams from memory
// once); more rows take K in blocks so every 8-row tile reuses the block from L2. The per-output
// sum order (k ascending, one fma each) does not depend on M.
void f32_strip(const float* A, int64_t M, int64_t K, int64_t N, const float* B, int64_t s, float* Y) {
  const float* strip = B + s * K * kF32Strip;
  const int64_t cols = std::min<int64_t>(kF32Strip, N - s * kF32Strip), kc = M <= 8 ? K : kF32KBlock;
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t k1 = std::min(K, k0 + kc);
    for (int64_t m = 0; m < M; m += 8)
      f32_rows(std::min<int64_t>(8, M - m), A + m * K, K, strip, k0, k1, Y + m * N + s * kF32Strip, N, cols, k0 > 0);
  }
}
