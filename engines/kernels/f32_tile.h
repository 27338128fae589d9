// ai.granite_deploy.MatMulF32's loop (q4_matmul.cc includes it inside an AVX-512F namespace; not a
// standalone header): Y = A (M x K) x B, fp32 arithmetic, over B tiled in strips of 48 columns, each
// strip K x 48 weights, k-major, so a strip is one contiguous stream (the last strip padded with zero
// columns). The weights are stored as fp32 or, where every weight of B is a bfloat16 value already
// (an fp32 export of a bf16 checkpoint: every released Granite 4.0), as its upper 16 bits: widening
// them back is exact, so the products and sums are the fp32 ones, from half the bytes.
//
// Why: a batch-1 decode step streams every weight once at the memory's pace (both ONNX Runtime and this
// tile ran at ~120% of the measured GEMV bandwidth on this Zen 4 host), so only fewer bytes make it
// faster. At 8 rows ONNX Runtime's MatMul (MLAS, prepacked B) streamed fp32 weights at 20-28 GB/s, this
// tile (8 rows x 3 vectors = 24 accumulators) at 26-31 GB/s in the same minutes (a /tmp microbenchmark
// over 1.7 GB of the 1B's layer shapes); in the engine, batch-8 decode went from 1.00x to 1.25x
// onnxruntime-genai. At one row over fp32 strips MLAS's GEMV is as fast or a little faster. Prefill
// moved within the host's noise (K runs in blocks of 256 there, so a strip's block stays in L2 while
// every row tile reuses it; a bf16 block is widened once into fp32 for all the row tiles).
constexpr int64_t kF32Strip = 48;
constexpr int64_t kF32KBlock = 256;
constexpr int64_t kF32Prefetch = 512;  // bytes ahead in the strip's stream (512-4096 measured alike)

inline __mmask16 f32_mask(int64_t cols, int64_t from) {
  const int64_t n = std::min<int64_t>(16, std::max<int64_t>(0, cols - from));
  return static_cast<__mmask16>((1u << n) - 1);
}

// 16 weights of a strip row as fp32: loaded, or widened from bf16 (shift into the upper half: exact).
inline __m512 f32_load(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 f32_load(const uint16_t* w) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Rows [0, R) of C (row stride ldc) over k in [k0, k1) of one strip; cols real columns (<= 48).
template <int R, typename W>
void f32_tile(const float* A, int64_t lda, const W* B, int64_t k0, int64_t k1, float* C, int64_t ldc,
              int64_t cols, bool accumulate) {
  constexpr int64_t kRowBytes = kF32Strip * sizeof(W);
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
  const W* b = B + k0 * kF32Strip;
  for (int64_t k = k0; k < k1; ++k, b += kF32Strip) {
    const char* ahead = reinterpret_cast<const char*>(b) + kF32Prefetch;
    for (int64_t line = 0; line < kRowBytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    const __m512 b0 = f32_load(b), b1 = f32_load(b + 16), b2 = f32_load(b + 32);
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

template <typename W>
void f32_rows(int64_t rows, const float* A, int64_t lda, const W* B, int64_t k0, int64_t k1, float* C,
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

// Rows k0..k1 of a bf16 strip widened to fp32, for every row tile of a block to reuse.
inline void f32_widen(const uint16_t* strip, int64_t k0, int64_t k1, float* out) {
  for (int64_t i = k0 * kF32Strip; i < k1 * kF32Strip; i += 16, out += 16) _mm512_storeu_ps(out, f32_load(strip + i));
}

// Strip s of Y for all M rows. Up to 8 rows the whole K runs at once (the strip streams from memory
// once); more rows take K in blocks so every 8-row tile reuses the block from L2. The per-output
// sum order (k ascending, one fma each) depends neither on M nor on the storage.
template <typename W>
void f32_strip(const float* A, int64_t M, int64_t K, int64_t N, const W* B, int64_t s, float* Y) {
  const W* strip = B + s * K * kF32Strip;
  const int64_t cols = std::min<int64_t>(kF32Strip, N - s * kF32Strip), kc = M <= 8 ? K : kF32KBlock;
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t k1 = std::min(K, k0 + kc);
    if constexpr (std::is_same_v<W, uint16_t>) {
      if (M > 8) {  // widen the bf16 block once; every row tile reads the fp32 copy from L2
        alignas(64) thread_local float block[kF32KBlock * kF32Strip];
        f32_widen(strip, k0, k1, block);
        for (int64_t m = 0; m < M; m += 8)
          f32_rows<float>(std::min<int64_t>(8, M - m), A + m * K + k0, K, block, 0, k1 - k0,
                          Y + m * N + s * kF32Strip, N, cols, k0 > 0);
        continue;
      }
    }
    for (int64_t m = 0; m < M; m += 8)
      f32_rows(std::min<int64_t>(8, M - m), A + m * K, K, strip, k0, k1, Y + m * N + s * kF32Strip, N, cols, k0 > 0);
  }
}
