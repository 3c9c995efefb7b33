// Tile-skipping masked GEMMs behind fastkd.nn.MaskedLinear (forward, dX, dW).
//
// Shapes (all row-major / contiguous; the launchers make them so):
//   X  (M, K)   activations            W, Mask (N, K)   weight and its bool keep-mask
//   Y  (M, N)   Y  = X (W o Mask)^T + b                       -> fastkd::masked_mm
//   dX (M, K)   dX = dY (W o Mask)                            -> fastkd::masked_mm_grad_input
//   dW (N, K)   dW = (dY^T X) o Mask                          -> fastkd::masked_mm_grad_weight
// bf16 or fp16 in and out, fp32 accumulation on tensor cores (WMMA 16x16x16, sm_80+).
//
// The tile map (built in Python by fastkd.reference.masked_linear.build_tile_map, one int32 tensor)
// describes the mask on a grid of TILE x TILE weight tiles (n_tiles = ceil(N/TILE) tile-rows,
// k_tiles = ceil(K/TILE) tile-columns):
//   [kind    : n_tiles*k_tiles]  0 = no kept entry, 1 = partly kept, 2 = every in-bounds entry kept
//   [row_ptr : n_tiles + 1    ]  CSR over tile-rows: non-empty tiles of tile-row tn are
//   [col_ptr : k_tiles + 1    ]      row_idx[row_ptr[tn] .. row_ptr[tn+1]) (their tile-columns)
//   [row_idx : n_tiles*k_tiles]  CSC over tile-columns: non-empty tiles of tile-column tk are
//   [col_idx : n_tiles*k_tiles]      col_idx[col_ptr[tk] .. col_ptr[tk+1]) (their tile-rows)
//   [...                      ]  lists for the Triton kernels (fastkd.reference.masked_linear.
//                                 TileMapLayout), not read here
// row_idx and col_idx hold nnz entries each, padded to n_tiles*k_tiles so that every offset
// follows from the shape alone.
// Empty tiles are skipped entirely; the mask is read (elementwise) only inside partly kept tiles,
// so any mask is computed exactly and the speed grows with block structure.
//
// Every CTA computes one TILE x TILE output tile with 4 warps; the reduction walks TILE-wide slices.
// Each operand tile is copied into shared memory in its own memory layout (TILE rows of TILE
// consecutive elements) and the WMMA fragments read it as row- or column-major, so no operand is
// transposed on the way in. Where an operand's rows are 16-byte aligned (leading dimension a
// multiple of 8 elements, aligned base) the copies are 16-byte cp.async transfers, double-buffered
// so the next slice loads while this one multiplies; tails, unaligned operands and chunks crossing
// the matrix edge fall back to element copies with bounds checks (zeros outside the matrix), so any
// M, N, K works.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>

#include <cstdint>
#include <optional>
#include <type_traits>

