//! Hugging Face datasets as parquet: one file, or a directory of them (all `*.parquet` below
//! it, in path order; point it at one split); or a `save_to_disk` directory (`state.json`
//! naming its Arrow stream files), or one such `.arrow` file. The audio column is the `datasets` `Audio`
//! feature, `struct<bytes: binary, path: string>`: the encoded file (WAV, FLAC, MP3, Ogg...)
//! is decoded from `bytes` by content, in memory. A row whose `bytes` is null falls back to
//! `path` when that file exists (datasets written without embedding their audio).
//!
//! Columns: the audio column is `audio`, else the first struct column with a `bytes` field.
//! Text is `--text-column`, else the first of `text`, `sentence` (Common Voice),
//! `transcription` (FLEURS), `normalized_text`. The id is `--id-column`, else the first of `id`,
//! `segment_id`, `path`; values that name an audio file (Common Voice's `path`) give their
//! stem. Without an id column, the id is the audio `path`'s stem, else `FILE-ROW`. Speaker:
//! the first of `speaker_id`, `speaker`, `client_id`.
//!
//! Only the small columns (and `audio.path`) are read here (parquet; an Arrow stream is read
//! whole, one batch at a time); `read_audio_bytes` reads the `bytes` of a few rows of one row
//! group (record batch, for Arrow) when `prepare` decodes them. An Arrow stream has no index,
//! so reading batch `k` reads the batches before it.
//!
//! Damaged files: an Arrow stream's message headers are checked against the file before
//! arrow-ipc decodes them (it panics on some damage), and arrow/parquet decoding runs under
//! `catch_unwind` as a last resort. Rows read before the damage are kept; the rest of that
//! file becomes one error row naming the file, the row and the reason, and the run goes on.
use super::dir::clean_id;
use super::{is_audio_path, AudioRef, Columns, CorpusItem, ManifestError, Origin, Utterance};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, StructArray};
use arrow_ipc::reader::StreamReader;
use arrow_ipc::MessageHeader;
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use parquet::arrow::ProjectionMask;
use parquet::schema::types::SchemaDescriptor;
use std::cell::Cell;
use std::fs::File;
use std::io::{BufReader, Read};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Once;

const TEXT_COLUMNS: &[&str] = &["text", "sentence", "transcription", "normalized_text"];
const ID_COLUMNS: &[&str] = &["id", "segment_id", "path"];
const SPEAKER_COLUMNS: &[&str] = &["speaker_id", "speaker", "client_id"];

/// Rows are read from a row group in chunks of at most this many, one `prepare` job each.
pub const ROWS_PER_JOB: usize = 32;

/// The data files of an input: the file itself, the Arrow files a `save_to_disk` directory's
/// `state.json` lists, or the parquet files below a directory in path order.
pub(super) fn data_files(input: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    if !input.is_dir() {
        return Ok(vec![input.to_path_buf()]);
    }
    let state = input.join("state.json");
    if state.is_file() {
        return saved_arrow_files(input, &state);
    }
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(input)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && has_parquet_extension(e.path()))
        .map(|e| e.into_path())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ManifestError::invalid(
            input,
            "no *.parquet files in this directory (a Hugging Face dataset in parquet)",
        ));
    }
    Ok(files)
}

