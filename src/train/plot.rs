//! Loss curves as a PNG, from a run's `metrics.jsonl` (total loss, every `loss/...` key and the
//! held-out loss `eval/loss`).
//! Text is rendered with a bundled DejaVu Sans Mono, so no system fonts are needed.

use crate::error::{Error, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

pub(crate) fn register_font() {
    REGISTER.call_once(|| {
        // A bundled, valid TTF: registration cannot fail except on a corrupt build.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Series read from metrics lines: name -> (step, value).
pub fn read_series(metrics: &Path) -> Result<BTreeMap<String, Vec<(f64, f64)>>> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(obj) = v.as_object() {
            for (k, val) in obj {
                if k == "loss" || k.starts_with("loss/") || k == "eval/loss" {
                    if let Some(y) = val.as_f64() {
                        series.entry(k.clone()).or_default().push((step, y));
                    }
                }
            }
        }
    }
    Ok(series)
}

/// Draw the loss curves of `metrics` into `png`.
pub fn plot_losses(metrics: &Path, png: &Path, title: &str) -> Result<()> {
    register_font();
    let series = read_series(metrics)?;
    let err = |e: String| Error::io(png, e);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for pts in series.values() {
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if series.is_empty() || x0 > x1 {
        return Err(Error::BadInput {
            path: metrics.to_path_buf(),
            msg: "no loss values to plot".into(),
        });
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let root = BitMapBackend::new(png, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let width = match name.as_str() {
            "loss" | "eval/loss" => 3,
            _ => 1,
        };
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied(),
                color.stroke_width(width),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(if name == "eval/loss" {
                "held-out loss"
            } else {
                name.as_str()
            })
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
