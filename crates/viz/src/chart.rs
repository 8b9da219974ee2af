//! Charts drawn with plotters, each to PNG (bitmap backend, bundled font) or SVG (text left to the viewer's
//! sans-serif font): loss curves, grouped bars of wrong counts, confusion heat maps, parameter counts.

use std::sync::OnceLock;

use plotters::backend::RGBPixel;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use crate::data::{group, Counts, LayerCount, LossSeries, Matrix};
use crate::error::{Result, VizError};

static FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
const SANS: &str = "sans-serif";

/// A loss to 4 decimals, or in scientific notation when that would show only zeros.
pub(crate) fn fmt_loss(l: f32) -> String {
    if l != 0.0 && l.abs() < 1e-3 {
        format!("{l:.2e}")
    } else {
        format!("{l:.4}")
    }
}

/// Registers the bundled font once; every chart calls it before drawing.
fn fonts() -> Result<()> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| [FontStyle::Normal, FontStyle::Bold].into_iter().all(|style| register_font(SANS, style, FONT).is_ok()));
    if ok {
        Ok(())
    } else {
        Err(VizError::Draw { chart: "fonts".into(), why: "the bundled DejaVu Sans could not be loaded".into() })
    }
}

/// Tableau 10: distinct, colour-blind-friendly enough, and familiar from matplotlib.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const INK: RGBColor = RGBColor(40, 40, 40);
const GRID: RGBColor = RGBColor(225, 225, 225);

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// The smoothing span for a series of `n` steps: about n/20, at least 3 from 10 steps on, at most 100;
/// below 10 steps 1 (no smoothing).
pub(crate) fn span(n: usize) -> usize {
    if n < 10 {
        1
    } else {
        (n / 20).clamp(3, 100)
    }
}

/// Exponential moving average with bias correction (as TensorBoard smooths), over a span of about 1/20
/// of the series (at least 3 steps from 10 steps on, at most 100; series under 10 steps are left alone).
pub fn smooth(values: &[f32]) -> Vec<f32> {
    let span = span(values.len()) as f64;
    let beta = 1.0 - 2.0 / (span + 1.0);
    let mut m = 0.0f64;
    let mut w = 1.0f64;
    values
        .iter()
        .map(|&v| {
            m = beta * m + (1.0 - beta) * v as f64;
            w *= beta;
            (m / (1.0 - w).max(f64::MIN_POSITIVE)) as f32
        })
        .collect()
}

/// Loss per step and smoothed, one panel per series side by side (runs of different lengths keep their
/// own step axis).
#[derive(Debug, Clone, PartialEq)]
pub struct LossChart {
    /// Chart title.
    pub title: String,
    /// One panel each.
    pub series: Vec<LossSeries>,
}

/// Grouped bars: per class, one bar per named series (pre-trained, LoRA on, LoRA off, each adapter…).
#[derive(Debug, Clone, PartialEq)]
pub struct WrongChart {
    /// Chart title.
    pub title: String,
    /// Class labels along the x axis, e.g. "0".."9".
    pub classes: Vec<String>,
    /// One colour each; every series has one count per class.
    pub series: Vec<Counts>,
}

/// Grouped bars of any real values: per group (x axis), one bar per named series, each labelled with its
/// value (e.g. validation bits per byte per corpus, one bar per model or adapter).
#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    /// Chart title.
    pub title: String,
    /// The y axis' description.
    pub y_desc: String,
    /// The x axis' description.
    pub x_desc: String,
    /// Group labels along the x axis.
    pub groups: Vec<String>,
    /// (name, one value per group), one colour each.
    pub series: Vec<(String, Vec<f64>)>,
    /// Decimals of the value labels.
    pub decimals: usize,
}

/// Confusion matrices as heat maps, one panel per model: green diagonal (correct), red off-diagonal
/// (errors, log-scaled so single mistakes show), every cell labelled with its count.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfusionChart {
    /// Chart title.
    pub title: String,
    /// Class labels for both axes.
    pub classes: Vec<String>,
    /// One panel each.
    pub matrices: Vec<Matrix>,
}

