//! `--report DIR` and `lora graph`, run as a user would on the shipped MNIST with small networks: every
//! promised file exists, parses (PNG signature and header, SVG and HTML as XML, DOT structurally and by
//! Graphviz when it is installed) and holds the run's numbers.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn lora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lora")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = lora(args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{args:?} failed: {out}\n{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn xml(text: &str) -> roxmltree::Document<'_> {
    let opt = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    roxmltree::Document::parse_with_options(text, opt).unwrap_or_else(|e| panic!("not well-formed: {e}"))
}

/// All text content of an XML/HTML document, trimmed pieces joined by newlines.
fn texts(doc: &roxmltree::Document) -> Vec<String> {
    doc.descendants().filter(|n| n.is_text()).filter_map(|n| n.text()).map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect()
}

/// Checks the PNG signature and IHDR chunk; returns (width, height).
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}: no PNG signature", path.display());
    assert_eq!(&b[12..16], b"IHDR", "{}: first chunk is not IHDR", path.display());
    assert_eq!(&b[b.len() - 8..b.len() - 4], b"IEND", "{}: does not end with IEND", path.display());
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

fn svg(path: &Path) -> Vec<String> {
    let text = read(path);
    let doc = xml(&text);
    assert_eq!(doc.root_element().tag_name().name(), "svg", "{}", path.display());
    texts(&doc)
}

/// A small structural check of DOT: tokens, balanced braces and brackets, one `digraph NAME { … }`, and
/// every edge's end points declared as nodes. Returns (nodes, edges).
fn check_dot(text: &str) -> (BTreeSet<String>, Vec<(String, String)>) {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {}
            '"' => {
                let mut s = String::from("\"");
                loop {
                    match chars.next() {
                        Some('\\') => {
                            s.push('\\');
                            s.push(chars.next().expect("escape at end of file"));
                        }
                        Some('"') => break,
                        Some(c) => s.push(c),
                        None => panic!("unterminated string in DOT"),
                    }
                }
                tokens.push(s);
            }
            '-' if chars.peek() == Some(&'>') => {
                chars.next();
                tokens.push("->".into());
            }
            '{' | '}' | '[' | ']' | ';' | '=' | ',' => tokens.push(c.to_string()),
            c if c.is_ascii_alphanumeric() || c == '_' || c == '.' => {
                let mut s = c.to_string();
                while let Some(&n) = chars.peek().filter(|n| n.is_ascii_alphanumeric() || **n == '_' || **n == '.') {
                    s.push(n);
                    chars.next();
                }
                tokens.push(s);
            }
            c => panic!("unexpected character {c:?} in DOT"),
        }
    }
    assert_eq!(tokens[0], "digraph");
    assert_eq!(tokens[2], "{");
    assert_eq!(tokens.last().unwrap(), "}");
    let (mut braces, mut brackets) = (0i32, 0i32);
    let (mut nodes, mut edges) = (BTreeSet::new(), Vec::new());
    for (i, t) in tokens.iter().enumerate().skip(2) {
        match t.as_str() {
            "{" => braces += 1,
            "}" => braces -= 1,
            "[" => brackets += 1,
            "]" => brackets -= 1,
            "->" => edges.push((tokens[i - 1].clone(), tokens[i + 1].clone())),
            _ => {}
        }
        assert!(braces >= 0 && (0..=1).contains(&brackets), "unbalanced at token {i} ({t})");
        if braces == 0 {
            assert_eq!(i, tokens.len() - 1, "tokens after the closing brace");
        }
        // A node statement: an id followed by '[' that is not the target of an edge.
        let is_id = t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if is_id && tokens.get(i + 1).is_some_and(|n| n == "[") && tokens[i - 1] != "->" && !["graph", "node", "edge"].contains(&t.as_str())
        {
            nodes.insert(t.clone());
        }
    }
    assert_eq!((braces, brackets), (0, 0));
    for (a, b) in &edges {
        assert!(nodes.contains(a) && nodes.contains(b), "edge {a} -> {b} uses an undeclared node");
    }
    (nodes, edges)
}

fn graphviz() -> bool {
    Command::new("dot").arg("-V").output().is_ok_and(|o| o.status.success())
}