namespace fastkd_masked {

namespace wmma = nvcuda::wmma;

constexpr int TILE = 64;      // tile-map granularity == CTA output tile == reduction slice
constexpr int THREADS = 128;  // 4 warps; warp w owns the 32x32 quarter (w / 2, w % 2)
constexpr int LDS = TILE + 8; // smem stride (elements) of the 16-bit tiles: WMMA wants a multiple
                              // of 8, and 144-byte rows keep every 16-byte chunk aligned
constexpr int LDC = TILE + 4; // smem stride of the fp32 staging tile: WMMA wants a multiple of 4
constexpr int CHUNK = 8;      // 16-bit elements per 16-byte copy
constexpr int CHUNKS = TILE * (TILE / CHUNK);  // chunks per tile (4 per thread)
constexpr int STAGES = 2;     // double buffering

enum TileKind : int { kEmpty = 0, kPartial = 1, kFull = 2 };

struct TileMap {
  const int* kind;     // [n_tiles][k_tiles]
  const int* row_ptr;  // [n_tiles + 1]
  const int* col_ptr;  // [k_tiles + 1]
  const int* row_idx;  // [nnz] tile-column of each non-empty tile, grouped by tile-row
  const int* col_idx;  // [nnz] tile-row of each non-empty tile, grouped by tile-column
  int n_tiles;
  int k_tiles;
};

// A row-major matrix operand: element (r, c) at ptr[r * ld + c], r < rows, c < cols. `vec`: rows
// may be copied in 16-byte chunks (ld % 8 == 0 and ptr 16-byte aligned; the launcher decides).
template <typename T>
struct Src {
  const T* ptr;
  int64_t ld;
  int64_t rows;
  int64_t cols;
  bool vec;
};

// The bool keep-mask, laid out like the weight. `vec`: 8 entries may be read as one 8-byte word.
struct MaskSrc {
  const bool* ptr;
  int64_t ld;
  int64_t rows;
  int64_t cols;
  bool vec;
};

template <typename T>
struct Num;
template <>
struct Num<__half> {
  static __device__ __forceinline__ __half from_float(float v) { return __float2half(v); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Thread t handles chunks t, t + THREADS, ... of a tile: chunk e is row e / 8, columns
// (e % 8) * 8 .. + 8, so eight consecutive threads cover one 128-byte row (coalesced).
__device__ __forceinline__ int chunk_row(int e) { return e / (TILE / CHUNK); }
__device__ __forceinline__ int chunk_col(int e) { return (e % (TILE / CHUNK)) * CHUNK; }

// S[r][c] = src(row0 + r, col0 + c) for r, c < TILE; zeros outside the matrix. Whole in-bounds
// chunks of a `vec` operand go by cp.async (the caller commits and waits); the rest by plain
// stores. Only the issuing thread may rely on its cp.async data before a __syncthreads.
template <typename T>
__device__ __forceinline__ void load_tile(T (*S)[LDS], const Src<T>& src, int64_t row0,
                                          int64_t col0) {
  const T zero = Num<T>::from_float(0.f);
  for (int e = threadIdx.x; e < CHUNKS; e += THREADS) {
    const int r = chunk_row(e);
    const int c = chunk_col(e);
    const int64_t gr = row0 + r;
    const int64_t gc = col0 + c;
    T* dst = &S[r][c];
    if (gr >= src.rows || gc >= src.cols) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    } else if (src.vec && gc + CHUNK <= src.cols) {
      __pipeline_memcpy_async(dst, src.ptr + gr * src.ld + gc, 16);
    } else {
      const T* row = src.ptr + gr * src.ld;
#pragma unroll
      for (int i = 0; i < CHUNK; ++i) dst[i] = (gc + i < src.cols) ? row[gc + i] : zero;
    }
  }
}

// Zeroes the entries of S (a weight tile loaded by load_tile from row0, col0) whose mask entry is
// false. Each thread touches exactly the chunks it loaded, after waiting for its own copies.
template <typename T>
__device__ __forceinline__ void mask_tile(T (*S)[LDS], const MaskSrc& mask, int64_t row0,
                                          int64_t col0) {
  const T zero = Num<T>::from_float(0.f);
  for (int e = threadIdx.x; e < CHUNKS; e += THREADS) {
    const int r = chunk_row(e);
    const int c = chunk_col(e);
    const int64_t gr = row0 + r;
    const int64_t gc = col0 + c;
    if (gr >= mask.rows || gc >= mask.cols) continue;  // already zero
    const bool* m = mask.ptr + gr * mask.ld + gc;
    T* dst = &S[r][c];
    if (mask.vec && gc + CHUNK <= mask.cols) {
      const uint2 word = *reinterpret_cast<const uint2*>(m);  // bools are bytes 0 / 1
#pragma unroll
      for (int i = 0; i < CHUNK; ++i) {
        const unsigned part = i < 4 ? word.x : word.y;
        if (((part >> (8 * (i % 4))) & 0xffu) == 0u) dst[i] = zero;
      }
    } else {
#pragma unroll
      for (int i = 0; i < CHUNK; ++i)
        if (gc + i < mask.cols && !m[i]) dst[i] = zero;
    }
  }
}

// acc += A (TILE x TILE) @ B (TILE x TILE), each warp on its 32x32 quarter of the output tile.
// LayoutA row_major: A(i, r) = As[i][r]; col_major: A(i, r) = As[r][i]. Likewise B(r, j) = Bs[r][j]
// (row_major) or Bs[j][r] (col_major).
template <typename T, typename LayoutA, typename LayoutB>
__device__ __forceinline__ void mma_tile(const T (*As)[LDS], const T (*Bs)[LDS], Acc (&acc)[2][2]) {
  constexpr bool a_rows = std::is_same<LayoutA, wmma::row_major>::value;
  constexpr bool b_rows = std::is_same<LayoutB, wmma::row_major>::value;
  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32;  // first output row of this warp's quarter
  const int wc = (warp % 2) * 32;  // first output column
#pragma unroll
  for (int kk = 0; kk < TILE; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> a[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> b[2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
      wmma::load_matrix_sync(a[i], a_rows ? &As[wr + 16 * i][kk] : &As[kk][wr + 16 * i], LDS);
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::load_matrix_sync(b[j], b_rows ? &Bs[kk][wc + 16 * j] : &Bs[wc + 16 * j][kk], LDS);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
  }
}

__device__ __forceinline__ void zero_acc(Acc (&acc)[2][2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
}

// out[gr*ld + gc] = acc(gr - row0, gc - col0) (+ bias[gc]) for in-bounds (gr, gc), staged through
// Cs. With `out_mask` (same layout as out) a false entry is written as exactly 0.
template <typename T>
__device__ __forceinline__ void store_tile(float (*Cs)[LDC], Acc (&acc)[2][2], T* __restrict__ out,
                                           int64_t ld, int64_t row0, int64_t col0, int64_t rows,
                                           int64_t cols, const T* __restrict__ bias,
                                           const bool* __restrict__ out_mask) {
  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32;
  const int wc = (warp % 2) * 32;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[wr + 16 * i][wc + 16 * j], acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < TILE * TILE; e += THREADS) {
    const int r = e / TILE;
    const int c = e % TILE;
    const int64_t gr = row0 + r;
    const int64_t gc = col0 + c;
    if (gr < rows && gc < cols) {
      float v = Cs[r][c];
      if (bias != nullptr) v += Num<T>::to_float(bias[gc]);
      const int64_t off = gr * ld + gc;
      if (out_mask != nullptr && !out_mask[off]) v = 0.f;
      out[off] = Num<T>::from_float(v);
    }
  }
}

// Two stages of the A and B tiles; the fp32 staging tile of the epilogue reuses their bytes (the
// main loop has finished with them by then).
struct __align__(128) SmemTiles16 {
  union {
    struct {
      unsigned char a[STAGES][TILE * LDS * 2];  // raw bytes: one struct for both 16-bit types
      unsigned char b[STAGES][TILE * LDS * 2];
    } ab;
    float c[TILE * LDC];
  };
};

// Stage `stage` of the A / B tiles as T[TILE][LDS] (address arithmetic, no pointer table).
template <typename T>
__device__ __forceinline__ T (*a_stage(SmemTiles16& smem, int stage))[LDS] {
  return reinterpret_cast<T(*)[LDS]>(smem.ab.a[stage]);
}
template <typename T>
__device__ __forceinline__ T (*b_stage(SmemTiles16& smem, int stage))[LDS] {
  return reinterpret_cast<T(*)[LDS]>(smem.ab.b[stage]);
}

// The main loop shared by the three kernels: for s = 0 .. steps-1, load step s's A tile (from a at
// a_row0(s), a_col0(s)) and B tile, zero B's pruned entries when step s's weight tile is partly
// kept, and accumulate A @ B. Step s + 1 loads (cp.async) while step s multiplies.
template <typename T, typename LayoutA, typename LayoutB, typename Step>
__device__ __forceinline__ void pipelined_mainloop(SmemTiles16& smem, const Src<T>& a,
                                                   const Src<T>& b, const MaskSrc& mask, int steps,
                                                   Step step, Acc (&acc)[2][2]) {
  int64_t ar, ac, br, bc;
  bool partial;
  if (steps > 0) {
    step(0, ar, ac, br, bc, partial);
    load_tile<T>(a_stage<T>(smem, 0), a, ar, ac);
    load_tile<T>(b_stage<T>(smem, 0), b, br, bc);
  }
  __pipeline_commit();
  for (int s = 0; s < steps; ++s) {
    const int cur = s & 1;
    int64_t mr = 0, mc = 0;  // where step s's weight tile starts (for its mask)
    bool cur_partial;
    step(s, ar, ac, mr, mc, cur_partial);
    if (s + 1 < steps) {
      step(s + 1, ar, ac, br, bc, partial);
      load_tile<T>(a_stage<T>(smem, cur ^ 1), a, ar, ac);
      load_tile<T>(b_stage<T>(smem, cur ^ 1), b, br, bc);
    }
    __pipeline_commit();      // one group per iteration (empty on the last), so that
    __pipeline_wait_prior(1); // waiting for all but the newest leaves step s's copies landed
    if (cur_partial) mask_tile<T>(b_stage<T>(smem, cur), mask, mr, mc);
    __syncthreads();
    mma_tile<T, LayoutA, LayoutB>(a_stage<T>(smem, cur), b_stage<T>(smem, cur), acc);
    __syncthreads();  // before step s + 2 overwrites this stage (and before the epilogue)
  }
  __pipeline_wait_prior(0);
}

// Y = X (W o Mask)^T + bias.  grid = (ceil(M / TILE), n_tiles); CTA (bm, tn) computes
// Y[bm*TILE.., tn*TILE..] walking only the non-empty tiles of weight tile-row tn (CSR).
//   A(i = m, r = k) = X[m][k]    row-major tile of X
//   B(r = k, j = n) = W[n][k]    W's rows as they are: B read column-major; mask alike
template <typename T>
__global__ void __launch_bounds__(THREADS)
    masked_mm_fwd_kernel(Src<T> x, Src<T> w, MaskSrc mask, const T* __restrict__ bias,
                         T* __restrict__ y, TileMap tm, int64_t M, int64_t N) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // host pass parses the body too
  __shared__ SmemTiles16 smem;
  float(*Cs)[LDC] = reinterpret_cast<float(*)[LDC]>(smem.c);
  const int64_t m0 = int64_t(blockIdx.x) * TILE;
  const int tn = blockIdx.y;
  const int64_t n0 = int64_t(tn) * TILE;
  const int p0 = tm.row_ptr[tn];
  Acc acc[2][2];
  zero_acc(acc);
  auto step = [&](int s, int64_t& ar, int64_t& ac, int64_t& br, int64_t& bc, bool& partial) {
    const int tk = tm.row_idx[p0 + s];
    ar = m0;
    ac = int64_t(tk) * TILE;
    br = n0;
    bc = ac;
    partial = tm.kind[int64_t(tn) * tm.k_tiles + tk] == kPartial;
  };
  pipelined_mainloop<T, wmma::row_major, wmma::col_major>(smem, x, w, mask,
                                                          tm.row_ptr[tn + 1] - p0, step, acc);
  store_tile<T>(Cs, acc, y, N, m0, n0, M, N, bias, nullptr);
#else
  __trap();  // tensor-core bf16/fp16 WMMA needs sm_80+; the launcher refuses older GPUs first
#endif
}

// dX = dY (W o Mask).  grid = (ceil(M / TILE), k_tiles); CTA (bm, tk) computes dX[bm*TILE.., tk*TILE..]
// walking only the non-empty tiles of weight tile-column tk (CSC, the transposed map).
//   A(i = m, r = n) = dY[m][n]   row-major tile of dY
//   B(r = n, j = k) = W[n][k]    row-major tile of W; mask alike
template <typename T>
__global__ void __launch_bounds__(THREADS)
    masked_mm_grad_input_kernel(Src<T> dy, Src<T> w, MaskSrc mask, T* __restrict__ dx, TileMap tm,
                                int64_t M, int64_t K) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // host pass parses the body too
  __shared__ SmemTiles16 smem;
  float(*Cs)[LDC] = reinterpret_cast<float(*)[LDC]>(smem.c);
  const int64_t m0 = int64_t(blockIdx.x) * TILE;
  const int tk = blockIdx.y;
  const int64_t k0 = int64_t(tk) * TILE;
  const int p0 = tm.col_ptr[tk];
  Acc acc[2][2];
  zero_acc(acc);
  auto step = [&](int s, int64_t& ar, int64_t& ac, int64_t& br, int64_t& bc, bool& partial) {
    const int tn = tm.col_idx[p0 + s];
    ar = m0;
    ac = int64_t(tn) * TILE;
    br = ac;
    bc = k0;
    partial = tm.kind[int64_t(tn) * tm.k_tiles + tk] == kPartial;
  };
  pipelined_mainloop<T, wmma::row_major, wmma::row_major>(smem, dy, w, mask,
                                                          tm.col_ptr[tk + 1] - p0, step, acc);
  store_tile<T>(Cs, acc, dx, K, m0, k0, M, K, nullptr, nullptr);
#else
  __trap();
#endif
}

// dW = (dY^T X) o Mask, a sampled product: grid = (k_tiles, n_tiles); CTA (tk, tn) owns weight tile
// (tn, tk). An empty tile only writes zeros; a kept tile reduces over all of M in TILE slices and
// applies the mask as it stores.
//   A(i = n, r = m) = dY[m][n]   row-major tile of dY (rows m): A read column-major
//   B(r = m, j = k) = X[m][k]    row-major tile of X
template <typename T>
__global__ void __launch_bounds__(THREADS)
    masked_mm_grad_weight_kernel(Src<T> dy, Src<T> x, MaskSrc mask, T* __restrict__ dw,
                                 TileMap tm, int64_t M, int64_t N, int64_t K) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // host pass parses the body too
  const int tk = blockIdx.x;
  const int tn = blockIdx.y;
  const int64_t k0 = int64_t(tk) * TILE;
  const int64_t n0 = int64_t(tn) * TILE;
  const int kind = tm.kind[int64_t(tn) * tm.k_tiles + tk];  // uniform across the CTA
  if (kind == kEmpty) {
    const T zero = Num<T>::from_float(0.f);
    for (int e = threadIdx.x; e < TILE * TILE; e += THREADS) {
      const int64_t gr = n0 + e / TILE;
      const int64_t gc = k0 + e % TILE;
      if (gr < N && gc < K) dw[gr * K + gc] = zero;
    }
    return;
  }
  __shared__ SmemTiles16 smem;
  float(*Cs)[LDC] = reinterpret_cast<float(*)[LDC]>(smem.c);
  Acc acc[2][2];
  zero_acc(acc);
  auto step = [&](int s, int64_t& ar, int64_t& ac, int64_t& br, int64_t& bc, bool& partial) {
    ar = int64_t(s) * TILE;  // rows m of dY
    ac = n0;
    br = ar;                 // rows m of X
    bc = k0;
    partial = false;         // the mask is applied to dW as it is stored
  };
  const int steps = static_cast<int>((M + TILE - 1) / TILE);
  pipelined_mainloop<T, wmma::col_major, wmma::row_major>(smem, dy, x, mask, steps, step, acc);
  store_tile<T>(Cs, acc, dw, K, n0, k0, N, K, nullptr, kind == kPartial ? mask.ptr : nullptr);
#else
  __trap();
#endif
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "fastkd masked_mm: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "fastkd masked_mm: ", name, " is on ", t.device(),
              " but expected ", like.device());
}