/// Base versus LoRA parameters per layer and in total, on a log scale.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamsChart {
    /// Chart title.
    pub title: String,
    /// Legend name for the LoRA bars, e.g. "LoRA (rank 1)".
    pub lora_name: String,
    /// The layers in forward order; a "total" group is added.
    pub layers: Vec<LayerCount>,
}

/// Any chart; renders to PNG bytes or an SVG document.
#[derive(Debug, Clone, PartialEq)]
pub enum Chart {
    /// Training losses.
    Loss(LossChart),
    /// Wrong answers per class.
    Wrong(WrongChart),
    /// Confusion heat maps.
    Confusion(ConfusionChart),
    /// Parameter counts.
    Params(ParamsChart),
    /// Grouped bars of real values.
    Bars(BarChart),
}

/// A plotters error turned into text (the backends' error types differ).
struct DrawErr(String);

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for DrawErr {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        DrawErr(e.to_string())
    }
}

type Drawn = std::result::Result<(), DrawErr>;

impl Chart {
    /// The chart's title.
    pub fn title(&self) -> &str {
        match self {
            Chart::Loss(c) => &c.title,
            Chart::Wrong(c) => &c.title,
            Chart::Confusion(c) => &c.title,
            Chart::Params(c) => &c.title,
            Chart::Bars(c) => &c.title,
        }
    }

    /// Width and height in pixels.
    pub fn size(&self) -> (u32, u32) {
        match self {
            Chart::Loss(c) => ((600 * c.series.len()).max(800) as u32, 440),
            Chart::Wrong(_) => (1100, 460),
            Chart::Bars(c) => ((240 + 110 * c.groups.len() * c.series.len().max(1)).clamp(700, 1400) as u32, 460),
            Chart::Confusion(c) => {
                let cols = c.matrices.len().clamp(1, 3) as u32;
                let rows = c.matrices.len().div_ceil(3).max(1) as u32;
                (560 * cols, 50 + 520 * rows)
            }
            Chart::Params(_) => (900, 440),
        }
    }

