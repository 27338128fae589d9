// ai.granite_deploy.MatMulQ4: ONNX Runtime's com.microsoft.MatMulNBits (bits 4, symmetric, accuracy
// level 4) for the CPU provider, on AVX2 + FMA, over the same packed weights and scales.
//
// Why: on AVX2 without VNNI, MLAS's 4-bit kernel is compute-bound at ~19-21 GB/s for one row
// and near-linear in rows after that (8 rows cost 3.8x one), while a decode step is a handful
// of rows over every weight. Here the packed bytes are read once per tile of up to 4 rows; each
// 32 bytes (64 weights, two 32-weight units) become two int8 vectors with one shift and two
// ands, and meet the int8-quantised activations in vpmaddubsw. The nibbles stay unsigned
// (vpmaddubsw's unsigned operand); the -8 zero point is one integer add per row per 64 weights.
//
// Numerics match accuracy level 4: the input is quantised to int8 per row per weight block
// (scale = max|a| / 127, round to nearest), dot products are exact in int32, then scaled in fp32.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr const char* kDomain = "ai.granite_deploy";
constexpr int64_t kRowTile = 4;      // rows sharing one pass over a column's weights
constexpr int64_t kChunkBytes = 65536;  // weight bytes per parallel task (16 KiB streamed ~15% slower)
constexpr int64_t kPrefetch = 2048;     // bytes ahead in B's stream (1-2 KiB measured best)

// One call's int8 input: per row, K bytes in pair order (see quantize_row), and per pair of
// 32-weight units a scale vector [s0 x4, s1 x4] and a zero-point correction [c0,0,0,0,c1,0,0,0].
struct QuantizedInput {
  int64_t pairs = 0;
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> corr;
  const int8_t* q_row(int64_t m) const { return q.data() + m * pairs * 64; }
  const float* scale_row(int64_t m) const { return scale.data() + m * pairs * 8; }
  const int32_t* corr_row(int64_t m) const { return corr.data() + m * pairs * 8; }
};

// Weight byte j of a 32-byte pair holds weights 2j (low nibble) and 2j+1 (high) of unit j/16,
// so the low nibbles are [unit0 evens | unit1 evens] and the high ones the odds: the input is
// stored in that order, 32 bytes for the low half then 32 for the high half.
void quantize_row(const float* a, int64_t K, int64_t block, int8_t* q, float* scale, int32_t* corr) {
  std::vector<float> block_scale(K / block);
  std::vector<int8_t> plain(K);
  for (int64_t b = 0; b < K / block; ++b) {
    const float* x = a + b * block;
    float amax = 0.f;
    for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float s = amax / 127.f;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    block_scale[b] = s;
    for (int64_t i = 0; i < block; ++i) plain[b * block + i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));
  }
  for (int64_t p = 0; p < K / 64; ++p) {
    const int8_t* src = plain.data() + p * 64;
    int8_t* dst = q + p * 64;
    int32_t sum0 = 0, sum1 = 0;
    for (int j = 0; j < 16; ++j) {
      dst[j] = src[2 * j];
      dst[16 + j] = src[32 + 2 * j];
      dst[32 + j] = src[2 * j + 1];
      dst[48 + j] = src[32 + 2 * j + 1];
    }
    for (int j = 0; j < 32; ++j) { sum0 += src[j]; sum1 += src[32 + j]; }
    const float s0 = block_scale[(p * 64) / block], s1 = block_scale[(p * 64 + 32) / block];
    for (int j = 0; j < 4; ++j) { scale[p * 8 + j] = s0; scale[p * 8 + 4 + j] = s1; }
    std::memset(corr + p * 8, 0, 8 * sizeof(int32_t));
    corr[p * 8] = -8 * sum0;
    corr[p * 8 + 4] = -8 * sum1;
  }
}

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
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
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i dup = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const int64_t pairs = K / 64, blocks = K / block, row_bytes = K / 2;
  const int pair_shift = __builtin_ctzll(static_cast<uint64_t>(block / 64 ? block / 64 : 1));  // pairs per block, log2
  const int8_t* q[R];
  const float* sa[R];
  const int32_t* corr[R];
  for (int r = 0; r < R; ++r) {
    q[r] = in.q_row(m0 + r);
    sa[r] = in.scale_row(m0 + r);
    corr[r] = in.corr_row(m0 + r);
  }
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
        const __m256 s =
            kBlock32 ? _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castpd_ps(
                                                    _mm_load_sd(reinterpret_cast<const double*>(sw + 2 * pp)))),
                                                dup)
                     : _mm256_broadcast_ss(sw + (pp >> pair_shift));
        for (int r = 0; r < R; ++r) {
          const __m256i d = _mm256_add_epi16(
              _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + pp * 64))),
              _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + pp * 64 + 32))));
          const __m256i i32 = _mm256_add_epi32(
              _mm256_madd_epi16(d, ones), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr[r] + pp * 8)));
          __m256& a = acc[r][kAcc == 2 ? h : 0];
          a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_mul_ps(s, _mm256_loadu_ps(sa[r] + pp * 8)), a);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      Y[(m0 + r) * N + n] = hsum(kAcc == 2 ? _mm256_add_ps(acc[r][0], acc[r][kAcc - 1]) : acc[r][0]);
  }
}

