//! `lora gpu info` and `lora gpu check`: what a CUDA device and its libraries are, and every CUDA kernel
//! of lora-cuda run on it against the CPU references, with the cuBLASLt bf16 matrix rate and each kernel's
//! time at a 1B model's sizes. On a machine without a usable GPU both fail at once with the error saying
//! what is missing (the driver library, NVRTC, cuBLAS, no device).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lora_cuda::check::{run_all, CheckOutcome};
use lora_cuda::{check_gemm, lm_gemm_shapes, time_gemms, time_kernels, DeviceSpec, Gpu, LtGemm};
use serde_json::json;

use crate::common::{check_outputs, write_json, Out};

/// `lora gpu`.
#[derive(Debug, Args)]
pub struct GpuArgs {
    #[command(subcommand)]
    pub command: GpuCommand,
}

#[derive(Debug, Subcommand)]
pub enum GpuCommand {
    /// The device (name, memory, compute capability), the driver's and NVRTC's CUDA versions, and every
    /// CUDA kernel compiled for the device's architecture.
    Info(GpuInfoArgs),
    /// Every CUDA kernel on random inputs against its CPU reference (each output's tolerance stated),
    /// cuBLASLt's bf16 products against theirs, then the bf16 matrix rate (TFLOP/s) at a 1B Llama's
    /// shapes and 8192³, and each kernel's time at that model's sizes. Exits non-zero if a check fails;
    /// the JSON report is written either way.
    Check(GpuCheckArgs),
}

#[derive(Debug, Args)]
pub struct GpuInfoArgs {
    /// The device: cuda or cuda:N.
    #[arg(long, default_value = "cuda:0")]
    pub device: DeviceSpec,
    /// Also write the facts as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GpuCheckArgs {
    /// The device: cuda or cuda:N.
    #[arg(long, default_value = "cuda:0")]
    pub device: DeviceSpec,
    /// The report: device, every comparison, every timing.
    #[arg(long, value_name = "FILE")]
    pub json: PathBuf,
    /// Timed repetitions per product and kernel (the median is reported).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub reps: u32,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Only the correctness checks (no timings).
    #[arg(long)]
    pub no_timing: bool,
}

pub fn run(a: GpuArgs) -> Result<()> {
    match a.command {
        GpuCommand::Info(a) => info(a),
        GpuCommand::Check(a) => check(a),
    }
}

fn ordinal(d: DeviceSpec) -> Result<usize> {
    match d {
        DeviceSpec::Cuda(n) => Ok(n),
        DeviceSpec::Cpu => bail!("--device cpu: lora gpu needs a CUDA device (--device cuda or cuda:N)"),
    }
}

/// Opens the device and compiles and loads every kernel, printing as it goes.
fn open(device: DeviceSpec) -> Result<(Gpu, serde_json::Value)> {
    let n = ordinal(device)?;
    let mut gpu = Gpu::open(n).with_context(|| format!("opening CUDA device {n}"))?;
    let i = gpu.info().clone();
    println!("device {}: {} (compute capability {}, {} multiprocessors)", i.ordinal, i.name, i.compute_capability, i.multiprocessors);
    println!("memory: {} MiB, {} MiB free", i.total_memory_mib, i.free_memory_mib);
    println!("driver: CUDA {}; NVRTC: CUDA {}; cuBLASLt: {}; devices seen: {}", i.driver_cuda, i.nvrtc, i.cublaslt_version, i.device_count);
    let t0 = Instant::now();
    let files = gpu.load_kernels().with_context(|| format!("compiling the kernels for {}", i.arch))?;
    for f in &files {
        println!("compiled {:<17} for {} ({:>7} bytes of PTX, {:.2} s): {}", f.file, i.arch, f.ptx_bytes, f.seconds, f.kernels.join(", "));
    }
    println!(
        "{} kernels in {} files compiled and loaded in {:.2} s",
        files.iter().map(|f| f.kernels.len()).sum::<usize>(),
        files.len(),
        t0.elapsed().as_secs_f64()
    );
    std::io::stdout().flush()?;
    let facts = json!({ "device": i, "kernels": files });
    Ok((gpu, facts))
}

