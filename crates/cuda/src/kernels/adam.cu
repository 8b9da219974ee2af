// Adam with decoupled weight decay, in place over (theta, g, m, v), n values: lora-optim's kernel
// (crates/optim/src/adam.rs), the same f32 operations in the same order, each one rounded on its own
// (the _rn intrinsics are never fused into an FMA), so the same bits:
//   g' = g * grad_scale
//   m  = m * b1 + g' * (1 - b1)            v = v * b2 + (g' * g') * (1 - b2)
//   theta = theta * decay - ((m * scale_m) / (sqrt(v * scale_v) + eps)) * lr

extern "C" __global__ void adam_step(float* __restrict__ theta, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v, u64 n,
                                     float b1, float one_minus_b1, float b2, float one_minus_b2, float scale_m, float scale_v, float eps,
                                     float lr, float decay, float grad_scale) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float gi = __fmul_rn(g[i], grad_scale);
        const float nm = __fadd_rn(__fmul_rn(m[i], b1), __fmul_rn(gi, one_minus_b1));
        const float nv = __fadd_rn(__fmul_rn(v[i], b2), __fmul_rn(__fmul_rn(gi, gi), one_minus_b2));
        const float adjusted = __fdiv_rn(__fmul_rn(nm, scale_m), __fadd_rn(__fsqrt_rn(__fmul_rn(nv, scale_v)), eps));
        theta[i] = __fsub_rn(__fmul_rn(theta[i], decay), __fmul_rn(adjusted, lr));
        m[i] = nm;
        v[i] = nv;
    }
}