/// Checks the DOT file structurally and, when Graphviz is installed, has `dot` lay it out.
fn check_dot_file(path: &Path) -> (BTreeSet<String>, Vec<(String, String)>) {
    let text = read(path);
    let parsed = check_dot(&text);
    if graphviz() {
        let o = Command::new("dot").arg("-Tsvg").arg(path).output().unwrap();
        assert!(o.status.success(), "dot refused {}: {}", path.display(), String::from_utf8_lossy(&o.stderr));
        xml(&String::from_utf8(o.stdout).unwrap());
    }
    parsed
}

/// Rows of the page's table whose header row starts with `first_header` and contains `has`.
fn html_table(doc: &roxmltree::Document, first_header: &str, has: &str) -> Vec<Vec<String>> {
    let cell_text =
        |n: roxmltree::Node| n.descendants().filter(|d| d.is_text()).filter_map(|d| d.text()).collect::<String>().trim().to_string();
    for table in doc.descendants().filter(|n| n.has_tag_name("table")) {
        let rows: Vec<Vec<String>> = table
            .descendants()
            .filter(|n| n.has_tag_name("tr"))
            .map(|tr| tr.children().filter(|c| c.has_tag_name("td") || c.has_tag_name("th")).map(cell_text).collect())
            .collect();
        if rows.first().is_some_and(|h| h.first().is_some_and(|f| f == first_header) && h.iter().any(|c| c == has)) {
            return rows;
        }
    }
    panic!("no table with headers {first_header} … {has}");
}

/// The page is self-contained: no scripts, no external resources, links only to anchors or to files
/// in the report folder.
fn check_self_contained(doc: &roxmltree::Document, dir: &Path) {
    for n in doc.descendants().filter(|n| n.is_element()) {
        assert!(!["script", "link", "img", "iframe", "object"].contains(&n.tag_name().name()), "<{}> in the page", n.tag_name().name());
        assert!(n.attribute("src").is_none(), "src= in the page");
        if let Some(href) = n.attribute("href").filter(|_| n.has_tag_name("a")) {
            assert!(href.starts_with('#') || dir.join(href).is_file(), "link to {href} which is not in {}", dir.display());
        }
    }
}

/// Digit grouping as the page writes it (`lora_viz::group`, unit-tested in its crate).
fn group(n: u64) -> String {
    lora_viz::group(n as usize)
}

/// Reads a metrics CSV, checks its header and step numbering, returns the losses and seconds.
fn metrics(path: &Path) -> (Vec<f32>, Vec<f64>) {
    let text = read(path);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("step,loss,seconds,smoothed_loss"), "{}", path.display());
    let (mut losses, mut seconds) = (Vec::new(), Vec::new());
    for (i, l) in lines.enumerate() {
        let f: Vec<&str> = l.split(',').collect();
        assert_eq!(f.len(), 4, "{l}");
        assert_eq!(f[0].parse::<usize>().unwrap(), i + 1, "{}: step numbers", path.display());
        losses.push(f[1].parse::<f32>().unwrap());
        seconds.push(f[2].parse::<f64>().unwrap());
        assert!(f[3].parse::<f32>().unwrap().is_finite());
    }
    assert!(seconds.windows(2).all(|w| w[0] <= w[1]), "{}: time goes backwards", path.display());
    (losses, seconds)
}

fn check_jsonl_matches(path: &Path, losses: &[f32]) {
    let lines: Vec<Value> = read(path).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), losses.len(), "{}", path.display());
    for (i, (v, l)) in lines.iter().zip(losses).enumerate() {
        assert_eq!(v["step"], i + 1);
        assert_eq!(v["loss"].as_f64().unwrap() as f32, *l, "{} line {}", path.display(), i + 1);
        assert!(v["seconds"].as_f64().is_some());
    }
}

