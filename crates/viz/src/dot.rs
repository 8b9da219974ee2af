//! The network as a Graphviz DOT graph: layers with shapes and parameter counts, frozen base weights and
//! trainable LoRA branches (A then B, scaled, joining the base output at a `+`), activations between.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::data::group;
use crate::error::{Result, VizError};

/// One linear layer `y = x·Wᵀ + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphLayer {
    /// Layer name, e.g. `linear1`; used in node ids, so letters, digits and `_` keep it readable.
    pub name: String,
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Whether the layer has a bias.
    pub bias: bool,
    /// The activation applied after it (e.g. `ReLU`), if any.
    pub activation: Option<String>,
}

/// The LoRA adapter drawn on every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphLora {
    /// Rank r.
    pub rank: usize,
    /// Alpha.
    pub alpha: f64,
    /// The scale s that multiplies B·A (alpha/r, or alpha/√r for rsLoRA).
    pub scale: f64,
}

/// A feed-forward network of linear layers, optionally with a LoRA adapter on each.
#[derive(Debug, Clone, PartialEq)]
pub struct NetGraph {
    /// Graph title, e.g. `ExpensiveNet`.
    pub title: String,
    /// Label of the input, e.g. `image x`.
    pub input: String,
    /// Label of the output, e.g. `logits`.
    pub output: String,
    /// The layers in forward order.
    pub layers: Vec<GraphLayer>,
    /// With an adapter the base is drawn frozen and A, B trainable; without, the base is trainable.
    pub lora: Option<GraphLora>,
}

