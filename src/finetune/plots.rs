//! PNG plots written at the end of every epoch: loss curves and the learned layer weights.
//!
//! Text needs a TrueType font at run time (plotters' ab_glyph backend embeds none): we look
//! for `$SPEECHCACHE_FONT`, then common DejaVu/Liberation paths (`apt-get install
//! fonts-dejavu-core`). Without one, the plots are drawn without any text.
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
#[error("cannot draw {path}: {reason}")]
pub struct PlotError {
    pub path: PathBuf,
    pub reason: String,
}

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Register a sans-serif font once; false when none was found (plots then have no text).
pub fn font_available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let env = std::env::var_os("SPEECHCACHE_FONT").map(PathBuf::from);
        let candidates = env
            .into_iter()
            .chain(FONT_CANDIDATES.iter().map(PathBuf::from));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps a 'static reference; the font lives for the process
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn perr(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Training loss per step (blue) and validation loss per epoch (red, at the epoch's last step).
pub fn plot_losses(
    path: &Path,
    train: &[(u64, f64)],
    valid: &[(u64, f64)],
) -> Result<(), PlotError> {
    let text = font_available();
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    let finite = |v: &&(u64, f64)| v.1.is_finite();
    let xmax = train
        .iter()
        .chain(valid)
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let ymax = train
        .iter()
        .chain(valid)
        .filter(finite)
        .map(|p| p.1)
        .fold(0f64, f64::max)
        .max(1e-3)
        * 1.05;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(15);
    if text {
        builder
            .caption(
                "CTC loss (train: per step, valid: per epoch)",
                ("sans-serif", 22),
            )
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| perr(path, e))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("optimizer step")
            .y_desc("loss per utterance")
            .x_label_formatter(&|x| format!("{x:.0}"));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| perr(path, e))?;
    let train_pts = train.iter().filter(finite).map(|&(s, l)| (s as f64, l));
    let series = chart
        .draw_series(LineSeries::new(train_pts, &BLUE))
        .map_err(|e| perr(path, e))?;
    if text {
        series
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    let valid_pts: Vec<(f64, f64)> = valid
        .iter()
        .filter(finite)
        .map(|&(s, l)| (s as f64, l))
        .collect();
    let series = chart
        .draw_series(LineSeries::new(valid_pts.clone(), RED.stroke_width(2)))
        .map_err(|e| perr(path, e))?;
    if text {
        series
            .label("valid")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    }
    chart
        .draw_series(valid_pts.iter().map(|&p| Circle::new(p, 4, RED.filled())))
        .map_err(|e| perr(path, e))?;
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| perr(path, e))?;
    }
    root.present().map_err(|e| perr(path, e))
}

/// One bar per stored layer: the learned (softmax-normalised) weight of its hidden state.
pub fn plot_layer_weights(
    path: &Path,
    layers: &[usize],
    weights: &[f32],
    epoch: usize,
) -> Result<(), PlotError> {
    let text = font_available();
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    let n = weights.len().max(1);
    let ymax = weights.iter().copied().fold(0f32, f32::max).max(1e-3) as f64 * 1.1;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(15);
    let caption = format!("learned layer weights after epoch {epoch}");
    if text {
        builder
            .caption(caption, ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)
        .map_err(|e| perr(path, e))?;
    let labels: Vec<String> = layers.iter().map(|l| l.to_string()).collect();
    let label_of = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            labels.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh();
    if text {
        mesh.x_desc("hidden state (layer)")
            .y_desc("weight")
            .x_labels(n)
            .x_label_formatter(&label_of);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| perr(path, e))?;
    chart
        .draw_series(weights.iter().enumerate().map(|(i, &w)| {
            let x = i as f64;
            Rectangle::new(
                [(x - 0.35, 0.0), (x + 0.35, w as f64)],
                BLUE.mix(0.7).filled(),
            )
        }))
        .map_err(|e| perr(path, e))?;
    root.present().map_err(|e| perr(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("loss.png");
        let train: Vec<(u64, f64)> = (1..50).map(|s| (s, 100.0 / s as f64)).collect();
        plot_losses(&p, &train, &[(25, 5.0), (49, 3.0)]).unwrap();
        assert!(std::fs::metadata(&p).unwrap().len() > 1000);
        let q = dir.path().join("w.png");
        plot_layer_weights(&q, &[0, 3, 6], &[0.2, 0.5, 0.3], 2).unwrap();
        assert!(std::fs::metadata(&q).unwrap().len() > 1000);
    }
}
