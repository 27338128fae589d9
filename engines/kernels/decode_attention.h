// ai.granite_deploy.DecodeAttention: ONNX Runtime's GroupQueryAttention (com.microsoft) for one new token
// per row, the decode step, over the in-place cache. Included once by q4_matmul.cc; not a standalone header.
//
// Same inputs, attributes and outputs as the GroupQueryAttention it stands in for (query [B, 1, N*H],
// key and value [B, 1, Nkv*H], past key and value [B, Nkv, T, H] bound to the present outputs' buffers,
// seqlens_k [B] = each row's length after this token minus 1, total_sequence_length), no rotary, no
// softcap, no local window. ONNX Runtime's CPU kernel runs one SGEMM per query head, so every key and
// value row is read once per query head (4 times in granite-4.0's 16/4 heads) and the GEMM packs the
// transposed keys first; here one task per (row, KV head) streams its keys once for all the query heads
// that share them, then its values once, so a step reads the cache once.

namespace attention {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int64_t kPrefetchRows = 8;  // key / value rows ahead of the ones being read (4 KiB at head size 128)

// e^x for 8 lanes (x <= 0 here: scores minus their maximum), Cephes' degree-5 polynomial on
// x - n ln2 and 2^n through the exponent bits: within 2 ulp of std::exp; below -87.3 it is 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(scale)));
}

struct Job {
  const float *q, *k_new, *v_new;
  float *keys, *values, *out;
  const int32_t* seqlens;
  int64_t rows, heads, kv_heads, capacity, head_size;
  bool first_prompt;
  float scale;
  std::atomic<int> failed_row{-1};  // a row whose position is outside the cache (reported after the loop)
};

// Softmax of each query head's L scores in place (max subtracted, exp, times 1/sum: ONNX Runtime's order).
void softmax_rows(float* scores, int64_t F, int64_t L) {
  for (int64_t f = 0; f < F; ++f) {
    float* s = scores + f * L;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < L; ++j) top = std::max(top, s[j]);
    float sum = 0.f;
    int64_t j = 0;
    if (std::isfinite(top)) {  // (a NaN or inf score: the scalar loop below spreads it, as ONNX Runtime's does)
      const __m256 t = _mm256_set1_ps(top);
      __m256 acc = _mm256_setzero_ps();
      for (; j + 8 <= L; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), t));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
      }
      sum = hsum(acc);
    }
    for (; j < L; ++j) sum += (s[j] = std::exp(s[j] - top));
    const float inv = 1.f / sum;
    for (j = 0; j < L; ++j) s[j] *= inv;
  }
}

// F query heads (a compile-time count, so the accumulators stay in registers) over L rows of keys
// and values (head size H, a multiple of 8): keys in one pass, every head per row; then values in
// one pass, every head per pair of rows.
template <int F>
void attend(const float* q, const float* keys, const float* values, int64_t L, int64_t H, float scale,
            float* scores, float* out) {
  for (int64_t j = 0; j < L; ++j) {
    const float* k = keys + j * H;
    for (int64_t b = 0; b < H * 4; b += 64)  // the row kPrefetchRows ahead, a line at a time
      _mm_prefetch(reinterpret_cast<const char*>(k + kPrefetchRows * H) + b, _MM_HINT_T0);
    __m256 acc[F];
    for (int f = 0; f < F; ++f) acc[f] = _mm256_setzero_ps();
    for (int64_t d = 0; d < H; d += 8) {
      const __m256 kv = _mm256_loadu_ps(k + d);
      for (int f = 0; f < F; ++f) acc[f] = _mm256_fmadd_ps(_mm256_loadu_ps(q + f * H + d), kv, acc[f]);
    }
    for (int f = 0; f < F; ++f) scores[f * L + j] = hsum(acc[f]) * scale;
  }
  softmax_rows(scores, F, L);
  // Values row by row, two rows at a time, into out (F x H floats, in L1): out += p0 v0 + p1 v1. The
  // cache is read in address order, so the prefetcher streams it; the earlier form held partial sums
  // in registers over 32-row blocks, one chunk of dims per pass, and read each block's rows at a
  // 512-byte stride: 6.7 GB/s of values from memory on one core against 12-21 now (Zen 4).
  // Per output the products are added in row order either way.
  std::fill(out, out + F * H, 0.f);
  int64_t j = 0;
  for (; j + 2 <= L; j += 2) {
    const float* v0 = values + j * H;
    const float* v1 = v0 + H;
    for (int64_t b = 0; b < 2 * H * 4; b += 64)  // the pair kPrefetchRows ahead
      _mm_prefetch(reinterpret_cast<const char*>(v0 + kPrefetchRows * H) + b, _MM_HINT_T0);
    __m256 p0[F], p1[F];
    for (int f = 0; f < F; ++f) {
      p0[f] = _mm256_set1_ps(scores[f * L + j]);
      p1[f] = _mm256_set1_ps(scores[f * L + j + 1]);
    }
    for (int64_t d = 0; d < H; d += 8) {
      const __m256 x0 = _mm256_loadu_ps(v0 + d), x1 = _mm256_loadu_ps(v1 + d);
      for (int f = 0; f < F; ++f) {
        float* o = out + f * H + d;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(p1[f], x1, _mm256_fmadd_ps(p0[f], x0, _mm256_loadu_ps(o))));
      }
    }
  }
  for (; j < L; ++j) {
    const float* v = values + j * H;
    for (int64_t d = 0; d < H; d += 8) {
      const __m256 x = _mm256_loadu_ps(v + d);
      for (int f = 0; f < F; ++f) {
        float* o = out + f * H + d;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(scores[f * L + j]), x, _mm256_loadu_ps(o)));
      }
    }
  }
}

