//! What the bad-input matrices share: a case, and running cases through the real binary.

use std::path::Path;
use std::process::Command;

/// One bad input: the command line, the text its error must contain, and a path it must not write.
pub struct Case {
    pub name: &'static str,
    pub args: Vec<String>,
    /// Text the error must contain (a file, field or value).
    pub expect: String,
    /// A path that must not exist afterwards (nothing half-written).
    pub absent: Option<String>,
}

impl Case {
    pub fn new(name: &'static str, args: &[&str], expect: &str) -> Case {
        Case { name, args: args.iter().map(|s| s.to_string()).collect(), expect: expect.to_string(), absent: None }
    }
}

/// Runs every case with `dir` as the working directory; returns one message per case that exited 0,
/// panicked, lacked its expected text or wrote what it must not.
pub fn failures(dir: &Path, cases: &[Case]) -> Vec<String> {
    let mut failures = Vec::new();
    for c in cases {
        let o = Command::new(env!("CARGO_BIN_EXE_lora")).args(&c.args).current_dir(dir).env("RUST_BACKTRACE", "1").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let mut why = Vec::new();
        if o.status.success() {
            why.push("exited 0".to_string());
        }
        if err.contains("panicked") || err.contains("stack backtrace") {
            why.push("panicked".into());
        }
        if !err.contains(&c.expect) {
            why.push(format!("stderr lacks {:?}", c.expect));
        }
        if let Some(p) = &c.absent {
            if dir.join(p).exists() {
                why.push(format!("{p} was written"));
            }
        }
        if !why.is_empty() {
            failures.push(format!("{} {:?}: {}\n  stderr: {}", c.name, c.args.join(" "), why.join(", "), err.trim()));
        }
    }
    failures
}
