// bf16 LoRA products for decode steps (see kernel.py), with AVX512-BF16 dot products (`vdpbf16ps`).
//
// gemv: for each listed token j: y = x[rows[j]] @ w[slots[j], :out].T, accumulated in float32,
// then written (or added) with a scale into row rows[j] of the output, rounded once. torch's
// bmm with one row per batch runs at 5-9 GB/s here; this reads each token's weights once, at
// about twice that.
// lora_linear: a whole LoRA linear layer (every slice's shrink and expand) per token, in one
// call: vLLM's Python and the small oneDNN products per layer call cost more than the
// arithmetic of a decode step.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

inline float sum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// in % 32 == 0: one 32-wide dot product per output (measured faster than four outputs at a
// time with independent accumulators: 13 against 8 GB/s for 32 x [48 x 576]).
void rows_wide(const uint16_t* x, const uint16_t* w, int64_t w_row, int64_t in, int64_t out, float* y) {
  for (int64_t o = 0; o < out; ++o) {
    const uint16_t* wr = w + o * w_row;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < in; i += 32) {
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + i), (__m512bh)_mm512_loadu_si512(wr + i));
    }
    y[o] = _mm512_reduce_add_ps(acc);
  }
}

// in == 16, rows contiguous, out even: two outputs per 32-wide dot product.
void rows_16(const uint16_t* x, const uint16_t* w, int64_t out, float* y) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m512i xx = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
  for (int64_t o = 0; o < out; o += 2) {
    const __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)xx, (__m512bh)_mm512_loadu_si512(w + o * 16));
    y[o] = sum8(_mm512_castps512_ps256(acc));
    y[o + 1] = sum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
  }
}

}  // namespace

template <typename T>
void store(const float* y, int64_t out, float scale, bool accumulate, T* dst) {
  for (int64_t o = 0; o < out; ++o) {
    dst[o] = static_cast<T>((accumulate ? static_cast<float>(dst[o]) : 0.f) + scale * y[o]);
  }
}

// dst[rows[j], :out] = (accumulate ? dst[rows[j], :out] : 0) + scale * x[rows[j]] @ w[slots[j], :out].T
void gemv(torch::Tensor x, torch::Tensor w, torch::Tensor rows, torch::Tensor slots, torch::Tensor dst, double scale,
          bool accumulate) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16, "bf16 only");
  TORCH_CHECK(x.stride(1) == 1 && w.stride(2) == 1 && dst.stride(1) == 1, "rows must be contiguous");
  const bool narrow_dst = dst.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(narrow_dst || dst.scalar_type() == torch::kFloat32, "bf16 or float32 output only");
  const int64_t n = rows.size(0), in = x.size(1), out = dst.size(1);
  const bool wide = in % 32 == 0, narrow = in == 16 && w.stride(1) == 16 && out % 2 == 0;
  TORCH_CHECK(wide || narrow, "unsupported shape");
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  std::vector<float> y(out);
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* xr = xp + rp[j] * x.stride(0);
    const uint16_t* wb = wp + sp[j] * w.stride(0);
    if (wide) {
      rows_wide(xr, wb, w.stride(1), in, out, y.data());
    } else {
      rows_16(xr, wb, out, y.data());
    }
    if (narrow_dst) {
      store(y.data(), out, scale, accumulate, dst.data_ptr<at::BFloat16>() + rp[j] * dst.stride(0));
    } else {
      store(y.data(), out, scale, accumulate, dst.data_ptr<float>() + rp[j] * dst.stride(0));
    }
  }
}

