//! `LORA_KERNELS` caps the instructions the kernels use, so the paths of CPUs without AVX-512 (AVX2) or
//! without AVX2 (portable: the gemm crate) run, and are tested, on a machine that has them (`.ci/run` runs every test
//! under each cap).

use std::process::Command;

use lora_kernels::Simd;

#[test]
fn lora_kernels_caps_the_instruction_set_and_nothing_else_raises_it() {
    if std::env::var_os("LORA_KERNELS_CHILD").is_some() {
        println!("LEVEL={:?}", lora_kernels::simd());
        return;
    }
    let level_under = |cap: &str| -> String {
        let o = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "lora_kernels_caps_the_instruction_set_and_nothing_else_raises_it", "--nocapture"])
            .env("LORA_KERNELS", cap)
            .env("LORA_KERNELS_CHILD", "1")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.lines().find_map(|l| l.strip_prefix("LEVEL=").map(String::from)).unwrap_or_else(|| panic!("no level printed: {out}"))
    };
    assert_eq!(level_under("portable"), "Portable");
    let avx2 = level_under("avx2");
    // An ARM CPU stays at NEON under an x86 cap (a cap only lowers the level).
    assert!(["Avx2", "Neon", "Portable"].contains(&avx2.as_str()), "{avx2}");
    // "auto" and an unknown value give what the CPU has, the same as no cap at all.
    let full = level_under("auto");
    assert_eq!(level_under("sse9"), full);
    assert!(["Avx512", "Avx2", "Neon", "Portable"].contains(&full.as_str()));
    // This process: never above what its own cap allows.
    let cap = match std::env::var("LORA_KERNELS").as_deref() {
        Ok("portable") => Simd::Portable,
        Ok("avx2") => Simd::Avx2,
        _ => Simd::Avx512,
    };
    assert!(lora_kernels::simd() <= cap);
}
