// Causal grouped-query attention, flash-style (the probabilities are never stored): one thread per query
// (forward, dq) or per key (dk, dv), keys or queries streamed through shared memory in tiles. A first,
// correct version: no tensor cores, scores on CUDA cores; chosen because it is whole in one kernel (the
// CPU emulation checks all of it, forward and backward) and needs O(T) memory, like crates/lm's fused CPU
// attention (the forward keeps each query's log-sum-exp, the backward recomputes the probabilities).
//
// Layouts (row-major): q (B, Tq, NH, HD), k and v (B, Tk, NKV, HD), o and dq like q, dk and dv like k,
// lse and D (B, NH, Tq), all f32. Query head h reads key/value head h / (NH / NKV) (transformers'
// repeat_kv). Query i sits at position i + Tk - Tq and sees keys j <= i + Tk - Tq (Tq = Tk in training;
// Tq < Tk when decoding after a KV cache). scale = 1/sqrt(HD), folded into q.
//   forward: s_ij = scale q_i.k_j, p_ij = exp(s_ij - lse_i), o_i = sum_j p_ij v_j, lse_i = log sum_j exp(s_ij)
//   backward: D_i = do_i.o_i; dp_ij = do_i.v_j; ds_ij = p_ij (dp_ij - D_i);
//             dq_i = scale sum_j ds_ij k_j; dk_j = scale sum_i ds_ij q_i; dv_j = sum_i p_ij do_i

#define ATTN_KT 32     // keys per tile (forward, dq)
#define ATTN_QT 32     // queries per tile (dk, dv)
#define ATTN_BLOCK 64  // threads per block (every attention kernel is launched with it)

// grid (ceil(Tq / ATTN_BLOCK), NH, B), ATTN_BLOCK threads; one thread per query.
template <int HD>
__device__ __forceinline__ void attn_fwd_impl(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                              float* __restrict__ o, float* __restrict__ lse, u32 tq, u32 tk, u32 nh, u32 nkv, float scale) {
    __shared__ float ks[ATTN_KT][HD];
    __shared__ float vs[ATTN_KT][HD];
    __shared__ float ss[ATTN_KT][ATTN_BLOCK];  // each thread's scores of the tile
    const u32 b = blockIdx.z, h = blockIdx.y, kvh = h / (nh / nkv);
    const u32 i0 = blockIdx.x * blockDim.x, i = i0 + threadIdx.x;
    const bool active = i < tq;
    const u32 off = tk - tq;
    float qr[HD], acc[HD];
    const float* qp = q + (((u64)b * tq + (active ? i : 0)) * nh + h) * HD;
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        qr[d] = active ? qp[d] * scale : 0.0f;
        acc[d] = 0.0f;
    }
    float m = -LORA_INF, l = 0.0f;
    const u32 kend = min(i0 + blockDim.x, tq) + off;  // keys the block's last query sees, plus one
    for (u32 j0 = 0; j0 < kend; j0 += ATTN_KT) {
        __syncthreads();
        for (u32 e = threadIdx.x; e < ATTN_KT * HD; e += blockDim.x) {
            const u32 jj = e / HD, d = e % HD, j = j0 + jj;
            const u64 src = (((u64)b * tk + j) * nkv + kvh) * HD + d;
            ks[jj][d] = j < tk ? k[src] : 0.0f;
            vs[jj][d] = j < tk ? v[src] : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
        float tmax = -LORA_INF;
        for (int jj = 0; jj < ATTN_KT; ++jj) {
            float dot = 0.0f;
#pragma unroll
            for (int d = 0; d < HD; ++d) dot += qr[d] * ks[jj][d];
            const float sj = j0 + jj <= i + off ? dot : -LORA_INF;
            ss[jj][threadIdx.x] = sj;
            tmax = fmaxf(tmax, sj);
        }
        if (tmax == -LORA_INF) continue;
        const float mn = fmaxf(m, tmax);
        const float corr = expf(m - mn);
        l *= corr;
#pragma unroll
        for (int d = 0; d < HD; ++d) acc[d] *= corr;
        for (int jj = 0; jj < ATTN_KT; ++jj) {
            const float p = expf(ss[jj][threadIdx.x] - mn);
            l += p;
#pragma unroll
            for (int d = 0; d < HD; ++d) acc[d] += p * vs[jj][d];
        }
        m = mn;
    }
    if (!active) return;
    float* op = o + (((u64)b * tq + i) * nh + h) * HD;
    const float inv = 1.0f / l;
#pragma unroll
    for (int d = 0; d < HD; ++d) op[d] = acc[d] * inv;
    lse[((u64)b * nh + h) * tq + i] = m + logf(l);
}