    /// Refuses data that cannot be drawn: no series, empty or ragged series, non-square matrices.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(VizError::invalid(format!("chart \"{}\"", self.title()), why));
        match self {
            Chart::Loss(c) => {
                if c.series.is_empty() {
                    return bad("no loss series".into());
                }
                for s in &c.series {
                    if s.points.is_empty() {
                        return bad(format!("loss series \"{}\" has no points", s.name));
                    }
                    if let Some(p) = s.points.iter().find(|p| !p.loss.is_finite()) {
                        return bad(format!("loss series \"{}\" has loss {} at step {}", s.name, p.loss, p.step));
                    }
                }
            }
            Chart::Wrong(c) => {
                if c.series.is_empty() || c.classes.is_empty() {
                    return bad("no series or no classes".into());
                }
                if let Some(s) = c.series.iter().find(|s| s.counts.len() != c.classes.len()) {
                    return bad(format!("series \"{}\" has {} counts for {} classes", s.name, s.counts.len(), c.classes.len()));
                }
            }
            Chart::Bars(c) => {
                if c.series.is_empty() || c.groups.is_empty() {
                    return bad("no series or no groups".into());
                }
                if let Some((n, v)) = c.series.iter().find(|(_, v)| v.len() != c.groups.len()) {
                    return bad(format!("series \"{n}\" has {} values for {} groups", v.len(), c.groups.len()));
                }
                if let Some((n, _)) = c.series.iter().find(|(_, v)| v.iter().any(|x| !x.is_finite() || *x < 0.0)) {
                    return bad(format!("series \"{n}\" has a negative or non-finite value"));
                }
            }
            Chart::Confusion(c) => {
                if c.matrices.is_empty() {
                    return bad("no matrices".into());
                }
                let k = c.classes.len();
                if let Some(m) = c.matrices.iter().find(|m| m.cells.len() != k || m.cells.iter().any(|r| r.len() != k)) {
                    return bad(format!("matrix \"{}\" is not {k} × {k}", m.name));
                }
            }
            Chart::Params(c) => {
                if c.layers.is_empty() {
                    return bad("no layers".into());
                }
            }
        }
        Ok(())
    }

    /// Renders to an SVG document.
    pub fn to_svg(&self) -> Result<String> {
        self.validate()?;
        fonts()?;
        let mut s = String::new();
        {
            let root = SVGBackend::with_string(&mut s, self.size()).into_drawing_area();
            self.draw(&root).and_then(|_| root.present().map_err(DrawErr::from)).map_err(|e| self.err(e))?;
        }
        Ok(s)
    }

    /// Renders to PNG bytes (8-bit RGB).
    pub fn to_png(&self) -> Result<Vec<u8>> {
        self.validate()?;
        fonts()?;
        let (w, h) = self.size();
        let mut rgb = vec![0u8; w as usize * h as usize * 3];
        {
            let backend = BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut rgb, (w, h))
                .map_err(|e| VizError::Draw { chart: self.title().to_string(), why: e.to_string() })?;
            let root = backend.into_drawing_area();
            self.draw(&root).and_then(|_| root.present().map_err(DrawErr::from)).map_err(|e| self.err(e))?;
        }
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let png_err = |e: png::EncodingError| VizError::Draw { chart: self.title().to_string(), why: format!("PNG encoding: {e}") };
        let mut writer = enc.write_header().map_err(png_err)?;
        writer.write_image_data(&rgb).map_err(png_err)?;
        writer.finish().map_err(png_err)?;
        Ok(out)
    }

    fn err(&self, e: DrawErr) -> VizError {
        VizError::Draw { chart: self.title().to_string(), why: e.0 }
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Drawn
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let body = root.titled(self.title(), (SANS, px(22)).into_font().style(FontStyle::Bold).color(&INK))?;
        match self {
            Chart::Loss(c) => draw_loss(c, &body),
            Chart::Wrong(c) => draw_wrong(c, root, &body),
            Chart::Bars(c) => draw_bars(c, root, &body),
            Chart::Confusion(c) => draw_confusion(c, root, &body),
            Chart::Params(c) => draw_params(c, root, &body),
        }
    }
}

/// plotters renders a font of nominal size n at about 0.8·n pixels; sizes here are the pixels wanted.
fn px(size: u32) -> f64 {
    size as f64 * 1.24
}

fn label_font(size: u32) -> TextStyle<'static> {
    (SANS, px(size)).into_font().color(&INK)
}

fn draw_loss<DB: DrawingBackend>(c: &LossChart, body: &DrawingArea<DB, Shift>) -> Drawn
where
    DB::ErrorType: 'static,
{
    let panels = body.split_evenly((1, c.series.len()));
    for (i, (s, panel)) in c.series.iter().zip(&panels).enumerate() {
        let losses: Vec<f32> = s.points.iter().map(|p| p.loss).collect();
        let sm = smooth(&losses);
        let last = s.points.last().map_or(1, |p| p.step).max(2) as f64;
        // Headroom above the highest loss keeps the legend (upper right) clear of the curves.
        let top = losses.iter().cloned().fold(0f32, f32::max).max(1e-6) as f64 * 1.35;
        let secs = s.points.last().map_or(0.0, |p| p.seconds);
        let caption =
            format!("{}: {} steps, {:.1} s, final smoothed loss {}", s.name, s.points.len(), secs, fmt_loss(*sm.last().unwrap_or(&0.0)));
        let mut ch = ChartBuilder::on(panel)
            .caption(caption, label_font(16))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(1f64..last, 0f64..top)?;
        ch.configure_mesh()
            .x_desc("step")
            .y_desc("cross-entropy loss")
            .label_style(label_font(14))
            .axis_desc_style(label_font(15))
            .light_line_style(WHITE)
            .bold_line_style(GRID)
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .draw()?;
        let col = color(i);
        let raw = s.points.iter().map(|p| (p.step as f64, p.loss as f64));
        ch.draw_series(LineSeries::new(raw, col.mix(0.35).stroke_width(1)))?
            .label("loss per step")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.mix(0.35).stroke_width(2)));
        let span = span(losses.len());
        let smoothed = s.points.iter().zip(&sm).map(|(p, &m)| (p.step as f64, m as f64));
        ch.draw_series(LineSeries::new(smoothed, col.stroke_width(3)))?
            .label(format!("smoothed (EMA, span {span})"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(3)));
        ch.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(GRID)
            .label_font(label_font(13))
            .draw()?;
    }
    Ok(())
}

