//! Compiles emu.cpp (the kernels of ../src/kernels with shim.h) for the host, with the C++ compiler the `cc`
//! crate finds. A cross build (target ≠ host: CI's ARM build) skips it: the emulation is for running the
//! kernels' tests here, and lora-cuda's tests then say by name that they skipped.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(lora_cuda_emu)");
    println!("cargo::rerun-if-changed=emu.cpp");
    println!("cargo::rerun-if-changed=shim.h");
    println!("cargo::rerun-if-changed=../src/kernels");
    let (host, target) = (std::env::var("HOST").unwrap_or_default(), std::env::var("TARGET").unwrap_or_default());
    if host != target {
        println!("cargo::warning=lora-cuda-emu: cross build ({host} -> {target}): the CPU emulation of the CUDA kernels is not built");
        return;
    }
    cc::Build::new()
        .cpp(true)
        .file("emu.cpp")
        .std("c++20")
        .opt_level(2)
        // The kernels' arithmetic as written: no a*b + c fused into an FMA (CUDA's __fmul_rn/__fadd_rn promise
        // that too, and lora-optim's Adam is compared bit for bit).
        .flag("-ffp-contract=off")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-pthread")
        .warnings_into_errors(true)
        .compile("lora_cuda_emu");
    println!("cargo::rustc-cfg=lora_cuda_emu");
}