namespace {

// float -> bf16 bits, rounded to nearest even as c10::BFloat16 does (NaN -> 0x7fc0), 16 at a time.
inline __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 from_bf16(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Rank-16 expand of 16 outputs: h . w[o] for o < 16 (w: 16 rows of 16 contiguous bf16; hh: h twice).
// Two outputs per dot product, then one transposing reduction tree instead of 16 horizontal sums.
inline __m512 expand16(__m512i hh, const uint16_t* w) {
  __m512 acc[8];
  for (int j = 0; j < 8; ++j) {  // acc[j]: lanes 0-7 sum to output 2j, lanes 8-15 to output 2j+1
    acc[j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)hh, (__m512bh)_mm512_loadu_si512(w + 32 * j));
  }
  __m512 u[4];
  for (int p = 0; p < 4; ++p) {  // 128-bit lane c of u[p]: 4 partial sums of output 4p + c
    const __m512 a = acc[2 * p], b = acc[2 * p + 1];
    u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  __m512 v[2];
  for (int q = 0; q < 2; ++q) {  // lane c of v[q]: 2 + 2 partial sums of outputs 8q + c and 8q + 4 + c
    const __m512 a = u[2 * q], b = u[2 * q + 1];
    v[q] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  // z[4c + k] = output 4k + c
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, z);
}

// Expand of 16 * Q outputs from pair-interleaved weights (see lora_linear): sums[q] = outputs
// 16q .. 16q + 15; w row p holds (B[o][2p], B[o][2p+1]) for each output o of the tile.
template <int Q>
inline void expand_paired(const __m512i* hp, int64_t pairs, const uint16_t* w, int64_t w_row, __m512 sums[Q]) {
  for (int q = 0; q < Q; ++q) sums[q] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* wr = w + p * w_row;
    for (int q = 0; q < Q; ++q) {
      sums[q] = _mm512_dpbf16_ps(sums[q], (__m512bh)hp[p], (__m512bh)_mm512_loadu_si512(wr + 32 * q));
    }
  }
}

inline void add_store(uint16_t* dst, __m512 sum) {  // dst[0:16] = bf16(dst[0:16] + sum)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), to_bf16(_mm512_add_ps(from_bf16(dst), sum)));
}

inline float bf16_value(uint16_t bits) { return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits())); }

struct Weights {  // one slice's [slots, (1,) rows, cols] weights, bf16, cols contiguous
  const uint16_t* data;
  int64_t slot_stride, row_stride, rows, cols;
};

Weights weights_of(const torch::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.dim() >= 2 && w.stride(-1) == 1, "bf16 weights, rows contiguous");
  return {reinterpret_cast<const uint16_t*>(w.data_ptr()), w.stride(0), w.stride(-2), w.size(-2), w.size(-1)};
}

struct SliceAt {  // one slice's weights for one slot: A [rank, in] rows, B natural [out, r] rows or paired
  const uint16_t* a;
  int64_t a_row;
  const uint16_t* b;
  int64_t b_row;
};

// One token's whole layer: h_i = bf16(scale * x @ A_i[:rank].T), y[slice i] += h_i @ B_i.T.
// r is B's layout rank (its row length, or the paired tiles' k); rank <= r rows of A are read,
// the rest of h is zero (paired: only the first ceil(rank / 2) pairs of each tile are read).
void token_linear(const uint16_t* xr, uint16_t* yr, int64_t in, const std::vector<SliceAt>& at,
                  const std::vector<int64_t>& sizes, int64_t r, int64_t rank, float scale, bool paired, float* acc,
                  uint16_t* h, __m512i* hp) {
  const size_t n_slices = at.size();
  const int64_t pairs = (rank + 1) / 2;
  for (size_t i = 0; i < n_slices; ++i) {  // shrink
    rows_wide(xr, at[i].a, at[i].a_row, in, rank, acc);
    for (int64_t k = 0; k < r; ++k) {
      h[i * r + k] = k < rank ? c10::BFloat16(scale * acc[k]).x : 0;
    }
  }
  int64_t offset = 0;
  for (size_t i = 0; i < n_slices; ++i) {  // expand
    const uint16_t* hi = h + i * r;
    const uint16_t* w = at[i].b;
    const int64_t w_row = at[i].b_row;  // natural layout
    uint16_t* dst = yr + offset;
    const int64_t out = sizes[i];
    int64_t o = 0;
    if (paired) {
      for (int64_t p = 0; p < pairs; ++p) {  // (h[2p], h[2p+1]) in every 32-bit lane
        uint32_t pair;
        std::memcpy(&pair, hi + 2 * p, sizeof(pair));
        hp[p] = _mm512_set1_epi32(static_cast<int>(pair));
      }
      for (; o + 64 <= out; o += 64) {  // full tiles
        __m512 sums[4];
        expand_paired<4>(hp, pairs, w + o * r, 128, sums);
        for (int q = 0; q < 4; ++q) add_store(dst + o + 16 * q, sums[q]);
      }
      const int64_t tile = out - o, tail_row = 2 * tile;  // the last, narrower tile
      const uint16_t* wt = w + o * r;
      int64_t c = 0;
      for (; c + 16 <= tile; c += 16) {
        __m512 sum;
        expand_paired<1>(hp, pairs, wt + 2 * c, tail_row, &sum);
        add_store(dst + o + c, sum);
      }
      for (; c < tile; ++c) {  // the rest one output at a time
        float sum = 0.f;
        for (int64_t p = 0; p < pairs; ++p) {
          const uint16_t* e = wt + p * tail_row + 2 * c;
          sum += bf16_value(hi[2 * p]) * bf16_value(e[0]) + bf16_value(hi[2 * p + 1]) * bf16_value(e[1]);
        }
        dst[o + c] = c10::BFloat16(bf16_value(dst[o + c]) + sum).x;
      }
    } else {
      if (r == 16 && w_row == 16) {
        const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi));
        const __m512i hh = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
        for (; o + 16 <= out; o += 16) add_store(dst + o, expand16(hh, w + o * 16));
      }
      for (; o < out; ++o) {  // the rest (rank 32, 64, ...; rank 16: sizes not a multiple of 16) one output at a time
        const uint16_t* wr = w + o * w_row;
        float sum = 0.f;
        if (r % 32 == 0) {
          rows_wide(hi, wr, 0, r, 1, &sum);
        } else {
          for (int64_t k = 0; k < r; ++k) sum += bf16_value(hi[k]) * bf16_value(wr[k]);
        }
        dst[o] = c10::BFloat16(bf16_value(dst[o]) + sum).x;
      }
    }
    offset += out;
  }
}

