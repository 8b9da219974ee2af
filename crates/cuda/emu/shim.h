// shim.h: just enough of CUDA's device-side language for lora-cuda's kernels to compile as C++ and run on the
// CPU. A launch runs its blocks one after another; a block's threads are real threads (std::thread), so
// __syncthreads is a std::barrier over the block, a warp shuffle writes to a per-warp exchange and waits on
// a per-warp barrier, and __shared__ is `static` (one block lives at a time; launches are serialised).
// Requirements this places on a kernel (also true of correct CUDA code): every thread of a block reaches
// each __syncthreads, and all 32 lanes of a warp reach each shuffle; blockDim a multiple of 32 where
// shuffles are used.
#pragma once
#include <barrier>
#include <math.h>  // expf, logf, sqrtf, fmaxf in the global namespace, as in CUDA
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
struct Launch {
    dim3 grid, block;
    unsigned nthreads = 0;
    std::unique_ptr<std::barrier<>> block_barrier;
    std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
    std::vector<uint64_t> exchange;
};
extern Launch* current;
extern thread_local dim3 thread_idx;
extern thread_local dim3 block_idx;
inline unsigned linear_thread() {
    return thread_idx.x + current->block.x * (thread_idx.y + current->block.y * thread_idx.z);
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::current->block)
#define gridDim (emu::current->grid)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { emu::current->block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
    emu::Launch& l = *emu::current;
    const unsigned t = emu::linear_thread(), w = t / 32, src = w * 32 + ((t % 32) ^ (unsigned)lane_mask);
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    l.exchange[t] = bits;
    l.warp_barriers[w]->arrive_and_wait();
    const uint64_t got = src < l.nthreads ? l.exchange[src] : bits;
    l.warp_barriers[w]->arrive_and_wait();
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}
// Each rounded on its own: the emulation is compiled with -ffp-contract=off, so nothing becomes an FMA.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
template <class T>
inline T min(T a, T b) {
    return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
    return a < b ? b : a;
}
