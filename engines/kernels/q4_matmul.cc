// ai.granite_deploy.MatMulQ4: ONNX Runtime's com.microsoft.MatMulNBits (bits 4, symmetric, accuracy
// level 4) for the CPU provider, on AVX2 + FMA + F16C (AVX-512 VNNI where the CPU has it), over the same
// weights and scales rearranged once at load into a tiled layout (engines/kernels/layout.py).
//
// Why: MLAS's 4-bit kernel (and this one's first form) forms each output as a dot product: 8
// lanes of partial sums per (row, column, block), each block converted, scaled and added in
// float, then summed across lanes. At 8 and more rows that per-block float work, not memory,
// bounds the step. Here 8 columns sit side by side in each vector (the tiled layout), one row's
// 4 input bytes are broadcast across them, and vpdpbusd (VNNI) or vpmaddubsw + vpmaddwd (AVX2)
// sums whole blocks in int32 lanes that are already outputs: per block, one convert and one fma
// per 8 outputs instead of per output.
//
// Tiled B: columns in groups of 8 (the last group padded with zero scales); a group is K/block
// blocks of block*4 weight bytes and then the block's 8 column scales as fp16, so it is one stream.
// fp16 scales (as llama.cpp's Q4_0 has) make a block of 32 4.5 bits a weight instead of 5: a tenth
// fewer bytes for the batch-1 step, which streams them at the memory's pace. `quantize --int4`
// writes scales that are fp16 values, so the conversion at load is exact; older artifacts' scales
// are rounded to the nearest fp16 (2^-11 relative at most), and scales outside fp16's normal range
// leave their node to MLAS (kernels/__init__.py).
// Weight byte 4c + j of the block's 32-byte step t holds weight k = 8t + j of column c (low
// nibble) and k = 8t + 4 + j (high nibble), unsigned, zero point 8.
//
// Numerics match accuracy level 4: the input is quantised to int8 per row per weight block
// (scale = max|a| / 127, round to nearest), dot products are exact in int32, then scaled in fp32.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr const char* kDomain = "ai.granite_deploy";
constexpr int64_t kChunkBytes = 65536;  // tiled weight bytes per parallel task (16 KiB streamed ~15% slower)
constexpr int64_t kPrefetch = 2048;     // bytes ahead in a group's stream (1-2 KiB measured best)

// One call's int8 input: per row, K bytes in k order, and per block its scale and zero-point
// correction (-8 x the block's int8 sum: the weights are stored unsigned).
struct QuantizedInput {
  int64_t K = 0, blocks = 0;
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> corr;
  void resize(int64_t M, int64_t k, int64_t block) {
    K = k;
    blocks = k / block;
    q.resize(static_cast<size_t>(M * K));
    scale.resize(static_cast<size_t>(M * blocks));
    corr.resize(static_cast<size_t>(M * blocks));
  }
  const int8_t* q_row(int64_t m) const { return q.data() + m * K; }
  const float* scale_row(int64_t m) const { return scale.data() + m * blocks; }
  const int32_t* corr_row(int64_t m) const { return corr.data() + m * blocks; }
};

void quantize_row(const float* a, int64_t K, int64_t block, int8_t* q, float* scale, int32_t* corr) {
  for (int64_t b = 0; b < K / block; ++b) {
    const float* x = a + b * block;
    int8_t* y = q + b * block;
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
      scale[b] = std::numeric_limits<float>::quiet_NaN();
      corr[b] = 0;
      std::memset(y, 0, block);
      continue;
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t i = 0; i < block; ++i) {
      y[i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));
      sum += y[i];
    }
    scale[b] = amax / 127.f;
    corr[b] = -8 * sum;
  }
}

// Bytes of one block of 8 columns in the tiled layout: block*4 weight bytes and 8 fp16 scales.
constexpr int64_t q4_block_bytes(int64_t block) { return block * 4 + 16; }

inline int32_t load32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Columns [col, col+8) of one output row; the last group may hold fewer than 8 real columns.
inline void store_columns(float* y, int64_t col, int64_t N, __m256 v) {
  if (col + 8 <= N) {
    _mm256_storeu_ps(y + col, v);
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    std::memcpy(y + col, tmp, static_cast<size_t>(N - col) * sizeof(float));
  }
}