fn info(a: GpuInfoArgs) -> Result<()> {
    check_outputs(&[("--json", a.json.as_deref(), Out::File)])?;
    let (_gpu, facts) = open(a.device)?;
    if let Some(p) = &a.json {
        write_json(p, &facts).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn check(a: GpuCheckArgs) -> Result<()> {
    // Not claimed as an output to remove on failure (check_outputs would): the report is written whole at
    // the end, also when checks fail (it is then the record of what failed); a run that stops earlier
    // writes nothing.
    if a.json.is_dir() {
        bail!("--json {}: is a directory; give a file path", a.json.display());
    }
    let (gpu, facts) = open(a.device)?;
    let mut failed = Vec::new();
    let outcomes: Vec<CheckOutcome> = run_all(&gpu, a.seed);
    for o in &outcomes {
        for c in &o.comparisons {
            println!("{c}");
        }
        if let Some(e) = &o.error {
            println!("FAIL {}: {e}", o.check);
        }
        if !o.passed {
            failed.push(o.check.to_string());
        }
    }
    std::io::stdout().flush()?;
    let lt = LtGemm::new(&gpu);
    let gemm_checks = match &lt {
        Ok(lt) => check_gemm(&gpu, lt, a.seed).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match &gemm_checks {
        Ok(cs) => {
            for c in cs {
                println!("{c}");
            }
            if cs.iter().any(|c| !c.passed) {
                failed.push("cublaslt".into());
            }
        }
        Err(e) => {
            println!("FAIL cublaslt: {e}");
            failed.push("cublaslt".into());
        }
    }
    std::io::stdout().flush()?;
    let (mut gemm_times, mut kernel_times) = (Vec::new(), Vec::new());
    if !a.no_timing {
        if let Ok(lt) = &lt {
            for (r, (name, _, _)) in time_gemms(&gpu, lt, &lm_gemm_shapes(), a.reps as usize).into_iter().zip(lm_gemm_shapes()) {
                match r {
                    Ok(t) => {
                        println!("gemm {:<40} {:>9.3} ms {:>7.1} TFLOP/s", t.name, t.ms, t.tflops);
                        gemm_times.push(json!(t));
                    }
                    Err(e) => {
                        println!("gemm {name}: {e}");
                        gemm_times.push(json!({ "name": name, "error": e.to_string() }));
                    }
                }
                std::io::stdout().flush()?;
            }
        }
        for r in time_kernels(&gpu, a.reps as usize) {
            match r {
                Ok(t) => {
                    let rate =
                        t.gb_per_s.map(|g| format!("{g:.0} GB/s")).or(t.tflops.map(|f| format!("{f:.1} TFLOP/s"))).unwrap_or_default();
                    println!("kernel {:<58} {:>9.3} ms {rate}", t.name, t.ms);
                    kernel_times.push(json!(t));
                }
                Err(e) => {
                    println!("kernel timing failed: {e}");
                    kernel_times.push(json!({ "error": e.to_string() }));
                }
            }
            std::io::stdout().flush()?;
        }
    }
    let report = json!({
        "device": facts["device"],
        "kernels": facts["kernels"],
        "seed": a.seed,
        "checks": outcomes,
        "cublaslt_checks": match &gemm_checks { Ok(c) => json!(c), Err(e) => json!({ "error": e }) },
        "gemm_timings": gemm_times,
        "kernel_timings": kernel_times,
        "failed": failed,
        "passed": failed.is_empty(),
    });
    write(&a.json, &report)?;
    if !failed.is_empty() {
        bail!("{} check(s) failed: {} (the report is in {})", failed.len(), failed.join(", "), a.json.display());
    }
    println!("every check passed; the report is in {}", a.json.display());
    Ok(())
}

fn write(p: &Path, v: &serde_json::Value) -> Result<()> {
    write_json(p, v).with_context(|| format!("writing {}", p.display()))
}