/// Quotes a DOT string: escapes `"` and `\`, turns line breaks into DOT's `\n`.
fn q(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A node id from a layer name: letters, digits and `_`, never starting with a digit.
fn id(name: &str, part: &str) -> String {
    let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("n_{clean}_{part}")
}

const FROZEN: &str = "style=\"filled,dashed\", fillcolor=\"#e5e5e5\", color=\"#7f7f7f\"";
const TRAINABLE: &str = "style=\"filled,bold\", fillcolor=\"#fdd0a2\", color=\"#d94801\"";

impl NetGraph {
    /// Base parameters (weights and biases) of all layers.
    pub fn base_params(&self) -> usize {
        self.layers.iter().map(|l| l.out_features * l.in_features + if l.bias { l.out_features } else { 0 }).sum()
    }

    /// Parameters of the adapter (A and B of every layer), 0 without one.
    pub fn lora_params(&self) -> usize {
        self.lora.as_ref().map_or(0, |a| self.layers.iter().map(|l| a.rank * (l.in_features + l.out_features)).sum())
    }

    /// The DOT text.
    pub fn to_dot(&self) -> String {
        let mut d = String::new();
        let mut line = |s: String| {
            d.push_str(&s);
            d.push('\n');
        };
        let mut title = format!("{}: {} base parameters", self.title, group(self.base_params()));
        if let Some(a) = &self.lora {
            let pct = 100.0 * self.lora_params() as f64 / self.base_params().max(1) as f64;
            title.push_str(&format!(
                ", LoRA rank {} alpha {} (s = {}): {} trainable (+{pct:.3}%)",
                a.rank,
                a.alpha,
                a.scale,
                group(self.lora_params())
            ));
        }
        line(format!("digraph {} {{", q(&self.title)));
        line(format!(
            "  graph [label={}, labelloc=t, fontsize=16, fontname=\"DejaVu Sans\", rankdir=TB, nodesep=0.4, ranksep=0.35];",
            q(&title)
        ));
        line("  node [shape=box, style=\"rounded,filled\", fontname=\"DejaVu Sans\", fontsize=11, fillcolor=white];".into());
        line("  edge [fontname=\"DejaVu Sans\", fontsize=10, color=\"#555555\"];".into());
        let first_in = self.layers.first().map_or(0, |l| l.in_features);
        line(format!("  input [label={}, shape=oval, fillcolor=\"#deebf7\"];", q(&format!("{}\n(B, {first_in})", self.input))));
        let mut prev = "input".to_string();
        for (i, l) in self.layers.iter().enumerate() {
            let (o, n) = (l.out_features, l.in_features);
            let base = o * n + if l.bias { o } else { 0 };
            let w = id(&l.name, "W");
            line(format!("  subgraph {} {{", id(&l.name, "cluster").replacen("n_", "cluster_", 1)));
            line(format!("    label={}; style=rounded; color=\"#9e9e9e\"; fontsize=13;", q(&format!("{} ({n} → {o})", l.name))));
            let bias = if l.bias { format!("\nb [{o}]") } else { String::new() };
            match &self.lora {
                Some(a) => {
                    let r = a.rank;
                    let (aid, bid, add) = (id(&l.name, "A"), id(&l.name, "B"), id(&l.name, "add"));
                    line(format!("    {w} [label={}, {FROZEN}];", q(&format!("W0 [{o}, {n}]{bias}\nfrozen · {} params", group(base)))));
                    line(format!("    {aid} [label={}, {TRAINABLE}];", q(&format!("A [{r}, {n}]\ntrainable · {}", group(r * n)))));
                    line(format!("    {bid} [label={}, {TRAINABLE}];", q(&format!("B [{o}, {r}]\ntrainable · {}", group(o * r)))));
                    line(format!("    {add} [label=\"+\", shape=circle, fixedsize=true, width=0.35, fillcolor=\"#fff5eb\"];"));
                    line("  }".into());
                    line(format!("  {prev} -> {w} [label={}];", q(&format!(" (B, {n})"))));
                    line(format!("  {prev} -> {aid} [label={}, color=\"#d94801\"];", q(" x·Aᵀ")));
                    line(format!("  {aid} -> {bid} [label={}, color=\"#d94801\"];", q(&format!(" (B, {r})"))));
                    line(format!("  {w} -> {add} [label={}];", q(&format!(" x·W0ᵀ + b (B, {o})"))));
                    line(format!("  {bid} -> {add} [label={}, color=\"#d94801\"];", q(&format!(" × s = {}", a.scale))));
                    prev = add;
                }
                None => {
                    line(format!(
                        "    {w} [label={}, {TRAINABLE}];",
                        q(&format!("W [{o}, {n}]{bias}\ntrainable · {} params", group(base)))
                    ));
                    line("  }".into());
                    line(format!("  {prev} -> {w} [label={}];", q(&format!(" (B, {n})"))));
                    prev = w;
                }
            }
            if let Some(act) = &l.activation {
                let aid = format!("act{}", i + 1);
                line(format!("  {aid} [label={}, shape=ellipse, fillcolor=\"#f7f7f7\"];", q(act)));
                line(format!("  {prev} -> {aid} [label={}];", q(&format!(" (B, {o})"))));
                prev = aid;
            }
        }
        let last_out = self.layers.last().map_or(0, |l| l.out_features);
        line(format!("  output [label={}, shape=oval, fillcolor=\"#deebf7\"];", q(&format!("{}\n(B, {last_out})", self.output))));
        line(format!("  {prev} -> output [label={}];", q(&format!(" (B, {last_out})"))));
        line("  subgraph cluster_legend {".into());
        line("    label=\"legend\"; style=rounded; color=\"#bdbdbd\"; fontsize=11;".into());
        line(format!("    legend_frozen [label=\"frozen (no gradient)\", {FROZEN}];"));
        line(format!("    legend_trainable [label=\"trainable\", {TRAINABLE}];"));
        line("    { rank=same; legend_frozen; legend_trainable; }".into());
        line("  }".into());
        line("}".into());
        d
    }
}

/// Whether Graphviz's `dot` can be run.
pub fn graphviz_available() -> bool {
    Command::new("dot").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Runs `dot -T<format>` (e.g. `svg`, `png`) on DOT text and returns its output.
pub fn render_dot(dot: &str, format: &str) -> Result<Vec<u8>> {
    if !format.chars().all(|c| c.is_ascii_alphanumeric() || c == ':') || format.is_empty() {
        return Err(VizError::invalid("graphviz format", format!("{format:?} is not a format name")));
    }
    let fail = |why: String| VizError::Graphviz { format: format.to_string(), why };
    let mut child =
        match Command::new("dot").arg(format!("-T{format}")).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(VizError::GraphvizMissing),
            Err(e) => return Err(fail(e.to_string())),
        };
    let mut stdin = child.stdin.take().ok_or_else(|| fail("no stdin".into()))?;
    let text = dot.to_string();
    // Write from a thread so a large output cannot dead-lock against a full stdin pipe.
    let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    let written = writer.join().map_err(|_| fail("writing to dot panicked".into()))?;
    if !out.status.success() {
        return Err(fail(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
    }
    written.map_err(|e| fail(format!("writing the graph: {e}")))?;
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(lora: bool) -> NetGraph {
        let layer = |name: &str, i, o, act: Option<&str>| GraphLayer {
            name: name.into(),
            in_features: i,
            out_features: o,
            bias: true,
            activation: act.map(String::from),
        };
        NetGraph {
            title: "ExpensiveNet".into(),
            input: "image x".into(),
            output: "logits".into(),
            layers: vec![
                layer("linear1", 784, 1000, Some("ReLU")),
                layer("linear2", 1000, 2000, Some("ReLU")),
                layer("linear3", 2000, 10, None),
            ],
            lora: lora.then_some(GraphLora { rank: 1, alpha: 1.0, scale: 1.0 }),
        }
    }

    #[test]
    fn counts_match_the_seed_network() {
        assert_eq!(net(true).base_params(), 2_807_010);
        assert_eq!(net(true).lora_params(), 6_794);
        assert_eq!(net(false).lora_params(), 0);
    }

    #[test]
    fn dot_marks_the_base_frozen_and_joins_a_and_b_at_a_plus_per_layer() {
        let d = net(true).to_dot();
        assert!(d.starts_with("digraph \"ExpensiveNet\" {") && d.trim_end().ends_with('}'));
        assert_eq!(d.matches('{').count(), d.matches('}').count());
        for l in ["linear1", "linear2", "linear3"] {
            assert!(d.contains(&format!("n_{l}_A -> n_{l}_B")), "{l}: no A → B edge");
            assert!(d.contains(&format!("n_{l}_B -> n_{l}_add")), "{l}: B does not join");
            assert!(d.contains(&format!("n_{l}_W -> n_{l}_add")), "{l}: base does not join");
        }
        assert!(d.contains("W0 [1000, 784]\\nb [1000]\\nfrozen · 785,000 params"));
        assert!(d.contains("A [1, 2000]\\ntrainable · 2,000"));
        assert!(d.contains("6,794 trainable (+0.242%)"));
    }

    #[test]
    fn without_an_adapter_the_base_is_trainable_and_there_is_no_branch() {
        let d = net(false).to_dot();
        assert!(!d.contains("_A ") && !d.contains("frozen ·"));
        assert!(d.contains("W [10, 2000]\\nb [10]\\ntrainable · 20,010 params"));
    }

    #[test]
    fn quoting_escapes_quotes_backslashes_and_newlines() {
        assert_eq!(q("a \"b\" \\ c\nd"), "\"a \\\"b\\\" \\\\ c\\nd\"");
    }

    #[test]
    fn graphviz_accepts_the_graph_when_it_is_installed() {
        match render_dot(&net(true).to_dot(), "svg") {
            Ok(svg) => {
                let s = String::from_utf8(svg).unwrap();
                assert!(s.contains("<svg") && s.contains("linear2"), "{s}");
            }
            Err(VizError::GraphvizMissing) => assert!(!graphviz_available()),
            Err(e) => panic!("dot refused the graph: {e}"),
        }
        assert!(matches!(render_dot("digraph {", "svg"), Err(VizError::Graphviz { .. }) | Err(VizError::GraphvizMissing)));
        assert!(render_dot("digraph {}", "svg; rm").is_err());
    }
}
