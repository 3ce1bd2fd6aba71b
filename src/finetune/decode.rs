//! `decode`: run a trained experiment over a feature store, CTC greedy or prefix beam search,
//! and score CER/WER.
//!
//! Writes into the output directory: `hyp.trn` / `ref.trn` (sclite `trn`: `text (uttid)`),
//! `hyp.txt` / `ref.txt` (`uttid text`), `result.txt` (totals with sub/del/ins, then one
//! block per utterance) and `result.json` (the same numbers for scripts).
use crate::device::Backend;
use crate::finetune::checkpoint::{self, avg_path, epoch_path, last_path};
use crate::finetune::data::{encode_text, make_batches, FeatureSource};
use crate::finetune::metrics::{self, ErrorCounts};
use crate::finetune::search;
use crate::finetune::tokenizer::Tokenizer;
use crate::finetune::train::{
    asr_engine, eval_logits, log_prob_rows, Experiment, ExperimentLock, TrainError,
};
use candle_core::{DType, Device, D};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Which weights to decode with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointChoice {
    /// `avg.safetensors`: mean of the n best epochs by validation loss.
    Average,
    /// `checkpoints/last.safetensors`: where training stopped.
    Last,
    /// `checkpoints/epoch_NNNN.safetensors` (kept only while among the n best).
    Epoch(usize),
}

impl std::str::FromStr for CheckpointChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "avg" | "average" => Ok(Self::Average),
            "last" => Ok(Self::Last),
            n => n
                .parse::<usize>()
                .map(Self::Epoch)
                .map_err(|_| format!("`{s}` is not avg, last or an epoch number")),
        }
    }
}

impl CheckpointChoice {
    pub fn path(&self, exp: &Path) -> PathBuf {
        match self {
            Self::Average => avg_path(exp),
            Self::Last => last_path(exp),
            Self::Epoch(n) => epoch_path(exp, *n),
        }
    }

    fn label(&self) -> String {
        match self {
            Self::Average => "avg".into(),
            Self::Last => "last".into(),
            Self::Epoch(n) => format!("epoch{n}"),
        }
    }
}

pub struct DecodeOptions {
    pub exp: PathBuf,
    pub checkpoint: CheckpointChoice,
    /// 1 = greedy; more = CTC prefix beam search with this beam.
    pub beam: usize,
    /// Output directory (default `EXP/decode_<store>_<checkpoint>_beam<N>`).
    pub out: Option<PathBuf>,
    /// Device and executor, as for training: the CPU engine for f32 on the CPU.
    pub backend: Backend,
    pub verbose: bool,
}

/// Totals of one decode (also `result.json`).
#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub experiment: String,
    pub checkpoint: String,
    pub data: String,
    pub beam: usize,
    pub utterances: usize,
    pub scored_utterances: usize,
    pub unknown_ref_chars: usize,
    pub cer: Option<Score>,
    pub wer: Option<Score>,
    pub out_dir: String,
    pub seconds: f64,
    pub utterances_detail: Vec<UttResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub rate: f64,
    pub reference: usize,
    pub substitutions: usize,
    pub deletions: usize,
    pub insertions: usize,
}

