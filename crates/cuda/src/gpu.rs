//! `Gpu`: one CUDA device, opened without a panic whatever the machine lacks: the libraries are probed
//! first (driver, NVRTC, cuBLAS, cuBLASLt), then the driver's CUDA version (≥ 13.0, and not older than
//! NVRTC's, whose PTX it must load), the device count, the device's context. `load_kernels` compiles
//! every kernel file for the device's architecture and loads them; `Gpu` is then a [`Backend`] of one
//! stream.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;

use crate::backend::Backend;
use crate::compile::{self, panic_text, Arch};
use crate::error::{CudaError, CudaVersion};
use crate::launch::Launch;
use crate::probe::{probe_real, Library};

/// The oldest CUDA the driver may support: NVRTC 13.0's PTX needs it.
pub const MIN_DRIVER: CudaVersion = CudaVersion { major: 13, minor: 0 };

/// What `lora gpu info` reports of a device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    /// The ordinal opened.
    pub ordinal: usize,
    /// Devices the driver sees.
    pub device_count: usize,
    /// The device's name.
    pub name: String,
    /// Compute capability, e.g. "9.0".
    pub compute_capability: String,
    /// The architecture kernels are compiled for.
    pub arch: Arch,
    /// Streaming multiprocessors.
    pub multiprocessors: i32,
    /// Memory, MiB.
    pub total_memory_mib: u64,
    /// Free memory when opened, MiB.
    pub free_memory_mib: u64,
    /// The CUDA version the driver supports.
    pub driver_cuda: CudaVersion,
    /// NVRTC's CUDA version.
    pub nvrtc: CudaVersion,
    /// cuBLASLt's version number (e.g. 130000 + patch).
    pub cublaslt_version: usize,
}

/// One kernel file compiled and loaded.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadedFile {
    /// The file.
    pub file: &'static str,
    /// Its kernels.
    pub kernels: Vec<&'static str>,
    /// PTX size, bytes.
    pub ptx_bytes: usize,
    /// Seconds to compile (0 when cached) and load.
    pub seconds: f64,
}

/// An opened CUDA device with one stream.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    functions: HashMap<&'static str, CudaFunction>,
}

fn driver_version() -> Result<CudaVersion, CudaError> {
    let mut v = 0;
    // SAFETY: the driver library is present (probed); cuDriverGetVersion writes one int through a valid pointer.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }.result().map_err(|e| CudaError::driver("cuDriverGetVersion", e))?;
    Ok(CudaVersion::from_driver(v))
}

impl Gpu {
    /// Opens device `ordinal`; every failure is a [`CudaError`] saying what is missing or failed.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        // cudarc panics when a symbol is missing from a library that loaded (an older CUDA than its
        // bindings): the probes make that unlikely, and this turns what is left into an error.
        catch_unwind(AssertUnwindSafe(|| Gpu::open_inner(ordinal)))
            .unwrap_or_else(|p| Err(CudaError::Panicked { during: "opening the device", message: panic_text(&*p) }))
    }

    fn open_inner(ordinal: usize) -> Result<Gpu, CudaError> {
        probe_real(&Library::ALL)?;
        cudarc::driver::result::init().map_err(|e| CudaError::driver("cuInit", e))?;
        let driver_cuda = driver_version()?;
        if driver_cuda < MIN_DRIVER {
            return Err(CudaError::DriverTooOld { found: driver_cuda, need: MIN_DRIVER });
        }
        let count = cudarc::driver::result::device::get_count().map_err(|e| CudaError::driver("cuDeviceGetCount", e))?.max(0) as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let nvrtc = compile::nvrtc_version()?;
        if nvrtc > driver_cuda {
            return Err(CudaError::NvrtcNewerThanDriver { nvrtc, driver: driver_cuda });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::driver(format!("cuDevicePrimaryCtxRetain (device {ordinal})"), e))?;
        // SAFETY: this Gpu launches on one stream only, so cudarc's cross-stream event tracking is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let name = ctx.name().map_err(|e| CudaError::driver("cuDeviceGetName", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| CudaError::driver("cuDeviceGetAttribute (compute capability)", e))?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| CudaError::driver("cuDeviceGetAttribute (multiprocessors)", e))?;
        let total = ctx.total_mem().map_err(|e| CudaError::driver("cuDeviceTotalMem", e))?;
        let (free, _) = ctx.mem_get_info().map_err(|e| CudaError::driver("cuMemGetInfo", e))?;
        // SAFETY: cuBLASLt is present (probed); cublasLtGetVersion takes nothing and returns a number.
        let cublaslt_version = unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() };
        let info = DeviceInfo {
            ordinal,
            device_count: count,
            name,
            compute_capability: format!("{major}.{minor}"),
            arch: Arch { major: major.max(0) as u32, minor: minor.max(0) as u32 },
            multiprocessors,
            total_memory_mib: (total / (1 << 20)) as u64,
            free_memory_mib: (free / (1 << 20)) as u64,
            driver_cuda,
            nvrtc,
            cublaslt_version,
        };
        Ok(Gpu { ctx, stream, info, functions: HashMap::new() })
    }

    /// The device's facts.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The stream every launch and copy goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Compiles (NVRTC, for the device's architecture) and loads every kernel file; the first failure is
    /// the error, naming the file.
    pub fn load_kernels(&mut self) -> Result<Vec<LoadedFile>, CudaError> {
        let arch = self.info.arch;
        let mut out = Vec::new();
        for file in crate::sources::FILES {
            let t0 = Instant::now();
            let ptx = compile::compile(file, arch)?;
            let module = catch_unwind(AssertUnwindSafe(|| self.ctx.load_module(Ptx::from_src(ptx.to_string()))))
                .map_err(|p| CudaError::Panicked { during: "loading a module", message: panic_text(&*p) })?
                .map_err(|e| CudaError::driver(format!("cuModuleLoadData ({}, {})", file.file, arch), e))?;
            for &entry in file.entries {
                let f = module
                    .load_function(entry)
                    .map_err(|e| CudaError::driver(format!("cuModuleGetFunction ({entry} in {})", file.file), e))?;
                self.functions.insert(entry, f);
            }
            out.push(LoadedFile {
                file: file.file,
                kernels: file.entries.to_vec(),
                ptx_bytes: ptx.len(),
                seconds: t0.elapsed().as_secs_f64(),
            });
        }
        Ok(out)
    }

    /// Whether kernel `name` is loaded.
    pub fn has_kernel(&self, name: &str) -> bool {
        self.functions.contains_key(name)
    }
}