template <bool kBlock32>
void columns(const QuantizedInput& in, int64_t M, const uint8_t* B, const float* scales, int64_t K, int64_t N,
             int64_t block, int64_t n0, int64_t n1, float* Y) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, kBlock32>(in, m, B, scales, K, N, block, n0, n1, Y);
  switch (M - m) {
    case 3: tile<3, kBlock32>(in, m, B, scales, K, N, block, n0, n1, Y); break;
    case 2: tile<2, kBlock32>(in, m, B, scales, K, N, block, n0, n1, Y); break;
    case 1: tile<1, kBlock32>(in, m, B, scales, K, N, block, n0, n1, Y); break;
    default: break;
  }
}

struct Job {
  const float* A;
  QuantizedInput* in;
  const uint8_t* B;
  const float* scales;
  float* Y;
  int64_t M, K, N, block, chunk;
};

void quantize_task(void* data, size_t m) {
  auto* job = static_cast<Job*>(data);
  QuantizedInput& in = *job->in;
  quantize_row(job->A + m * job->K, job->K, job->block, in.q.data() + m * in.pairs * 64,
               in.scale.data() + m * in.pairs * 8, in.corr.data() + m * in.pairs * 8);
}

void matmul_task(void* data, size_t t) {
  auto* job = static_cast<Job*>(data);
  const int64_t n0 = static_cast<int64_t>(t) * job->chunk, n1 = std::min(job->N, n0 + job->chunk);
  if (job->block == 32)
    columns<true>(*job->in, job->M, job->B, job->scales, job->K, job->N, job->block, n0, n1, job->Y);
  else
    columns<false>(*job->in, job->M, job->B, job->scales, job->K, job->N, job->block, n0, n1, job->Y);
}

struct MatMulQ4Kernel {
  int64_t K, N, block;

  MatMulQ4Kernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    K = ki.GetAttribute<int64_t>("K");
    N = ki.GetAttribute<int64_t>("N");
    block = ki.GetAttribute<int64_t>("block_size");
    if (ki.GetAttribute<int64_t>("bits") != 4) ORT_CXX_API_THROW("MatMulQ4: bits must be 4", ORT_INVALID_ARGUMENT);
    if (block < 32 || block > 256 || (block & (block - 1)) || K % 128 || K % block)
      ORT_CXX_API_THROW("MatMulQ4: block_size must be a power of two in 32..256 dividing K, and K a multiple of 128",
                        ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto a = ctx.GetInput(0);
    auto b = ctx.GetInput(1);
    auto sc = ctx.GetInput(2);
    std::vector<int64_t> shape = a.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != K) ORT_CXX_API_THROW("MatMulQ4: input's last dimension is not K", ORT_INVALID_ARGUMENT);
    int64_t M = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) M *= shape[i];
    shape.back() = N;
    auto y = ctx.GetOutput(0, shape);
    if (M == 0) return;

    thread_local QuantizedInput in;
    in.pairs = K / 64;
    in.q.resize(static_cast<size_t>(M * K));
    in.scale.resize(static_cast<size_t>(M * in.pairs * 8));
    in.corr.resize(static_cast<size_t>(M * in.pairs * 8));
    Job job{a.GetTensorData<float>(), &in, b.GetTensorData<uint8_t>(), sc.GetTensorData<float>(),
            y.GetTensorMutableData<float>(), M, K, N, block, 0};
    job.chunk = std::max<int64_t>(8, kChunkBytes / (K / 2));
    if (M >= 8)
      ctx.ParallelFor(quantize_task, static_cast<size_t>(M), 0, &job);
    else
      for (int64_t m = 0; m < M; ++m) quantize_task(&job, static_cast<size_t>(m));
    const int64_t tasks = (N + job.chunk - 1) / job.chunk;
    ctx.ParallelFor(matmul_task, static_cast<size_t>(tasks), static_cast<size_t>(std::min<int64_t>(tasks, 64)), &job);
  }
};

struct MatMulQ4Op : Ort::CustomOpBase<MatMulQ4Op, MatMulQ4Kernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new MatMulQ4Kernel(api, info); }
  const char* GetName() const { return "MatMulQ4"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

MatMulQ4Op op;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // unreachable: every runtime since the header's serves its API version
  Ort::InitApi(api);
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
    return api->CreateStatus(ORT_NOT_IMPLEMENTED, "granite-deploy MatMulQ4 needs AVX2 and FMA");
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = api->CreateCustomOpDomain(kDomain, &domain)) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op)) return status;
  return api->AddCustomOpDomain(options, domain);
}
