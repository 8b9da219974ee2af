//! Probing CUDA's libraries before any call into them: cudarc loads them lazily and panics when one is
//! missing, so `Gpu::open` first tries to load each (the driver, NVRTC, cuBLAS, cuBLASLt, in that order)
//! and turns the first that is missing into `CudaError::MissingLibrary`, with the file names tried and
//! what to install.

use crate::error::CudaError;

/// One of the CUDA libraries the GPU path loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Library {
    /// The driver API (libcuda), installed with the NVIDIA driver.
    Driver,
    /// The run-time compiler (libnvrtc).
    Nvrtc,
    /// cuBLAS (libcublas).
    Cublas,
    /// cuBLASLt (libcublasLt).
    CublasLt,
}

impl Library {
    /// Every library, in the order they are probed.
    pub const ALL: [Library; 4] = [Library::Driver, Library::Nvrtc, Library::Cublas, Library::CublasLt];

    /// The name cudarc builds file names from.
    fn stem(self) -> &'static str {
        match self {
            Library::Driver => "cuda",
            Library::Nvrtc => "nvrtc",
            Library::Cublas => "cublas",
            Library::CublasLt => "cublasLt",
        }
    }

    /// Its name in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Library::Driver => "the NVIDIA driver's CUDA library (libcuda)",
            Library::Nvrtc => "CUDA's run-time compiler NVRTC (libnvrtc)",
            Library::Cublas => "cuBLAS (libcublas)",
            Library::CublasLt => "cuBLASLt (libcublasLt)",
        }
    }

    /// What to install.
    pub fn hint(self) -> &'static str {
        match self {
            Library::Driver => "this needs a machine with an NVIDIA GPU and its driver (CUDA 13.0 or newer); `lora gpu info` on such a machine says what it sees",
            Library::Nvrtc => "install NVRTC of the driver's CUDA version, e.g. `pip install nvidia-cuda-nvrtc==13.0.88` and add its nvidia/cu13/lib to LD_LIBRARY_PATH, or the CUDA toolkit's lib64",
            Library::Cublas | Library::CublasLt => "install cuBLAS, e.g. `pip install nvidia-cublas` and add its nvidia/cu13/lib to LD_LIBRARY_PATH, or the CUDA toolkit's lib64",
        }
    }

    /// Whether the library loads here.
    fn present(self) -> bool {
        // SAFETY: each probe only tries to load the library by its known names (running the library's own
        // initialisers, which is what loading it for use would do anyway) and drops it; no symbol is called.
        unsafe {
            match self {
                Library::Driver => cudarc::driver::sys::is_culib_present(),
                Library::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Library::Cublas => cudarc::cublas::sys::is_culib_present(),
                Library::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
            }
        }
    }
}

impl std::fmt::Display for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// The file names tried for a library (cudarc's list, without repeats, Linux's first).
pub fn looked_for(library: Library) -> Vec<String> {
    let mut names = Vec::new();
    for n in cudarc::get_lib_name_candidates(library.stem()) {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    // Linux's names (libX.so, libX.so.N) first: they are the ones a reader here looks for.
    let linux = format!("lib{}.so", library.stem());
    names.sort_by_key(|n| !n.starts_with(&linux));
    names
}

/// Probes every library in order; the first missing one is the error.
pub fn probe_libraries() -> Result<(), CudaError> {
    probe_libraries_with(|l| l.present())
}

/// [`probe_libraries`] with another test of presence (for tests of the errors).
pub fn probe_libraries_with(present: impl Fn(Library) -> bool) -> Result<(), CudaError> {
    probe_some(&Library::ALL, present)
}

/// Probes `libraries` in order.
pub(crate) fn probe_some(libraries: &[Library], present: impl Fn(Library) -> bool) -> Result<(), CudaError> {
    match libraries.iter().find(|&&l| !present(l)) {
        None => Ok(()),
        Some(&library) => Err(CudaError::MissingLibrary { library, looked_for: looked_for(library), hint: library.hint() }),
    }
}

/// Probes `libraries` in order with the real loader.
pub(crate) fn probe_real(libraries: &[Library]) -> Result<(), CudaError> {
    probe_some(libraries, |l| l.present())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_driver_is_the_first_error_and_says_what_was_looked_for_and_what_to_install() {
        let e = probe_libraries_with(|_| false).unwrap_err();
        let CudaError::MissingLibrary { library, ref looked_for, .. } = e else { panic!("{e}") };
        assert_eq!(library, Library::Driver);
        assert!(looked_for.iter().any(|n| n == "libcuda.so"), "{looked_for:?}");
        let msg = e.to_string();
        assert!(msg.contains("libcuda") && msg.contains("LD_LIBRARY_PATH") && msg.contains("NVIDIA GPU and its driver"), "{msg}");
    }

    #[test]
    fn libraries_are_probed_in_order_driver_nvrtc_cublas_cublaslt() {
        for (i, &want) in Library::ALL.iter().enumerate() {
            let e = probe_libraries_with(|l| Library::ALL[..i].contains(&l)).unwrap_err();
            assert!(matches!(e, CudaError::MissingLibrary { library, .. } if library == want), "{e}");
        }
        assert!(probe_libraries_with(|_| true).is_ok());
        let msg = probe_libraries_with(|l| l != Library::Nvrtc).unwrap_err().to_string();
        assert!(msg.contains("libnvrtc") && msg.contains("nvidia-cuda-nvrtc==13.0.88"), "{msg}");
    }
}