void check_activations(const torch::Tensor& x, const torch::Tensor& y, const std::vector<int64_t>& sizes) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && y.scalar_type() == torch::kBFloat16, "bf16 only");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.stride(1) == 1 && y.stride(1) == 1, "rows must be contiguous");
  TORCH_CHECK(x.size(1) % 32 == 0, "input width must be a multiple of 32");
  int64_t width = 0;
  for (int64_t size : sizes) width += size;
  TORCH_CHECK(!sizes.empty() && width <= y.size(1), "slices wider than the output");
}

}  // namespace

// Tokens are independent (each writes its own row of y): torch's intra-op threads take them in
// runs of this many, so a decode step's LoRA reads use every core the engine was given.
constexpr int64_t kTokensPerTask = 4;

// A whole LoRA linear layer for the listed tokens, in one call (decode steps): for token j
// (row t = rows[j], slot s = slots[j]):
//   h = bf16(scale * x[t] @ a_i[s].T) for every slice i (the LoRA buffer, float32 sums rounded once)
//   y[t, offset_i : offset_i + out_i] += h_i @ B_i[s].T   (float32 sums, rounded once)
// with offset_i the sum of the earlier slices' sizes. Rows not listed are left as they are.
// a_i, b_i as vLLM stores them: [slots, (1,) r, in] and [slots, (1,) out, r].
void lora_linear(torch::Tensor x, torch::Tensor y, std::vector<torch::Tensor> a, std::vector<torch::Tensor> b,
                 std::vector<int64_t> sizes, torch::Tensor rows, torch::Tensor slots, double scale) {
  check_activations(x, y, sizes);
  const size_t n_slices = a.size();
  TORCH_CHECK(n_slices == sizes.size() && b.size() == n_slices, "one A, B and size per slice");
  const int64_t in = x.size(1), r = a[0].size(-2);
  TORCH_CHECK(r == 16 || r % 32 == 0, "rank must be 16 or a multiple of 32");
  std::vector<Weights> wa, wb;
  for (size_t i = 0; i < n_slices; ++i) {
    wa.push_back(weights_of(a[i]));
    wb.push_back(weights_of(b[i]));
    TORCH_CHECK(wa[i].rows == r && wa[i].cols == in, "A shapes");
    TORCH_CHECK(wb[i].cols == r && wb[i].rows >= sizes[i], "B shapes");
  }
  const int64_t n = rows.size(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, n, kTokensPerTask, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(r);
    std::vector<uint16_t> h(r * n_slices);
    std::vector<SliceAt> at(n_slices);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t s = sp[j];
      for (size_t i = 0; i < n_slices; ++i) {
        at[i] = {wa[i].data + s * wa[i].slot_stride, wa[i].row_stride, wb[i].data + s * wb[i].slot_stride, wb[i].row_stride};
      }
      token_linear(xp + rp[j] * x.stride(0), yp + rp[j] * y.stride(0), in, at, sizes, r, r, static_cast<float>(scale),
                   false, acc.data(), h.data(), nullptr);
    }
  });
}

