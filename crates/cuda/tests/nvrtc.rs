//! Every kernel file compiled by NVRTC for the H200's architecture (compute_90), as `lora gpu info` does on
//! the GPU: a kernel that does not compile fails here, with NVRTC's log naming the file and line. Needs
//! NVRTC only (no GPU, no driver): .ci/run installs NVRTC 13.0 from PyPI and puts it on LD_LIBRARY_PATH;
//! without it these tests say by name that they skipped — unless LORA_CUDA_REQUIRE_NVRTC is set (.ci/run's
//! NVRTC step sets it), where a missing NVRTC fails them.

use lora_cuda::compile::{compile, compile_all, has_entry, nvrtc_version, Arch};
use lora_cuda::sources::{KernelFile, FILES};
use lora_cuda::CudaError;

fn nvrtc_here(test: &str) -> bool {
    match nvrtc_version() {
        Ok(v) => {
            eprintln!("{test}: NVRTC {v}");
            true
        }
        Err(e) if std::env::var_os("LORA_CUDA_REQUIRE_NVRTC").is_some() => panic!("{test}: LORA_CUDA_REQUIRE_NVRTC is set but {e}"),
        Err(e) => {
            eprintln!("skipped {test}: {e}");
            false
        }
    }
}

#[test]
fn every_kernel_file_compiles_with_nvrtc_for_compute_90_and_defines_its_kernels() {
    if !nvrtc_here("every_kernel_file_compiles_with_nvrtc_for_compute_90_and_defines_its_kernels") {
        return;
    }
    let compiled = compile_all(Arch::SM90).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(compiled.len(), FILES.len());
    for (file, ptx) in compiled {
        assert!(ptx.contains(".target sm_90"), "{}: not compiled for sm_90", file.file);
        for e in file.entries {
            assert!(has_entry(&ptx, e), "{}: no entry {e}", file.file);
        }
        println!("{:<18} {:>8} bytes of PTX, kernels {:?}", file.file, ptx.len(), file.entries);
    }
}

static BROKEN: KernelFile = KernelFile {
    file: "broken.cu",
    source: "extern \"C\" __global__ void broken(float* x) {\n    x[0] = undefined_name;\n}\n",
    entries: &["broken"],
};

#[test]
fn a_kernel_that_does_not_compile_is_an_error_naming_its_file_with_nvrtcs_log() {
    if !nvrtc_here("a_kernel_that_does_not_compile_is_an_error_naming_its_file_with_nvrtcs_log") {
        return;
    }
    let e = compile(&BROKEN, Arch::SM90).unwrap_err();
    let CudaError::Compile { file, ref arch, ref log } = e else { panic!("{e}") };
    assert_eq!((file, arch.as_str()), ("broken.cu", "compute_90"));
    // The #line directive after the prelude makes NVRTC name the file's own line 2.
    assert!(log.contains("broken.cu(2)") && log.contains("undefined_name"), "{log}");
    assert!(e.to_string().starts_with("NVRTC could not compile broken.cu for compute_90"), "{e}");
}
