// A few rows times a float32 weight matrix stored in column panels: the small matmul of a decoding
// step at batch 1 (one row greedy, beam rows in beam search), as an XLA FFI custom call for the CPU.
//
//   y [M, N] = x [M, K] . W [K, N],   W stored panel after panel in an array of its own size,
//   [K, N]: panel p (columns 64p .. 64p + w - 1) at offset 64pK, row-major [K, w], w = 64 but for
//   the last panel, N - 64 (P - 1) (P = ceil(N / 64)); no padding. Any other shapes are an
//   InvalidArgument error, returned before any memory is touched.
//
// Why by hand: at a few rows a step is a stream of every weight once, and the speed is the rate at
// which the product reads them. XLA:CPU's kernels read a [K, N] matrix at 15-30 GB/s at four rows
// (YNNPACK) and 40-60 GB/s at one (its matrix-vector loop); walking a panel stores its 64 columns
// contiguously row after row, so the product is one sequential read of the weights with every
// row's 64 sums held in registers: 40-45 GB/s at four rows, 70-85 at one, on the machine of
// docs/benchmarks_decoding.md ("Packed kernels"). Panels are shared out between the calling thread
// and tasks on XLA's intra-op thread pool (a thread for each 128 KB of panels, up to the pool's
// size: on two cores, both for every matrix of 256 KB or more, 1.4x one thread in a decode).
//
// Written with GCC/Clang vector extensions, not intrinsics: compiled on the machine that runs it
// (-march=native), it is AVX-512 on AVX-512 CPUs and the widest vectors elsewhere.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 64;  // columns per panel
// Rows per pass over a panel: 6 x 64 sums are 24 of AVX-512's 32 vector registers (1.0-1.3x four
// rows from 8 rows up; from 128 rows level with XLA's GEMM or ahead: docs/benchmarks_decoding.md,
// "One copy of each weight").
constexpr int kBlock = 6;
typedef float V16 __attribute__((vector_size(64), aligned(4)));  // 16 floats, unaligned loads

inline V16 Load(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, V16 v) { std::memcpy(p, &v, sizeof(v)); }

// Rows [0, R) of x (row stride K) times one panel [K, 64] into out [R, 64] (row stride 64).
template <int R>
void PanelRows(const float* x, int64_t K, const float* panel, float* out) {
  V16 acc[R][4] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kPanel;
    const V16 w0 = Load(w), w1 = Load(w + 16), w2 = Load(w + 32), w3 = Load(w + 48);
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * K + k];
      acc[r][0] += xr * w0;
      acc[r][1] += xr * w1;
      acc[r][2] += xr * w2;
      acc[r][3] += xr * w3;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) Store(out + r * kPanel + c * 16, acc[r][c]);
}

// One row: two sets of sums (even and odd k) so that eight multiply-add chains run at once.
void PanelOneRow(const float* x, int64_t K, const float* panel, float* out) {
  V16 even[4] = {}, odd[4] = {};
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    const float* w = panel + k * kPanel;
    const float a = x[k], b = x[k + 1];
    for (int c = 0; c < 4; ++c) {
      even[c] += a * Load(w + c * 16);
      odd[c] += b * Load(w + kPanel + c * 16);
    }
  }
  if (k < K)
    for (int c = 0; c < 4; ++c) even[c] += x[k] * Load(panel + k * kPanel + c * 16);
  for (int c = 0; c < 4; ++c) Store(out + c * 16, even[c] + odd[c]);
}

// Rows [0, M) times panel p, written into y [M, N] (only the panel's columns below N). A last
// panel narrower than 64 columns is read from a zero-padded copy (at most K x 64 floats, once).
void Panel(const float* x, int64_t M, int64_t K, const float* panels, int64_t p, float* y,
           int64_t N) {
  const float* panel = panels + p * K * kPanel;
  const int64_t col = p * kPanel, width = std::min(kPanel, N - col);
  std::unique_ptr<float[]> padded;
  if (width < kPanel) {
    padded.reset(new float[K * kPanel]());
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(padded.get() + k * kPanel, panel + k * width, width * sizeof(float));
    panel = padded.get();
  }
  float tile[kBlock * kPanel];
  for (int64_t r0 = 0; r0 < M; r0 += kBlock) {
    const int64_t rows = std::min<int64_t>(kBlock, M - r0);
    const float* xr = x + r0 * K;
    switch (rows) {
      case 1: PanelOneRow(xr, K, panel, tile); break;
      case 2: PanelRows<2>(xr, K, panel, tile); break;
      case 3: PanelRows<3>(xr, K, panel, tile); break;
      case 4: PanelRows<4>(xr, K, panel, tile); break;
      case 5: PanelRows<5>(xr, K, panel, tile); break;
      default: PanelRows<kBlock>(xr, K, panel, tile); break;
    }
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(y + (r0 + r) * N + col, tile + r * kPanel, width * sizeof(float));
  }
}

// Panels are handed out one at a time from a shared counter; the caller works too, then waits
// until every panel is done (a helper task that starts late finds none left and returns).
struct Work {
  std::atomic<int64_t> next{0}, done{0};
};

// One turn of a wait for a helper's last panels (a few microseconds when it runs): a pause
// instruction for the first kSpins turns, then the core is given up on every turn, so a helper
// pre-empted on a loaded machine does not make the caller burn a core until it runs again.
constexpr int kSpins = 256;

inline void WaitTurn(int turn) {
  if (turn >= kSpins) {
    std::this_thread::yield();
    return;
  }
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

constexpr int64_t kBytesPerThread = 128 << 10;  // a thread for each 128 KB of panels, up to the pool's

std::string Shape(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Every shape is checked before a byte is read or written: the loops read exactly the panels'
// K x N floats and write y's M x N only when x [M, K], panels [K, N] and y [M, N] agree.
bool ShapesAgree(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> pd,
                 ffi::Span<const int64_t> yd) {
  return xd.size() == 2 && pd.size() == 2 && yd.size() == 2 && pd[0] == xd[1] &&
         pd[1] == yd[1] && yd[0] == xd[0];
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> panels, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), pd = panels.dimensions(), yd = y->dimensions();
  if (!ShapesAgree(xd, pd, yd))
    return ffi::Error::InvalidArgument(
        "packed_matmul: want x [M, K], panels [K, N], y [M, N]; got x " +
        Shape(xd) + ", panels " + Shape(pd) + ", y " + Shape(yd));
  const int64_t M = xd[0], K = xd[1], N = yd[1], P = (N + kPanel - 1) / kPanel;
  const float* xp = x.typed_data();
  const float* wp = panels.typed_data();
  float* yp = y->typed_data();
  auto work = std::make_shared<Work>();
  auto run = [=] {
    for (int64_t p; (p = work->next.fetch_add(1)) < P; work->done.fetch_add(1))
      Panel(xp, M, K, wp, p, yp, N);
  };
  const int64_t threads = std::min({pool.num_threads(), P, P * K * kPanel * 4 / kBytesPerThread});
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([run] { run(); });
  run();
  for (int turn = 0; work->done.load(std::memory_order_acquire) < P; turn += turn < kSpins)
    WaitTurn(turn);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeqzooPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