// MatMulQ8Dynamic's int8 input: per row, K uint8 (zero point 128) and one scale, computed as the
// graph it replaces does (export/quantize.py's per-row dynamic GEMM): s = max(max|x|, eps) * inv127,
// xq = clamp(round_half_even(x / s), -128, 127) + 128.
struct Q8Input {
  int64_t K = 0;
  std::vector<uint8_t> q;
  std::vector<float> scale;
  void resize(int64_t M, int64_t k) {
    K = k;
    q.resize(static_cast<size_t>(M * K));
    scale.resize(static_cast<size_t>(M));
  }
  const uint8_t* q_row(int64_t m) const { return q.data() + m * K; }
};

void quantize_row8(const float* x, int64_t K, float eps, float inv127, uint8_t* q, float* scale) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < K; ++i) {
    const float v = std::fabs(x[i]);
    finite &= v <= std::numeric_limits<float>::max();
    amax = std::max(amax, v);
  }
  if (!finite) {  // the row's outputs become NaN, as MatMulQ4's do
    *scale = std::numeric_limits<float>::quiet_NaN();
    std::memset(q, 128, static_cast<size_t>(K));
    return;
  }
  const float s = std::max(amax, eps) * inv127;
  for (int64_t i = 0; i < K; ++i)
    q[i] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(std::min(std::max(x[i] / s, -128.f), 127.f))) + 128);
  *scale = s;
}

inline int32_t load32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// AVX2: vpmaddubsw (u8 weights x s8 input, pairs to int16: at most 2*15*127, no saturation), the
// two halves added (at most 7620), vpmaddwd to int32 (each lane: 8 weights of one column).
namespace avx2 {
#define Q4_DOT8(acc, lo, hi, a0, a1) \
  _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_maddubs_epi16(hi, a1)), ones))
#define Q4_ROWS 4    // 16 vector registers: 4 rows x 1 group of int and float sums
#define Q4_GROUPS 1
#define Q4_GROUPS1 1  // one row: one stream (2 side by side streamed ~25% slower)
// u8 input x s8 weights (|w| <= 63: pairs at most 2*255*63, inside int16) to int32 lanes of 4 products.
#define Q8_DOT4(acc, a, w) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), ones))
#include "q4_tile.h"
#include "q8_tile.h"
#undef Q4_DOT8
#undef Q8_DOT4
#undef Q4_ROWS
#undef Q4_GROUPS
#undef Q4_GROUPS1
}  // namespace avx2

// AVX-512 VNNI (256-bit, EVEX): vpdpbusd sums the same 4 bytes per int32 lane, so every integer,
// and then every float operation, is the same as the AVX2 path's: bit-identical outputs
// (RegisterCustomOps checks that on the machine before using it). 32 vector registers: 4 x 3 tiles.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
namespace vnni {
#define Q4_DOT8(acc, lo, hi, a0, a1) _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, lo, a0), hi, a1)
#ifndef Q4_VNNI_ROWS
#define Q4_VNNI_ROWS 4
#endif
#ifndef Q4_VNNI_GROUPS
#define Q4_VNNI_GROUPS 3
#endif
#ifndef Q4_VNNI_GROUPS1
#define Q4_VNNI_GROUPS1 1
#endif
#define Q4_ROWS Q4_VNNI_ROWS
#define Q4_GROUPS Q4_VNNI_GROUPS
#define Q4_GROUPS1 Q4_VNNI_GROUPS1
#define Q8_DOT4(acc, a, w) _mm256_dpbusd_epi32(acc, a, w)
#include "q4_tile.h"
#include "q8_tile.h"
#undef Q4_DOT8
#undef Q8_DOT4
#undef Q4_ROWS
#undef Q4_GROUPS
#undef Q4_GROUPS1
}  // namespace vnni
#pragma GCC pop_options

bool g_vnni = false;  // set once by RegisterCustomOps
const char* g_isa = "avx2";