// SAFETY: buffers are `CudaSlice<u8>` allocations of this context (cudaMalloc'd, 256-byte aligned) whose
// device address is valid for their length while they live; `launch` passes the arguments as given to
// cuLaunchKernel on this Gpu's stream, and every copy is ordered on that stream.
unsafe impl Backend for Gpu {
    type Buffer = CudaSlice<u8>;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.info.ordinal, self.info.name)
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<CudaSlice<u8>, CudaError> {
        self.stream.alloc_zeros::<u8>(bytes).map_err(|e| CudaError::driver(format!("cuMemAlloc ({bytes} bytes)"), e))
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>, CudaError> {
        self.stream.clone_htod(bytes).map_err(|e| CudaError::driver(format!("cuMemcpyHtoD ({} bytes)", bytes.len()), e))
    }

    fn download(&self, buffer: &CudaSlice<u8>, out: &mut [u8]) -> Result<(), CudaError> {
        if out.len() > buffer.len() {
            return Err(CudaError::shape("download", format!("{} bytes asked of a buffer of {}", out.len(), buffer.len())));
        }
        self.stream
            .memcpy_dtoh(&buffer.slice(..out.len()), out)
            .map_err(|e| CudaError::driver(format!("cuMemcpyDtoH ({} bytes)", out.len()), e))?;
        self.synchronize()
    }

    fn address(&self, buffer: &CudaSlice<u8>) -> u64 {
        let (p, _sync) = buffer.device_ptr(&self.stream);
        p
    }

    fn byte_len(&self, buffer: &CudaSlice<u8>) -> usize {
        buffer.len()
    }

    unsafe fn launch(&self, launch: &mut Launch) -> Result<(), CudaError> {
        let f = self.functions.get(launch.kernel).ok_or_else(|| CudaError::UnknownKernel(launch.kernel.to_string()))?;
        let mut params = launch.params();
        let (g, b) = (launch.grid, launch.block);
        // SAFETY: the caller's contract (pointer arguments are live buffers of this Gpu, large enough); the
        // parameter array holds one pointer per argument of the kernel, built by `ops` from its signature.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                (g[0], g[1], g[2]),
                (b[0], b[1], b[2]),
                0,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| CudaError::driver(format!("cuLaunchKernel ({})", launch.kernel), e))
    }

    fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(|e| CudaError::driver("cuStreamSynchronize", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_gpu_without_a_driver_is_an_error_naming_the_driver_library() {
        // SAFETY: only tries to load the library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            eprintln!("skipped opening_a_gpu_without_a_driver_is_an_error_naming_the_driver_library: this machine has libcuda");
            return;
        }
        let e = Gpu::open(0).err().expect("no driver here, yet the device opened");
        assert!(matches!(e, CudaError::MissingLibrary { library: Library::Driver, .. }), "{e}");
        assert!(e.to_string().contains("libcuda"), "{e}");
    }

    #[test]
    fn driver_versions_read_as_major_minor() {
        assert_eq!(CudaVersion::from_driver(13000), CudaVersion { major: 13, minor: 0 });
        assert_eq!(CudaVersion::from_driver(12090).to_string(), "12.9");
        assert!(CudaVersion::from_driver(12090) < MIN_DRIVER);
    }
}
