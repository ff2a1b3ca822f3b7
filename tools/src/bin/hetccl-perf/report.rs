//! The nccl-tests style table and its JSON twin.

use serde::Serialize;

/// One timed mode (out-of-place or in-place) of one size.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Timing {
    /// Per-iteration average, maximum over ranks, in microseconds.
    pub time_us: f64,
    /// Median over iterations of each iteration's slowest rank, in microseconds: what
    /// the MPI peers' benchmarks report, and what one preempted iteration cannot move.
    pub median_us: f64,
    /// Bytes / time, GB/s.
    pub algbw: f64,
    /// algbw x the collective's bus factor, GB/s.
    pub busbw: f64,
    /// Wrong elements summed over ranks (`None` when not checked).
    pub wrong: Option<u64>,
}

/// One size.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    /// Bytes of the whole vector.
    pub size: usize,
    /// Elements of the whole vector.
    pub count: usize,
    /// Element type name.
    #[serde(rename = "type")]
    pub dtype: &'static str,
    /// Reduction name, `none` for data movement.
    pub redop: &'static str,
    /// Root rank, -1 where there is none.
    pub root: i64,
    /// Separate send and receive buffers (`None`: the API has no such form).
    pub out_of_place: Option<Timing>,
    /// One buffer (`None`: the API has no such form).
    pub in_place: Option<Timing>,
}

/// Column headings, three lines, aligned with [`format_row`]: the nccl-tests columns
/// (time is the mean over iterations), then the median time of each mode, appended
/// last so that scripts reading the first 13 fields by position still find them.
pub fn table_heading() -> String {
    [
        format!(
            "#{:48}{:^33}  {:^33}  {:^19}",
            "", "out-of-place", "in-place", "median time"
        )
        .trim_end()
        .to_string(),
        format!(
            "#{:>11}  {:>12}  {:>6}  {:>5}  {:>4}  {:>9} {:>7} {:>7} {:>7}  {:>9} {:>7} {:>7} {:>7}  {:>9} {:>9}",
            "size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time", "algbw", "busbw", "#wrong", "oop", "in-place"
        ),
        format!(
            "#{:>11}  {:>12}  {:>6}  {:>5}  {:>4}  {:>9} {:>7} {:>7} {:>7}  {:>9} {:>7} {:>7} {:>7}  {:>9} {:>9}",
            "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(us)"
        ),
    ]
    .join("\n")
}

fn format_median(t: &Option<Timing>) -> String {
    match t {
        Some(t) => format!("{:>9.2}", t.median_us),
        None => format!("{:>9}", "n/a"),
    }
}

fn format_timing(t: &Option<Timing>) -> String {
    match t {
        Some(t) => {
            let wrong = t.wrong.map_or("N/A".to_string(), |w| w.to_string());
            format!(
                "{:>9.2} {:>7.2} {:>7.2} {:>7}",
                t.time_us, t.algbw, t.busbw, wrong
            )
        }
        None => format!("{:>9} {:>7} {:>7} {:>7}", "n/a", "n/a", "n/a", "n/a"),
    }
}

/// One table line: 15 whitespace-separated fields, whatever is missing printed as a
/// single token (`n/a`, `N/A`), so scripts can split on whitespace.
pub fn format_row(r: &Row) -> String {
    format!(
        " {:>11}  {:>12}  {:>6}  {:>5}  {:>4}  {}  {}  {} {}",
        r.size,
        r.count,
        r.dtype,
        r.redop,
        r.root,
        format_timing(&r.out_of_place),
        format_timing(&r.in_place),
        format_median(&r.out_of_place),
        format_median(&r.in_place)
    )
}

/// The median of `v` (the mean of the middle two for an even length; 0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// nccl-tests' footer figure: the mean busbw over every measured mode of every row.
pub fn avg_busbw(rows: &[Row]) -> f64 {
    let all: Vec<f64> = rows
        .iter()
        .flat_map(|r| [r.out_of_place, r.in_place])
        .flatten()
        .map(|t| t.busbw)
        .collect();
    if all.is_empty() {
        0.0
    } else {
        all.iter().sum::<f64>() / all.len() as f64
    }
}

/// Total wrong elements over every checked mode (`None` if nothing was checked).
pub fn total_wrong(rows: &[Row]) -> Option<u64> {
    rows.iter()
        .flat_map(|r| [r.out_of_place, r.in_place])
        .flatten()
        .filter_map(|t| t.wrong)
        .reduce(|a, b| a + b)
}

/// What `--json` writes.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// all_reduce, ...
    pub collective: &'static str,
    /// Ranks.
    pub world_size: usize,
    /// Algorithm setting (`auto` lets the cost model choose per size).
    pub algo: &'static str,
    /// Timed iterations per size.
    pub iters: usize,
    /// Warm-up iterations per size.
    pub warmup: usize,
    /// One line per rank (host, pid, links).
    pub ranks: &'a [String],
    /// The table.
    pub rows: &'a [Row],
    /// Footer mean busbw.
    pub avg_busbw: f64,
    /// Largest peak resident set over ranks, KiB.
    pub max_rss_kib: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(oop: Option<Timing>, ip: Option<Timing>) -> Row {
        Row {
            size: 1048576,
            count: 262144,
            dtype: "f32",
            redop: "sum",
            root: -1,
            out_of_place: oop,
            in_place: ip,
        }
    }

    const T: Timing = Timing {
        time_us: 512.25,
        median_us: 498.5,
        algbw: 2.047,
        busbw: 3.0705,
        wrong: Some(0),
    };

    #[test]
    fn rows_have_fifteen_fields_medians_last() {
        let line = format_row(&row(Some(T), None));
        assert_eq!(
            line,
            "     1048576        262144     f32    sum    -1     512.25    2.05    3.07       0        n/a     n/a     n/a     n/a     498.50       n/a"
        );
        assert_eq!(line.split_whitespace().count(), 15);
        let heading = table_heading();
        let cols: Vec<&str> = heading.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(cols.len(), 16); // '#' + 15 names
        assert_eq!(&cols[14..], ["oop", "in-place"]);
        // every heading line is as wide as a row, so columns line up
        assert_eq!(heading.lines().nth(1).unwrap().len(), line.len());
        assert_eq!(heading.lines().nth(2).unwrap().len(), line.len());
        let both = format_row(&row(
            Some(T),
            Some(Timing {
                median_us: 7.0,
                ..T
            }),
        ));
        let f: Vec<&str> = both.split_whitespace().collect();
        assert_eq!(
            (f[5], f[9], f[13], f[14]),
            ("512.25", "512.25", "498.50", "7.00")
        );
    }

    #[test]
    fn median_ignores_one_preempted_iteration() {
        // Nine iterations of 100 us and one of 10 ms: the mean is 1090 us.
        let mut v = vec![100.0; 9];
        v.push(10_000.0);
        assert_eq!(median(&v), 100.0);
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
        assert_eq!(median(&[4.0]), 4.0);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn footer_averages_measured_modes_only() {
        let slow = Timing {
            busbw: 1.0,
            wrong: Some(3),
            ..T
        };
        let rows = [row(Some(T), None), row(Some(slow), Some(slow))];
        assert!((avg_busbw(&rows) - (3.0705 + 1.0 + 1.0) / 3.0).abs() < 1e-12);
        assert_eq!(total_wrong(&rows), Some(6));
        let unchecked = Timing { wrong: None, ..T };
        assert_eq!(total_wrong(&[row(Some(unchecked), None)]), None);
        assert_eq!(avg_busbw(&[]), 0.0);
    }
}