/// `_data_files` of a `save_to_disk` directory's `state.json`, in order.
fn saved_arrow_files(dir: &Path, state: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let text = crate::regular_file::read_regular_to_string(state)
        .map_err(|e| ManifestError::io(state, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ManifestError::invalid(state, format!("not valid JSON ({e})")))?;
    let files: Option<Vec<PathBuf>> = value["_data_files"].as_array().map(|list| {
        list.iter()
            .filter_map(|f| f["filename"].as_str())
            .map(|name| dir.join(name))
            .collect()
    });
    match files {
        Some(files) if !files.is_empty() => Ok(files),
        _ => Err(ManifestError::invalid(
            state,
            "no '_data_files' with file names (not a datasets save_to_disk directory?)",
        )),
    }
}

/// A directory `load` reads: a `save_to_disk` one, or one holding parquet files.
pub(super) fn is_dataset_dir(dir: &Path) -> bool {
    dir.join("state.json").is_file() || data_files(dir).is_ok()
}

pub(super) fn has_parquet_extension(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

pub(super) fn has_arrow_extension(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("arrow"))
}

pub(super) fn load(input: &Path, columns: &Columns) -> Result<Vec<CorpusItem>, ManifestError> {
    let mut items = Vec::new();
    for file in data_files(input)? {
        if has_arrow_extension(&file) {
            load_arrow_file(&file, columns, &mut items)?;
        } else {
            load_file(&file, columns, &mut items)?;
        }
    }
    Ok(items)
}

/// Opens an Arrow stream reading only the columns `projection` (all when None); a damaged
/// stream is an `Err` with the reason.
fn open_arrow(
    path: &Path,
    projection: Option<Vec<usize>>,
) -> Result<StreamReader<BufReader<File>>, String> {
    let file = crate::regular_file::open_regular(path).map_err(|e| format!("cannot open: {e}"))?;
    guarded(|| {
        StreamReader::try_new_buffered(file, projection)
            .map_err(|e| format!("not an Arrow stream (datasets' .arrow): {e}"))
    })
}

/// The indices of the chosen columns in an Arrow schema, ascending.
fn arrow_projection(schema: &Schema, c: &Chosen) -> Vec<usize> {
    let names = [
        Some(&c.audio),
        c.text.as_ref(),
        c.id.as_ref(),
        c.speaker.as_ref(),
    ];
    let mut indices: Vec<usize> = names
        .into_iter()
        .flatten()
        .filter_map(|n| schema.index_of(n).ok())
        .collect();
    indices.sort_unstable();
    indices.dedup();
    indices
}

/// An Arrow stream file, as `save_to_disk` writes it: every batch is read once. Where the file
/// turns out damaged, the rows read so far are kept and the rest is one error row.
fn load_arrow_file(
    path: &Path,
    columns: &Columns,
    items: &mut Vec<CorpusItem>,
) -> Result<(), ManifestError> {
    // arrow-ipc panics on some damage its validation does not see: look at the headers first
    let (good_batches, damage) = match check_arrow_stream(path, usize::MAX) {
        Ok(()) => (usize::MAX, None),
        Err(d) => (d.good_batches, Some(d.reason)),
    };
    let schema = match open_arrow(path, None) {
        Ok(reader) => reader.schema(),
        Err(reason) => {
            items.push(unreadable_rest(path, 0, damage.unwrap_or(reason)));
            return Ok(());
        }
    };
    let chosen = choose_columns(path, &schema, columns)?;
    let mut reader = match open_arrow(path, Some(arrow_projection(&schema, &chosen))) {
        Ok(reader) => reader,
        Err(reason) => {
            items.push(unreadable_rest(path, 0, damage.unwrap_or(reason)));
            return Ok(());
        }
    };
    let mut row = 0usize;
    for group in 0.. {
        if group == good_batches {
            if let Some(reason) = damage {
                items.push(unreadable_rest(path, row, reason));
            }
            break;
        }
        let batch = match guarded(|| reader.next().transpose().map_err(|e| e.to_string())) {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(reason) => {
                let reason = format!("record batch {group}: {reason}");
                items.push(unreadable_rest(path, row, reason));
                break;
            }
        };
        let table =
            Table::new(&batch, &chosen).map_err(|e| ManifestError::line(path, row + 1, e))?;
        for i in 0..batch.num_rows() {
            items.push(table.item(path, row, i, group, i));
            row += 1;
        }
    }
    Ok(())
}

/// The error row standing for the rows of a damaged data file from `row` (0-based) on.
fn unreadable_rest(path: &Path, row: usize, reason: String) -> CorpusItem {
    let stem = clean_id(&stem(&path.to_string_lossy()));
    CorpusItem {
        utt: Utterance {
            id: format!("{stem}-unreadable-{row}"),
            source: path.to_path_buf(),
            start: 0.0,
            duration: None,
            text: None,
            speaker: None,
        },
        audio: AudioRef::Invalid(format!(
            "the file is damaged from row {} on, which cannot be read: {reason}",
            row + 1
        )),
        origin: Origin::at_line(path, row + 1),
    }
}

/// Where an Arrow stream turned out damaged: after how many good record batches, and why.
#[derive(Debug)]
struct ArrowDamage {
    good_batches: usize,
    reason: String,
}

/// Checks the framing of an Arrow IPC stream and the buffers of its first `max_batches` record
/// batches against their message bodies, reading message headers only (bodies are skipped).
/// arrow-ipc slices buffers with assertions, so a flipped bit in an offset or a length would
/// panic inside it; here it is an error naming the batch.
fn check_arrow_stream(path: &Path, max_batches: usize) -> Result<(), ArrowDamage> {
    let mut good = 0usize;
    let damaged = |good: usize, reason: String| ArrowDamage {
        good_batches: good,
        reason,
    };
    let file = crate::regular_file::open_regular(path)
        .map_err(|e| damaged(0, format!("cannot open: {e}")))?;
    let size = file
        .metadata()
        .map_err(|e| damaged(0, format!("cannot stat: {e}")))?
        .len();
    let mut reader = BufReader::new(file);
    let mut pos = 0u64;
    let mut meta = Vec::new();
    while good < max_batches {
        let (at, done) = (pos, good);
        let fail = |reason: String| damaged(done, format!("message at byte {at}: {reason}"));
        let mut word = [0u8; 4];
        match read_word(&mut reader, &mut word).map_err(|e| fail(e.to_string()))? {
            false => return Ok(()),
            true => pos += 4,
        }
        let mut len = i32::from_le_bytes(word);
        if len == -1 {
            // the continuation marker of the current format; the length follows
            if !read_word(&mut reader, &mut word).map_err(|e| fail(e.to_string()))? {
                return Err(fail("the stream ends inside a message header".into()));
            }
            pos += 4;
            len = i32::from_le_bytes(word);
        }
        if len == 0 {
            return Ok(());
        }
        let len = u64::try_from(len).map_err(|_| fail(format!("negative length {len}")))?;
        if len > size - pos {
            return Err(fail(format!(
                "a header of {len} bytes runs past the end of the file ({size} bytes)"
            )));
        }
        meta.resize(len as usize, 0);
        reader
            .read_exact(&mut meta)
            .map_err(|e| fail(e.to_string()))?;
        pos += len;
        let message = arrow_ipc::root_as_message(&meta)
            .map_err(|e| fail(format!("damaged message header ({e})")))?;
        let body = u64::try_from(message.bodyLength())
            .ok()
            .filter(|&b| b <= size - pos)
            .ok_or_else(|| {
                fail(format!(
                    "a body of {} bytes runs past the end of the file ({size} bytes)",
                    message.bodyLength()
                ))
            })?;
        let batch = match message.header_type() {
            MessageHeader::RecordBatch => message.header_as_record_batch(),
            MessageHeader::DictionaryBatch => {
                message.header_as_dictionary_batch().and_then(|d| d.data())
            }
            _ => None,
        };
        if let Some(batch) = batch {
            check_batch_buffers(&batch, body).map_err(fail)?;
        }
        if message.header_type() == MessageHeader::RecordBatch {
            good += 1;
        }
        reader
            .seek_relative(body as i64)
            .map_err(|e| fail(e.to_string()))?;
        pos += body;
    }
    Ok(())
}

/// Every buffer and node of a record batch header lies within a body of `body` bytes.
fn check_batch_buffers(batch: &arrow_ipc::RecordBatch<'_>, body: u64) -> Result<(), String> {
    if batch.length() < 0 {
        return Err(format!("negative row count {}", batch.length()));
    }
    for (i, b) in batch.buffers().iter().flatten().enumerate() {
        let end = u64::try_from(b.offset())
            .ok()
            .zip(u64::try_from(b.length()).ok())
            .and_then(|(o, l)| o.checked_add(l));
        if end.is_none_or(|end| end > body) {
            return Err(format!(
                "buffer {i} (offset {}, {} bytes) lies outside the message body of {body} bytes",
                b.offset(),
                b.length()
            ));
        }
    }
    for (i, n) in batch.nodes().iter().flatten().enumerate() {
        if n.length() < 0 || n.null_count() < 0 || n.null_count() > n.length() {
            return Err(format!(
                "column node {i} has {} rows and {} nulls",
                n.length(),
                n.null_count()
            ));
        }
    }
    Ok(())
}

/// Fills `word`; false at a clean end of file before its first byte.
fn read_word(reader: &mut impl Read, word: &mut [u8; 4]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < word.len() {
        match reader.read(&mut word[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the stream ends inside a message header",
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

thread_local! {
    /// Set while `guarded` runs on this thread: its panics are reported as errors instead.
    static QUIET_PANICS: Cell<bool> = const { Cell::new(false) };
}

/// Runs arrow/parquet decoding, turning a panic inside those crates (their last resort on
/// damage they do not check) into an error. The panic hook is wrapped once so that such a
/// panic prints nothing; panics elsewhere, and on other threads, print as before.
fn guarded<T>(work: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET_PANICS.with(|q| q.replace(true));
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(work));
    QUIET_PANICS.with(|q| q.set(was));
    outcome.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(format!("the decoder crashed on damaged data ({what})"))
    })
}

/// The columns one file is read through, chosen from its schema.
struct Chosen {
    audio: String,
    text: Option<String>,
    id: Option<String>,
    speaker: Option<String>,
}

fn choose_columns(
    path: &Path,
    schema: &Schema,
    columns: &Columns,
) -> Result<Chosen, ManifestError> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let pick = |asked: &Option<String>, flag: &str, defaults: &[&str]| match asked {
        Some(name) if names.contains(&name.as_str()) => Ok(Some(name.clone())),
        Some(name) => Err(ManifestError::invalid(
            path,
            format!(
                "{flag} '{name}' is not a column of this file (columns: {})",
                names.join(", ")
            ),
        )),
        None => Ok(defaults
            .iter()
            .find(|d| names.contains(d))
            .map(|d| d.to_string())),
    };
    let audio = audio_column(schema).ok_or_else(|| {
        ManifestError::invalid(
            path,
            format!(
                "no audio column: expected a struct column with a 'bytes' field, as the \
                 datasets Audio feature writes (columns: {})",
                names.join(", ")
            ),
        )
    })?;
    Ok(Chosen {
        audio,
        text: pick(&columns.text, "--text-column", TEXT_COLUMNS)?,
        id: pick(&columns.id, "--id-column", ID_COLUMNS)?,
        speaker: pick(&None, "", SPEAKER_COLUMNS)?,
    })
}

/// `audio`, else the first struct column with a `bytes` field.
fn audio_column(schema: &Schema) -> Option<String> {
    let is_audio = |f: &Field| match f.data_type() {
        DataType::Struct(children) => children.iter().any(|c| c.name() == "bytes"),
        _ => false,
    };
    let fields = schema.fields();
    fields
        .iter()
        .find(|f| f.name() == "audio" && is_audio(f))
        .or_else(|| fields.iter().find(|f| is_audio(f)))
        .map(|f| f.name().clone())
}

/// Leaf columns whose path is one of `wanted` (top-level names, or `audio.path`).
fn leaves(schema: &SchemaDescriptor, wanted: &[Vec<&str>]) -> ProjectionMask {
    let indices = (0..schema.num_columns()).filter(|&i| {
        let parts = schema.column(i).path().parts().to_vec();
        wanted
            .iter()
            .any(|w| parts.len() >= w.len() && parts[..w.len()].iter().zip(w).all(|(a, b)| a == b))
    });
    ProjectionMask::leaves(schema, indices.collect::<Vec<_>>())
}

fn open_parquet(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, String> {
    let file = crate::regular_file::open_regular(path).map_err(|e| format!("cannot open: {e}"))?;
    guarded(|| {
        ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| format!("not a parquet file: {e}"))
    })
}

/// A parquet file, small columns only. Where the file turns out damaged, the rows read so far
/// are kept and the rest is one error row.
fn load_file(
    path: &Path,
    columns: &Columns,
    items: &mut Vec<CorpusItem>,
) -> Result<(), ManifestError> {
    let builder = match open_parquet(path) {
        Ok(b) => b,
        Err(reason) => {
            items.push(unreadable_rest(path, 0, reason));
            return Ok(());
        }
    };
    let chosen = choose_columns(path, builder.schema(), columns)?;
    let mut wanted: Vec<Vec<&str>> = vec![vec![chosen.audio.as_str(), "path"]];
    for name in [&chosen.text, &chosen.id, &chosen.speaker]
        .into_iter()
        .flatten()
    {
        wanted.push(vec![name.as_str()]);
    }
    let mask = leaves(builder.parquet_schema(), &wanted);
    let group_rows: Vec<usize> = builder
        .metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows().max(0) as usize)
        .collect();
    let built = guarded(|| {
        builder
            .with_projection(mask)
            .build()
            .map_err(|e| format!("cannot read: {e}"))
    });
    let mut reader = match built {
        Ok(r) => r,
        Err(reason) => {
            items.push(unreadable_rest(path, 0, reason));
            return Ok(());
        }
    };
    let mut row = 0usize;
    let mut locate = RowLocator::new(group_rows);
    loop {
        let batch = match guarded(|| reader.next().transpose().map_err(|e| e.to_string())) {
            Ok(Some(batch)) => batch,
            Ok(None) => break,
            Err(reason) => {
                items.push(unreadable_rest(path, row, reason));
                break;
            }
        };
        let table =
            Table::new(&batch, &chosen).map_err(|e| ManifestError::line(path, row + 1, e))?;
        for i in 0..batch.num_rows() {
            let (group, in_group) = locate.next();
            items.push(table.item(path, row, i, group, in_group));
            row += 1;
        }
    }
    Ok(())
}