/// A row of coloured squares with names, centred in `area` (wraps onto further rows when too wide).
fn legend_row<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, items: &[(String, RGBColor)]) -> Drawn {
    let font = label_font(15);
    let (w, _) = area.dim_in_pixel();
    let widths: Vec<i32> = items
        .iter()
        .map(|(name, _)| area.estimate_text_size(name, &font).map(|(tw, _)| tw as i32 + 44))
        .collect::<std::result::Result<_, _>>()?;
    let mut rows: Vec<Vec<usize>> = vec![Vec::new()];
    let mut used = 0;
    for (i, &iw) in widths.iter().enumerate() {
        if used + iw > w as i32 - 20 && !rows.last().is_some_and(|r| r.is_empty()) {
            rows.push(Vec::new());
            used = 0;
        }
        used += iw;
        if let Some(r) = rows.last_mut() {
            r.push(i)
        }
    }
    for (ri, row) in rows.iter().enumerate() {
        let total: i32 = row.iter().map(|&i| widths[i]).sum();
        let mut x = (w as i32 - total) / 2;
        let y = 10 + ri as i32 * 24;
        for &i in row {
            let (name, col) = &items[i];
            area.draw(&Rectangle::new([(x, y - 7), (x + 14, y + 7)], col.filled()))?;
            area.draw(&Text::new(name.clone(), (x + 20, y), font.clone().pos(Pos::new(HPos::Left, VPos::Center))))?;
            x += widths[i];
        }
    }
    Ok(())
}

/// Writes `labels` centred under the given absolute x positions, at absolute height `y`.
fn x_labels<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, at: &[(i32, String)], y: i32, size: u32) -> Drawn {
    let style = label_font(size).pos(Pos::new(HPos::Center, VPos::Top));
    for (x, s) in at {
        root.draw(&Text::new(s.clone(), (*x, y), style.clone()))?;
    }
    Ok(())
}

fn draw_wrong<DB: DrawingBackend>(c: &WrongChart, root: &DrawingArea<DB, Shift>, body: &DrawingArea<DB, Shift>) -> Drawn
where
    DB::ErrorType: 'static,
{
    let bars = BarChart {
        title: c.title.clone(),
        y_desc: "wrong answers (test set)".into(),
        x_desc: "true digit".into(),
        groups: c.classes.clone(),
        series: c.series.iter().map(|s| (s.name.clone(), s.counts.iter().map(|&v| v as f64).collect())).collect(),
        decimals: 0,
    };
    let legend: Vec<String> = c
        .series
        .iter()
        .map(|s| match s.accuracy {
            Some(a) => format!("{} (accuracy {a:.4})", s.name),
            None => s.name.clone(),
        })
        .collect();
    grouped_bars(&bars, &legend, root, body)
}

fn draw_bars<DB: DrawingBackend>(c: &BarChart, root: &DrawingArea<DB, Shift>, body: &DrawingArea<DB, Shift>) -> Drawn
where
    DB::ErrorType: 'static,
{
    let legend: Vec<String> = c.series.iter().map(|s| s.0.clone()).collect();
    grouped_bars(c, &legend, root, body)
}