// D (B, NH, Tq) = rowsum(do * o); one thread per (b, i, h).
extern "C" __global__ void attn_bwd_dot(const float* __restrict__ o, const float* __restrict__ dout, float* __restrict__ dsum, u32 batch,
                                        u32 tq, u32 nh, u32 hd) {
    const u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (u64)batch * tq * nh) return;
    const u32 h = (u32)(t % nh);
    const u64 bi = t / nh;
    const u32 i = (u32)(bi % tq), b = (u32)(bi / tq);
    const float* op = o + t * hd;
    const float* dp = dout + t * hd;
    float s = 0.0f;
    for (u32 d = 0; d < hd; ++d) s += op[d] * dp[d];
    dsum[((u64)b * nh + h) * tq + i] = s;
}

// dq; grid (ceil(Tq / ATTN_BLOCK), NH, B), ATTN_BLOCK threads; one thread per query.
template <int HD>
__device__ __forceinline__ void attn_bwd_dq_impl(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                                 const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dsum,
                                                 float* __restrict__ dq, u32 tq, u32 tk, u32 nh, u32 nkv, float scale) {
    __shared__ float ks[ATTN_KT][HD];
    __shared__ float vs[ATTN_KT][HD];
    const u32 b = blockIdx.z, h = blockIdx.y, kvh = h / (nh / nkv);
    const u32 i0 = blockIdx.x * blockDim.x, i = i0 + threadIdx.x;
    const bool active = i < tq;
    const u32 off = tk - tq;
    const u64 row = (((u64)b * tq + (active ? i : 0)) * nh + h) * HD;
    float qr[HD], dor[HD], acc[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        qr[d] = active ? q[row + d] * scale : 0.0f;
        dor[d] = active ? dout[row + d] : 0.0f;
        acc[d] = 0.0f;
    }
    const u64 li = ((u64)b * nh + h) * tq + (active ? i : 0);
    const float l = active ? lse[li] : 0.0f, dd = active ? dsum[li] : 0.0f;
    const u32 kend = min(i0 + blockDim.x, tq) + off;
    for (u32 j0 = 0; j0 < kend; j0 += ATTN_KT) {
        __syncthreads();
        for (u32 e = threadIdx.x; e < ATTN_KT * HD; e += blockDim.x) {
            const u32 jj = e / HD, d = e % HD, j = j0 + jj;
            const u64 src = (((u64)b * tk + j) * nkv + kvh) * HD + d;
            ks[jj][d] = j < tk ? k[src] : 0.0f;
            vs[jj][d] = j < tk ? v[src] : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
        for (int jj = 0; jj < ATTN_KT; ++jj) {
            if (j0 + jj > i + off) break;
            float s = 0.0f, dp = 0.0f;
#pragma unroll
            for (int d = 0; d < HD; ++d) {
                s += qr[d] * ks[jj][d];
                dp += dor[d] * vs[jj][d];
            }
            const float ds = expf(s - l) * (dp - dd);
#pragma unroll
            for (int d = 0; d < HD; ++d) acc[d] += ds * ks[jj][d];
        }
    }
    if (!active) return;
#pragma unroll
    for (int d = 0; d < HD; ++d) dq[row + d] = acc[d] * scale;
}

// dk, dv; grid (ceil(Tk / ATTN_BLOCK), NKV, B), ATTN_BLOCK threads; one thread per key, over the NH / NKV query heads that read it.
template <int HD>
__device__ __forceinline__ void attn_bwd_dkv_impl(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                                  const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dsum,
                                                  float* __restrict__ dk, float* __restrict__ dv, u32 tq, u32 tk, u32 nh, u32 nkv, float scale) {
    __shared__ float qs[ATTN_QT][HD];
    __shared__ float dos[ATTN_QT][HD];
    __shared__ float ls[ATTN_QT];
    __shared__ float ds_[ATTN_QT];
    const u32 b = blockIdx.z, kvh = blockIdx.y, group = nh / nkv;
    const u32 j0 = blockIdx.x * blockDim.x, j = j0 + threadIdx.x;
    const bool active = j < tk;
    const u32 off = tk - tq;
    const u64 row = (((u64)b * tk + (active ? j : 0)) * nkv + kvh) * HD;
    float kr[HD], vr[HD], dka[HD], dva[HD];
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        kr[d] = active ? k[row + d] : 0.0f;
        vr[d] = active ? v[row + d] : 0.0f;
        dka[d] = 0.0f;
        dva[d] = 0.0f;
    }
    const u32 istart = j0 > off ? j0 - off : 0;  // the first query that sees the block's first key
    for (u32 h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (u32 i0 = istart; i0 < tq; i0 += ATTN_QT) {
            __syncthreads();
            for (u32 e = threadIdx.x; e < ATTN_QT * HD; e += blockDim.x) {
                const u32 ii = e / HD, d = e % HD, i = i0 + ii;
                const u64 src = (((u64)b * tq + i) * nh + h) * HD + d;
                qs[ii][d] = i < tq ? q[src] * scale : 0.0f;
                dos[ii][d] = i < tq ? dout[src] : 0.0f;
            }
            for (u32 ii = threadIdx.x; ii < ATTN_QT; ii += blockDim.x) {
                const u32 i = i0 + ii;
                const u64 li = ((u64)b * nh + h) * tq + i;
                ls[ii] = i < tq ? lse[li] : 0.0f;
                ds_[ii] = i < tq ? dsum[li] : 0.0f;
            }
            __syncthreads();
            if (!active) continue;
            for (int ii = 0; ii < ATTN_QT; ++ii) {
                const u32 i = i0 + ii;
                if (i >= tq) break;
                if (j > i + off) continue;
                float s = 0.0f, dp = 0.0f;
#pragma unroll
                for (int d = 0; d < HD; ++d) {
                    s += qs[ii][d] * kr[d];
                    dp += dos[ii][d] * vr[d];
                }
                const float p = expf(s - ls[ii]);
                const float ds = p * (dp - ds_[ii]);
#pragma unroll
                for (int d = 0; d < HD; ++d) {
                    dva[d] += p * dos[ii][d];
                    dka[d] += ds * qs[ii][d];
                }
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int d = 0; d < HD; ++d) {
        dk[row + d] = dka[d];
        dv[row + d] = dva[d];
    }
}

#define LORA_ATTN_KERNELS(HD)                                                                                                               \
    extern "C" __global__ void attn_fwd_hd##HD(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,         \
                                               float* __restrict__ o, float* __restrict__ lse, u32 tq, u32 tk, u32 nh, u32 nkv,             \
                                               float scale) {                                                                                 \
        attn_fwd_impl<HD>(q, k, v, o, lse, tq, tk, nh, nkv, scale);                                                                          \
    }                                                                                                                                         \
    extern "C" __global__ void attn_bwd_dq_hd##HD(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,      \
                                                  const float* __restrict__ dout, const float* __restrict__ lse,                             \
                                                  const float* __restrict__ dsum, float* __restrict__ dq, u32 tq, u32 tk, u32 nh, u32 nkv,   \
                                                  float scale) {                                                                              \
        attn_bwd_dq_impl<HD>(q, k, v, dout, lse, dsum, dq, tq, tk, nh, nkv, scale);                                                          \
    }                                                                                                                                         \
    extern "C" __global__ void attn_bwd_dkv_hd##HD(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,     \
                                                   const float* __restrict__ dout, const float* __restrict__ lse,                            \
                                                   const float* __restrict__ dsum, float* __restrict__ dk, float* __restrict__ dv, u32 tq,   \
                                                   u32 tk, u32 nh, u32 nkv, float scale) {                                                   \
        attn_bwd_dkv_impl<HD>(q, k, v, dout, lse, dsum, dk, dv, tq, tk, nh, nkv, scale);                                                     \
    }

LORA_ATTN_KERNELS(32)
LORA_ATTN_KERNELS(64)
LORA_ATTN_KERNELS(128)