void check_half(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_operand(t, name, like);
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              "fastkd masked_mm: ", name, " must be float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastkd masked_mm: ", name, " has dtype ",
              t.scalar_type(), " but expected ", like.scalar_type());
}

void check_sm80(const at::Tensor& t) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(t.get_device());
  TORCH_CHECK(prop->major >= 8, "fastkd masked_mm needs a GPU of compute capability 8.0 or newer, got ",
              prop->major, ".", prop->minor);
}

// Validates the weight/mask/tile map triple and returns device pointers into the tile map.
TileMap view_tile_map(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& tile_map) {
  TORCH_CHECK(weight.dim() == 2, "fastkd masked_mm: weight must be 2-D (N, K)");
  TORCH_CHECK(mask.sizes() == weight.sizes(), "fastkd masked_mm: mask shape ", mask.sizes(),
              " must equal weight shape ", weight.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "fastkd masked_mm: mask must be bool");
  check_operand(mask, "mask", weight);
  check_operand(tile_map, "tile_map", weight);
  TORCH_CHECK(tile_map.scalar_type() == at::kInt && tile_map.dim() == 1 && tile_map.is_contiguous(),
              "fastkd masked_mm: tile_map must be a contiguous 1-D int32 tensor");
  const int64_t nt = ceil_div(weight.size(0), TILE);
  const int64_t kt = ceil_div(weight.size(1), TILE);
  TORCH_CHECK(nt <= 65535 && kt <= 65535, "fastkd masked_mm: weight too large for the tile grid");
  // Every section, the Triton kernels' lists included (fastkd.reference.masked_linear.
  // TileMapLayout.size): a map of another shape or tile size has another length.
  const int64_t hn = ceil_div(nt, 2), hk = ceil_div(kt, 2);
  const int64_t lists = (2 * nt + nt * kt) + (2 * hn + hn * kt) + (2 * kt + kt * nt) + (2 * hk + hk * nt);
  const int64_t expected = 3 * nt * kt + nt + 1 + kt + 1 + lists;
  TORCH_CHECK(tile_map.numel() == expected,
              "fastkd masked_mm: tile_map of ", tile_map.numel(), " entries does not match a ",
              weight.size(0), "x", weight.size(1), " weight with ", TILE, "x", TILE,
              " tiles (", expected, " entries); rebuild it with ",
              "fastkd.reference.masked_linear.build_tile_map");
  const int* base = tile_map.data_ptr<int>();
  TileMap tm;
  tm.kind = base;
  tm.row_ptr = base + nt * kt;
  tm.col_ptr = tm.row_ptr + nt + 1;
  tm.row_idx = tm.col_ptr + kt + 1;
  tm.col_idx = tm.row_idx + nt * kt;
  tm.n_tiles = static_cast<int>(nt);
  tm.k_tiles = static_cast<int>(kt);
  return tm;
}

