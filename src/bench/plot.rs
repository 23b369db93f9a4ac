//! The chart of a sweep (SVG, plotters): output throughput, and TTFT p50/p99, against the
//! concurrency or request rate.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// A named line of points in a colour.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);
/// A chart area with its caption, y-axis label and lines.
type Panel<'a, A> = (&'a A, &'a str, &'a str, Vec<Series<'a>>);

/// One point of a sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepPoint {
    /// Concurrency or request rate.
    pub load: f64,
    pub output_throughput: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
}

fn upper(values: impl Iterator<Item = f64>) -> f64 {
    let max = values.fold(0.0f64, f64::max);
    if max > 0.0 {
        max * 1.15
    } else {
        1.0
    }
}

/// Writes a two-panel SVG chart; `load_label` names the x axis.
pub fn write_svg(path: &Path, title: &str, load_label: &str, points: &[SweepPoint]) -> Result<()> {
    let err = |e: &dyn std::fmt::Debug| anyhow!("drawing {}: {e:?}", path.display());
    let root = SVGBackend::new(path, (1100, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(550);
    let x_max = upper(points.iter().map(|p| p.load));
    let panels: [Panel<_>; 2] = [
        (
            &left,
            "Output throughput",
            "tokens/s",
            vec![(
                "output tok/s",
                BLUE,
                points
                    .iter()
                    .map(|p| (p.load, p.output_throughput))
                    .collect(),
            )],
        ),
        (
            &right,
            "Time to first token",
            "ms",
            vec![
                (
                    "TTFT p50",
                    GREEN,
                    points.iter().map(|p| (p.load, p.ttft_p50_ms)).collect(),
                ),
                (
                    "TTFT p99",
                    RED,
                    points.iter().map(|p| (p.load, p.ttft_p99_ms)).collect(),
                ),
            ],
        ),
    ];
    for (area, caption, y_label, series) in panels {
        let y_max = upper(
            series
                .iter()
                .flat_map(|(_, _, pts)| pts.iter().map(|p| p.1)),
        );
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 16))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(load_label)
            .y_desc(y_label)
            .draw()
            .map_err(|e| err(&e))?;
        for (name, color, pts) in series {
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
