//! Loss curves as a PNG.
//!
//! Text needs a font file; plotters is built without system-font discovery, so a few common
//! locations are tried. Without any, the picture still has both curves (train blue, val
//! red), only without axes labels and legend, and a log line says so.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::files::read_limited;
use super::train::{EvalRecord, StepRecord};
use crate::error::{Error, Result};

const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Largest font file read (bytes); DejaVu Sans is 750 kB.
const FONT_MAX_BYTES: u64 = 64 << 20;

/// Registers the first font found as "sans-serif" (once per process); false if none.
fn have_font() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        for path in FONT_FILES {
            if let Ok(bytes) = read_limited(Path::new(path), "font", FONT_MAX_BYTES) {
                // plotters keeps fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::invalid("plot_losses", e.to_string())
}

/// Draws training loss per step and validation loss per evaluation into `path` (PNG).
pub fn plot_losses(path: &Path, steps: &[StepRecord], evals: &[EvalRecord]) -> Result<()> {
    let fonts = have_font();
    if !fonts {
        tracing::warn!(target: "hetccl::trainer::plot", "no font file found: loss plot has no labels");
    }
    let train: Vec<(f64, f64)> = steps
        .iter()
        .map(|r| ((r.step + 1) as f64, r.loss))
        .collect();
    let val: Vec<(f64, f64)> = evals.iter().map(|e| (e.step as f64, e.val_loss)).collect();
    let all = train.iter().chain(&val);
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let x_min = all.clone().map(|p| p.0).fold(x_max, f64::min).min(0.0);
    let y_max = all.clone().map(|p| p.1).fold(f64::MIN, f64::max);
    let y_min = all.map(|p| p.1).fold(f64::MAX, f64::min);
    let (y_min, y_max) = if y_min <= y_max {
        let pad = ((y_max - y_min) * 0.05).max(1e-3);
        (y_min - pad, y_max + pad)
    } else {
        (0.0, 1.0)
    };

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if fonts {
        builder
            .caption("hetccl-bert: masked-LM loss", ("sans-serif", 24))
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(x_min..x_max, y_min..y_max)
        .map_err(plot_err)?;
    if fonts {
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("loss (nats)")
            .draw()
            .map_err(plot_err)?;
    } else {
        let frame = [
            (x_min, y_min),
            (x_max, y_min),
            (x_max, y_max),
            (x_min, y_max),
            (x_min, y_min),
        ];
        chart
            .draw_series(LineSeries::new(frame, BLACK.stroke_width(1)))
            .map_err(plot_err)?;
    }
    let t = chart
        .draw_series(LineSeries::new(train, BLUE.stroke_width(1)))
        .map_err(plot_err)?;
    if fonts {
        t.label("train")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    }
    let v = chart
        .draw_series(LineSeries::new(val.clone(), RED.stroke_width(2)))
        .map_err(plot_err)?;
    if fonts {
        v.label("validation")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    }
    chart
        .draw_series(val.iter().map(|&p| Circle::new(p, 3, RED.filled())))
        .map_err(plot_err)?;
    if fonts {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}