// Any head counts and sizes: plain loops.
void attend_any(const float* q, const float* keys, const float* values, int64_t F, int64_t L, int64_t H, float scale,
                float* scores, float* out) {
  for (int64_t j = 0; j < L; ++j)
    for (int64_t f = 0; f < F; ++f) {
      float s = 0.f;
      for (int64_t d = 0; d < H; ++d) s += q[f * H + d] * keys[j * H + d];
      scores[f * L + j] = s * scale;
    }
  softmax_rows(scores, F, L);
  for (int64_t f = 0; f < F; ++f)
    for (int64_t d = 0; d < H; ++d) {
      float acc = 0.f;
      for (int64_t j = 0; j < L; ++j) acc += scores[f * L + j] * values[j * H + d];
      out[f * H + d] = acc;
    }
}

// Row b, KV head g: write this token's key and value at its position, then attend the group's query
// heads over positions [0, position]: scores = scale * q.k, softmax, out = sum_j p_j v_j.
void row_head(Job& job, int64_t b, int64_t g) {
  const int64_t H = job.head_size, F = job.heads / job.kv_heads, T = job.capacity;
  const int64_t total = static_cast<int64_t>(job.seqlens[b]) + 1;
  const int64_t position = job.first_prompt ? 0 : total - 1;
  if (position < 0 || position >= T) {
    job.failed_row.store(static_cast<int>(b));
    return;
  }
  float* keys = job.keys + (b * job.kv_heads + g) * T * H;
  float* values = job.values + (b * job.kv_heads + g) * T * H;
  std::memcpy(keys + position * H, job.k_new + (b * job.kv_heads + g) * H, H * sizeof(float));
  std::memcpy(values + position * H, job.v_new + (b * job.kv_heads + g) * H, H * sizeof(float));
  const int64_t L = std::min(position + 1, std::max<int64_t>(total, 1));
  const float* q = job.q + (b * job.heads + g * F) * H;  // the group's F query heads, each H floats
  float* out = job.out + (b * job.heads + g * F) * H;
  thread_local std::vector<float> scores;
  scores.resize(static_cast<size_t>(F * L));
  if (H % 8 == 0 && F == 4)
    attend<4>(q, keys, values, L, H, job.scale, scores.data(), out);
  else if (H % 8 == 0 && F == 2)
    attend<2>(q, keys, values, L, H, job.scale, scores.data(), out);
  else if (H % 8 == 0 && F == 1)
    attend<1>(q, keys, values, L, H, job.scale, scores.data(), out);
  else if (H % 8 == 0 && F == 8)
    attend<8>(q, keys, values, L, H, job.scale, scores.data(), out);
  else
    attend_any(q, keys, values, F, L, H, job.scale, scores.data(), out);
}

void task(void* data, size_t i) {
  auto* job = static_cast<Job*>(data);
  row_head(*job, static_cast<int64_t>(i) / job->kv_heads, static_cast<int64_t>(i) % job->kv_heads);
}

}  // namespace attention

