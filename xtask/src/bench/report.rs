//! What the benchmark found: rows (median and range across rounds), targets (met, missed, or not
//! measured and why), ratios for the plot. Printed as a table, written as JSON and as an SVG plot.

use std::{fmt::Write as _, fs, path::Path};

use serde_json::{json, Value};

use super::stats::Spread;

pub struct Row {
    pub part: char,
    pub what: String,
    pub value: Option<Spread>,
    pub unit: &'static str,
    pub note: String,
}

pub struct Target {
    pub what: String,
    pub limit: String,
    pub value: Option<f64>,
    pub shown: String,
    /// None: not measured.
    pub met: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
    /// (label, spread, target line if any)
    pub ratios: Vec<(String, Spread, Option<f64>)>,
}

impl Report {
    pub fn row(
        &mut self,
        part: char,
        what: impl Into<String>,
        unit: &'static str,
        v: Option<Spread>,
    ) {
        self.row_note(part, what, unit, v, "");
    }

    pub fn row_note(
        &mut self,
        part: char,
        what: impl Into<String>,
        unit: &'static str,
        v: Option<Spread>,
        note: impl Into<String>,
    ) {
        self.rows.push(Row {
            part,
            what: what.into(),
            value: v,
            unit,
            note: note.into(),
        });
    }

    pub fn not_measured(&mut self, part: char, what: impl Into<String>, why: impl Into<String>) {
        self.rows.push(Row {
            part,
            what: what.into(),
            value: None,
            unit: "",
            note: format!("not measured: {}", why.into()),
        });
    }

    pub fn ratio(&mut self, label: impl Into<String>, s: Option<Spread>, target: Option<f64>) {
        if let Some(s) = s {
            self.ratios.push((label.into(), s, target));
        }
    }

    /// A target on a value: `at_least` true for `>=`, false for `<=`.
    pub fn target(
        &mut self,
        what: impl Into<String>,
        value: Option<f64>,
        limit: f64,
        at_least: bool,
        unit: &str,
    ) {
        let shown = value
            .map(|v| format!("{}{unit}", num(v)))
            .unwrap_or_else(|| "not measured".into());
        self.targets.push(Target {
            what: what.into(),
            limit: format!(
                "{} {}{unit}",
                if at_least { ">=" } else { "<=" },
                num(limit)
            ),
            value,
            shown,
            met: value.map(|v| if at_least { v >= limit } else { v <= limit }),
        });
    }

    pub fn target_bool(
        &mut self,
        what: impl Into<String>,
        limit: &str,
        met: Option<bool>,
        shown: String,
    ) {
        self.targets.push(Target {
            what: what.into(),
            limit: limit.into(),
            value: None,
            shown,
            met,
        });
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<4} {:<66} {:>10} {:>21} {:<6} NOTE",
            "PART", "MEASUREMENT", "MEDIAN", "MIN .. MAX", "UNIT"
        );
        for r in &self.rows {
            let (med, range) = match r.value {
                Some(v) if v.n > 1 => (num(v.median), format!("{} .. {}", num(v.min), num(v.max))),
                Some(v) => (num(v.median), String::new()),
                None => ("-".into(), String::new()),
            };
            let _ = writeln!(
                s,
                "{:<4} {:<66} {:>10} {:>21} {:<6} {}",
                r.part, r.what, med, range, r.unit, r.note
            );
        }
        let _ = writeln!(s, "\nTARGETS");
        for t in &self.targets {
            let mark = match t.met {
                Some(true) => "met   ",
                Some(false) => "MISSED",
                None => "n/a   ",
            };
            let _ = writeln!(
                s,
                "  [{mark}] {:<62} {:>14}   target {}",
                t.what, t.shown, t.limit
            );
        }
        s
    }

    pub fn json(&self, meta: Value) -> Value {
        json!({
            "meta": meta,
            "rows": self.rows.iter().map(|r| json!({
                "part": r.part.to_string(),
                "what": r.what,
                "unit": r.unit,
                "median": r.value.map(|v| v.median),
                "min": r.value.map(|v| v.min),
                "max": r.value.map(|v| v.max),
                "rounds": r.value.map(|v| v.n),
                "note": r.note,
            })).collect::<Vec<_>>(),
            "targets": self.targets.iter().map(|t| json!({
                "what": t.what,
                "target": t.limit,
                "value": t.value,
                "shown": t.shown,
                "met": t.met,
            })).collect::<Vec<_>>(),
            "ratios": self.ratios.iter().map(|(l, s, t)| json!({
                "what": l, "median": s.median, "min": s.min, "max": s.max, "target": t,
            })).collect::<Vec<_>>(),
        })
    }

    /// Horizontal bars: the median ratio of each comparison, a whisker for its range across
    /// rounds, a line at 1.0 (no cost) and a tick at the target where there is one.
    pub fn write_svg(&self, path: &Path, title: &str) -> std::io::Result<()> {
        let (left, width, bar, gap) = (330.0, 420.0, 18.0, 10.0);
        let top = 50.0;
        let n = self.ratios.len().max(1) as f64;
        let height = top + n * (bar + gap) + 50.0;
        let hi = self
            .ratios
            .iter()
            .map(|(_, s, _)| s.max)
            .fold(1.2f64, f64::max)
            .min(10.0);
        let x = |v: f64| left + (v.clamp(0.0, hi) / hi) * width;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="12">"#,
            left + width + 60.0
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
            esc(title)
        );
        let _ = writeln!(
            s,
            r##"<text x="10" y="38" fill="#555">ratio to the unprotected baseline (median; whisker: min..max across rounds; red tick: target)</text>"##
        );
        for (i, (label, sp, target)) in self.ratios.iter().enumerate() {
            let y = top + i as f64 * (bar + gap);
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                left - 8.0,
                y + bar * 0.7,
                esc(label)
            );
            let _ = writeln!(
                s,
                r##"<rect x="{left}" y="{y}" width="{}" height="{bar}" fill="#4a7ebb"/>"##,
                x(sp.median) - left
            );
            let _ = writeln!(
                s,
                r#"<line x1="{}" x2="{}" y1="{}" y2="{}" stroke="black"/>"#,
                x(sp.min),
                x(sp.max),
                y + bar / 2.0,
                y + bar / 2.0
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}">{:.3}</text>"#,
                x(sp.max) + 4.0,
                y + bar * 0.7,
                sp.median
            );
            if let Some(t) = target {
                let _ = writeln!(
                    s,
                    r#"<line x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="red" stroke-width="2"/>"#,
                    x(*t),
                    y - 2.0,
                    y + bar + 2.0
                );
            }
        }
        let y_end = top + n * (bar + gap);
        let _ = writeln!(
            s,
            r##"<line x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="#333" stroke-dasharray="4,3"/><text x="{0}" y="{3}" text-anchor="middle">1.0</text>"##,
            x(1.0),
            top - 6.0,
            y_end,
            y_end + 16.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{}" text-anchor="middle">0</text>"#,
            y_end + 16.0
        );
        let _ = writeln!(s, "</svg>");
        fs::write(path, s)
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A number as the table shows it: no false precision, no rounding toward a target (3
/// significant digits at least, all integer digits).
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