/// Maps consecutive file rows to (row group, row within it).
struct RowLocator {
    groups: Vec<usize>,
    group: usize,
    in_group: usize,
}

impl RowLocator {
    fn new(groups: Vec<usize>) -> Self {
        RowLocator {
            groups,
            group: 0,
            in_group: 0,
        }
    }

    fn next(&mut self) -> (usize, usize) {
        while self.group < self.groups.len() && self.in_group >= self.groups[self.group] {
            self.group += 1;
            self.in_group = 0;
        }
        let at = (self.group, self.in_group);
        self.in_group += 1;
        at
    }
}

/// One record batch's columns, as strings.
struct Table {
    audio_path: Option<ArrayRef>,
    text: Option<ArrayRef>,
    id: Option<ArrayRef>,
    speaker: Option<ArrayRef>,
}

impl Table {
    fn new(batch: &RecordBatch, chosen: &Chosen) -> Result<Self, String> {
        let as_text = |name: &Option<String>| -> Result<Option<ArrayRef>, String> {
            let Some(name) = name else { return Ok(None) };
            let column = batch
                .column_by_name(name)
                .ok_or_else(|| format!("column '{name}' is missing"))?;
            arrow_cast::cast(column, &DataType::Utf8)
                .map(Some)
                .map_err(|e| format!("column '{name}' cannot be read as text: {e}"))
        };
        let audio = batch
            .column_by_name(&chosen.audio)
            .and_then(|c| c.as_struct_opt())
            .ok_or_else(|| format!("column '{}' is missing", chosen.audio))?;
        let audio_path = match audio.column_by_name("path") {
            Some(p) => Some(
                arrow_cast::cast(p, &DataType::Utf8)
                    .map_err(|e| format!("'{}.path' is not text: {e}", chosen.audio))?,
            ),
            None => None,
        };
        Ok(Table {
            audio_path,
            text: as_text(&chosen.text)?,
            id: as_text(&chosen.id)?,
            speaker: as_text(&chosen.speaker)?,
        })
    }

