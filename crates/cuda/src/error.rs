//! `CudaError`: everything that can stop the GPU path, each naming what failed (the library, the driver
//! call, the kernel file, the shape) so a user knows what to install or fix.

use crate::probe::Library;

/// A CUDA version as the driver and NVRTC report it (13.0 = 13000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct CudaVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl CudaVersion {
    /// From the driver's integer (1000 · major + 10 · minor).
    pub fn from_driver(v: i32) -> CudaVersion {
        let v = v.max(0) as u32;
        CudaVersion { major: v / 1000, minor: (v % 1000) / 10 }
    }
}

impl std::fmt::Display for CudaVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Why the GPU path could not run.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A library of CUDA could not be loaded.
    #[error("{} was not found (looked for {} on the loader's path: LD_LIBRARY_PATH, then the system's); {hint}", library.describe(), short_list(looked_for))]
    MissingLibrary {
        /// Which library.
        library: Library,
        /// The file names tried.
        looked_for: Vec<String>,
        /// What to install.
        hint: &'static str,
    },
    /// The ordinal names no device.
    #[error("no CUDA device {ordinal}: the driver sees {count} device(s)")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many the driver sees.
        count: usize,
    },
    /// A driver call failed.
    #[error("{call} failed: {message}")]
    Driver {
        /// The call (and what it was for).
        call: String,
        /// The driver's error.
        message: String,
    },
    /// The driver is older than the CUDA this crate's PTX needs.
    #[error("the NVIDIA driver supports CUDA {found}; lora-cuda needs {need} or newer (update the driver)")]
    DriverTooOld {
        /// What the driver supports.
        found: CudaVersion,
        /// What is needed.
        need: CudaVersion,
    },
    /// NVRTC writes PTX for a newer CUDA than the driver loads.
    #[error("NVRTC is CUDA {nvrtc} but the driver supports CUDA {driver}: the PTX it writes would not load; put an NVRTC of CUDA {driver} first on LD_LIBRARY_PATH (e.g. pip install nvidia-cuda-nvrtc=={driver}.*)")]
    NvrtcNewerThanDriver {
        /// NVRTC's version.
        nvrtc: CudaVersion,
        /// The driver's.
        driver: CudaVersion,
    },
    /// NVRTC rejected a kernel file.
    #[error("NVRTC could not compile {file} for {arch}:\n{log}")]
    Compile {
        /// The kernel file.
        file: &'static str,
        /// The target (compute_90, …).
        arch: String,
        /// NVRTC's log (file:line: error …).
        log: String,
    },
    /// An NVRTC call failed outside compilation proper.
    #[error("NVRTC {call} failed for {file}: {message}")]
    Nvrtc {
        /// The call.
        call: &'static str,
        /// The kernel file.
        file: &'static str,
        /// NVRTC's error.
        message: String,
    },
    /// A cuBLAS(Lt) call failed.
    #[error("{call} failed: {status}")]
    Cublas {
        /// The call.
        call: &'static str,
        /// cuBLAS's status.
        status: String,
    },
    /// Buffers that do not fit the shape given.
    #[error("{op}: {detail}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What does not fit.
        detail: String,
    },
    /// A kernel name no loaded module has.
    #[error("no kernel named {0:?} is loaded")]
    UnknownKernel(String),
    /// A CUDA library panicked inside cudarc (a symbol missing from an old library); caught.
    #[error("the CUDA libraries failed during {during}: {message} (is the driver or a library older than CUDA 13.0?)")]
    Panicked {
        /// What was being done.
        during: &'static str,
        /// The panic's message.
        message: String,
    },
    /// A backend's own failure (the CPU emulation's).
    #[error("{0}")]
    Backend(String),
}

fn short_list(names: &[String]) -> String {
    const SHOWN: usize = 4;
    if names.len() <= SHOWN {
        names.join(", ")
    } else {
        format!("{} and {} other names", names[..SHOWN].join(", "), names.len() - SHOWN)
    }
}

impl CudaError {
    /// A driver error from cudarc, naming the call.
    pub(crate) fn driver(call: impl Into<String>, e: cudarc::driver::DriverError) -> CudaError {
        let message = match e.error_string() {
            Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
            Err(_) => format!("{:?}", e.0),
        };
        CudaError::Driver { call: call.into(), message }
    }

    /// A cuBLASLt error, naming the call.
    pub(crate) fn cublas(call: &'static str, e: cudarc::cublaslt::result::CublasError) -> CudaError {
        CudaError::Cublas { call, status: format!("{:?}", e.0) }
    }

    /// A shape error.
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> CudaError {
        CudaError::Shape { op, detail: detail.into() }
    }
}