impl Score {
    fn from_counts(c: &ErrorCounts) -> Self {
        Self {
            rate: c.rate(),
            reference: c.ref_len,
            substitutions: c.sub,
            deletions: c.del,
            insertions: c.ins,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct UttResult {
    pub id: String,
    pub reference: Option<String>,
    pub hypothesis: String,
    pub cer: Option<Score>,
    pub wer: Option<Score>,
}

/// Decode every utterance of `data` and score those that have a transcript.
pub fn decode(opts: &DecodeOptions, data: &dyn FeatureSource) -> Result<DecodeResult, TrainError> {
    let started = std::time::Instant::now();
    let exp = Experiment::load(&opts.exp)?;
    exp.check_source(data)?;
    // Decoding beside a training run is allowed: every checkpoint is replaced by one atomic
    // rename with its description inside, so the file read is a whole one, old or new.
    if let Some(holder) = ExperimentLock::holder(&exp.dir) {
        if opts.verbose {
            eprintln!(
                "decode: {} is being trained by {holder}; decoding its checkpoint as saved now",
                exp.dir.display()
            );
        }
    }
    if data.is_empty() {
        return Err(TrainError::Experiment {
            path: data.path().to_path_buf(),
            reason: "the store has no utterances to decode".into(),
        });
    }
    let dev = opts.backend.device();
    let (model, vars) = exp.build_model(dev)?;
    let ckpt = opts.checkpoint.path(&exp.dir);
    if !ckpt.is_file() {
        let kept: Vec<String> = std::fs::read_dir(checkpoint::checkpoint_dir(&exp.dir))
            .map(|d| {
                let mut v: Vec<String> = d
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        let n = name.strip_prefix("epoch_")?.strip_suffix(".safetensors")?;
                        n.parse::<usize>().ok().map(|n| n.to_string())
                    })
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        return Err(TrainError::Experiment {
            path: ckpt,
            reason: format!(
                "no such checkpoint (epochs kept: [{}]; also `avg` and `last`)",
                kept.join(", ")
            ),
        });
    }
    let tensors = checkpoint::load_tensors(&ckpt, dev)?;
    checkpoint::assign(&vars, &tensors, &ckpt)?;
    drop(tensors);
    let engine = asr_engine(&model, &opts.backend, &vars, &vars, |m| {
        if opts.verbose {
            eprintln!("decode: {m}")
        }
    })?;
    let params = engine.as_ref().map(|e| e.params()).transpose()?;
    let runner = engine.as_ref().zip(params.as_ref());
    let blank = Tokenizer::BLANK_ID;

    // utterances shorter than the subsampling's minimum get an empty hypothesis
    let frames: Vec<usize> = (0..data.len()).map(|i| data.frames(i)).collect();
    let decodable: Vec<usize> = (0..data.len())
        .filter(|&i| frames[i] >= exp.min_frames())
        .collect();
    let batches = make_batches(&frames, &decodable, exp.config.train.batch_frames, None);
    let mut hyps: Vec<String> = vec![String::new(); data.len()];
    for (bn, items) in batches.iter().enumerate() {
        let (feats, lens) = data.batch(items, &exp.meta.layers, dev)?;
        let (logits, out_lens) = eval_logits(&model, runner, &feats, &lens)?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        for (u, &i) in items.iter().enumerate() {
            let rows = log_prob_rows(&lp, u, out_lens[u])?;
            let ids = if opts.beam <= 1 {
                search::greedy(rows.view(), blank)
            } else {
                search::prefix_beam_search(rows.view(), opts.beam, blank)
                    .into_iter()
                    .next()
                    .map(|(ids, _)| ids)
                    .unwrap_or_default()
            };
            hyps[i] = exp.tokenizer.decode(&ids);
        }
        if opts.verbose && (bn + 1) % 20 == 0 {
            eprintln!("decode: batch {}/{}", bn + 1, batches.len());
        }
    }

    let store_name = data
        .path()
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "data".into());
    let out = opts.out.clone().unwrap_or_else(|| {
        exp.dir.join(format!(
            "decode_{store_name}_{}_beam{}",
            opts.checkpoint.label(),
            opts.beam.max(1)
        ))
    });
    let mut result = score(data, &exp, &hyps);
    result.experiment = exp.dir.display().to_string();
    result.checkpoint = ckpt.display().to_string();
    result.beam = opts.beam.max(1);
    result.out_dir = out.display().to_string();
    result.seconds = started.elapsed().as_secs_f64();
    write_outputs(&out, &result)?;
    Ok(result)
}

fn score(data: &dyn FeatureSource, exp: &Experiment, hyps: &[String]) -> DecodeResult {
    let (mut chars, mut words) = (ErrorCounts::default(), ErrorCounts::default());
    let (mut scored, mut unknown) = (0usize, 0usize);
    let mut details = Vec::with_capacity(hyps.len());
    for (i, hyp) in hyps.iter().enumerate() {
        let reference = data.text(i).map(str::to_string);
        let (cer, wer) = match &reference {
            Some(r) => {
                unknown += encode_text(&exp.tokenizer, r).1;
                let c = metrics::cer(r, hyp);
                let w = metrics::wer(r, hyp);
                chars += c;
                words += w;
                scored += 1;
                (Some(Score::from_counts(&c)), Some(Score::from_counts(&w)))
            }
            None => (None, None),
        };
        details.push(UttResult {
            id: data.id(i).to_string(),
            reference,
            hypothesis: hyp.clone(),
            cer,
            wer,
        });
    }
    DecodeResult {
        experiment: String::new(),
        checkpoint: String::new(),
        data: data.path().display().to_string(),
        beam: 1,
        utterances: hyps.len(),
        scored_utterances: scored,
        unknown_ref_chars: unknown,
        cer: (scored > 0).then(|| Score::from_counts(&chars)),
        wer: (scored > 0).then(|| Score::from_counts(&words)),
        out_dir: String::new(),
        seconds: 0.0,
        utterances_detail: details,
    }
}

fn fmt_score(name: &str, s: &Score) -> String {
    format!(
        "{name} {:6.2} %  ({} reference tokens: {} substitutions, {} deletions, {} insertions)",
        100.0 * s.rate,
        s.reference,
        s.substitutions,
        s.deletions,
        s.insertions
    )
}

/// The summary lines printed by the CLI and written at the top of result.txt.
pub fn summary_text(r: &DecodeResult) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "experiment: {}", r.experiment);
    let _ = writeln!(t, "checkpoint: {}", r.checkpoint);
    let _ = writeln!(t, "data:       {}", r.data);
    let _ = writeln!(
        t,
        "search:     {}",
        if r.beam <= 1 {
            "greedy".to_string()
        } else {
            format!("prefix beam search, beam {}", r.beam)
        }
    );
    let _ = writeln!(
        t,
        "utterances: {} decoded, {} scored; {} reference characters unknown to the tokenizer",
        r.utterances, r.scored_utterances, r.unknown_ref_chars
    );
    match (&r.cer, &r.wer) {
        (Some(c), Some(w)) => {
            let _ = writeln!(t, "{}", fmt_score("CER", c));
            let _ = writeln!(t, "{}", fmt_score("WER", w));
        }
        _ => {
            let _ = writeln!(t, "no transcripts in the store: hypotheses only, no scores");
        }
    }
    t
}