#[test]
fn demo_report_writes_every_promised_file_and_each_holds_the_runs_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, dir) = (tmp.path().join("run"), tmp.path().join("run/pictures"));
    let (o, d) = (out.to_str().unwrap(), dir.to_str().unwrap());
    let stdout = ok(&["demo", "--hidden1", "64", "--hidden2", "32", "--steps", "20", "--seed", "5", "--out", o, "--report", d]);
    assert!(stdout.contains(&format!("{}", dir.join("report.html").display())), "{stdout}");
    let rep = json(&out.join("report.json"));

    // Charts: PNG and SVG of each.
    for stem in ["loss", "wrong", "confusion", "params"] {
        let (w, h) = png_size(&dir.join(format!("{stem}.png")));
        assert!(w >= 600 && h >= 400, "{stem}.png is {w}×{h}");
        let text = svg(&dir.join(format!("{stem}.svg")));
        assert!(!text.is_empty(), "{stem}.svg has no text");
    }
    let wrong = svg(&dir.join("wrong.svg"));
    for (name, key) in [("pre-trained", "pretrain"), ("LoRA on", "lora_on"), ("LoRA off", "lora_off")] {
        let acc = rep[key]["accuracy"].as_f64().unwrap();
        assert!(wrong.contains(&format!("{name} (accuracy {acc:.4})")), "wrong.svg lacks the {name} legend: {wrong:?}");
        for c in rep[key]["wrong"].as_array().unwrap() {
            assert!(wrong.contains(&c.to_string()), "wrong.svg lacks the {name} count {c}");
        }
    }
    let params = svg(&dir.join("params.svg"));
    assert!(
        params.contains(&group(rep["params"]["base"].as_u64().unwrap()))
            && params.contains(&group(rep["params"]["lora"].as_u64().unwrap()))
    );
    let confusion = svg(&dir.join("confusion.svg"));
    let errors: u64 = rep["lora_on"]["wrong"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).sum();
    assert!(confusion.contains(&format!("LoRA on: {} errors", group(errors))), "{confusion:?}");

    // Metrics: one row per step, the losses the run averaged.
    let (pre, _) = metrics(&dir.join("metrics-pre-training.csv"));
    assert_eq!(pre.len() as u64, rep["pretrain"]["steps"].as_u64().unwrap());
    let (fine, fine_secs) = metrics(&dir.join("metrics-fine-tuning.csv"));
    assert_eq!(fine.len(), 20);
    assert_eq!(rep["finetune"]["steps"], 20);
    let mean = fine.iter().sum::<f32>() / fine.len() as f32;
    let reported = rep["finetune"]["final_avg_loss"].as_f64().unwrap() as f32;
    assert!((mean - reported).abs() <= 1e-5 * reported.abs().max(1.0), "CSV mean {mean} vs report {reported}");
    assert!(*fine_secs.last().unwrap() <= rep["finetune"]["seconds"].as_f64().unwrap() + 1e-9);
    check_jsonl_matches(&dir.join("metrics-pre-training.jsonl"), &pre);
    check_jsonl_matches(&dir.join("metrics-fine-tuning.jsonl"), &fine);

    // The network graph: three layers, each with A → B joining the frozen base at a `+`.
    let (nodes, edges) = check_dot_file(&dir.join("network.dot"));
    for l in ["linear1", "linear2", "linear3"] {
        for part in ["W", "A", "B", "add"] {
            assert!(nodes.contains(&format!("n_{l}_{part}")), "no node n_{l}_{part}");
        }
        assert!(edges.contains(&(format!("n_{l}_B"), format!("n_{l}_add"))));
        assert!(edges.contains(&(format!("n_{l}_W"), format!("n_{l}_add"))));
    }
    assert_eq!(dir.join("network.svg").is_file(), graphviz(), "network.svg should exist exactly when dot does");

    // The page: well-formed, self-contained, the charts inline, the numbers of report.json in it.
    let html = read(&dir.join("report.html"));
    let doc = xml(&html);
    check_self_contained(&doc, &dir);
    let inline_svgs = doc.descendants().filter(|n| n.has_tag_name("svg") && n.parent().is_some_and(|p| p.has_tag_name("figure"))).count();
    assert_eq!(inline_svgs, 4 + graphviz() as usize);
    let page = texts(&doc).join("\n");
    for key in ["pretrain", "lora_on", "lora_off"] {
        assert!(page.contains(&rep[key]["accuracy"].to_string()), "accuracy of {key} missing");
    }
    for v in [&rep["finetune"]["trainable_params"], &rep["finetune"]["digit_train_images"], &rep["data"]["mean"]] {
        assert!(page.contains(&v.to_string()), "{v} missing from the page");
    }
    assert!(page.contains(&group(rep["files"]["base_bytes"].as_u64().unwrap())), "size of base.safetensors missing");
    let table = html_table(&doc, "digit", "LoRA on");
    for d in 0..10 {
        let row = &table[d + 1];
        assert_eq!(row[0], d.to_string());
        for (col, key) in [(1, "pretrain"), (2, "lora_on"), (3, "lora_off")] {
            assert_eq!(row[col], rep[key]["wrong"][d].to_string(), "digit {d}, {key}");
        }
    }
    let proof = doc.descendants().find(|n| n.has_tag_name("ul") && n.attribute("class") == Some("checks")).expect("no checks");
    let marks: Vec<&str> = proof.descendants().filter(|n| n.attribute("class") == Some("mark ok")).filter_map(|n| n.text()).collect();
    assert_eq!(marks, ["✓"; 3], "every proof check passes and is shown");
}

