//! The kernels' CUDA C sources (`src/kernels/*.cu`, built into the binary) and the entry points each
//! defines. `common.cuh` (bf16 helpers, warp and block reductions) is prepended to each file, followed by a
//! `#line` directive, so NVRTC's messages name the kernel file and its own line numbers.

/// One kernel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelFile {
    /// File name (in `src/kernels/`).
    pub file: &'static str,
    /// Its text.
    pub source: &'static str,
    /// The `extern "C"` kernels it defines.
    pub entries: &'static [&'static str],
}

/// The prelude of every kernel file.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// Every kernel file.
pub const FILES: &[KernelFile] = &[
    KernelFile { file: "cast.cu", source: include_str!("kernels/cast.cu"), entries: &["cast_bf16_to_f32", "cast_f32_to_bf16"] },
    KernelFile { file: "embedding.cu", source: include_str!("kernels/embedding.cu"), entries: &["embedding_bf16"] },
    KernelFile {
        file: "rmsnorm.cu",
        source: include_str!("kernels/rmsnorm.cu"),
        entries: &["rmsnorm_fwd", "rmsnorm_bwd_dx", "rmsnorm_dw_partial", "sum_chunks"],
    },
    KernelFile { file: "rope.cu", source: include_str!("kernels/rope.cu"), entries: &["rope_fwd", "rope_bwd"] },
    KernelFile { file: "swiglu.cu", source: include_str!("kernels/swiglu.cu"), entries: &["swiglu_fwd", "swiglu_bwd"] },
    KernelFile {
        file: "attention.cu",
        source: include_str!("kernels/attention.cu"),
        entries: &[
            "attn_bwd_dot",
            "attn_fwd_hd32",
            "attn_fwd_hd64",
            "attn_fwd_hd128",
            "attn_bwd_dq_hd32",
            "attn_bwd_dq_hd64",
            "attn_bwd_dq_hd128",
            "attn_bwd_dkv_hd32",
            "attn_bwd_dkv_hd64",
            "attn_bwd_dkv_hd128",
        ],
    },
    KernelFile { file: "cross_entropy.cu", source: include_str!("kernels/cross_entropy.cu"), entries: &["cross_entropy"] },
    KernelFile { file: "adam.cu", source: include_str!("kernels/adam.cu"), entries: &["adam_step"] },
    KernelFile { file: "lora.cu", source: include_str!("kernels/lora.cu"), entries: &["lora_shrink", "lora_expand"] },
];

impl KernelFile {
    /// The text NVRTC compiles: the prelude, then the file under its own name and line numbers.
    pub fn full_source(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}\"\n{}", self.file, self.source)
    }
}

/// The file that defines kernel `entry`.
pub fn file_of(entry: &str) -> Option<&'static KernelFile> {
    FILES.iter().find(|f| f.entries.contains(&entry))
}

/// Every kernel name, in file order.
pub fn all_entries() -> impl Iterator<Item = &'static str> {
    FILES.iter().flat_map(|f| f.entries.iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_are_unique_and_each_plain_one_is_defined_in_its_file() {
        let names: Vec<_> = all_entries().collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "a kernel name appears twice");
        for f in FILES {
            for e in f.entries {
                // The attention kernels are stamped out by a macro (name##HD): their names are checked in the
                // PTX by the NVRTC test and against the CPU emulation's table.
                if !e.starts_with("attn_") || *e == "attn_bwd_dot" {
                    assert!(f.source.contains(&format!("void {e}(")), "{e} not defined in {}", f.file);
                }
            }
        }
    }
}
