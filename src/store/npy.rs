//! `.npy` files as the store uses them: a fixed 128-byte header (so a shard can be streamed and
//! its shape patched at seal time) and zero-copy memory-mapped reads.
use super::StoreError;
use memmap2::Mmap;
use npyz::WriterBuilder;
use std::path::{Path, PathBuf};

/// Every header the store writes is exactly this long: data starts 64-byte aligned at 128.
pub const HEADER_LEN: usize = 128;

/// The `.npy` header for a C-order array of `descr` (e.g. `<f4`) with `shape`.
pub fn header_bytes(descr: &str, shape: &[u64]) -> Result<Vec<u8>, StoreError> {
    let type_str: npyz::TypeStr = descr
        .parse()
        .map_err(|e| StoreError::Format(format!("bad npy dtype {descr}: {e}")))?;
    let mut buf: Vec<u8> = Vec::with_capacity(HEADER_LEN);
    npyz::WriteOptions::new_header_only()
        .dtype(npyz::DType::Plain(type_str))
        .shape(shape)
        .writer(&mut buf)
        .write_header_only()
        .map_err(|e| StoreError::Format(format!("cannot build npy header: {e}")))?;
    if buf.len() != HEADER_LEN {
        return Err(StoreError::Format(format!(
            "npy header for shape {shape:?} is {} bytes, expected {HEADER_LEN}",
            buf.len()
        )));
    }
    Ok(buf)
}

/// A memory-mapped `.npy` file whose header has been checked.
pub struct MappedNpy {
    /// Names this file if it shrinks while mapped (SIGBUS); dropped before the map.
    _sigbus: super::sigbus::Registration,
    pub path: PathBuf,
    map: Mmap,
    data_offset: usize,
    pub shape: Vec<u64>,
    pub descr: String,
}

impl MappedNpy {
    /// Drops the pages of this mapping from the process (they stay in the page cache and are
    /// read again when touched): streaming a store larger than memory keeps RSS bounded.
    pub fn release_pages(&self) {
        // SAFETY: a read-only shared file mapping; DONTNEED only makes the next access fault the
        // page in again from the file, whose contents never change (sealed shards).
        let _ = unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        };
    }

    /// Maps `path`, checks that it holds a C-order array of `descr`, and its byte size.
    pub fn open(path: &Path, descr: &str) -> Result<Self, StoreError> {
        let file = crate::regular_file::open_regular(path).map_err(|e| StoreError::io(path, e))?;
        // SAFETY: shards are sealed (renamed into place after fsync) and never modified again.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| StoreError::io(path, e))?;
        let mut rest: &[u8] = &map[..];
        let header = npyz::NpyHeader::from_reader(&mut rest)
            .map_err(|e| StoreError::corrupt(path, format!("unreadable npy header: {e}")))?;
        let data_offset = map.len() - rest.len();
        let found = header.dtype().descr();
        let found = found.trim_matches('\'');
        if found != descr {
            return Err(StoreError::corrupt(
                path,
                format!("dtype {found}, expected {descr}"),
            ));
        }
        if header.order() != npyz::Order::C {
            return Err(StoreError::corrupt(path, "Fortran-order array".to_string()));
        }
        let shape = header.shape().to_vec();
        let item = item_size(descr);
        let expected = shape
            .iter()
            .try_fold(item as u64, |n, &d| n.checked_mul(d))
            .and_then(|n| usize::try_from(n).ok());
        if expected != Some(rest.len()) {
            let expected =
                expected.map_or("more than memory can address".into(), |n| n.to_string());
            return Err(StoreError::corrupt(
                path,
                format!(
                    "{} data bytes, header shape {shape:?} needs {expected} (truncated or overwritten shard)",
                    rest.len()
                ),
            ));
        }
        if data_offset % 16 != 0 {
            return Err(StoreError::corrupt(
                path,
                format!("data offset {data_offset} is not aligned"),
            ));
        }
        let _sigbus = super::sigbus::register(map.as_ptr(), map.len(), path);
        Ok(Self {
            path: path.to_path_buf(),
            _sigbus,
            map,
            data_offset,
            shape,
            descr: descr.to_string(),
        })
    }

    /// The raw little-endian data bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.data_offset..]
    }

    /// The data viewed as `T` (whose size must match the dtype).
    pub fn as_slice<T: bytemuck::Pod>(&self) -> Result<&[T], StoreError> {
        bytemuck::try_cast_slice(self.bytes())
            .map_err(|e| StoreError::corrupt(&self.path, format!("misaligned data: {e}")))
    }
}

fn item_size(descr: &str) -> usize {
    descr
        .trim_start_matches(['<', '>', '|', '='])
        .get(1..)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}