fn write_outputs(out: &Path, r: &DecodeResult) -> Result<(), TrainError> {
    let io = |p: &Path, e: std::io::Error| TrainError::Experiment {
        path: p.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let (mut hyp_trn, mut ref_trn, mut hyp_txt, mut ref_txt) =
        (String::new(), String::new(), String::new(), String::new());
    let mut detail = String::new();
    for u in &r.utterances_detail {
        let _ = writeln!(hyp_trn, "{} ({})", u.hypothesis, u.id);
        let _ = writeln!(hyp_txt, "{} {}", u.id, u.hypothesis);
        if let Some(reference) = &u.reference {
            let _ = writeln!(ref_trn, "{} ({})", reference, u.id);
            let _ = writeln!(ref_txt, "{} {}", u.id, reference);
        }
        let _ = writeln!(detail, "id:  {}", u.id);
        if let (Some(c), Some(w)) = (&u.cer, &u.wer) {
            let _ = writeln!(
                detail,
                "     CER {:.2} % (S {} D {} I {} / {})  WER {:.2} % (S {} D {} I {} / {})",
                100.0 * c.rate,
                c.substitutions,
                c.deletions,
                c.insertions,
                c.reference,
                100.0 * w.rate,
                w.substitutions,
                w.deletions,
                w.insertions,
                w.reference
            );
        }
        if let Some(reference) = &u.reference {
            let _ = writeln!(detail, "REF: {reference}");
        }
        let _ = writeln!(detail, "HYP: {}\n", u.hypothesis);
    }
    let files: [(&str, &str); 4] = [
        ("hyp.trn", &hyp_trn),
        ("hyp.txt", &hyp_txt),
        ("ref.trn", &ref_trn),
        ("ref.txt", &ref_txt),
    ];
    for (name, text) in files {
        if name.starts_with("ref") && r.scored_utterances == 0 {
            continue;
        }
        // never through a link planted at one of these names
        crate::regular_file::write_atomic(&out.join(name), text.as_bytes())
            .map_err(|(p, e)| io(&p, e))?;
    }
    let text = format!("{}\nper utterance:\n\n{detail}", summary_text(r));
    crate::regular_file::write_atomic(&out.join("result.txt"), text.as_bytes())
        .map_err(|(p, e)| io(&p, e))?;
    let p = out.join("result.json");
    let json = serde_json::to_string_pretty(r).map_err(|e| TrainError::Experiment {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    crate::regular_file::write_atomic(&p, json.as_bytes()).map_err(|(p, e)| io(&p, e))?;
    Ok(())
}
