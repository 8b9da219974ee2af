// Cross-entropy of logit rows against targets, transformers' ignore index, forward and backward in one pass:
//   loss[r] = logsumexp(z_r) - z_r[t_r]                         (0 for an ignored row)
//   dz[r, j] = grad_scale * (softmax(z_r)_j - [j == t_r])       (0 for an ignored row)
// A target outside the vocabulary (other than the ignore index) gives NaN loss and gradient for its row,
// never a read out of bounds.
// The host passes grad_scale = dloss / (rows kept) for a mean loss. dz may be z itself (in place): each
// value is read by the thread that writes it, after the row's reductions. One block per row.

extern "C" __global__ void cross_entropy(const float* z, const u32* __restrict__ targets, float* __restrict__ loss, float* dz, u32 rows,
                                         u32 vocab, u32 ignore, float grad_scale) {
    __shared__ float scratch[32];
    const u32 r = blockIdx.x;
    if (r >= rows) return;  // the same for the whole block
    const float* zr = z + (u64)r * vocab;
    const u32 t = targets[r];
    const bool kept = t != ignore;
    const bool bad = kept && t >= vocab;
    const float zt = kept && !bad ? zr[t] : 0.0f;
    float m = -LORA_INF;
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, zr[j]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(zr[j] - m);
    s = block_sum(s, scratch);
    const float lse = m + logf(s);
    if (threadIdx.x == 0) loss[r] = bad ? LORA_NAN : kept ? lse - zt : 0.0f;
    if (dz == 0) return;
    float* dr = dz + (u64)r * vocab;
    for (u32 j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float p = expf(zr[j] - lse);
        dr[j] = bad ? LORA_NAN : kept ? grad_scale * (p - (j == t ? 1.0f : 0.0f)) : 0.0f;
    }
}