    fn string(column: &Option<ArrayRef>, i: usize) -> Option<String> {
        let column = column.as_ref()?;
        let strings = column.as_string_opt::<i32>()?;
        strings.is_valid(i).then(|| strings.value(i).to_string())
    }

    fn item(&self, path: &Path, row: usize, i: usize, group: usize, in_group: usize) -> CorpusItem {
        let audio_path = Self::string(&self.audio_path, i);
        let id = match Self::string(&self.id, i) {
            Some(v) if is_audio_path(Path::new(&v)) => clean_id(&stem(&v)),
            Some(v) => v,
            None => match audio_path.as_deref().filter(|p| !p.is_empty()) {
                Some(p) => clean_id(&stem(p)),
                None => format!("{}-{row}", clean_id(&stem(&path.to_string_lossy()))),
            },
        };
        let audio = if id.is_empty() || id.chars().any(char::is_whitespace) {
            AudioRef::Invalid(format!(
                "id '{id}' must be non-empty and contain no whitespace (choose another --id-column)"
            ))
        } else {
            AudioRef::Embedded {
                group,
                row: in_group,
                file_row: row,
                fallback: audio_path.clone().map(PathBuf::from),
            }
        };
        CorpusItem {
            utt: Utterance {
                id,
                source: path.to_path_buf(),
                start: 0.0,
                duration: None,
                text: Self::string(&self.text, i),
                speaker: Self::string(&self.speaker, i),
            },
            audio,
            origin: Origin::at_line(path, row + 1),
        }
    }
}