/// Grouped bars with a legend row, value labels (up to 4 series) and group labels under the axis.
fn grouped_bars<DB: DrawingBackend>(
    c: &BarChart,
    legend_names: &[String],
    root: &DrawingArea<DB, Shift>,
    body: &DrawingArea<DB, Shift>,
) -> Drawn
where
    DB::ErrorType: 'static,
{
    let k = c.groups.len();
    let n = c.series.len();
    let top = c.series.iter().flat_map(|s| s.1.iter()).cloned().fold(0.0, f64::max).max(if c.decimals == 0 { 1.0 } else { 1e-9 }) * 1.12;
    let rows = if n > 3 { 2 } else { 1 };
    let (legend, plot) = body.split_vertically(12 + 24 * rows);
    let items: Vec<(String, RGBColor)> = legend_names.iter().enumerate().map(|(i, s)| (s.clone(), color(i))).collect();
    legend_row(&legend, &items)?;
    let dec = c.decimals;
    let mut ch = ChartBuilder::on(&plot)
        .margin(12)
        .margin_right(24)
        .x_label_area_size(56)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..k as f64 - 0.5, 0f64..top)?;
    ch.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(c.y_desc.as_str())
        .y_label_formatter(&|v| if dec == 0 { format!("{v:.0}") } else { format!("{v:.2}") })
        .label_style(label_font(14))
        .axis_desc_style(label_font(15))
        .light_line_style(WHITE)
        .bold_line_style(GRID)
        .draw()?;
    let group_w = 0.84;
    let bar_w = group_w / n as f64;
    for (si, s) in c.series.iter().enumerate() {
        let col = color(si);
        let bars = s.1.iter().enumerate().map(|(d, &v)| {
            let x0 = d as f64 - group_w / 2.0 + si as f64 * bar_w;
            Rectangle::new([(x0 + bar_w * 0.06, 0.0), (x0 + bar_w * 0.94, v)], col.filled())
        });
        ch.draw_series(bars)?;
    }
    // Value labels above the bars while they fit (up to 4 series).
    if n <= 4 {
        let size = if n <= 3 { 12 } else { 10 };
        let style = label_font(size).pos(Pos::new(HPos::Center, VPos::Bottom));
        for (si, s) in c.series.iter().enumerate() {
            for (d, &v) in s.1.iter().enumerate() {
                let x = d as f64 - group_w / 2.0 + (si as f64 + 0.5) * bar_w;
                let (px, py) = ch.backend_coord(&(x, v));
                root.draw(&Text::new(format!("{v:.dec$}"), (px, py - 2), style.clone()))?;
            }
        }
    }
    let y0 = ch.backend_coord(&(0.0, 0.0)).1 + 8;
    let at: Vec<(i32, String)> = c.groups.iter().enumerate().map(|(d, l)| (ch.backend_coord(&(d as f64, 0.0)).0, l.clone())).collect();
    x_labels(root, &at, y0, 18)?;
    let (xr, yb) = ch.backend_coord(&(k as f64 - 0.5, 0.0));
    root.draw(&Text::new(c.x_desc.clone(), (xr, yb + 32), label_font(16).pos(Pos::new(HPos::Right, VPos::Top))))?;
    Ok(())
}

/// Linear blend from white to `to` by `t` in [0, 1].
fn shade(to: RGBColor, t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let f = |c: u8| (255.0 + (c as f64 - 255.0) * t).round() as u8;
    RGBColor(f(to.0), f(to.1), f(to.2))
}

