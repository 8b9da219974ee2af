// Embedding gather: out[r, :] = table[ids[r], :] as f32 (the residual stream), table (vocab, hidden) bf16.
// One block per row, threads over the hidden features. An id outside the vocabulary gives a row of NaN (the
// host checks ids before upload; this keeps a bad id visible instead of reading out of bounds).

extern "C" __global__ void embedding_bf16(const u32* __restrict__ ids, const bf16_t* __restrict__ table, float* __restrict__ out,
                                          u32 rows, u32 hidden, u32 vocab) {
    const u32 r = blockIdx.x;
    if (r >= rows) return;
    const u32 id = ids[r];
    float* o = out + (u64)r * hidden;
    if (id >= vocab) {
        for (u32 c = threadIdx.x; c < hidden; c += blockDim.x) o[c] = LORA_NAN;
        return;
    }
    const bf16_t* t = table + (u64)id * hidden;
    for (u32 c = threadIdx.x; c < hidden; c += blockDim.x) o[c] = bf16_to_f32(t[c]);
}