fn stem(path: &str) -> String {
    let name = path.rsplit(['/', '\\']).next().unwrap_or(path);
    match name.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem.to_string(),
        _ => name.to_string(),
    }
}

/// The encoded audio of rows `rows` (ascending, within row group `group`, or record batch
/// `group` of an Arrow file) of a data file, in the order asked; `None` where the row's `bytes`
/// is null.
pub fn read_audio_bytes(
    path: &Path,
    group: usize,
    rows: &[usize],
) -> Result<Vec<Option<Vec<u8>>>, String> {
    let (Some(&first), Some(&last)) = (rows.first(), rows.last()) else {
        return Ok(Vec::new());
    };
    if has_arrow_extension(path) {
        return read_arrow_audio_bytes(path, group, rows);
    }
    let builder = open_parquet(path)?;
    let audio = audio_column(builder.schema()).ok_or("no audio column")?;
    if group >= builder.metadata().num_row_groups() {
        return Err(format!("row group {group} is missing"));
    }
    let mask = leaves(builder.parquet_schema(), &[vec![audio.as_str(), "bytes"]]);
    let span = last + 1 - first;
    let bytes = guarded(|| {
        let reader = builder
            .with_projection(mask)
            .with_row_groups(vec![group])
            .with_row_selection(RowSelection::from(vec![
                RowSelector::skip(first),
                RowSelector::select(span),
            ]))
            .with_batch_size(span)
            .build()
            .map_err(|e| format!("cannot read: {e}"))?;
        let mut bytes: Vec<Option<Vec<u8>>> = Vec::with_capacity(span);
        for batch in reader {
            let batch = batch.map_err(|e| format!("cannot read the audio bytes: {e}"))?;
            append_bytes(&batch, &audio, 0..batch.num_rows(), &mut bytes)?;
        }
        Ok(bytes)
    })?;
    rows.iter()
        .map(|&r| {
            bytes
                .get(r - first)
                .cloned()
                .ok_or_else(|| format!("row {r} of row group {group} is missing"))
        })
        .collect()
}