fn draw_confusion<DB: DrawingBackend>(c: &ConfusionChart, root: &DrawingArea<DB, Shift>, body: &DrawingArea<DB, Shift>) -> Drawn
where
    DB::ErrorType: 'static,
{
    let k = c.classes.len();
    let cols = c.matrices.len().clamp(1, 3);
    let rows = c.matrices.len().div_ceil(3).max(1);
    let panels = body.split_evenly((rows, cols));
    let green = RGBColor(35, 139, 69);
    let red = RGBColor(203, 24, 29);
    for (m, panel) in c.matrices.iter().zip(&panels) {
        let errors: usize = (0..k).map(|t| m.cells[t].iter().sum::<usize>() - m.cells[t][t]).sum();
        let max_off =
            (0..k).flat_map(|t| (0..k).filter(move |&p| p != t).map(move |p| (t, p))).map(|(t, p)| m.cells[t][p]).max().unwrap_or(0);
        let max_diag = (0..k).map(|t| m.cells[t][t]).max().unwrap_or(0).max(1);
        let mut ch = ChartBuilder::on(panel)
            .caption(format!("{}: {} errors", m.name, group(errors)), label_font(16))
            .margin(10)
            .margin_right(24)
            .x_label_area_size(44)
            .y_label_area_size(44)
            .build_cartesian_2d(0f64..k as f64, 0f64..k as f64)?;
        ch.configure_mesh().disable_mesh().x_labels(0).y_labels(0).draw()?;
        let cell = |t: usize, p: usize| -> [(f64, f64); 2] {
            let y = (k - 1 - t) as f64;
            [(p as f64, y + 1.0), (p as f64 + 1.0, y)]
        };
        let mut texts = Vec::new();
        for t in 0..k {
            for p in 0..k {
                let v = m.cells[t][p];
                let (fill, strength) = if t == p {
                    let s = 0.15 + 0.85 * v as f64 / max_diag as f64;
                    (shade(green, s), s)
                } else if v == 0 {
                    (RGBColor(250, 250, 250), 0.0)
                } else {
                    let s = 0.12 + 0.88 * (v as f64).ln_1p() / (max_off.max(1) as f64).ln_1p();
                    (shade(red, s), s)
                };
                ch.draw_series(std::iter::once(Rectangle::new(cell(t, p), fill.filled())))?;
                ch.draw_series(std::iter::once(Rectangle::new(cell(t, p), WHITE.stroke_width(1))))?;
                if v > 0 {
                    let ink = if strength > 0.6 { WHITE } else { INK };
                    texts.push((ch.backend_coord(&(p as f64 + 0.5, (k - 1 - t) as f64 + 0.5)), v.to_string(), ink));
                }
            }
        }
        let size = if k <= 10 { 12 } else { 9 };
        for ((x, y), s, ink) in texts {
            root.draw(&Text::new(s, (x, y), (SANS, px(size)).into_font().color(&ink).pos(Pos::new(HPos::Center, VPos::Center))))?;
        }
        let (_, ybottom) = ch.backend_coord(&(0.0, 0.0));
        let (xleft, ytop) = ch.backend_coord(&(0.0, k as f64));
        let xs: Vec<(i32, String)> =
            c.classes.iter().enumerate().map(|(p, l)| (ch.backend_coord(&(p as f64 + 0.5, 0.0)).0, l.clone())).collect();
        x_labels(root, &xs, ybottom + 6, 13)?;
        let xright = ch.backend_coord(&(k as f64, 0.0)).0;
        root.draw(&Text::new("predicted", ((xleft + xright) / 2, ybottom + 24), label_font(13).pos(Pos::new(HPos::Center, VPos::Top))))?;
        for (t, l) in c.classes.iter().enumerate() {
            let y = ch.backend_coord(&(0.0, (k - 1 - t) as f64 + 0.5)).1;
            root.draw(&Text::new(l.clone(), (xleft - 8, y), label_font(13).pos(Pos::new(HPos::Right, VPos::Center))))?;
        }
        root.draw(&Text::new("true", (xleft - 8, ytop - 16), label_font(13).pos(Pos::new(HPos::Right, VPos::Center))))?;
    }
    Ok(())
}