struct Job {
  const float* A;
  QuantizedInput* in;
  const uint8_t* B;
  float* Y;
  int64_t M, K, N, block, groups, chunk;
};

void quantize_task(void* data, size_t m) {
  auto* job = static_cast<Job*>(data);
  QuantizedInput& in = *job->in;
  quantize_row(job->A + m * job->K, job->K, job->block, in.q.data() + m * in.K, in.scale.data() + m * in.blocks,
               in.corr.data() + m * in.blocks);
}

void matmul_task(void* data, size_t t) {
  auto* job = static_cast<Job*>(data);
  const int64_t g0 = static_cast<int64_t>(t) * job->chunk, g1 = std::min(job->groups, g0 + job->chunk);
  (g_vnni ? vnni::groups : avx2::groups)(*job->in, job->M, job->B, job->K, job->N, job->block, g0, g1, job->Y);
}

// Bytes of the tiled weights for K x N (what layout.py writes and Compute checks).
int64_t tiled_bytes(int64_t K, int64_t N, int64_t block) { return (N + 7) / 8 * (K / block) * q4_block_bytes(block); }

// Both GEMMs' run: quantise the job's M input rows (in parallel from 8 rows: fewer cost less than the
// hand-off), then the column-group tasks, `chunk` groups each.
template <typename J>
void quantize_then_multiply(Ort::KernelContext& ctx, J& job, void (*quantize)(void*, size_t),
                            void (*multiply)(void*, size_t)) {
  if (job.M >= 8)
    ctx.ParallelFor(quantize, static_cast<size_t>(job.M), 0, &job);
  else
    for (int64_t m = 0; m < job.M; ++m) quantize(&job, static_cast<size_t>(m));
  const int64_t tasks = (job.groups + job.chunk - 1) / job.chunk;
  ctx.ParallelFor(multiply, static_cast<size_t>(tasks), static_cast<size_t>(std::min<int64_t>(tasks, 64)), &job);
}

struct MatMulQ4Kernel {
  int64_t K, N, block;

  MatMulQ4Kernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    K = ki.GetAttribute<int64_t>("K");
    N = ki.GetAttribute<int64_t>("N");
    block = ki.GetAttribute<int64_t>("block_size");
    if (ki.GetAttribute<int64_t>("bits") != 4) ORT_CXX_API_THROW("MatMulQ4: bits must be 4", ORT_INVALID_ARGUMENT);
    if (block < 32 || block > 256 || (block & (block - 1)) || K % 128 || K % block || N < 1)
      ORT_CXX_API_THROW("MatMulQ4: block_size must be a power of two in 32..256 dividing K, and K a multiple of 128",
                        ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto a = ctx.GetInput(0);
    auto b = ctx.GetInput(1);
    std::vector<int64_t> shape = a.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != K) ORT_CXX_API_THROW("MatMulQ4: input's last dimension is not K", ORT_INVALID_ARGUMENT);
    if (static_cast<int64_t>(b.GetTensorTypeAndShapeInfo().GetElementCount()) != tiled_bytes(K, N, block))
      ORT_CXX_API_THROW("MatMulQ4: weights are not in the tiled layout for these K, N, block_size", ORT_INVALID_ARGUMENT);
    int64_t M = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) M *= shape[i];
    shape.back() = N;
    auto y = ctx.GetOutput(0, shape);
    if (M == 0) return;

    thread_local QuantizedInput in;
    in.resize(M, K, block);
    Job job{a.GetTensorData<float>(), &in, b.GetTensorData<uint8_t>(), y.GetTensorMutableData<float>(),
            M, K, N, block, (N + 7) / 8, 0};
    job.chunk = std::max<int64_t>(1, kChunkBytes / (K * 4));
    quantize_then_multiply(ctx, job, quantize_task, matmul_task);
  }
};

struct MatMulQ4Op : Ort::CustomOpBase<MatMulQ4Op, MatMulQ4Kernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new MatMulQ4Kernel(api, info); }
  const char* GetName() const { return "MatMulQ4"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }  // input, tiled weights (scales inside)
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

