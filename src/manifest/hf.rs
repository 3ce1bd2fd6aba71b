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
use super::dir::clean_id;
use super::{is_audio_path, AudioRef, Columns, CorpusItem, ManifestError, Origin, Utterance};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, StructArray};
use arrow_ipc::reader::StreamReader;
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
use parquet::arrow::ProjectionMask;
use parquet::schema::types::SchemaDescriptor;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

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
    let text = std::fs::read_to_string(state).map_err(|e| ManifestError::io(state, e))?;
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

fn open_arrow(
    path: &Path,
    columns: impl FnOnce(&Schema) -> Result<Vec<usize>, ManifestError>,
) -> Result<StreamReader<BufReader<File>>, ManifestError> {
    let open = |projection| {
        let file = File::open(path).map_err(|e| ManifestError::io(path, e))?;
        StreamReader::try_new_buffered(file, projection).map_err(|e| {
            ManifestError::invalid(path, format!("not an Arrow stream (datasets' .arrow): {e}"))
        })
    };
    let schema = open(None)?.schema();
    open(Some(columns(&schema)?))
}

/// An Arrow stream file, as `save_to_disk` writes it: every batch is read once.
fn load_arrow_file(
    path: &Path,
    columns: &Columns,
    items: &mut Vec<CorpusItem>,
) -> Result<(), ManifestError> {
    let mut chosen = None;
    let reader = open_arrow(path, |schema| {
        let c = choose_columns(path, schema, columns)?;
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
        chosen = Some(c);
        Ok(indices)
    })?;
    let chosen = chosen.ok_or_else(|| ManifestError::invalid(path, "no schema"))?;
    let mut row = 0usize;
    for (group, batch) in reader.enumerate() {
        let batch =
            batch.map_err(|e| ManifestError::invalid(path, format!("cannot read rows: {e}")))?;
        let table =
            Table::new(&batch, &chosen).map_err(|e| ManifestError::line(path, row + 1, e))?;
        for i in 0..batch.num_rows() {
            items.push(table.item(path, row, i, group, i));
            row += 1;
        }
    }
    Ok(())
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
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| format!("not a parquet file: {e}"))
}

fn load_file(
    path: &Path,
    columns: &Columns,
    items: &mut Vec<CorpusItem>,
) -> Result<(), ManifestError> {
    let builder = open_parquet(path).map_err(|e| ManifestError::invalid(path, e))?;
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
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| ManifestError::invalid(path, format!("cannot read: {e}")))?;
    let mut row = 0usize;
    let mut locate = RowLocator::new(group_rows);
    for batch in reader {
        let batch =
            batch.map_err(|e| ManifestError::invalid(path, format!("cannot read rows: {e}")))?;
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
    let mask = leaves(builder.parquet_schema(), &[vec![audio.as_str(), "bytes"]]);
    let span = last + 1 - first;
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
    let mut audio = None;
    let mut reader = open_arrow(path, |schema| {
        let name =
            audio_column(schema).ok_or_else(|| ManifestError::invalid(path, "no audio column"))?;
        let index = schema
            .index_of(&name)
            .map_err(|e| ManifestError::invalid(path, e.to_string()))?;
        audio = Some(name);
        Ok(vec![index])
    })
    .map_err(|e| e.to_string())?;
    let audio = audio.ok_or("no audio column")?;
    let wanted = reader
        .nth(batch)
        .ok_or_else(|| format!("record batch {batch} is missing"))?
        .map_err(|e| format!("cannot read the audio bytes: {e}"))?;
    let mut bytes = Vec::with_capacity(rows.len());
    for &row in rows {
        append_bytes(&wanted, &audio, row..row + 1, &mut bytes)?;
    }
    Ok(bytes)
}
