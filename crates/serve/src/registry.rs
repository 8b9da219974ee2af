//! The adapter registry: names → adapter directories inside one folder, the packed adapters held in
//! memory keyed by their content, and a cap on how many are held (least recently used go back to disk).
//!
//! ```text
//! name ──► Entry { path inside DIR, fingerprint of the content last read }
//! fingerprint = SHA-256(len(config) ‖ adapter_config.json ‖ adapter_model.safetensors)
//! fingerprint ──► Arc<ServedAdapter> (packed for the base; at most `cap` held, LRU evicted)
//! ```
//!
//! A request takes an `Arc` of the adapter it names when it starts and keeps it to the end, so loading,
//! replacing, unloading or evicting never changes or fails a request in flight. Everything held is keyed
//! by content, never by name: a name reloaded with new weights gets a new fingerprint, so it can never be
//! served the old weights, and two names with the same files share one copy.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use lora::{AdapterFiles, PackedAdapter};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Lays out validated adapter files for the served base, or says why they do not fit it.
pub type Packer = Arc<dyn Fn(&AdapterFiles) -> Result<PackedAdapter, String> + Send + Sync>;

/// An adapter held in memory, ready for mixed batches.
#[derive(Debug)]
pub struct ServedAdapter {
    /// SHA-256 of its files (see the module docs).
    pub fingerprint: String,
    /// The packed weights.
    pub packed: PackedAdapter,
    /// Bytes of its two files.
    pub bytes: u64,
}

/// What memory holds for a name.
#[derive(Debug)]
pub enum Lookup {
    /// In memory.
    Held(Arc<ServedAdapter>),
    /// Registered, but evicted to disk: [`Registry::reload`] reads it again.
    Evicted,
    /// No adapter of that name.
    Unknown,
}

/// What `/v1/models` and the load route say about an adapter.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AdapterInfo {
    /// The name requests use.
    pub name: String,
    /// Its directory, relative to the adapters folder.
    pub path: String,
    /// Content fingerprint (empty until first read).
    pub fingerprint: String,
    /// Rank r.
    pub rank: usize,
    /// lora_alpha.
    pub alpha: f64,
    /// The modules it adapts.
    pub target_modules: Vec<String>,
    /// Bytes on disk.
    pub bytes: u64,
    /// Trainable parameters.
    pub params: usize,
    /// Whether it is in memory now (else it is read again on its next use).
    pub loaded: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    fingerprint: String,
    info: AdapterInfo,
}

#[derive(Debug, Default)]
struct Inner {
    names: BTreeMap<String, Entry>,
    held: HashMap<String, (Arc<ServedAdapter>, u64)>, // fingerprint → (adapter, last use)
    clock: u64,
}

/// Registered adapters and the ones held in memory.
pub struct Registry {
    dir: Option<PathBuf>, // canonical
    cap: usize,
    base_name: String,
    base_fingerprint: String,
    packer: Packer,
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("dir", &self.dir).field("cap", &self.cap).finish_non_exhaustive()
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, format!("adapter registry: {e}"))
}