struct Q8Job {
  const float* A;
  Q8Input* in;
  const uint8_t* B;
  float* Y;
  int64_t M, K, N, groups, chunk;
  float eps, inv127;
};

void quantize8_task(void* data, size_t m) {
  auto* job = static_cast<Q8Job*>(data);
  quantize_row8(job->A + m * job->K, job->K, job->eps, job->inv127, job->in->q.data() + m * job->K,
                job->in->scale.data() + m);
}

void matmul8_task(void* data, size_t t) {
  auto* job = static_cast<Q8Job*>(data);
  const int64_t g0 = static_cast<int64_t>(t) * job->chunk, g1 = std::min(job->groups, g0 + job->chunk);
  (g_vnni ? vnni::groups8 : avx2::groups8)(*job->in, job->M, job->B, job->K, job->N, g0, g1, job->Y);
}

// Bytes of MatMulQ8Dynamic's tiled weights for K x N (what GraniteQ8Tile writes).
int64_t tiled8_bytes(int64_t K, int64_t N) { return (N + 7) / 8 * (K * 8 + 64); }

// ai.granite_deploy.MatMulQ8Dynamic: export/quantize.py's per-row dynamic int8 GEMM (Abs, ReduceMax,
// Max, Mul, QuantizeLinear, MatMulInteger, DequantizeLinear, Mul: ten nodes) as one node over
// tiled int8 weights; the integers are the same, and so is every float operation and its order.
struct MatMulQ8Kernel {
  int64_t K, N;
  float eps, inv127;

  MatMulQ8Kernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    K = ki.GetAttribute<int64_t>("K");
    N = ki.GetAttribute<int64_t>("N");
    eps = ki.GetAttribute<float>("eps");
    inv127 = ki.GetAttribute<float>("inv127");
    if (K < 8 || K % 8 || N < 1) ORT_CXX_API_THROW("MatMulQ8Dynamic: K must be a multiple of 8, N positive", ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto a = ctx.GetInput(0);
    auto b = ctx.GetInput(1);
    std::vector<int64_t> shape = a.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != K)
      ORT_CXX_API_THROW("MatMulQ8Dynamic: input's last dimension is not K", ORT_INVALID_ARGUMENT);
    if (static_cast<int64_t>(b.GetTensorTypeAndShapeInfo().GetElementCount()) != tiled8_bytes(K, N))
      ORT_CXX_API_THROW("MatMulQ8Dynamic: weights are not in the tiled layout for these K, N", ORT_INVALID_ARGUMENT);
    int64_t M = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) M *= shape[i];
    shape.back() = N;
    auto y = ctx.GetOutput(0, shape);
    if (M == 0) return;
    thread_local Q8Input in;
    in.resize(M, K);
    Q8Job job{a.GetTensorData<float>(), &in, b.GetTensorData<uint8_t>(), y.GetTensorMutableData<float>(),
              M, K, N, (N + 7) / 8, std::max<int64_t>(1, kChunkBytes / (K * 8)), eps, inv127};
    quantize_then_multiply(ctx, job, quantize8_task, matmul8_task);
  }
};