/// Appends the `bytes` of rows `range` of a batch's audio column.
fn append_bytes(
    batch: &RecordBatch,
    audio: &str,
    range: std::ops::Range<usize>,
    out: &mut Vec<Option<Vec<u8>>>,
) -> Result<(), String> {
    let column = batch
        .column_by_name(audio)
        .and_then(|c| c.as_struct_opt())
        .and_then(|s: &StructArray| s.column_by_name("bytes"))
        .ok_or("the audio column has no 'bytes'")?;
    let binary = arrow_cast::cast(column, &DataType::LargeBinary)
        .map_err(|e| format!("'{audio}.bytes' is not binary: {e}"))?;
    let binary = binary.as_binary::<i64>();
    for i in range {
        if i >= binary.len() {
            return Err(format!("row {i} is past the batch's {} rows", binary.len()));
        }
        out.push(binary.is_valid(i).then(|| binary.value(i).to_vec()));
    }
    Ok(())
}

/// `read_audio_bytes` for an Arrow stream: the batches before `batch` are read past.
fn read_arrow_audio_bytes(
    path: &Path,
    batch: usize,
    rows: &[usize],
) -> Result<Vec<Option<Vec<u8>>>, String> {
    check_arrow_stream(path, batch.saturating_add(1)).map_err(|d| {
        format!(
            "damaged after record batch {}: {}",
            d.good_batches, d.reason
        )
    })?;
    let schema = open_arrow(path, None)?.schema();
    let audio = audio_column(&schema).ok_or("no audio column")?;
    let index = schema.index_of(&audio).map_err(|e| e.to_string())?;
    let mut reader = open_arrow(path, Some(vec![index]))?;
    let wanted = guarded(|| {
        reader
            .nth(batch)
            .ok_or_else(|| format!("record batch {batch} is missing"))?
            .map_err(|e| format!("cannot read the audio bytes: {e}"))
    })?;
    let mut bytes = Vec::with_capacity(rows.len());
    for &row in rows {
        append_bytes(&wanted, &audio, row..row + 1, &mut bytes)?;
    }
    Ok(bytes)
}