/// Whether `name` is a plain adapter name: 1–64 of `A–Z a–z 0–9 _ . -`, not starting with `.` or `-`.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl Registry {
    /// A registry for adapters under `dir` (canonicalised; `None`: no adapters can be loaded), holding
    /// at most `cap` in memory, for the base called `base_name` with `base_fingerprint`.
    pub fn new(
        dir: Option<&Path>,
        cap: usize,
        base_name: &str,
        base_fingerprint: String,
        packer: Packer,
        metrics: Arc<Metrics>,
    ) -> crate::Result<Self> {
        if cap == 0 {
            return Err(crate::ServeError::setting("max-loaded-adapters", cap, "must be at least 1"));
        }
        let dir = match dir {
            Some(d) => Some(d.canonicalize().map_err(|e| crate::ServeError::path(d, format!("adapters folder: {e}")))?),
            None => None,
        };
        Ok(Registry { dir, cap, base_name: base_name.to_string(), base_fingerprint, packer, inner: Mutex::new(Inner::default()), metrics })
    }

    /// Registers (and loads) every sub-folder of the adapters folder that holds an `adapter_config.json`,
    /// under the folder's name, in name order. A folder whose adapter does not load stops the start.
    pub fn scan(&self) -> crate::Result<Vec<AdapterInfo>> {
        let Some(dir) = &self.dir else { return Ok(Vec::new()) };
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| crate::ServeError::path(dir, e.to_string()))? {
            let e = e.map_err(|e| crate::ServeError::path(dir, e.to_string()))?;
            if e.path().join(lora::adapter::CONFIG_FILE).is_file() {
                names.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let info = self
                .load(&name, &name, false)
                .map_err(|e| crate::ServeError::path(&dir.join(&name), format!("adapter {name:?}: {}", e.message)))?;
            out.push(info);
        }
        Ok(out)
    }

    /// The base model's name.
    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// Resolves `lora_path` (relative to the adapters folder, or absolute) to a directory strictly inside it.
    fn resolve(&self, lora_path: &str) -> Result<PathBuf, ApiError> {
        let Some(dir) = &self.dir else {
            return Err(ApiError::invalid("lora_path", "this server has no adapters folder (start it with --adapters DIR)"));
        };
        let p = Path::new(lora_path);
        let joined = if p.is_absolute() { p.to_path_buf() } else { dir.join(p) };
        let real = joined.canonicalize().map_err(|e| {
            ApiError::invalid("lora_path", format!("lora_path {lora_path:?}: {e} (paths are relative to the adapters folder)"))
        })?;
        if !real.starts_with(dir) || real == *dir {
            return Err(ApiError::invalid(
                "lora_path",
                format!("lora_path {lora_path:?} is outside the adapters folder {}; only its sub-folders can be loaded", dir.display()),
            ));
        }
        Ok(real)
    }

    /// Reads the adapter in `path`: its fingerprint, its packed form (reused when the same content is
    /// held already) and its info.
    fn read(&self, name: &str, path: &Path) -> Result<(Arc<ServedAdapter>, AdapterInfo), ApiError> {
        let bad = |e: String| ApiError::invalid("lora_path", e);
        let cpath = path.join(lora::adapter::CONFIG_FILE);
        let wpath = path.join(lora::adapter::WEIGHTS_FILE);
        let text = std::fs::read_to_string(&cpath).map_err(|e| bad(format!("{}: {e}", cpath.display())))?;
        let weights = std::fs::read(&wpath).map_err(|e| bad(format!("{}: {e}", wpath.display())))?;
        let mut h = Sha256::new();
        h.update((text.len() as u64).to_le_bytes());
        h.update(text.as_bytes());
        h.update(&weights);
        let fingerprint = format!("{:x}", h.finalize());
        let files = lora::adapter_from_bytes(path, &text, &weights).map_err(|e| bad(e.to_string()))?;
        if let Some(want) = files.base_fingerprint() {
            if want != self.base_fingerprint {
                return Err(bad(format!(
                    "{}: this adapter was trained on another base (base fingerprint {want}, the served base is {})",
                    wpath.display(),
                    self.base_fingerprint
                )));
            }
        }
        let bytes = (text.len() + weights.len()) as u64;
        let rel = self.dir.as_ref().and_then(|d| path.strip_prefix(d).ok()).unwrap_or(path);
        let info = AdapterInfo {
            name: name.to_string(),
            path: rel.display().to_string(),
            fingerprint: fingerprint.clone(),
            rank: files.config.r,
            alpha: files.config.alpha,
            target_modules: files.tensors.keys().cloned().collect(),
            bytes,
            params: files.num_params(),
            loaded: true,
        };
        let held = self.inner.lock().map_err(internal)?.held.get(&fingerprint).map(|(a, _)| a.clone());
        let adapter = match held {
            Some(a) => a,
            None => {
                let packed = (self.packer)(&files).map_err(bad)?;
                self.metrics.adapter_loads.inc();
                Arc::new(ServedAdapter { fingerprint, packed, bytes })
            }
        };
        Ok((adapter, info))
    }

    /// Holds `adapter`, marks it used now, and evicts the least recently used beyond the cap.
    fn hold(&self, inner: &mut Inner, adapter: Arc<ServedAdapter>) {
        inner.clock += 1;
        let now = inner.clock;
        inner.held.insert(adapter.fingerprint.clone(), (adapter.clone(), now));
        while inner.held.len() > self.cap {
            let Some(oldest) =
                inner.held.iter().filter(|(fp, _)| **fp != adapter.fingerprint).min_by_key(|(_, (_, t))| *t).map(|(fp, _)| fp.clone())
            else {
                break;
            };
            inner.held.remove(&oldest);
            self.metrics.evictions.inc();
            tracing::info!(fingerprint = %oldest, "evicted adapter from memory");
        }
        self.metrics.adapters_loaded.set(inner.held.len() as i64);
    }

    /// Loads the adapter in `lora_path` under `name` (`/v1/load_lora_adapter`). A name in use is
    /// refused unless `replace`; requests already running keep the adapter they started with.
    pub fn load(&self, name: &str, lora_path: &str, replace: bool) -> Result<AdapterInfo, ApiError> {
        if !is_plain_name(name) {
            return Err(ApiError::invalid(
                "lora_name",
                format!("lora_name {name:?} is not a plain name (1-64 letters, digits, '_', '.', '-', not starting with '.' or '-')"),
            ));
        }
        if name == self.base_name {
            return Err(ApiError::invalid("lora_name", format!("lora_name {name:?} is the base model's name")));
        }
        if !replace && self.inner.lock().map_err(internal)?.names.contains_key(name) {
            return Err(ApiError::invalid(
                "lora_name",
                format!("an adapter named {name:?} is loaded already; unload it first or pass \"load_inplace\": true to replace it"),
            ));
        }
        let path = self.resolve(lora_path)?;
        let (adapter, info) = self.read(name, &path)?;
        let mut inner = self.inner.lock().map_err(internal)?;
        let old = inner.names.insert(name.to_string(), Entry { path, fingerprint: adapter.fingerprint.clone(), info: info.clone() });
        self.hold(&mut inner, adapter);
        if let Some(old) = old {
            Self::release(&mut inner, &old.fingerprint);
        }
        self.metrics.adapters_loaded.set(inner.held.len() as i64);
        tracing::info!(adapter = name, fingerprint = %info.fingerprint, "loaded adapter");
        Ok(info)
    }

    /// Drops content `fingerprint` from memory when no name refers to it any more.
    fn release(inner: &mut Inner, fingerprint: &str) {
        if !inner.names.values().any(|e| e.fingerprint == fingerprint) {
            inner.held.remove(fingerprint);
        }
    }

    /// Unregisters `name` (`/v1/unload_lora_adapter`); its memory goes when the last request using it ends.
    pub fn unload(&self, name: &str) -> Result<(), ApiError> {
        let mut inner = self.inner.lock().map_err(internal)?;
        let Some(old) = inner.names.remove(name) else {
            return Err(ApiError::status(StatusCode::NOT_FOUND, format!("no adapter named {name:?} is loaded")));
        };
        Self::release(&mut inner, &old.fingerprint);
        self.metrics.adapters_loaded.set(inner.held.len() as i64);
        tracing::info!(adapter = name, "unloaded adapter");
        Ok(())
    }

    /// What memory holds for `name`, without touching the disk (marks a held adapter used now).
    pub fn lookup(&self, name: &str) -> Result<Lookup, ApiError> {
        let mut inner = self.inner.lock().map_err(internal)?;
        let Some(fingerprint) = inner.names.get(name).map(|e| e.fingerprint.clone()) else { return Ok(Lookup::Unknown) };
        inner.clock += 1;
        let now = inner.clock;
        Ok(match inner.held.get_mut(&fingerprint) {
            Some((a, t)) => {
                *t = now;
                Lookup::Held(a.clone())
            }
            None => Lookup::Evicted,
        })
    }

    /// Reads an evicted adapter again and holds it (outside the lock: the files may have changed, and the
    /// content decides). `Ok(None)`: unloaded meanwhile.
    pub fn reload(&self, name: &str) -> Result<Option<Arc<ServedAdapter>>, ApiError> {
        let Some(path) = self.inner.lock().map_err(internal)?.names.get(name).map(|e| e.path.clone()) else { return Ok(None) };
        let (adapter, info) = self.read(name, &path)?;
        let mut inner = self.inner.lock().map_err(internal)?;
        match inner.names.get_mut(name) {
            Some(e) if e.path == path => {
                e.fingerprint = adapter.fingerprint.clone();
                e.info = info;
            }
            // Unloaded or replaced meanwhile: serve what was asked for, but hold nothing for the old name.
            _ => return Ok(Some(adapter)),
        }
        self.hold(&mut inner, adapter.clone());
        Ok(Some(adapter))
    }

    /// Every registered adapter, by name.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let Ok(inner) = self.inner.lock() else { return Vec::new() };
        inner
            .names
            .values()
            .map(|e| AdapterInfo { loaded: inner.held.contains_key(&e.fingerprint), fingerprint: e.fingerprint.clone(), ..e.info.clone() })
            .collect()
    }

    /// How many adapters are held in memory.
    pub fn held(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.held.len())
    }
}
