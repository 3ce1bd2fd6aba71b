//! Fixed windows for long-form audio (`extract --chunk-seconds S --chunk-context C`): the
//! utterance's frames are cut every S seconds; each window runs with up to C seconds of
//! context on either side that is computed but not kept, and the kept frames of the windows,
//! in order, are exactly the frames of the whole utterance (the same count, the same frame
//! times). Windows start on a frame boundary (a multiple of the model's samples per frame), so
//! a window's frame i is the utterance's frame `start + i`. The windows depend on the length
//! alone: resumed runs and `--part` get the same bytes.
use super::config::Wav2Vec2Config;
use std::ops::Range;

/// Seconds of audio per window and of context on each side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chunking {
    pub seconds: f64,
    pub context: f64,
}

/// One window: the samples it runs, and which of its output frames are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub samples: Range<usize>,
    pub keep: Range<usize>,
}

impl Chunking {
    /// The windows of an utterance of `n` samples at 16 kHz, or `None` when it fits in one
    /// window (it then runs whole, exactly as without chunking). A last piece shorter than a
    /// quarter window joins the one before it.
    pub fn windows(&self, cfg: &Wav2Vec2Config, n: usize) -> Option<Vec<Window>> {
        let spf = cfg.samples_per_frame().max(1);
        let field = cfg.receptive_field();
        let t = super::frames_for_samples(cfg, n);
        let rate = 16000.0;
        let per = ((self.seconds * rate / spf as f64).round() as usize).max(1);
        let ctx = (self.context.max(0.0) * rate / spf as f64).round() as usize;
        if t <= per.saturating_add(per / 4) {
            return None;
        }
        let mut cuts: Vec<usize> = (0..t).step_by(per).collect();
        if t - cuts[cuts.len() - 1] < per.div_ceil(4) {
            cuts.pop();
        }
        cuts.push(t);
        let windows = cuts
            .windows(2)
            .map(|w| {
                let (f0, f1) = (w[0], w[1]);
                let (a, b) = (f0.saturating_sub(ctx), f1.saturating_add(ctx).min(t));
                Window {
                    samples: a * spf..(b - 1) * spf + field,
                    keep: f0 - a..f1 - a,
                }
            })
            .collect();
        Some(windows)
    }

    /// Frames of the longest window (for memory planning).
    pub fn window_frames(&self, cfg: &Wav2Vec2Config) -> usize {
        let per_second = cfg.frame_rate();
        ((self.seconds * 1.25 + 2.0 * self.context.max(0.0)) * per_second).ceil() as usize + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_every_frame_once() {
        let cfg = Wav2Vec2Config::default();
        let chunking = Chunking {
            seconds: 10.0,
            context: 2.0,
        };
        for n in [16000 * 13, 16000 * 60 + 123, 16000 * 300 + 7, 16000 * 21] {
            let t = super::super::frames_for_samples(&cfg, n);
            let windows = chunking.windows(&cfg, n).unwrap();
            let mut next = 0;
            for w in &windows {
                assert!(w.samples.end <= n);
                let local = super::super::frames_for_samples(&cfg, w.samples.len());
                assert!(w.keep.end <= local, "{w:?} gives {local} frames");
                // the window's frame i is the utterance's frame start + i
                assert_eq!(w.samples.start % cfg.samples_per_frame(), 0);
                let first = w.samples.start / cfg.samples_per_frame() + w.keep.start;
                assert_eq!(first, next);
                next += w.keep.len();
            }
            assert_eq!(next, t, "{n} samples");
        }
        assert!(chunking.windows(&cfg, 16000 * 12).is_none());
        // lengths from a command line can be absurd: no overflow, no empty plan
        let huge = Chunking {
            seconds: 1e30,
            context: 1e30,
        };
        assert!(huge.windows(&cfg, 16000 * 300).is_none());
        let wide = Chunking {
            seconds: 10.0,
            context: 1e30,
        };
        let windows = wide.windows(&cfg, 16000 * 60).unwrap();
        assert!(windows
            .iter()
            .all(|w| w.samples.end <= 16000 * 60 && !w.keep.is_empty()));
    }
}