struct MatMulQ8Op : Ort::CustomOpBase<MatMulQ8Op, MatMulQ8Kernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new MatMulQ8Kernel(api, info); }
  const char* GetName() const { return "MatMulQ8Dynamic"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }  // input, tiled weights (scales and zero-point sums inside)
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// Both paths on one small problem (7 rows: the 4-, 2- and 1-row tiles; 5 groups: the 3- and
// 1-group tiles and a part group; blocks 32 and 64); VNNI is used only if this CPU has it and its
// outputs equal the AVX2 path's bit for bit.
bool vnni_agrees() {
  constexpr int64_t M = 7, K = 256, N = 37;
  std::vector<float> A(M * K), y0(M * N), y1(M * N);
  uint32_t state = 12345;
  auto next = [&state] { state = state * 1664525u + 1013904223u; return state >> 8; };
  for (auto& a : A) a = static_cast<float>(static_cast<int>(next() % 2001) - 1000) / 250.f;
  for (int64_t block : {32, 64}) {
    std::vector<uint8_t> B(tiled_bytes(K, N, block));
    for (auto& b : B) b = static_cast<uint8_t>(next());
    const int64_t block_bytes = q4_block_bytes(block);
    for (int64_t i = 0; i < static_cast<int64_t>(B.size()) / block_bytes; ++i)  // finite scales
      for (int c = 0; c < 8; ++c) {
        const uint16_t s = _cvtss_sh(static_cast<float>(next() % 1000 + 1) / 10000.f, 0);
        std::memcpy(B.data() + i * block_bytes + block * 4 + 2 * c, &s, 2);
      }
    QuantizedInput in;
    in.resize(M, K, block);
    for (int64_t m = 0; m < M; ++m)
      quantize_row(A.data() + m * K, K, block, in.q.data() + m * K, in.scale.data() + m * in.blocks,
                   in.corr.data() + m * in.blocks);
    avx2::groups(in, M, B.data(), K, N, block, 0, (N + 7) / 8, y0.data());
    vnni::groups(in, M, B.data(), K, N, block, 0, (N + 7) / 8, y1.data());
    if (std::memcmp(y0.data(), y1.data(), y0.size() * sizeof(float)) != 0) return false;
  }
  std::vector<uint8_t> B8(tiled8_bytes(K, N));  // MatMulQ8Dynamic: weights within +-63, any scales
  for (auto& b : B8) b = static_cast<uint8_t>(static_cast<int>(next() % 127) - 63);
  for (int64_t g = 0; g < (N + 7) / 8; ++g)  // finite column scales (the zero-point sums may be any integers)
    for (int c = 0; c < 8; ++c) {
      const float s = static_cast<float>(next() % 1000 + 1) / 10000.f;
      std::memcpy(B8.data() + g * (K * 8 + 64) + K * 8 + 4 * c, &s, 4);
    }
  Q8Input in8;
  in8.resize(M, K);
  for (int64_t m = 0; m < M; ++m) quantize_row8(A.data() + m * K, K, 1e-12f, 1.f / 127.f, in8.q.data() + m * K, &in8.scale[m]);
  avx2::groups8(in8, M, B8.data(), K, N, 0, (N + 7) / 8, y0.data());
  vnni::groups8(in8, M, B8.data(), K, N, 0, (N + 7) / 8, y1.data());
  return std::memcmp(y0.data(), y1.data(), y0.size() * sizeof(float)) == 0;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,fma")
namespace f32 {
#include "f32_tile.h"
}  // namespace f32
#pragma GCC pop_options

bool g_avx512f = false;  // set once by RegisterCustomOps

struct F32Job {
  const float* A;
  const void* B;  // strips of fp32, or of bf16 where bf16
  float* Y;
  int64_t M, K, N;
  bool bf16;
};

void f32_task(void* data, size_t s) {
  auto* job = static_cast<F32Job*>(data);
  if (job->bf16)
    f32::f32_strip(job->A, job->M, job->K, job->N, static_cast<const uint16_t*>(job->B), static_cast<int64_t>(s), job->Y);
  else
    f32::f32_strip(job->A, job->M, job->K, job->N, static_cast<const float*>(job->B), static_cast<int64_t>(s), job->Y);
}

// Bytes of MatMulF32's tiled weights for K x N (what GraniteF32Tile writes).
int64_t tiled_f32_bytes(int64_t K, int64_t N, bool bf16) {
  return (N + f32::kF32Strip - 1) / f32::kF32Strip * K * f32::kF32Strip * (bf16 ? 2 : 4);
}

// ai.granite_deploy.MatMulF32: ONNX MatMul (or Gemm with transB, no C) with a constant fp32 B, over B
// tiled in strips (f32_tile.h says why), stored as bf16 where attribute bf16 is 1 (every weight a bf16
// value); AVX-512F only (the engine rewrites nodes to it only where the CPU has it).
struct MatMulF32Kernel {
  int64_t K, N;
  bool bf16;

  MatMulF32Kernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    K = ki.GetAttribute<int64_t>("K");
    N = ki.GetAttribute<int64_t>("N");
    bf16 = ki.GetAttribute<int64_t>("bf16") != 0;
    if (K < 1 || N < 1) ORT_CXX_API_THROW("MatMulF32: K and N must be positive", ORT_INVALID_ARGUMENT);
    if (!g_avx512f) ORT_CXX_API_THROW("MatMulF32: this CPU has no AVX-512F", ORT_NOT_IMPLEMENTED);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto a = ctx.GetInput(0);
    auto b = ctx.GetInput(1);
    std::vector<int64_t> shape = a.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.empty() || shape.back() != K) ORT_CXX_API_THROW("MatMulF32: input's last dimension is not K", ORT_INVALID_ARGUMENT);
    if (static_cast<int64_t>(b.GetTensorTypeAndShapeInfo().GetElementCount()) != tiled_f32_bytes(K, N, bf16))
      ORT_CXX_API_THROW("MatMulF32: weights are not in the tiled layout for these K, N", ORT_INVALID_ARGUMENT);
    int64_t M = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) M *= shape[i];
    shape.back() = N;
    auto y = ctx.GetOutput(0, shape);
    if (M == 0) return;
    F32Job job{a.GetTensorData<float>(), b.GetTensorData<uint8_t>(), y.GetTensorMutableData<float>(), M, K, N, bf16};
    const size_t strips = static_cast<size_t>((N + f32::kF32Strip - 1) / f32::kF32Strip);
    ctx.ParallelFor(f32_task, strips, 0, &job);
  }
};

