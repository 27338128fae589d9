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
#include <cstdlib>
#include <cstring>
#include <limits>
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
    bool finite = true;
    for (int64_t i = 0; i < block; ++i) {
      const float v = std::fabs(x[i]);
      finite &= v <= std::numeric_limits<float>::max();  // false for NaN and inf
      amax = std::max(amax, v);
    }
    if (!finite) {
      // A NaN or inf must reach the output as NaN (as it does through MLAS), not as an
      // undefined int8 cast: a NaN block scale carries it through every column of this row.
      block_scale[b] = std::numeric_limits<float>::quiet_NaN();
      std::memset(plain.data() + b * block, 0, block);
      continue;
    }
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

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// AVX2: vpmaddubsw (u8 weights x s8 input, pairs to int16: at most 2*15*127, no saturation), the
// two halves added (at most 7620), vpmaddwd to int32 (each lane: 4 consecutive bytes), + correction.
namespace avx2 {
#define Q4_DOT(lo, hi, qp, cp)                                                                            \
  _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, load256(qp)),                \
                                                      _mm256_maddubs_epi16(hi, load256((qp) + 32))),       \
                                     ones),                                                                \
                   load256(cp))
#define Q4_COLS 1
#include "q4_tile.h"
#undef Q4_DOT
#undef Q4_COLS
}  // namespace avx2

// AVX-512 VNNI (256-bit, EVEX): vpdpbusd sums the same 4 bytes per int32 lane into the correction,
// so every integer, and then every float operation, is the same as the AVX2 path's: bit-identical
// outputs (RegisterCustomOps checks that on the machine before using it).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace vnni {
#define Q4_DOT(lo, hi, qp, cp) \
  _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(load256(cp), lo, load256(qp)), hi, load256((qp) + 32))
#ifndef Q4_VNNI_COLS
#define Q4_VNNI_COLS 3  // 12 accumulators; 3 columns measured best (2 and 4 no better than 1)
#endif
#define Q4_COLS Q4_VNNI_COLS
#include "q4_tile.h"
#undef Q4_DOT
#undef Q4_COLS
}  // namespace vnni
#pragma GCC pop_options

bool g_vnni = false;  // set once by RegisterCustomOps
const char* g_isa = "avx2";

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
  const auto run = g_vnni ? (job->block == 32 ? vnni::columns<true> : vnni::columns<false>)
                         : (job->block == 32 ? avx2::columns<true> : avx2::columns<false>);
  run(*job->in, job->M, job->B, job->scales, job->K, job->N, job->block, n0, n1, job->Y);
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

// Both paths on one small problem (5 rows: the 4-row and 1-row tiles; blocks 32 and 64); VNNI is
// used only if this CPU has it and its outputs equal the AVX2 path's bit for bit.
bool vnni_agrees() {
  constexpr int64_t M = 5, K = 256, N = 3;
  std::vector<uint8_t> B(N * K / 2);
  std::vector<float> A(M * K), S(N * K / 32), y0(M * N), y1(M * N);
  uint32_t state = 12345;
  auto next = [&state] { state = state * 1664525u + 1013904223u; return state >> 8; };
  for (auto& b : B) b = static_cast<uint8_t>(next());
  for (auto& a : A) a = static_cast<float>(static_cast<int>(next() % 2001) - 1000) / 250.f;
  for (auto& s : S) s = static_cast<float>(next() % 1000 + 1) / 10000.f;
  for (int64_t block : {32, 64}) {
    QuantizedInput in;
    in.pairs = K / 64;
    in.q.resize(M * K);
    in.scale.resize(M * in.pairs * 8);
    in.corr.resize(M * in.pairs * 8);
    for (int64_t m = 0; m < M; ++m)
      quantize_row(A.data() + m * K, K, block, in.q.data() + m * K, in.scale.data() + m * in.pairs * 8,
                   in.corr.data() + m * in.pairs * 8);
    const auto a2 = block == 32 ? avx2::columns<true> : avx2::columns<false>;
    const auto v = block == 32 ? vnni::columns<true> : vnni::columns<false>;
    a2(in, M, B.data(), S.data(), K, N, block, 0, N, y0.data());
    v(in, M, B.data(), S.data(), K, N, block, 0, N, y1.data());
    if (std::memcmp(y0.data(), y1.data(), y0.size() * sizeof(float)) != 0) return false;
  }
  return true;
}

MatMulQ4Op op;

}  // namespace

// Which instruction set this process's MatMulQ4 runs ("avx2" or "avx512vnni"), for logs.
extern "C" __attribute__((visibility("default"))) const char* GraniteQ4Isa() { return g_isa; }

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // unreachable: every runtime since the header's serves its API version
  Ort::InitApi(api);
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
    return api->CreateStatus(ORT_NOT_IMPLEMENTED, "granite-deploy MatMulQ4 needs AVX2 and FMA");
  static const bool vnni = [] {
    const char* want = std::getenv("GRANITE_DEPLOY_Q4_ISA");  // "avx2": never VNNI (A/B runs)
    if (want != nullptr && std::strcmp(want, "avx2") == 0) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && vnni_agrees();
  }();
  g_vnni = vnni;
  g_isa = vnni ? "avx512vnni" : "avx2";
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = api->CreateCustomOpDomain(kDomain, &domain)) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op)) return status;
  return api->AddCustomOpDomain(options, domain);
}
