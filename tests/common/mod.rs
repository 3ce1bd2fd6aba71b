//! Helpers shared by the CLI-level integration tests.
#![allow(dead_code)]
use std::path::Path;
use std::process::{Command, Output};

/// The spec of a 16 kHz float32 audio store written straight through `StoreWriter`.
pub fn audio_writer_spec(
    shard_bytes: u64,
    options: serde_json::Value,
) -> speechcache::store::WriterSpec {
    speechcache::store::WriterSpec {
        kind: speechcache::store::StoreKind::Audio,
        dtype: speechcache::store::Dtype::F32,
        sample_rate: Some(16000),
        frame_rate: None,
        dim: None,
        layers: vec![],
        options,
        source: serde_json::json!({"test": true}),
        extra: serde_json::Value::Null,
        shard_bytes,
        overwrite: false,
    }
}

/// The speechcache binary under test (`SPEECHCACHE_TEST_BIN` runs the CLI tests against
/// another build, e.g. an older release, to show which of them it fails).
pub fn bin() -> Command {
    match std::env::var_os("SPEECHCACHE_TEST_BIN") {
        Some(other) => Command::new(other),
        None => Command::new(env!("CARGO_BIN_EXE_speechcache")),
    }
}

/// Asserts the command succeeded; returns stdout + stderr.
pub fn ok(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "command failed: {text}");
    text
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir` with its bytes, sorted by relative path (for byte-identity checks).
pub fn tree_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            (
                e.path().strip_prefix(dir).unwrap().display().to_string(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Asserts that two store trees hold the same files with the same bytes, naming what differs.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (tree_bytes(a), tree_bytes(b));
    let names = |t: &[(String, Vec<u8>)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&ta),
        names(&tb),
        "{} and {} hold different files",
        a.display(),
        b.display()
    );
    let differ: Vec<&String> = ta
        .iter()
        .zip(&tb)
        .filter(|((_, x), (_, y))| x != y)
        .map(|((n, _), _)| n)
        .collect();
    assert!(
        differ.is_empty(),
        "{} and {} differ in {differ:?}",
        a.display(),
        b.display()
    );
}

/// Largest absolute difference between two tensors of one shape, in f32.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let f32 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    (f32(a) - f32(b))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The limits every hostile input must be handled within (issue 18): 3 GB of address space
/// (`ulimit -v 3000000`) and 20 s of wall time.
pub const HOSTILE_ADDRESS_SPACE: u64 = 3_000_000 * 1024;
pub const HOSTILE_WALL: std::time::Duration = std::time::Duration::from_secs(20);

/// What a command run under the hostile-input limits did.
pub struct Limited {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub text: String,
}

impl Limited {
    /// Exited by itself (no signal, no panic) with `code`; returns the output.
    pub fn exited(&self, code: i32) -> &str {
        assert_eq!(
            self.signal, None,
            "killed by signal {:?}: {}",
            self.signal, self.text
        );
        assert!(
            !self.text.contains("panicked at"),
            "panicked: {}",
            self.text
        );
        assert_eq!(self.code, Some(code), "unexpected exit: {}", self.text);
        &self.text
    }
}

/// Runs `cmd` with a 3 GB address-space limit; kills it after 20 s and fails the test (a hang).
pub fn run_limited(mut cmd: Command) -> Limited {
    use std::io::Read;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::Stdio;
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: HOSTILE_ADDRESS_SPACE,
                rlim_max: HOSTILE_ADDRESS_SPACE,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > HOSTILE_WALL {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {HOSTILE_WALL:?}: a hang");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out_t.join().unwrap()),
        String::from_utf8_lossy(&err_t.join().unwrap())
    );
    Limited {
        code: status.code(),
        signal: status.signal(),
        text,
    }
}

/// A 16-bit mono WAV of deterministic noise.
pub fn noise_wav(path: &Path, seconds: f64, seed: u32) {
    let n = (seconds * 16000.0) as u32;
    let mut bytes = Vec::with_capacity(44 + 2 * n as usize);
    bytes.extend_from_slice(b"RIFF");
    bytes.extend_from_slice(&(36 + 2 * n).to_le_bytes());
    bytes.extend_from_slice(b"WAVEfmt ");
    bytes.extend_from_slice(&16u32.to_le_bytes());
    bytes.extend_from_slice(&1u16.to_le_bytes()); // PCM
    bytes.extend_from_slice(&1u16.to_le_bytes()); // mono
    bytes.extend_from_slice(&16000u32.to_le_bytes());
    bytes.extend_from_slice(&32000u32.to_le_bytes());
    bytes.extend_from_slice(&2u16.to_le_bytes());
    bytes.extend_from_slice(&16u16.to_le_bytes());
    bytes.extend_from_slice(b"data");
    bytes.extend_from_slice(&(2 * n).to_le_bytes());
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    for _ in 0..n {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        bytes.extend_from_slice(&((state % 6000) as i16 - 3000).to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}