#[test]
fn pretrain_and_eval_reports_show_their_runs_and_a_bad_report_path_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s);
    let model = p("m.safetensors");
    let m = model.to_str().unwrap();
    let (pj, pr) = (p("pre.json"), p("pre-report"));
    ok(&[
        "pretrain",
        "--hidden1",
        "32",
        "--hidden2",
        "16",
        "--batch-size",
        "600",
        "--out",
        m,
        "--json",
        pj.to_str().unwrap(),
        "--report",
        pr.to_str().unwrap(),
    ]);
    let pre = json(&pj);
    let (losses, _) = metrics(&pr.join("metrics-pre-training.csv"));
    assert_eq!(losses.len(), 100, "60000 images / batch 600");
    assert_eq!(pre["steps"], 100);
    for f in ["loss.png", "wrong.png", "confusion.png", "params.png", "network.dot", "report.html"] {
        assert!(pr.join(f).is_file(), "pretrain report lacks {f}");
    }
    let (nodes, _) = check_dot_file(&pr.join("network.dot"));
    assert!(nodes.contains("n_linear2_W") && !nodes.contains("n_linear2_A"), "pre-training has no adapter: {nodes:?}");
    let html = read(&pr.join("report.html"));
    let doc = xml(&html);
    check_self_contained(&doc, &pr);
    assert!(texts(&doc).join("\n").contains(&pre["accuracy"].to_string()));

    let (ej, er) = (p("eval.json"), p("eval-report"));
    ok(&["eval", "--model", m, "--json", ej.to_str().unwrap(), "--report", er.to_str().unwrap()]);
    let ev = json(&ej);
    assert_eq!(ev["accuracy"], pre["accuracy"]);
    assert!(!er.join("loss.png").exists(), "eval trains nothing, so it draws no loss curve");
    png_size(&er.join("confusion.png"));
    let html = read(&er.join("report.html"));
    let doc = xml(&html);
    let table = html_table(&doc, "digit", "m");
    assert_eq!(table.last().unwrap(), &vec!["accuracy".to_string(), ev["accuracy"].to_string()]);

    // A report folder that cannot be created: the error names it, nothing panics.
    std::fs::write(p("file"), b"x").unwrap();
    let bad = p("file/report");
    let o = lora(&["eval", "--model", m, "--report", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(err.contains(bad.to_str().unwrap()), "{err}");
}

#[test]
fn graph_writes_dot_with_the_adapter_shapes_and_graphviz_output_when_installed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g/network.dot");
    ok(&["graph", "--rank", "4", "--alpha", "8", "--out", out.to_str().unwrap()]);
    let text = read(&out);
    let (nodes, _) = check_dot_file(&out);
    assert_eq!(nodes.iter().filter(|n| n.ends_with("_A")).count(), 3);
    for want in ["A [4, 784]", "B [1000, 4]", "B [10, 4]", "2,807,010 base parameters", "× s = 2", "frozen · 785,000 params"] {
        assert!(text.contains(want), "network.dot lacks {want}");
    }
    for ext in ["svg", "png"] {
        assert_eq!(out.with_extension(ext).is_file(), graphviz(), "network.{ext} should exist exactly when dot does");
    }
    if graphviz() {
        png_size(&out.with_extension("png"));
        svg(&out.with_extension("svg"));
    }

    let plain = tmp.path().join("plain.dot");
    ok(&["graph", "--no-lora", "--hidden1", "16", "--hidden2", "8", "--out", plain.to_str().unwrap()]);
    let (nodes, _) = check_dot_file(&plain);
    assert!(!nodes.iter().any(|n| n.ends_with("_A")), "{nodes:?}");
    assert!(read(&plain).contains("W [16, 784]\\nb [16]\\ntrainable · 12,560 params"));

    let o = lora(&["graph", "--rank", "0"]);
    assert!(!o.status.success());
}