// A contiguous (rows, cols) tensor as a kernel operand; 16-byte copies where every row starts
// 16-byte aligned (a view with a storage offset may not).
template <typename T>
Src<T> src_of(const at::Tensor& t) {
  const auto addr = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  return Src<T>{reinterpret_cast<const T*>(t.data_ptr()), t.size(1), t.size(0), t.size(1),
                addr % 16 == 0 && t.size(1) % CHUNK == 0};
}

MaskSrc mask_src_of(const at::Tensor& mask) {
  const auto addr = reinterpret_cast<std::uintptr_t>(mask.data_ptr());
  return MaskSrc{mask.data_ptr<bool>(), mask.size(1), mask.size(0), mask.size(1),
                 addr % 8 == 0 && mask.size(1) % CHUNK == 0};
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// fastkd::masked_mm(Tensor x, Tensor weight, Tensor mask, Tensor? bias, Tensor tile_map) -> Tensor
at::Tensor masked_mm_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                          const at::Tensor& mask_in, const std::optional<at::Tensor>& bias_in,
                          const at::Tensor& tile_map) {
  TORCH_CHECK(x_in.dim() == 2, "fastkd masked_mm: x must be 2-D (M, K)");
  check_half(weight_in, "weight", x_in);
  check_half(x_in, "x", x_in);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == x_in.size(1),
              "fastkd masked_mm: x (M, K) and weight (N, K) disagree on K: ", x_in.sizes(), " vs ",
              weight_in.sizes());
  const at::cuda::CUDAGuard guard(x_in.device());
  const TileMap tm = view_tile_map(weight_in, mask_in, tile_map);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    check_half(bias, "bias", x_in);
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0),
                "fastkd masked_mm: bias must have shape (N,) = (", weight.size(0), ",)");
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  check_sm80(x);
  TORCH_CHECK(ceil_div(M, TILE) <= INT32_MAX, "fastkd masked_mm: too many rows");
  const dim3 grid(static_cast<unsigned>(ceil_div(M, TILE)), static_cast<unsigned>(tm.n_tiles));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kHalf) {
    masked_mm_fwd_kernel<__half><<<grid, THREADS, 0, stream>>>(
        src_of<__half>(x), src_of<__half>(weight), mask_src_of(mask),
        bias.defined() ? cptr<__half>(bias) : nullptr, mptr<__half>(y), tm, M, N);
  } else {
    masked_mm_fwd_kernel<__nv_bfloat16><<<grid, THREADS, 0, stream>>>(
        src_of<__nv_bfloat16>(x), src_of<__nv_bfloat16>(weight), mask_src_of(mask),
        bias.defined() ? cptr<__nv_bfloat16>(bias) : nullptr, mptr<__nv_bfloat16>(y), tm, M, N);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

// fastkd::masked_mm_grad_input(Tensor grad_out, Tensor weight, Tensor mask, Tensor tile_map) -> Tensor
at::Tensor masked_mm_grad_input_cuda(const at::Tensor& grad_in, const at::Tensor& weight_in,
                                     const at::Tensor& mask_in, const at::Tensor& tile_map) {
  TORCH_CHECK(grad_in.dim() == 2, "fastkd masked_mm_grad_input: grad_out must be 2-D (M, N)");
  check_half(grad_in, "grad_out", grad_in);
  check_half(weight_in, "weight", grad_in);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(0) == grad_in.size(1),
              "fastkd masked_mm_grad_input: grad_out (M, N) and weight (N, K) disagree on N");
  const at::cuda::CUDAGuard guard(grad_in.device());
  const TileMap tm = view_tile_map(weight_in, mask_in, tile_map);
  const at::Tensor dy = grad_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const int64_t M = dy.size(0), N = dy.size(1), K = weight.size(1);
  at::Tensor dx = at::empty({M, K}, dy.options());
  if (M == 0 || K == 0) return dx;
  check_sm80(dy);
  TORCH_CHECK(ceil_div(M, TILE) <= INT32_MAX, "fastkd masked_mm_grad_input: too many rows");
  const dim3 grid(static_cast<unsigned>(ceil_div(M, TILE)), static_cast<unsigned>(tm.k_tiles));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (dy.scalar_type() == at::kHalf) {
    masked_mm_grad_input_kernel<__half><<<grid, THREADS, 0, stream>>>(
        src_of<__half>(dy), src_of<__half>(weight), mask_src_of(mask), mptr<__half>(dx), tm, M, K);
  } else {
    masked_mm_grad_input_kernel<__nv_bfloat16><<<grid, THREADS, 0, stream>>>(
        src_of<__nv_bfloat16>(dy), src_of<__nv_bfloat16>(weight), mask_src_of(mask),
        mptr<__nv_bfloat16>(dx), tm, M, K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

// fastkd::masked_mm_grad_weight(Tensor grad_out, Tensor x, Tensor mask, Tensor tile_map) -> Tensor
at::Tensor masked_mm_grad_weight_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                      const at::Tensor& mask_in, const at::Tensor& tile_map) {
  TORCH_CHECK(grad_in.dim() == 2 && x_in.dim() == 2,
              "fastkd masked_mm_grad_weight: grad_out (M, N) and x (M, K) must be 2-D");
  check_half(grad_in, "grad_out", grad_in);
  check_half(x_in, "x", grad_in);
  TORCH_CHECK(grad_in.size(0) == x_in.size(0),
              "fastkd masked_mm_grad_weight: grad_out and x disagree on M");
  TORCH_CHECK(mask_in.dim() == 2 && mask_in.size(0) == grad_in.size(1) &&
                  mask_in.size(1) == x_in.size(1),
              "fastkd masked_mm_grad_weight: mask must have shape (N, K)");
  check_operand(mask_in, "mask", grad_in);
  const at::cuda::CUDAGuard guard(grad_in.device());
  // The mask has the weight's shape, so it stands in for the weight in the tile-map checks.
  const TileMap tm = view_tile_map(mask_in, mask_in, tile_map);
  const at::Tensor dy = grad_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1);
  at::Tensor dw = at::empty({N, K}, dy.options());
  if (N == 0 || K == 0) return dw;
  check_sm80(dy);
  const dim3 grid(static_cast<unsigned>(tm.k_tiles), static_cast<unsigned>(tm.n_tiles));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (dy.scalar_type() == at::kHalf) {
    masked_mm_grad_weight_kernel<__half><<<grid, THREADS, 0, stream>>>(
        src_of<__half>(dy), src_of<__half>(x), mask_src_of(mask), mptr<__half>(dw), tm, M, N, K);
  } else {
    masked_mm_grad_weight_kernel<__nv_bfloat16><<<grid, THREADS, 0, stream>>>(
        src_of<__nv_bfloat16>(dy), src_of<__nv_bfloat16>(x), mask_src_of(mask),
        mptr<__nv_bfloat16>(dw), tm, M, N, K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dw;
}

}  // namespace fastkd_masked

// The schemas are defined in Python (fastkd/_ops.py); this only adds the CUDA implementations.
TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("masked_mm", &fastkd_masked::masked_mm_cuda);
  m.impl("masked_mm_grad_input", &fastkd_masked::masked_mm_grad_input_cuda);
  m.impl("masked_mm_grad_weight", &fastkd_masked::masked_mm_grad_weight_cuda);
}
