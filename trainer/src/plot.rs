//! Loss curves as a PNG, and a second PNG of every rank's speed and batch share.
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

/// Draws training loss per step and validation loss per evaluation into `path` (PNG),
/// with `unigram` (the loss of a model that knows only word frequencies) as a level line.
pub fn plot_losses(
    path: &Path,
    steps: &[StepRecord],
    evals: &[EvalRecord],
    unigram: Option<f64>,
) -> Result<()> {
    let fonts = have_font();
    if !fonts {
        tracing::warn!(target: "hetccl::trainer::plot", "no font file found: loss plot has no labels");
    }
    let train: Vec<(f64, f64)> = steps
        .iter()
        .map(|r| ((r.step + 1) as f64, r.loss))
        .collect();
    let val: Vec<(f64, f64)> = evals.iter().map(|e| (e.step as f64, e.val_loss)).collect();
    let unigram = unigram.filter(|u| u.is_finite());
    let all = train.iter().chain(&val);
    let x_max = all.clone().map(|p| p.0).fold(1.0, f64::max);
    let x_min = all.clone().map(|p| p.0).fold(x_max, f64::min).min(0.0);
    let levels = all.map(|p| p.1).chain(unigram);
    let y_max = levels.clone().fold(f64::MIN, f64::max);
    let y_min = levels.fold(f64::MAX, f64::min);
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
    if let Some(u) = unigram {
        let green = RGBColor(0, 140, 0);
        let line = chart
            .draw_series(DashedLineSeries::new(
                [(x_min, u), (x_max, u)],
                8,
                5,
                green.stroke_width(2),
            ))
            .map_err(plot_err)?;
        if fonts {
            line.label(format!("unigram entropy {u:.2}"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], green));
        }
    }
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

/// Where [`plot_ranks`] draws beside the loss plot `path`: `loss.png` → `loss-ranks.png`.
pub fn ranks_path(path: &Path) -> std::path::PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(|| "loss".into(), |s| s.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-ranks.png"))
}

/// One colour per rank, cycling.
fn rank_color(r: usize) -> RGBColor {
    const COLORS: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    COLORS[r % COLORS.len()]
}

/// Draws every rank's samples/s of compute per step (top) and its share of the batch per
/// step (bottom) into `path` (PNG): the heterogeneity, and what the balancer did about it.
/// Steps recorded without per-rank times (metrics of an older run) are left out.
pub fn plot_ranks(path: &Path, steps: &[StepRecord], grad_accum: usize) -> Result<()> {
    let fonts = have_font();
    let steps: Vec<&StepRecord> = steps
        .iter()
        .filter(|s| !s.split.is_empty() && s.split.len() == s.rank_ms_compute.len())
        .collect();
    let world = steps.first().map_or(0, |s| s.split.len());
    if world == 0 {
        return Err(Error::invalid(
            "plot_ranks",
            "no step has per-rank times to plot",
        ));
    }
    let speeds: Vec<Vec<(f64, f64)>> = (0..world)
        .map(|r| {
            steps
                .iter()
                .filter(|s| s.split.len() == world)
                .map(|s| {
                    let sp = super::train::rank_speeds(s, grad_accum);
                    ((s.step + 1) as f64, sp[r])
                })
                .collect()
        })
        .collect();
    let shares: Vec<Vec<(f64, f64)>> = (0..world)
        .map(|r| {
            steps
                .iter()
                .filter(|s| s.split.len() == world)
                .map(|s| ((s.step + 1) as f64, s.split[r] as f64))
                .collect()
        })
        .collect();
    let x_max = steps
        .iter()
        .map(|s| (s.step + 1) as f64)
        .fold(1.0, f64::max);
    let x_min = steps.iter().map(|s| s.step as f64).fold(x_max, f64::min);
    let speed_max = speeds
        .iter()
        .flatten()
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.05;
    let share_max = shares.iter().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.1;

    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let root = BitMapBackend::new(path, (960, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (top, bottom) = root.split_vertically(360);
    let panels = [
        (top, &speeds, speed_max, "samples/s per rank (compute)"),
        (bottom, &shares, share_max, "samples per micro-batch"),
    ];
    for (area, series, y_max, what) in panels {
        let mut builder = ChartBuilder::on(&area);
        builder.margin(15);
        if fonts {
            builder
                .caption(format!("hetccl-bert: {what}"), ("sans-serif", 20))
                .x_label_area_size(35)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(x_min..x_max, 0.0..y_max)
            .map_err(plot_err)?;
        if fonts {
            chart
                .configure_mesh()
                .x_desc("step")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc(what)
                .draw()
                .map_err(plot_err)?;
        }
        for (r, points) in series.iter().enumerate() {
            let color = rank_color(r);
            let s = chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(plot_err)?;
            if fonts && r < 16 {
                s.label(format!("rank {r}"))
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
            }
        }
        if fonts {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(plot_err)?;
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}
