//! NVRTC compilation of the kernel files for a GPU architecture (a virtual `compute_XY`: the driver
//! finishes PTX for the exact chip when it loads it), with a process-wide cache of PTX per (file, arch).
//! A file NVRTC rejects is an error naming the file and carrying NVRTC's log. NVRTC is probed first (a
//! missing library is `MissingLibrary`, not cudarc's panic).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

use crate::error::{CudaError, CudaVersion};
use crate::probe::{probe_real, Library};
use crate::sources::{KernelFile, FILES};

/// A GPU architecture, as compute capability major.minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Arch {
    /// Major (9 for Hopper).
    pub major: u32,
    /// Minor.
    pub minor: u32,
}

impl Arch {
    /// The H200's (and H100's): compute capability 9.0, `compute_90`.
    pub const SM90: Arch = Arch { major: 9, minor: 0 };

    /// NVRTC's target name, e.g. `compute_90`.
    pub fn target(self) -> String {
        format!("compute_{}{}", self.major, self.minor)
    }
}

impl Default for Arch {
    fn default() -> Arch {
        Arch::SM90
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.target())
    }
}

/// The options every file is compiled with: the target, C++17, IEEE division and square root (NVRTC's
/// default, stated), no flush of denormals.
fn options(arch: Arch) -> Vec<String> {
    vec![
        format!("--gpu-architecture={}", arch.target()),
        "--std=c++17".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--ftz=false".into(),
    ]
}

/// NVRTC's version (probing the library first).
pub fn nvrtc_version() -> Result<CudaVersion, CudaError> {
    probe_real(&[Library::Nvrtc])?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (probed above); nvrtcVersion writes two ints through valid pointers.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Nvrtc { call: "nvrtcVersion", file: "-", message: format!("{rc:?}") });
    }
    Ok(CudaVersion { major: major.max(0) as u32, minor: minor.max(0) as u32 })
}

type Cache = Mutex<HashMap<(&'static str, Arch), Arc<str>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The PTX of `file` for `arch`, compiled once per process. Checks that every entry the file declares is
/// in the PTX.
pub fn compile(file: &'static KernelFile, arch: Arch) -> Result<Arc<str>, CudaError> {
    if let Some(p) = cache().lock().map_err(|_| CudaError::Backend("the PTX cache's lock is poisoned".into()))?.get(&(file.file, arch)) {
        return Ok(p.clone());
    }
    probe_real(&[Library::Nvrtc])?;
    let opts = CompileOptions { options: options(arch), name: Some(file.file.to_string()), ..Default::default() };
    let source = file.full_source();
    let compiled = std::panic::catch_unwind(|| compile_ptx_with_opts(&source, opts))
        .map_err(|p| CudaError::Panicked { during: "NVRTC compilation", message: panic_text(&p) })?;
    let ptx = compiled.map_err(|e| match e {
        CompileError::CompileError { log, .. } => {
            CudaError::Compile { file: file.file, arch: arch.target(), log: log.to_string_lossy().into_owned() }
        }
        CompileError::CreationError(e) => CudaError::Nvrtc { call: "nvrtcCreateProgram", file: file.file, message: format!("{:?}", e.0) },
        CompileError::GetLogError(e) => CudaError::Nvrtc { call: "nvrtcGetProgramLog", file: file.file, message: format!("{:?}", e.0) },
        CompileError::GetPtxError(e) => CudaError::Nvrtc { call: "nvrtcGetPTX", file: file.file, message: format!("{:?}", e.0) },
        CompileError::DestroyError(e) => CudaError::Nvrtc { call: "nvrtcDestroyProgram", file: file.file, message: format!("{:?}", e.0) },
    })?;
    let text: Arc<str> = ptx.to_src().trim_end_matches('\0').into();
    for e in file.entries {
        if !has_entry(&text, e) {
            return Err(CudaError::Compile { file: file.file, arch: arch.target(), log: format!("the PTX has no entry point {e}") });
        }
    }
    cache().lock().map_err(|_| CudaError::Backend("the PTX cache's lock is poisoned".into()))?.insert((file.file, arch), text.clone());
    Ok(text)
}

/// Whether PTX text defines kernel `name` (`.entry name(`).
pub fn has_entry(ptx: &str, name: &str) -> bool {
    ptx.lines().any(|l| {
        l.trim_start()
            .strip_prefix(".visible .entry ")
            .or_else(|| l.trim_start().strip_prefix(".entry "))
            .is_some_and(|r| r.starts_with(name) && r[name.len()..].starts_with('('))
    })
}

/// Every kernel file compiled for `arch`: (file, PTX), in file order; the first failure is the error.
pub fn compile_all(arch: Arch) -> Result<Vec<(&'static KernelFile, Arc<str>)>, CudaError> {
    FILES.iter().map(|f| compile(f, arch).map(|p| (f, p))).collect()
}

/// A panic's message.
pub(crate) fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_the_virtual_target() {
        assert_eq!(Arch::SM90.target(), "compute_90");
        assert_eq!(Arch { major: 12, minor: 0 }.to_string(), "compute_120");
        assert!(options(Arch::SM90).contains(&"--gpu-architecture=compute_90".to_string()));
    }

    #[test]
    fn ptx_entry_points_are_found_by_exact_name() {
        let ptx = ".version 9.0\n.target sm_90\n.visible .entry rope_fwd(\n\t.param .u64 a\n)\n.visible .entry attn_fwd_hd64(\n";
        assert!(has_entry(ptx, "rope_fwd"));
        assert!(has_entry(ptx, "attn_fwd_hd64"));
        assert!(!has_entry(ptx, "rope"));
        assert!(!has_entry(ptx, "rope_bwd"));
        assert!(!has_entry(ptx, "attn_fwd_hd6"));
    }
}
