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

/// The doc every case is listed in.
pub const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/bad-input.md");

/// The markdown table of `cases` (case, command, must mention).
pub fn table(cases: &[Case]) -> String {
    let mut t = String::from("| case | command | must mention |\n|---|---|---|\n");
    for c in cases {
        t.push_str(&format!("| `{}` | `lora {}` | `{}` |\n", c.name, c.args.join(" "), c.expect));
    }
    t
}

/// Checks that docs/bad-input.md lists exactly `cases`, as [`table`] renders them, between the markers
/// `<!-- cases: SECTION -->` and `<!-- end cases: SECTION -->`; with `LORA_WRITE_DOCS=1` it rewrites that
/// block instead. The doc is generated from the tests, so it cannot drift from them.
pub fn check_doc(section: &str, cases: &[Case]) {
    let (open, close) = (format!("<!-- cases: {section} -->\n"), format!("<!-- end cases: {section} -->"));
    let doc = std::fs::read_to_string(DOC).unwrap();
    let (Some(a), Some(b)) = (doc.find(&open), doc.find(&close)) else { panic!("{DOC}: no {open:?} … {close:?} block") };
    let want = table(cases);
    let have = &doc[a + open.len()..b];
    if std::env::var_os("LORA_WRITE_DOCS").is_some() {
        std::fs::write(DOC, format!("{}{want}{}", &doc[..a + open.len()], &doc[b..])).unwrap();
    } else {
        assert_eq!(
            have, want,
            "{DOC} is out of date with the {section} cases: run LORA_WRITE_DOCS=1 cargo test --release --test bad_input --test lm_bad_input"
        );
    }
}