// How many calls found their present buffers apart from the past ones and copied the cache (the engine
// binds them to one buffer; a copy there means the in-place contract broke: tests read this).
std::atomic<int64_t> g_attention_copies{0};

struct DecodeAttentionKernel {
  int64_t heads, kv_heads;
  float scale;

  DecodeAttentionKernel(const OrtApi&, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    heads = ki.GetAttribute<int64_t>("num_heads");
    kv_heads = ki.GetAttribute<int64_t>("kv_num_heads");
    scale = ki.GetAttribute<float>("scale");
    if (heads < 1 || kv_heads < 1 || heads % kv_heads)
      ORT_CXX_API_THROW("DecodeAttention: num_heads must be a positive multiple of kv_num_heads", ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto q = ctx.GetInput(0), k = ctx.GetInput(1), v = ctx.GetInput(2), pk = ctx.GetInput(3), pv = ctx.GetInput(4);
    auto seqlens = ctx.GetInput(5), total = ctx.GetInput(6);
    const std::vector<int64_t> qs = q.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> cache = pk.GetTensorTypeAndShapeInfo().GetShape();
    if (qs.size() != 3 || qs[1] != 1)
      ORT_CXX_API_THROW("DecodeAttention: query must be [rows, 1, heads * head_size]", ORT_INVALID_ARGUMENT);
    if (cache.size() != 4 || cache[0] != qs[0] || cache[1] != kv_heads || qs[2] != heads * cache[3] ||
        pv.GetTensorTypeAndShapeInfo().GetShape() != cache ||
        k.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(qs[0] * kv_heads * cache[3]) ||
        v.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(qs[0] * kv_heads * cache[3]) ||
        seqlens.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(qs[0]))
      ORT_CXX_API_THROW("DecodeAttention: key, value, cache or seqlens_k shapes do not fit the query", ORT_INVALID_ARGUMENT);
    auto out = ctx.GetOutput(0, qs);
    auto present_k = ctx.GetOutput(1, cache), present_v = ctx.GetOutput(2, cache);
    const size_t cache_bytes = pk.GetTensorTypeAndShapeInfo().GetElementCount() * sizeof(float);
    float* keys = present_k.GetTensorMutableData<float>();
    float* values = present_v.GetTensorMutableData<float>();
    if (keys != pk.GetTensorData<float>()) {
      std::memcpy(keys, pk.GetTensorData<float>(), cache_bytes);
      ++g_attention_copies;
    }
    if (values != pv.GetTensorData<float>()) {
      std::memcpy(values, pv.GetTensorData<float>(), cache_bytes);
      ++g_attention_copies;
    }
    if (qs[0] == 0) return;
    attention::Job job{q.GetTensorData<float>(), k.GetTensorData<float>(), v.GetTensorData<float>(), keys, values,
                       out.GetTensorMutableData<float>(), seqlens.GetTensorData<int32_t>(), qs[0], heads, kv_heads,
                       cache[2], cache[3], total.GetTensorData<int32_t>()[0] == 1,
                       scale != 0.f ? scale : 1.f / std::sqrt(static_cast<float>(cache[3]))};
    const size_t tasks = static_cast<size_t>(qs[0] * kv_heads);
    ctx.ParallelFor(attention::task, tasks, tasks, &job);
    if (job.failed_row.load() >= 0)
      ORT_CXX_API_THROW("DecodeAttention: a row's position (seqlens_k) is outside the cache", ORT_INVALID_ARGUMENT);
  }
};

struct DecodeAttentionOp : Ort::CustomOpBase<DecodeAttentionOp, DecodeAttentionKernel> {
  DecodeAttentionOp() {
    // past key -> present key, past value -> present value: the buffers the engine binds as one
    OrtCustomOp::GetMayInplace = [](int** inputs, int** outputs) -> size_t {
      *inputs = static_cast<int*>(std::malloc(2 * sizeof(int)));
      *outputs = static_cast<int*>(std::malloc(2 * sizeof(int)));
      (*inputs)[0] = 3, (*inputs)[1] = 4, (*outputs)[0] = 1, (*outputs)[1] = 2;
      return 2;
    };
    OrtCustomOp::ReleaseMayInplace = [](int* inputs, int* outputs) {
      std::free(inputs);
      std::free(outputs);
    };
  }
  void* CreateKernel(const OrtApi& api, const OrtKernelInfo* info) const { return new DecodeAttentionKernel(api, info); }
  const char* GetName() const { return "DecodeAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 7; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index >= 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};
