//! One progress facility for every stage: a bar on a terminal, plain periodic lines otherwise,
//! both showing items, audio hours, x-real-time and ETA.
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Progress over `total` items of a stage that processes audio.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    audio_seconds: f64,
    started: Instant,
    last_line: Instant,
    quiet: bool,
}

impl Progress {
    /// `label` names the stage ("prepare", "extract", ...).
    pub fn new(label: &str, total: u64, quiet: bool) -> Self {
        let bar = if !quiet && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar.enable_steady_tick(Duration::from_millis(250));
            Some(bar)
        } else {
            None
        };
        Self {
            bar,
            label: label.to_string(),
            total,
            done: 0,
            audio_seconds: 0.0,
            started: Instant::now(),
            last_line: Instant::now(),
            quiet,
        }
    }

    /// Records `items` more done, covering `audio_seconds` of audio.
    pub fn advance(&mut self, items: u64, audio_seconds: f64) {
        self.done += items;
        self.audio_seconds += audio_seconds;
        let msg = self.rate_message();
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
            bar.set_message(msg);
        } else if !self.quiet && self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            eprintln!("{}: {}/{} {msg}", self.label, self.done, self.total);
        }
    }

    /// Audio seconds processed per wall-clock second so far.
    pub fn realtime_factor(&self) -> f64 {
        self.audio_seconds / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn rate_message(&self) -> String {
        format!(
            "{:.2} h audio, {:.0}x real time",
            self.audio_seconds / 3600.0,
            self.realtime_factor()
        )
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// "1.23 GB" style byte counts for summaries.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

/// Parses "1GiB", "512MiB", "200MB", "1000000" into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected e.g. 1GiB, 512MiB, 200MB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        other => return Err(format!("invalid size unit {other:?} in {text:?}")),
    };
    let bytes = value * scale;
    if bytes.is_nan() || bytes < 1.0 {
        return Err(format!("size {text:?} must be at least 1 byte"));
    }
    Ok(bytes as u64)
}
