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
//!
//! One operation per name at a time: loading, replacing, unloading and reading an evicted adapter again
//! take the name's turn ([`Busy`]). So two loads of one name cannot both pass the "name in use" check, and
//! when N requests find one adapter evicted, the first reads and packs it while the others wait for it and
//! take what it read: one read per eviction. Operations on other names go on meanwhile. The disk is read
//! with the name's turn held but never with the registry's lock, so lookups never wait for a disk.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

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

/// The names with an operation under way; one operation per name at a time.
#[derive(Debug, Default)]
struct Busy {
    names: Mutex<HashSet<String>>,
    freed: Condvar,
}

/// A name's turn; the next operation on the name starts when it is dropped.
struct Turn<'a> {
    busy: &'a Busy,
    name: String,
}

impl Busy {
    /// Waits until no other operation holds `name`, then holds it.
    fn take(&self, name: &str) -> Result<Turn<'_>, ApiError> {
        let mut names = self.names.lock().map_err(internal)?;
        while names.contains(name) {
            names = self.freed.wait(names).map_err(internal)?;
        }
        names.insert(name.to_string());
        Ok(Turn { busy: self, name: name.to_string() })
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut names = self.busy.names.lock().unwrap_or_else(|p| p.into_inner());
        names.remove(&self.name);
        drop(names);
        self.busy.freed.notify_all();
    }
}