struct MatMulF32Op : Ort::CustomOpBase<MatMulF32Op, MatMulF32Kernel> {
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new MatMulF32Kernel(api, info); }
  const char* GetName() const { return "MatMulF32"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }  // input, tiled fp32 weights as bytes
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

#include "decode_attention.h"

MatMulQ4Op op;
MatMulF32Op op_f32;
MatMulQ8Op op8;
DecodeAttentionOp op_attention;

}  // namespace

// MatMulNBits' packed 4-bit weights (N x K/2 bytes: weight 2i in the low nibble of byte i, 2i+1 in
// the high) and fp32 scales (N x K/block, rounded to the nearest fp16) as the tiled layout (see the
// top of this file), into out (tiled_bytes(K, N, block) bytes). The engine calls it once per weight
// at load (layout.py).
extern "C" __attribute__((visibility("default"))) void GraniteQ4Tile(const uint8_t* packed, const float* scales,
                                                                      int64_t K, int64_t N, int64_t block,
                                                                      uint8_t* out) {
  const int64_t blocks = K / block, steps = block / 8, block_bytes = q4_block_bytes(block);
  for (int64_t g = 0; g < (N + 7) / 8; ++g)
    for (int64_t b = 0; b < blocks; ++b) {
      uint8_t* dst = out + (g * blocks + b) * block_bytes;
      for (int c = 0; c < 8; ++c) {
        const int64_t n = g * 8 + c;
        const uint16_t scale = _cvtss_sh(n < N ? scales[n * blocks + b] : 0.f, 0);  // round to nearest even
        std::memcpy(dst + block * 4 + 2 * c, &scale, 2);
        for (int64_t t = 0; t < steps; ++t) {
          uint8_t* o = dst + t * 32 + 4 * c;
          if (n >= N) {
            std::memset(o, 0, 4);
            continue;
          }
          // packed bytes p0..p3 hold weights 8t..8t+7 of this block: byte 4c+j gets 8t+j (low) and 8t+4+j (high)
          const uint8_t* p = packed + n * (K / 2) + b * (block / 2) + t * 4;
          o[0] = static_cast<uint8_t>((p[0] & 15) | (p[2] << 4));
          o[1] = static_cast<uint8_t>((p[0] >> 4) | (p[2] & 0xF0));
          o[2] = static_cast<uint8_t>((p[1] & 15) | (p[3] << 4));
          o[3] = static_cast<uint8_t>((p[1] >> 4) | (p[3] & 0xF0));
        }
      }
    }
}

