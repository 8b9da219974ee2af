//! Loss series as CSV and JSON lines, for people who plot with their own tools.

use crate::chart::smooth;
use crate::data::LossSeries;

/// `step,loss,seconds,smoothed_loss` with a header line and one row per step.
pub fn metrics_csv(s: &LossSeries) -> String {
    let losses: Vec<f32> = s.points.iter().map(|p| p.loss).collect();
    let sm = smooth(&losses);
    let mut out = String::from("step,loss,seconds,smoothed_loss\n");
    for (p, m) in s.points.iter().zip(sm) {
        out.push_str(&format!("{},{},{:.6},{}\n", p.step, p.loss, p.seconds, m));
    }
    out
}

/// One JSON object per line: `{"step":1,"loss":2.31,"seconds":0.012}`.
pub fn metrics_jsonl(s: &LossSeries) -> String {
    let mut out = String::new();
    for p in &s.points {
        let line = serde_json::json!({"step": p.step, "loss": p.loss, "seconds": p.seconds});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_a_header_and_one_row_per_step_with_the_losses() {
        let s = LossSeries::new("x", &[2.5, 1.25, 0.5], &[0.1, 0.2, 0.3]).unwrap();
        let csv = metrics_csv(&s);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "step,loss,seconds,smoothed_loss");
        assert_eq!(lines.len(), 4);
        assert!(lines[2].starts_with("2,1.25,0.200000,"), "{}", lines[2]);
    }

    #[test]
    fn jsonl_lines_parse_back_to_the_points() {
        let s = LossSeries::new("x", &[2.5, 0.75], &[0.5, 1.5]).unwrap();
        let v: Vec<serde_json::Value> = metrics_jsonl(&s).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1]["step"], 2);
        assert_eq!(v[1]["loss"].as_f64().unwrap(), 0.75);
        assert_eq!(v[1]["seconds"].as_f64().unwrap(), 1.5);
    }
}
