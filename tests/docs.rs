//! What the docs state that can be checked: counts match what they count, and every commit a figure names
//! exists in this repository's history.

use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(p: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(p)).unwrap()
}

#[test]
fn the_readme_gives_the_number_of_bad_input_cases_that_docs_bad_input_md_lists() {
    // docs/bad-input.md's tables are checked against the cases by the bad-input tests themselves.
    let rows = read("docs/bad-input.md").lines().filter(|l| l.starts_with("| `")).count();
    let readme = read("README.md");
    let at = readme.find(" bad-input cases").expect("README.md names its count of bad-input cases as \"N bad-input cases\"");
    let n: usize = readme[..at].rsplit(|c: char| !c.is_ascii_digit() && c != ',').next().unwrap().replace(',', "").parse().unwrap();
    assert_eq!(n, rows, "README.md says {n} bad-input cases, docs/bad-input.md lists {rows}");
}

#[test]
fn every_commit_the_docs_name_for_a_figure_exists() {
    let git = |args: &[&str]| Command::new("git").args(args).current_dir(ROOT).output();
    match git(&["rev-parse", "--is-shallow-repository"]) {
        Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "false" => {}
        _ => {
            println!("every_commit_the_docs_name_for_a_figure_exists: skipped (no git, or a shallow clone without the history)");
            return;
        }
    }
    let mut checked = 0;
    for doc in ["README.md", "CHANGELOG.md", "docs/benchmarks.md", "docs/serving.md", "docs/reliability.md", "ARCHITECTURE.md"] {
        let text = read(doc);
        for (i, _) in text.match_indices("commit ") {
            let word: String = text[i + 7..].chars().take_while(|c| c.is_ascii_hexdigit()).collect();
            if word.len() >= 7 && word.chars().any(|c| c.is_ascii_digit()) {
                let o = git(&["cat-file", "-e", &format!("{word}^{{commit}}")]).unwrap();
                assert!(o.status.success(), "{doc} names commit {word}, which is not in this repository");
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no commit named in the docs: the test checks nothing");
}

#[test]
fn the_readme_shows_the_numbers_the_demo_prints() {
    if std::env::var_os("LORA_KERNELS").is_some() {
        println!("the_readme_shows_the_numbers_the_demo_prints: skipped under LORA_KERNELS (the README shows the default path)");
        return;
    }
    let readme = read("README.md");
    let start = readme.find("```text\nMNIST: ").expect("README.md shows the demo's output") + "```text\n".len();
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    let tmp = tempfile::tempdir().unwrap();
    // Two threads, as on the machine the README was made on: training is deterministic for a seed and a
    // thread count.
    let o = Command::new(env!("CARGO_BIN_EXE_lora"))
        .args(["demo", "--out", tmp.path().to_str().unwrap()])
        .current_dir(ROOT)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    // Every line the README shows (but the progress bars, which go to stderr, and its "..." elision)
    // appears in the output, in order.
    let mut rest = out.lines();
    for line in block.lines().filter(|l| !l.starts_with("Training (epoch") && l.trim() != "...") {
        assert!(rest.any(|o| o == line), "README.md shows {line:?}, which the demo did not print (in this order):\n{out}");
    }
}