// A per-row dynamic GEMM's int8 weights (K x N, row-major: [in, out], |w| <= 63) and fp32 column
// scales (N) as MatMulQ8Dynamic's tiled layout (q8_tile.h), into out (tiled8_bytes(K, N) bytes).
extern "C" __attribute__((visibility("default"))) void GraniteQ8Tile(const int8_t* weights, const float* scales,
                                                                      int64_t K, int64_t N, uint8_t* out) {
  const int64_t groups = (N + 7) / 8, group_bytes = K * 8 + 64;
  std::memset(out, 0, static_cast<size_t>(groups * group_bytes));
  std::vector<int32_t> colsum(static_cast<size_t>(groups * 8), 0);
  for (int64_t k = 0; k < K; ++k) {  // rows in order: the source is read once, sequentially
    const int8_t* row = weights + k * N;
    for (int64_t n = 0; n < N; ++n) {
      out[(n / 8) * group_bytes + (k / 4) * 32 + (n % 8) * 4 + (k % 4)] = static_cast<uint8_t>(row[n]);
      colsum[n] += row[n];
    }
  }
  for (int64_t g = 0; g < groups; ++g)
    for (int c = 0; c < 8; ++c) {
      const int64_t n = g * 8 + c;
      const float s = n < N ? scales[n] : 0.f;
      const int32_t corr = -128 * colsum[n];
      std::memcpy(out + g * group_bytes + K * 8 + 4 * c, &s, 4);
      std::memcpy(out + g * group_bytes + K * 8 + 32 + 4 * c, &corr, 4);
    }
}

// An fp32 K x N weight (element (k, n) at weights[k * stride_k + n * stride_n]: [K, N] row-major, or a
// Gemm's transposed [N, K]) as MatMulF32's strips (f32_tile.h), into out (tiled_f32_bytes(K, N, bf16)
// bytes): fp32, or where bf16 is nonzero each weight's upper 16 bits (the caller has checked that the
// lower 16 are zero: every weight is a bf16 value).
extern "C" __attribute__((visibility("default"))) void GraniteF32Tile(const float* weights, int64_t K, int64_t N,
                                                                       int64_t stride_k, int64_t stride_n, int bf16,
                                                                       void* out) {
  const int64_t S = f32::kF32Strip, strips = (N + S - 1) / S;
  for (int64_t s = 0; s < strips; ++s) {
    const int64_t cols = std::min(S, N - s * S);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t at = (s * K + k) * S;
      for (int64_t c = 0; c < S; ++c) {
        const float w = c < cols ? weights[k * stride_k + (s * S + c) * stride_n] : 0.f;
        if (bf16) {
          uint32_t bits;
          std::memcpy(&bits, &w, 4);
          static_cast<uint16_t*>(out)[at + c] = static_cast<uint16_t>(bits >> 16);
        } else {
          static_cast<float*>(out)[at + c] = w;
        }
      }
    }
  }
}

// DecodeAttention calls that had to copy the cache (present not bound to past's buffer), for tests.
extern "C" __attribute__((visibility("default"))) int64_t GraniteAttentionCopies() { return g_attention_copies.load(); }

// Which instruction set this process's MatMulQ4 runs ("avx2" or "avx512vnni"), for logs.
extern "C" __attribute__((visibility("default"))) const char* GraniteQ4Isa() { return g_isa; }

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // unreachable: every runtime since the header's serves its API version
  Ort::InitApi(api);
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c"))
    return api->CreateStatus(ORT_NOT_IMPLEMENTED, "granite-deploy MatMulQ4 needs AVX2, FMA and F16C");
  static const bool vnni = [] {
    const char* want = std::getenv("GRANITE_DEPLOY_Q4_ISA");  // "avx2": never VNNI (A/B runs)
    if (want != nullptr && std::strcmp(want, "avx2") == 0) return false;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && vnni_agrees();
  }();
  g_vnni = vnni;
  g_avx512f = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
  g_isa = vnni ? "avx512vnni" : "avx2";
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = api->CreateCustomOpDomain(kDomain, &domain)) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op)) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op8)) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op_f32)) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op_attention)) return status;
  return api->AddCustomOpDomain(options, domain);
}
