//! A self-contained HTML page (inline CSS and SVG, no scripts, no external assets). The output is also
//! well-formed XML (every element closed, only XML's own entities), so tools and tests can parse it.

use crate::data::{Check, Table};

/// One piece of a section.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    /// A paragraph of plain text.
    Text(String),
    /// Key/value pairs shown as a two-column grid.
    KeyValues(Vec<(String, String)>),
    /// A table.
    Table(Table),
    /// Pass/fail facts with their evidence.
    Checks(Vec<Check>),
    /// An inline SVG document (an XML prolog or DOCTYPE before `<svg` is dropped) with a caption and
    /// links to the files it was written to.
    Figure {
        /// Caption under the picture.
        caption: String,
        /// The SVG document.
        svg: String,
        /// Links shown under the caption (relative paths, e.g. `loss.png`).
        links: Vec<String>,
    },
    /// Blocks side by side (wrapping onto the next line when the page is narrow), one column per list.
    Columns(Vec<Vec<Block>>),
    /// A JSON value as nested tables, folded away by default.
    Json {
        /// The summary line that unfolds it.
        summary: String,
        /// The value.
        value: serde_json::Value,
    },
}

/// A titled section of the page.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    /// Heading (also the anchor in the table of contents).
    pub title: String,
    /// Its content in order.
    pub blocks: Vec<Block>,
}

/// The whole page.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Page {
    /// `<title>` and the main heading.
    pub title: String,
    /// A line under the heading (e.g. the command line).
    pub subtitle: String,
    /// Shown as a coloured banner under the heading: green when every check passes, red otherwise.
    pub verdict: Vec<Check>,
    /// The sections.
    pub sections: Vec<Section>,
}

/// Escapes text for element content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Whether a cell reads as a number (right-aligned in tables).
fn numeric(s: &str) -> bool {
    let t = s.trim().trim_start_matches(['+', '-']).trim_end_matches(['%', 's']).replace(',', "");
    !t.is_empty() && t.parse::<f64>().is_ok()
}

/// The SVG element of a document: from `<svg` on, trailing whitespace trimmed.
fn svg_element(doc: &str) -> &str {
    doc.find("<svg").map_or("", |i| doc[i..].trim_end())
}

