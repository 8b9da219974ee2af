// The kernels of lora-cuda compiled for the CPU (see shim.h), with one C entry point that launches any of
// them by name with cuLaunchKernel's argument convention (an array of pointers to the arguments).
#include "shim.h"

#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>

#include "../src/kernels/common.cuh"
#include "../src/kernels/adam.cu"
#include "../src/kernels/attention.cu"
#include "../src/kernels/cast.cu"
#include "../src/kernels/cross_entropy.cu"
#include "../src/kernels/embedding.cu"
#include "../src/kernels/lora.cu"
#include "../src/kernels/rmsnorm.cu"
#include "../src/kernels/rope.cu"
#include "../src/kernels/swiglu.cu"

namespace emu {
Launch* current = nullptr;
thread_local dim3 thread_idx;
thread_local dim3 block_idx;

// Calls f with its arguments read from params[i] (each a pointer to an argument of the i-th type).
template <class... A, std::size_t... I>
void call(void (*f)(A...), void** params, std::index_sequence<I...>) {
    f(*static_cast<std::remove_reference_t<A>*>(params[I])...);
}
}  // namespace emu

namespace {
// A kernel's address and the function that calls it with its own signature.
struct Entry {
    void* kernel;
    void (*invoke)(void* kernel, void** params);
};

template <class... A>
void invoke_as(void* kernel, void** params) {
    auto f = reinterpret_cast<void (*)(A...)>(kernel);
    emu::call(f, params, std::index_sequence_for<A...>{});
}
template <class... A>
Entry entry(void (*f)(A...)) {
    return Entry{reinterpret_cast<void*>(f), &invoke_as<A...>};
}

#define K(name) {#name, entry(&name)}
const std::unordered_map<std::string, Entry>& table() {
    static const std::unordered_map<std::string, Entry> t = {
        K(cast_bf16_to_f32), K(cast_f32_to_bf16), K(embedding_bf16), K(rmsnorm_fwd), K(rmsnorm_bwd_dx), K(rmsnorm_dw_partial),
        K(sum_chunks), K(rope_fwd), K(rope_bwd), K(swiglu_fwd), K(swiglu_bwd), K(cross_entropy), K(adam_step), K(lora_shrink),
        K(lora_expand), K(attn_bwd_dot), K(attn_fwd_hd32), K(attn_fwd_hd64), K(attn_fwd_hd128), K(attn_bwd_dq_hd32), K(attn_bwd_dq_hd64),
        K(attn_bwd_dq_hd128), K(attn_bwd_dkv_hd32), K(attn_bwd_dkv_hd64), K(attn_bwd_dkv_hd128),
    };
    return t;
}
#undef K

std::mutex launch_lock;
}  // namespace

// The number of kernels, and the name of the i-th (for the tests to check the list against lora-cuda's).
extern "C" unsigned lora_emu_kernel_count() { return (unsigned)table().size(); }
extern "C" const char* lora_emu_kernel_name(unsigned i) {
    auto it = table().begin();
    for (unsigned k = 0; k < i && it != table().end(); ++k) ++it;
    return it == table().end() ? nullptr : it->first.c_str();
}

// Runs kernel `name` over grid x block with `params` (cuLaunchKernel's convention). Returns 0, or -1 for an
// unknown kernel, -2 for an empty or too large block (over 1024 threads).
extern "C" int lora_emu_launch(const char* name, const unsigned* grid, const unsigned* block, void** params) {
    const auto& t = table();
    auto it = t.find(name);
    if (it == t.end()) return -1;
    const unsigned nthreads = block[0] * block[1] * block[2];
    if (nthreads == 0 || nthreads > 1024) return -2;
    std::lock_guard<std::mutex> guard(launch_lock);
    emu::Launch l;
    l.grid = dim3{grid[0], grid[1], grid[2]};
    l.block = dim3{block[0], block[1], block[2]};
    l.nthreads = nthreads;
    l.block_barrier = std::make_unique<std::barrier<>>((std::ptrdiff_t)nthreads);
    for (unsigned w = 0; w * 32 < nthreads; ++w)
        l.warp_barriers.push_back(std::make_unique<std::barrier<>>((std::ptrdiff_t)std::min(32u, nthreads - w * 32)));
    l.exchange.assign(nthreads, 0);
    emu::current = &l;
    const Entry e = it->second;
    std::vector<std::thread> threads;
    threads.reserve(nthreads);
    for (unsigned tz = 0; tz < block[2]; ++tz)
        for (unsigned ty = 0; ty < block[1]; ++ty)
            for (unsigned tx = 0; tx < block[0]; ++tx)
                threads.emplace_back([&l, e, params, tx, ty, tz] {
                    emu::thread_idx = dim3{tx, ty, tz};
                    for (unsigned bz = 0; bz < l.grid.z; ++bz)
                        for (unsigned by = 0; by < l.grid.y; ++by)
                            for (unsigned bx = 0; bx < l.grid.x; ++bx) {
                                emu::block_idx = dim3{bx, by, bz};
                                e.invoke(e.kernel, params);
                                l.block_barrier->arrive_and_wait();  // the block ends before the next one starts
                            }
                });
    for (auto& th : threads) th.join();
    emu::current = nullptr;
    return 0;
}