/// Registered adapters and the ones held in memory.
pub struct Registry {
    dir: Option<PathBuf>,   // canonical
    given: Option<PathBuf>, // as the caller wrote it, for messages
    cap: usize,
    base_name: String,
    base_fingerprint: String,
    packer: Packer,
    inner: Mutex<Inner>,
    busy: Busy,
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

/// `path` with `.` dropped and each `..` taking back the component before it, without asking the file
/// system; `None` when a `..` climbs above the root.
fn lexically_normal(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            c => out.push(c),
        }
    }
    Some(out)
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
        let given = dir;
        let dir = match dir {
            Some(d) => Some(d.canonicalize().map_err(|e| crate::ServeError::path(d, format!("adapters folder: {e}")))?),
            None => None,
        };
        Ok(Registry {
            dir,
            given: given.map(Path::to_path_buf),
            cap,
            base_name: base_name.to_string(),
            base_fingerprint,
            packer,
            inner: Mutex::new(Inner::default()),
            busy: Busy::default(),
            metrics,
        })
    }

    /// Registers (and loads) every sub-folder of the adapters folder that holds an `adapter_config.json`,
    /// under the folder's name, in name order. A folder whose adapter does not load stops the start, and
    /// so does an adapters folder that is itself an adapter with none inside (`--adapters` names the folder
    /// *holding* adapter folders).
    pub fn scan(&self) -> crate::Result<Vec<AdapterInfo>> {
        let (Some(dir), Some(given)) = (&self.dir, &self.given) else { return Ok(Vec::new()) };
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| crate::ServeError::path(dir, e.to_string()))? {
            let e = e.map_err(|e| crate::ServeError::path(dir, e.to_string()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().join(lora::adapter::CONFIG_FILE).is_file() {
                names.push(name);
            }
        }
        names.sort();
        if names.is_empty() && dir.join(lora::adapter::CONFIG_FILE).is_file() {
            // The folder above, as the caller wrote the path (`runs/demo/adapter` → `runs/demo`).
            let parent = match given.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                Some(_) => PathBuf::from("."),
                None => dir.parent().unwrap_or(dir).to_path_buf(),
            };
            return Err(crate::ServeError::path(
                given,
                format!(
                    "no sub-folder holds an {}; this folder is an adapter itself. --adapters takes the folder that holds \
                     adapter folders (each served under its folder's name): --adapters {}",
                    lora::adapter::CONFIG_FILE,
                    parent.display()
                ),
            ));
        }
        let mut out = Vec::new();
        for name in names {
            let info = self
                .load(&name, &name, false)
                .map_err(|e| crate::ServeError::path(&given.join(&name), format!("adapter {name:?}: {}", e.message)))?;
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
        let outside = || {
            ApiError::invalid(
                "lora_path",
                format!("lora_path {lora_path:?} is outside the adapters folder {}; only its sub-folders can be loaded", dir.display()),
            )
        };
        // First by the path's own words (`..` taken back lexically), so a path that climbs out is named as
        // such whether or not it exists; then by the real path, so a symbolic link cannot lead out either.
        let p = Path::new(lora_path);
        let joined = if p.is_absolute() { p.to_path_buf() } else { dir.join(p) };
        let lexical = lexically_normal(&joined).ok_or_else(outside)?;
        if !lexical.starts_with(dir) || lexical == *dir {
            return Err(outside());
        }
        let real = joined.canonicalize().map_err(|e| {
            ApiError::invalid(
                "lora_path",
                format!("lora_path {lora_path:?}: {e} (paths are relative to the adapters folder {})", dir.display()),
            )
        })?;
        if !real.starts_with(dir) || real == *dir {
            return Err(outside());
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
        let _turn = self.busy.take(name)?;
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
    /// Waits for a load of the same name under way (it blocks: call it off the async threads).
    pub fn unload(&self, name: &str) -> Result<(), ApiError> {
        let _turn = self.busy.take(name)?;
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
    /// content decides). `Ok(None)`: unloaded meanwhile. Requests that ask while one reads wait and take
    /// what it read (it blocks: call it off the async threads).
    pub fn reload(&self, name: &str) -> Result<Option<Arc<ServedAdapter>>, ApiError> {
        let _turn = self.busy.take(name)?;
        match self.lookup(name)? {
            Lookup::Held(a) => return Ok(Some(a)), // read by the request we waited for
            Lookup::Unknown => return Ok(None),
            Lookup::Evicted => {}
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::testing::write_lm;

    /// A registry of ROOT/adapters holding at most `cap`, whose packer counts its calls and takes 50 ms
    /// (so that concurrent operations overlap).
    fn registry(root: &Path, cap: usize) -> (Registry, Arc<AtomicUsize>) {
        let (m, _) = lora_lm::hf::load_model(&root.join("base")).unwrap();
        let m = Arc::new(m);
        let fingerprint = m.fingerprint().unwrap();
        let packs = Arc::new(AtomicUsize::new(0));
        let p = packs.clone();
        let packer: Packer = Arc::new(move |files| {
            p.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            m.pack_adapter(files).map_err(|e| e.to_string())
        });
        let r = Registry::new(Some(&root.join("adapters")), cap, "base", fingerprint, packer, Arc::new(Metrics::default())).unwrap();
        (r, packs)
    }

    #[test]
    fn two_concurrent_loads_of_one_name_let_one_through_and_tell_the_other_the_name_is_taken() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 32);
        let (r, _) = registry(d.path(), 8);
        let results: Vec<Result<AdapterInfo, ApiError>> = std::thread::scope(|s| {
            let hs: Vec<_> = ["a", "spare/c"].iter().map(|path| s.spawn(|| r.load("x", path, false))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ok: Vec<&AdapterInfo> = results.iter().filter_map(|x| x.as_ref().ok()).collect();
        assert_eq!(ok.len(), 1, "both loads of one name passed: {results:?}");
        let refused = results.iter().find_map(|x| x.as_ref().err()).unwrap();
        assert!(refused.message.contains("loaded already"), "{refused:?}");
        // What "x" serves is what the successful load read.
        let listed = r.list().into_iter().find(|a| a.name == "x").unwrap();
        assert_eq!(listed.fingerprint, ok[0].fingerprint);
    }

    #[test]
    fn requests_for_one_evicted_adapter_read_it_once_and_all_get_it() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 32);
        let (r, packs) = registry(d.path(), 1);
        r.scan().unwrap(); // a, then b: a is evicted by the cap of 1
        assert!(matches!(r.lookup("a").unwrap(), Lookup::Evicted));
        let before = packs.load(Ordering::SeqCst);
        let got: Vec<Arc<ServedAdapter>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8).map(|_| s.spawn(|| r.reload("a").unwrap().unwrap())).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(packs.load(Ordering::SeqCst) - before, 1, "eight requests read the evicted adapter more than once");
        assert!(got.iter().all(|a| Arc::ptr_eq(a, &got[0])), "the requests got different copies");
    }

    #[test]
    fn a_path_that_climbs_out_of_the_adapters_folder_is_named_as_outside_whether_or_not_it_exists() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 32);
        let (r, _) = registry(d.path(), 8);
        let outside = d.path().join("elsewhere");
        std::fs::create_dir_all(&outside).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, d.path().join("adapters/link")).unwrap();
        let mut cases = vec!["../nothing-here", "a/../../nothing", "../base", "/no/such/absolute", "/", ".", "", "a/.."];
        if cfg!(unix) {
            cases.push("link");
        }
        for path in cases {
            let e = r.load("x", path, false).unwrap_err();
            assert!(e.message.contains("outside the adapters folder"), "{path:?}: {}", e.message);
        }
        // Inside but missing: named, with where paths start.
        let e = r.load("x", "nothing-here", false).unwrap_err();
        assert!(e.message.contains("\"nothing-here\"") && e.message.contains("relative to the adapters folder"), "{}", e.message);
        // Inside, by a roundabout way: fine.
        assert_eq!(r.load("x", "spare/../a", false).unwrap().path, "a");
    }

    #[test]
    fn an_adapters_folder_that_is_an_adapter_itself_stops_the_start_naming_the_folder_to_give() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 32);
        let (m, _) = lora_lm::hf::load_model(&d.path().join("base")).unwrap();
        let packer: Packer = Arc::new(|_| Err("unused".into()));
        let one = d.path().join("adapters/a");
        let r = Registry::new(Some(&one), 8, "base", m.fingerprint().unwrap(), packer.clone(), Arc::new(Metrics::default())).unwrap();
        let e = r.scan().unwrap_err().to_string();
        let parent = d.path().join("adapters");
        assert!(e.contains("no sub-folder holds an adapter_config.json"), "{e}");
        assert!(e.contains("an adapter itself") && e.contains(&format!("--adapters {}", parent.display())), "{e}");
        // An empty folder is no mistake: nothing to serve yet.
        let empty = d.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let r = Registry::new(Some(&empty), 8, "base", m.fingerprint().unwrap(), packer, Arc::new(Metrics::default())).unwrap();
        assert!(r.scan().unwrap().is_empty());
    }

    #[test]
    fn two_names_with_the_same_files_share_one_copy_and_the_cap_evicts_the_least_recently_used() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 32);
        let (r, packs) = registry(d.path(), 2);
        r.load("a", "a", false).unwrap();
        r.load("a2", "a", false).unwrap();
        assert_eq!((r.held(), packs.load(Ordering::SeqCst)), (1, 1), "the same content was packed twice");
        r.load("b", "b", false).unwrap();
        let _ = r.lookup("a").unwrap(); // a used after b
        r.load("c", "spare/c", false).unwrap(); // evicts b, the least recently used
        assert!(matches!(r.lookup("b").unwrap(), Lookup::Evicted));
        assert!(matches!(r.lookup("a").unwrap(), Lookup::Held(_)));
        // Unloading one name keeps the copy the other still names.
        r.unload("a2").unwrap();
        assert!(matches!(r.lookup("a").unwrap(), Lookup::Held(_)));
        assert!(r.unload("a2").unwrap_err().message.contains("no adapter named"));
    }

    #[test]
    fn names_that_are_not_plain_or_are_the_bases_are_refused() {
        let d = tempfile::tempdir().unwrap();
        write_lm(d.path(), 32);
        let (r, _) = registry(d.path(), 8);
        for name in ["", "../x", ".hidden", "-flag", "a b", &"x".repeat(65)] {
            assert!(r.load(name, "a", false).unwrap_err().message.contains("not a plain name"), "{name:?}");
        }
        assert!(r.load("base", "a", false).unwrap_err().message.contains("base model's name"));
        assert!(is_plain_name("sql_v2.1-x") && is_plain_name(&"x".repeat(64)));
    }
}