const CSS: &str = r#"
:root { --ink: #222; --muted: #666; --line: #e3e3e3; --accent: #1f77b4; --ok: #2ca02c; --bad: #d62728; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 "DejaVu Sans", "Segoe UI", Helvetica, Arial, sans-serif; color: var(--ink); background: #f6f7f9; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 60px; }
header h1 { margin: 0 0 4px; font-size: 28px; }
header p.sub { margin: 0 0 16px; color: var(--muted); font-family: "DejaVu Sans Mono", monospace; font-size: 13px; word-break: break-all; }
.verdict { border-radius: 8px; padding: 12px 18px; margin: 0 0 18px; color: #fff; font-size: 17px; font-weight: bold; }
.verdict.ok { background: var(--ok); }
.verdict.bad { background: var(--bad); }
.verdict ul { margin: 6px 0 0; padding-left: 4px; list-style: none; font-weight: normal; font-size: 14px; }
nav { margin: 0 0 20px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; white-space: nowrap; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 16px 22px 20px; margin: 0 0 20px; }
section h2 { margin: 0 0 12px; font-size: 20px; border-bottom: 2px solid var(--accent); display: inline-block; padding-bottom: 2px; }
h3 { font-size: 15px; margin: 16px 0 6px; color: #444; }
.cols { display: flex; flex-wrap: wrap; gap: 0 56px; align-items: flex-start; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 4px 22px; margin: 0; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; margin: 4px 0 12px; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #f0f3f7; font-weight: bold; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) td { background: #fafbfc; }
ul.checks { list-style: none; padding: 0; margin: 0; }
ul.checks li { padding: 5px 0; border-bottom: 1px solid var(--line); }
.mark { display: inline-block; width: 22px; height: 22px; border-radius: 11px; color: #fff; text-align: center; line-height: 22px; margin-right: 10px; font-weight: bold; }
.mark.ok { background: var(--ok); }
.mark.bad { background: var(--bad); }
.detail { color: var(--muted); font-size: 13px; margin-left: 32px; display: block; }
figure { margin: 8px 0 18px; }
figure svg { max-width: 100%; height: auto; display: block; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
figcaption a { color: var(--accent); margin-left: 8px; }
details summary { cursor: pointer; color: var(--accent); }
table.json td, table.json th { font-size: 13px; padding: 2px 8px; }
footer { color: var(--muted); font-size: 12px; text-align: center; }
"#;

impl Page {
    /// The HTML document.
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n");
        h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>\n");
        h.push_str(&format!("<title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n", esc(&self.title)));
        h.push_str(&format!("<header>\n<h1>{}</h1>\n", esc(&self.title)));
        if !self.subtitle.is_empty() {
            h.push_str(&format!("<p class=\"sub\">{}</p>\n", esc(&self.subtitle)));
        }
        h.push_str("</header>\n");
        if !self.verdict.is_empty() {
            let ok = self.verdict.iter().all(|c| c.ok);
            let head = if ok { "✓ Every check passed" } else { "✗ A check failed" };
            h.push_str(&format!("<div class=\"verdict {}\">{head}\n<ul>\n", if ok { "ok" } else { "bad" }));
            for c in &self.verdict {
                h.push_str(&format!("<li>{} {}</li>\n", if c.ok { "✓" } else { "✗" }, esc(&c.name)));
            }
            h.push_str("</ul>\n</div>\n");
        }
        if self.sections.len() > 1 {
            h.push_str("<nav>");
            for (i, s) in self.sections.iter().enumerate() {
                h.push_str(&format!("\n<a href=\"#s{i}\">{}</a>", esc(&s.title)));
            }
            h.push_str("\n</nav>\n");
        }
        for (i, s) in self.sections.iter().enumerate() {
            h.push_str(&format!("<section id=\"s{i}\">\n<h2>{}</h2>\n", esc(&s.title)));
            for b in &s.blocks {
                block(&mut h, b);
            }
            h.push_str("</section>\n");
        }
        h.push_str("<footer>Written by lora-rs. Self-contained: no scripts, no external files.</footer>\n</main>\n</body>\n</html>\n");
        h
    }
}

fn table(h: &mut String, t: &Table) {
    if !t.title.is_empty() {
        h.push_str(&format!("<h3>{}</h3>\n", esc(&t.title)));
    }
    h.push_str("<table>\n<thead><tr>");
    // A column is numeric when every non-empty cell in it is.
    let num: Vec<bool> = (0..t.header.len())
        .map(|c| {
            let mut cells = t.rows.iter().filter_map(|r| r.get(c)).filter(|s| !s.is_empty()).peekable();
            cells.peek().is_some() && cells.all(|s| numeric(s))
        })
        .collect();
    for (c, head) in t.header.iter().enumerate() {
        let class = if num[c] { " class=\"num\"" } else { "" };
        h.push_str(&format!("<th{class}>{}</th>", esc(head)));
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for r in &t.rows {
        h.push_str("<tr>");
        for (c, cell) in r.iter().enumerate() {
            let class = if num.get(c).copied().unwrap_or(false) { " class=\"num\"" } else { "" };
            h.push_str(&format!("<td{class}>{}</td>", esc(cell)));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table>\n");
}

fn json(h: &mut String, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            h.push_str("<table class=\"json\"><tbody>\n");
            for (k, v) in m {
                h.push_str(&format!("<tr><th>{}</th><td>", esc(k)));
                json(h, v);
                h.push_str("</td></tr>\n");
            }
            h.push_str("</tbody></table>");
        }
        Value::Array(a) if a.iter().any(|x| x.is_object() || x.is_array()) => {
            h.push_str("<table class=\"json\"><tbody>\n");
            for (i, v) in a.iter().enumerate() {
                h.push_str(&format!("<tr><th>{i}</th><td>"));
                json(h, v);
                h.push_str("</td></tr>\n");
            }
            h.push_str("</tbody></table>");
        }
        // Numbers and short arrays exactly as serde_json writes them in the JSON report.
        Value::String(s) => h.push_str(&esc(s)),
        other => h.push_str(&esc(&other.to_string())),
    }
}

fn block(h: &mut String, b: &Block) {
    match b {
        Block::Text(t) => h.push_str(&format!("<p>{}</p>\n", esc(t))),
        Block::KeyValues(kv) => {
            h.push_str("<dl class=\"kv\">\n");
            for (k, v) in kv {
                h.push_str(&format!("<dt>{}</dt><dd>{}</dd>\n", esc(k), esc(v)));
            }
            h.push_str("</dl>\n");
        }
        Block::Table(t) => table(h, t),
        Block::Checks(cs) => {
            h.push_str("<ul class=\"checks\">\n");
            for c in cs {
                let (class, mark) = if c.ok { ("ok", "✓") } else { ("bad", "✗") };
                h.push_str(&format!("<li><span class=\"mark {class}\">{mark}</span>{}: <b>{}</b>", esc(&c.name), c.ok));
                if !c.detail.is_empty() {
                    h.push_str(&format!("<span class=\"detail\">{}</span>", esc(&c.detail)));
                }
                h.push_str("</li>\n");
            }
            h.push_str("</ul>\n");
        }
        Block::Figure { caption, svg, links } => {
            h.push_str("<figure>\n");
            h.push_str(svg_element(svg));
            h.push_str(&format!("\n<figcaption>{}", esc(caption)));
            for l in links {
                h.push_str(&format!("<a href=\"{}\">{}</a>", esc(l), esc(l)));
            }
            h.push_str("</figcaption>\n</figure>\n");
        }
        Block::Columns(cols) => {
            h.push_str("<div class=\"cols\">\n");
            for col in cols {
                h.push_str("<div>\n");
                for b in col {
                    block(h, b);
                }
                h.push_str("</div>\n");
            }
            h.push_str("</div>\n");
        }
        Block::Json { summary, value } => {
            h.push_str(&format!("<details>\n<summary>{}</summary>\n", esc(summary)));
            json(h, value);
            h.push_str("\n</details>\n");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Page {
        let mut t = Table::new("wrong <per> digit", &["digit", "pre-trained", "note"]);
        t.row(vec!["0".into(), "17".into(), "a & b".into()]);
        t.row(vec!["1".into(), "1,234".into(), String::new()]);
        Page {
            title: "lora demo".into(),
            subtitle: "lora demo --steps 20".into(),
            verdict: vec![Check::new("base unchanged", true, "")],
            sections: vec![
                Section { title: "Settings".into(), blocks: vec![Block::KeyValues(vec![("seed".into(), "0".into())])] },
                Section {
                    title: "Results".into(),
                    blocks: vec![
                        Block::Table(t),
                        Block::Checks(vec![Check::new("bits equal", false, "max |err| 1e-8")]),
                        Block::Figure {
                            caption: "c".into(),
                            svg: "<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\"><text>x</text></svg>\n".into(),
                            links: vec!["loss.png".into()],
                        },
                        Block::Json {
                            summary: "JSON".into(),
                            value: serde_json::json!({"accuracy": 0.9681, "wrong": [17, 9], "n": {"x": [{"a": 1}]}}),
                        },
                    ],
                },
            ],
        }
    }

    #[test]
    fn the_page_is_well_formed_xml_with_escaped_text() {
        let html = page().to_html();
        let doc = crate::tests_xml(&html);
        assert_eq!(doc.root_element().tag_name().name(), "html");
        assert!(html.contains("wrong &lt;per&gt; digit") && html.contains("a &amp; b"));
        assert!(!html.contains("<?xml"), "the SVG prolog must not be inlined");
        assert_eq!(doc.descendants().filter(|n| n.has_tag_name("section")).count(), 2);
    }

    #[test]
    fn json_numbers_appear_exactly_as_serde_writes_them() {
        let html = page().to_html();
        assert!(html.contains("0.9681") && html.contains("[17,9]"), "{html}");
    }

    #[test]
    fn numeric_columns_are_right_aligned_and_failed_checks_turn_the_verdict_red() {
        let html = page().to_html();
        assert!(html.contains("<td class=\"num\">1,234</td>") && html.contains("<td>a &amp; b</td>"));
        assert!(html.contains("verdict ok"));
        let mut p = page();
        p.verdict.push(Check::new("logits equal", false, ""));
        assert!(p.to_html().contains("verdict bad"));
    }
}
