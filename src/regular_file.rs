//! Opening files that users, manifests and other processes control, as an adversary may shape
//! them: an input path may be a FIFO (opening it blocks until a writer appears), a device or
//! a socket; a fixed name inside a store may be a planted symlink that redirects our writes.
//!
//! - inputs (audio, manifests, shards) are opened non-blocking and checked to be regular files
//!   on the opened descriptor, so a swap between a check and the open changes nothing;
//! - names a store owns (`writer.lock`, `*.tmp`) are opened with `O_NOFOLLOW`, and temporaries
//!   are created with `O_EXCL` after removing a leftover, so a planted link is never followed.
use std::fs::{File, OpenOptions};
use std::io::{Error, ErrorKind, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` for reading if (after following symlinks, as a corpus may use them) it is a
/// regular file; never blocks on a FIFO.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, not_regular(kind)));
    }
    clear_nonblocking(&file)?;
    Ok(file)
}

/// The whole content of a regular file (see `open_regular`).
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let mut bytes = Vec::with_capacity(file.metadata().map_or(0, |m| m.len()) as usize);
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The whole content of a regular UTF-8 text file (see `open_regular`).
pub fn read_regular_to_string(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_regular(path)?)
        .map_err(|_| Error::new(ErrorKind::InvalidData, "stream did not contain valid UTF-8"))
}

/// Whether `path` names a regular file (following symlinks), without opening it.
pub fn is_regular(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Creates `path` afresh for writing: a leftover (file or symlink) is removed first, and the
/// create is exclusive and does not follow symlinks, so a link planted in between fails the
/// create instead of redirecting the write.
pub fn create_exclusive(path: &Path) -> std::io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Writes `path` atomically: `NAME.tmp` created afresh (see `create_exclusive`), written,
/// fsynced and renamed into place, then the directory fsynced (best effort) so the rename
/// survives a power cut. The error names the file it concerns.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), (std::path::PathBuf, Error)> {
    use std::io::Write;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let at_tmp = |e| (tmp.clone(), e);
    let mut file = create_exclusive(&tmp).map_err(at_tmp)?;
    file.write_all(bytes).map_err(at_tmp)?;
    file.sync_all().map_err(at_tmp)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| (path.to_path_buf(), e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Opens (creating if needed) a file the caller owns by name, read-write, refusing a symlink
/// or anything but a regular file at that name.
pub fn open_owned(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    open_no_follow(options, path)
}

/// Opens an existing file the caller owns by name for reading, refusing a symlink.
pub fn open_owned_readonly(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    open_no_follow(options, path)
}

fn open_no_follow(mut options: OpenOptions, path: &Path) -> std::io::Result<File> {
    let file = options
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::new(
                ErrorKind::InvalidInput,
                "is a symbolic link (refused: a link at a name we own would redirect our writes)",
            ),
            _ => e,
        })?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, not_regular(kind)));
    }
    clear_nonblocking(&file)?;
    Ok(file)
}

fn not_regular(kind: std::fs::FileType) -> String {
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    };
    format!("is {what}, not a regular file (refused: only regular files are read)")
}

fn clear_nonblocking(file: &File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL take and return plain ints.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("a.wav");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let err = open_regular(&fifo).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
        assert!(!is_regular(&fifo));
    }

    #[test]
    fn owned_names_refuse_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("victim");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("writer.lock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_owned(&link).is_err());
        assert!(open_owned_readonly(&link).is_err());
        // create_exclusive replaces the link itself, never writes through it
        let mut f = create_exclusive(&link).unwrap();
        std::io::Write::write_all(&mut f, b"new").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&link).unwrap().is_symlink());
    }
}