fn draw_params<DB: DrawingBackend>(c: &ParamsChart, root: &DrawingArea<DB, Shift>, body: &DrawingArea<DB, Shift>) -> Drawn
where
    DB::ErrorType: 'static,
{
    let mut groups: Vec<(String, usize, usize)> = c.layers.iter().map(|l| (l.name.clone(), l.base, l.lora)).collect();
    let (base, lora) = c.layers.iter().fold((0, 0), |(b, l), x| (b + x.base, l + x.lora));
    groups.push(("total".to_string(), base, lora));
    let k = groups.len();
    let top = groups.iter().map(|g| g.1.max(g.2)).max().unwrap_or(1).max(1) as f64 * 4.0;
    let names = ["base (weight + bias)", c.lora_name.as_str()];
    let (legend, plot) = body.split_vertically(36);
    legend_row(&legend, &[(names[0].to_string(), color(0)), (names[1].to_string(), color(1))])?;
    let mut ch = ChartBuilder::on(&plot)
        .margin(12)
        .margin_right(24)
        .x_label_area_size(52)
        .y_label_area_size(90)
        .build_cartesian_2d(-0.5f64..k as f64 - 0.5, (1f64..top).log_scale())?;
    ch.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("parameters (log scale)")
        .y_label_formatter(&|v| group(v.round() as usize))
        .label_style(label_font(14))
        .axis_desc_style(label_font(15))
        .light_line_style(WHITE)
        .bold_line_style(GRID)
        .draw()?;
    let bar_w = 0.38;
    let style = label_font(12).pos(Pos::new(HPos::Center, VPos::Bottom));
    for si in 0..2 {
        let col = color(si);
        let bars = groups.iter().enumerate().map(|(g, (_, b, l))| {
            let v = if si == 0 { *b } else { *l };
            let x0 = g as f64 - bar_w + si as f64 * bar_w;
            Rectangle::new([(x0 + 0.02, 1.0), (x0 + bar_w - 0.02, (v as f64).max(1.0))], col.filled())
        });
        ch.draw_series(bars)?;
        for (g, (_, b, l)) in groups.iter().enumerate() {
            let v = if si == 0 { *b } else { *l };
            let (px, py) = ch.backend_coord(&(g as f64 - bar_w / 2.0 + si as f64 * bar_w, (v as f64).max(1.0)));
            root.draw(&Text::new(group(v), (px, py - 2), style.clone()))?;
        }
    }
    let y0 = ch.backend_coord(&(0.0, 1.0)).1 + 8;
    let at: Vec<(i32, String)> = groups
        .iter()
        .enumerate()
        .map(|(g, (name, b, l))| {
            let pct = if *b > 0 { format!("{name} (+{:.3}%)", 100.0 * *l as f64 / *b as f64) } else { name.clone() };
            (ch.backend_coord(&(g as f64, 1.0)).0, pct)
        })
        .collect();
    x_labels(root, &at, y0, 16)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrong(series: usize) -> Chart {
        Chart::Wrong(WrongChart {
            title: "wrong".into(),
            classes: (0..10).map(|d| d.to_string()).collect(),
            series: (0..series)
                .map(|i| Counts::new(&format!("model {i}"), (0..10).map(|d| d * 7 + i * 100).collect(), Some(0.9)))
                .collect(),
        })
    }

    #[test]
    fn smoothing_a_constant_gives_the_constant_and_short_series_are_left_alone() {
        assert!(smooth(&[2.0; 200]).iter().all(|v| (v - 2.0).abs() < 1e-5));
        assert_eq!(smooth(&[3.0, 1.0, 2.0]), vec![3.0, 1.0, 2.0]);
        let s = smooth(&(0..400).map(|i| if i % 2 == 0 { 1.0 } else { 0.0 }).collect::<Vec<f32>>());
        assert!((s[399] - 0.5).abs() < 0.05, "{}", s[399]);
    }

    #[test]
    fn tiny_losses_are_shown_in_scientific_notation_instead_of_zeros() {
        assert_eq!(fmt_loss(0.22501), "0.2250");
        assert_eq!(fmt_loss(0.0), "0.0000");
        assert_eq!(fmt_loss(3.2e-5), "3.20e-5");
    }

    #[test]
    fn png_output_has_the_signature_and_the_declared_size() {
        let png = wrong(3).to_png().unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let dec = png::Decoder::new(std::io::Cursor::new(png));
        let info = dec.read_info().unwrap();
        assert_eq!((info.info().width, info.info().height), wrong(3).size());
    }

    #[test]
    fn png_text_is_rendered_with_the_bundled_font() {
        // The title is drawn in dark ink; without a font the strip above the plot would stay white.
        let png = wrong(1).to_png().unwrap();
        let mut r = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        r.next_frame(&mut buf).unwrap();
        let w = r.info().width as usize;
        let dark = buf[..w * 3 * 30].chunks(3).filter(|p| p.iter().all(|&c| c < 100)).count();
        assert!(dark > 100, "only {dark} dark pixels in the title strip");
    }

    #[test]
    fn svg_output_is_well_formed_and_names_every_series_and_class() {
        for chart in [wrong(5), wrong(1)] {
            let svg = chart.to_svg().unwrap();
            let doc = roxmltree::Document::parse(&svg).unwrap();
            assert_eq!(doc.root_element().tag_name().name(), "svg");
            let text: Vec<&str> = doc.descendants().filter(|n| n.is_text()).filter_map(|n| n.text()).map(str::trim).collect();
            let Chart::Wrong(w) = &chart else { unreachable!() };
            for s in &w.series {
                assert!(text.iter().any(|t| t.starts_with(&s.name)), "legend lacks {}", s.name);
            }
            for d in 0..10 {
                assert!(text.contains(&d.to_string().as_str()));
            }
        }
    }

    #[test]
    fn every_chart_kind_renders_both_formats() {
        let loss = LossSeries::new("pre-training", &(0..50).map(|i| 2.3 / (1.0 + i as f32)).collect::<Vec<_>>(), &[0.1; 50]).unwrap();
        let m = Matrix {
            name: "pre-trained".into(),
            cells: (0..3).map(|t| (0..3).map(|p| if t == p { 90 } else { t + p }).collect()).collect(),
        };
        let charts = [
            Chart::Loss(LossChart { title: "loss".into(), series: vec![loss.clone(), loss] }),
            Chart::Confusion(ConfusionChart { title: "c".into(), classes: vec!["a".into(), "b".into(), "c".into()], matrices: vec![m] }),
            Chart::Params(ParamsChart {
                title: "p".into(),
                lora_name: "LoRA (rank 1)".into(),
                layers: vec![LayerCount { name: "linear1".into(), base: 785_000, lora: 1784 }],
            }),
        ];
        for c in charts {
            roxmltree::Document::parse(&c.to_svg().unwrap()).unwrap();
            assert!(c.to_png().unwrap().starts_with(b"\x89PNG"));
        }
    }

    #[test]
    fn ragged_or_empty_data_is_refused_with_the_chart_and_series_named() {
        let mut c = wrong(2);
        if let Chart::Wrong(w) = &mut c {
            w.series[1].counts.pop();
        }
        let e = c.to_png().unwrap_err().to_string();
        assert!(e.contains("\"wrong\"") && e.contains("model 1") && e.contains("9 counts for 10 classes"), "{e}");
        let e = Chart::Loss(LossChart { title: "l".into(), series: vec![] }).to_svg().unwrap_err().to_string();
        assert!(e.contains("no loss series"), "{e}");
        let m = Matrix { name: "m".into(), cells: vec![vec![1, 2]] };
        let e = Chart::Confusion(ConfusionChart { title: "c".into(), classes: vec!["a".into(), "b".into()], matrices: vec![m] })
            .to_svg()
            .unwrap_err()
            .to_string();
        assert!(e.contains("not 2 × 2"), "{e}");
    }

    #[test]
    fn bar_charts_of_real_values_label_every_bar_and_refuse_ragged_or_negative_series() {
        let mut c = BarChart {
            title: "Validation bits per byte".into(),
            y_desc: "bits per byte".into(),
            x_desc: "data".into(),
            groups: vec!["sql".into(), "js".into()],
            series: vec![("base".into(), vec![2.5, 2.25]), ("sql".into(), vec![1.875, 2.375])],
            decimals: 3,
        };
        let svg = Chart::Bars(c.clone()).to_svg().unwrap();
        for label in ["2.500", "2.250", "1.875", "2.375", "base", "sql", "js", "bits per byte"] {
            assert!(svg.contains(label), "{label} missing from the SVG");
        }
        c.series[1].1.pop();
        assert!(Chart::Bars(c.clone()).validate().unwrap_err().to_string().contains("has 1 values for 2 groups"));
        c.series[1].1.push(-1.0);
        assert!(Chart::Bars(c).validate().unwrap_err().to_string().contains("negative or non-finite"));
    }
}