// The same from a packed copy of the layer (kernel.py's `PackedWeights`): block [slots, numel],
// where slot s holds, for k = ranks[s] rounded up to even (an adapter of rank ranks[s] in a
// slot padded with zeros), every slice's A[:k] ([k, in] each), then every slice's B[:, :k]
// pair-interleaved in tiles of 64 outputs (out * k elements: tile t holds outputs 64t ..
// 64t + w - 1, w = min(64, out - 64t), as [k / 2, w, 2] with element (p, o, e) = B[64t + o,
// 2p + e]). So a token reads only its slot's used weights, in memory order, and the expand
// needs no horizontal sums. (Reading a prefix of each full-rank tile instead was slower than
// reading everything: the prefetchers run into the skipped halves.) Rank 0: nothing to add.
void lora_linear_packed(torch::Tensor x, torch::Tensor y, torch::Tensor block, std::vector<int64_t> sizes,
                        torch::Tensor rows, torch::Tensor slots, double scale, torch::Tensor ranks) {
  check_activations(x, y, sizes);
  TORCH_CHECK(block.scalar_type() == torch::kBFloat16 && block.dim() == 2 && block.stride(1) == 1, "bf16 block rows");
  TORCH_CHECK(ranks.scalar_type() == torch::kInt64 && ranks.is_contiguous() && ranks.size(0) == block.size(0), "ranks");
  const size_t n_slices = sizes.size();
  const int64_t in = x.size(1);
  int64_t per_rank = n_slices * in;  // elements of a slot's block per unit of rank
  for (int64_t size : sizes) per_rank += size;
  const int64_t* kp = ranks.data_ptr<int64_t>();
  int64_t r = 0;
  for (int64_t s = 0; s < ranks.size(0); ++s) {
    TORCH_CHECK(kp[s] >= 0 && (kp[s] + kp[s] % 2) * per_rank <= block.size(1), "slot rank beyond the block");
    r = std::max(r, kp[s] + kp[s] % 2);
  }
  const int64_t n = rows.size(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* bp = reinterpret_cast<const uint16_t*>(block.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, n, kTokensPerTask, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(std::max<int64_t>(r, 1));
    std::vector<uint16_t> h(std::max<int64_t>(r, 1) * n_slices);
    std::vector<__m512i> hp(std::max<int64_t>(r / 2, 1));
    std::vector<SliceAt> at(n_slices);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t s = sp[j], rank = kp[s], k = rank + rank % 2;
      if (rank == 0) continue;
      const uint16_t* base = bp + s * block.stride(0);
      int64_t b_offset = n_slices * k * in;
      for (size_t i = 0; i < n_slices; ++i) {
        at[i] = {base + i * k * in, in, base + b_offset, 0};
        b_offset += sizes[i] * k;
      }
      token_linear(xp + rp[j] * x.stride(0), yp + rp[j] * y.stride(0), in, at, sizes, k, rank, static_cast<float>(scale),
                   true, acc.data(), h.data(), hp.data());
    }
  });
}

// Ask for transparent huge pages for the tensor's memory (before it is first written): the
// decode kernel streams LoRA weights, and with 4 KiB pages every page costs a TLB miss and
// restarts the hardware prefetcher. False if no whole 2 MiB page fits or madvise fails.
bool advise_huge_pages(torch::Tensor t) {
  const uintptr_t huge = uintptr_t{1} << 21;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + huge - 1) & ~(huge - 1), end = (start + t.nbytes()) & ~(huge - 1);
  return end > begin && madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("advise_huge_pages", &advise_huge_pages);
  m.def("gemv", &gemv);
  m.def("lora_linear", &lora_linear);
  m.def("lora_linear_packed", &lora_linear_packed);
}
