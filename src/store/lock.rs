//! One writer per store: an exclusive OS file lock (`flock`) on `STORE/writer.lock`, held for
//! the whole run. The kernel drops it when the process dies, so a `kill -9` never leaves a
//! stale lock; the file names the holder (pid, host, command) for the refusal message.
use super::StoreError;
use fs4::fs_std::FileExt;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The lock file inside a store; present only while a writer holds it.
pub const LOCK_FILE: &str = "writer.lock";

/// Who holds a store (the lock file's content).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    host: String,
    command: String,
}

impl Holder {
    fn describe(text: &str) -> String {
        match serde_json::from_str::<Holder>(text) {
            Ok(h) => format!(
                "speechcache {} (pid {} on host {})",
                h.command, h.pid, h.host
            ),
            Err(_) => "another speechcache process".into(),
        }
    }
}

/// An exclusive lock on a store directory; released (and the lock file removed) on drop.
#[derive(Debug)]
pub struct StoreLock {
    file: File,
    path: PathBuf,
}

impl StoreLock {
    /// Creates `dir` if needed and takes its writer lock, or refuses at once naming the holder.
    pub fn acquire(dir: &Path, command: &str) -> Result<Self, StoreError> {
        if dir.exists() && !dir.is_dir() {
            return Err(StoreError::refused(dir, "exists and is not a directory"));
        }
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        // A holder that was finishing may unlink the file we opened: retry on the new one.
        for _ in 0..100 {
            // never through a planted symlink: the holder line would overwrite its target
            let file =
                crate::regular_file::open_owned(&path).map_err(|e| StoreError::io(&path, e))?;
            let locked =
                FileExt::try_lock_exclusive(&file).map_err(|e| StoreError::io(&path, e))?;
            if !locked {
                let text = crate::regular_file::read_regular_to_string(&path).unwrap_or_default();
                return Err(StoreError::refused(
                    dir,
                    format!(
                        "is being written by {}; one writer per store: wait for it, or give \
                         each run (each array task) its own --out",
                        Holder::describe(&text)
                    ),
                ));
            }
            if !same_file(&file, &path) {
                continue;
            }
            warn_if_lock_may_be_node_local(dir);
            let mut lock = StoreLock { file, path };
            lock.write_holder(command)?;
            return Ok(lock);
        }
        Err(StoreError::refused(dir, "cannot take the writer lock"))
    }

    fn write_holder(&mut self, command: &str) -> Result<(), StoreError> {
        let holder = Holder {
            pid: std::process::id(),
            host: host_name(),
            command: command.to_string(),
        };
        let text = serde_json::to_string(&holder).map_err(|e| StoreError::Format(e.to_string()))?;
        let io = |e| StoreError::io(&self.path, e);
        self.file.set_len(0).map_err(io)?;
        self.file.write_all(text.as_bytes()).map_err(io)?;
        self.file.flush().map_err(io)
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        // Unlinked while still held, so a waiting opener sees a changed inode and retries.
        let _ = std::fs::remove_file(&self.path);
        let _ = FileExt::unlock(&self.file);
    }
}

/// Refuses a store whose writer lock is held by a live process (readers call this).
pub fn refuse_if_being_written(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = match crate::regular_file::open_regular(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io(&path, e)),
    };
    let free = FileExt::try_lock_shared(&file).map_err(|e| StoreError::io(&path, e))?;
    if free {
        let _ = FileExt::unlock(&file);
        return Ok(());
    }
    let text = crate::regular_file::read_regular_to_string(&path).unwrap_or_default();
    Err(StoreError::refused(
        dir,
        format!(
            "is being written by {}; read it when that run has finished",
            Holder::describe(&text)
        ),
    ))
}

/// A reader's shared lock on a complete store (on its `meta.json`), held while the store is
/// open: a writer that would destroy the store (`--overwrite`, `prune`) takes the same lock
/// exclusively first and refuses while any reader holds it, instead of truncating files mapped
/// by a running extract or finetune.
#[derive(Debug)]
pub struct ReadLock {
    _file: File,
}

impl ReadLock {
    /// Takes the shared lock, refusing if a destroying writer holds it.
    pub fn acquire(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("meta.json");
        let file =
            crate::regular_file::open_regular(&path).map_err(|e| StoreError::io(&path, e))?;
        let free = FileExt::try_lock_shared(&file).map_err(|e| StoreError::io(&path, e))?;
        if !free {
            return Err(StoreError::refused(
                dir,
                "is being replaced or pruned by another speechcache process; read it when that has finished",
            ));
        }
        Ok(Self { _file: file })
    }
}

/// The exclusive side of `ReadLock`: held by a writer while it removes or rewrites a complete
/// store's files. None when the store has no `meta.json` (nothing complete to protect).
#[derive(Debug)]
pub struct DestroyLock {
    _file: Option<File>,
}

impl DestroyLock {
    pub fn acquire(dir: &Path, what: &str) -> Result<Self, StoreError> {
        let path = dir.join("meta.json");
        let file = match crate::regular_file::open_regular(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self { _file: None }),
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let free = FileExt::try_lock_exclusive(&file).map_err(|e| StoreError::io(&path, e))?;
        if !free {
            return Err(StoreError::refused(
                dir,
                format!(
                    "is being read by another process (a running extract, finetune or decode \
                     has it mapped); {what} would pull its files from under it: wait for it to finish"
                ),
            ));
        }
        Ok(Self { _file: Some(file) })
    }
}

/// File systems whose `flock` may hold on this node only: NFS mounted `nolock` (or `local_lock=flock`)
/// and Lustre mounted `localflock`. A second writer on another node would not be refused there.
fn lock_may_be_node_local(dir: &Path) -> Option<&'static str> {
    const NFS_SUPER_MAGIC: i64 = 0x6969;
    const LUSTRE_SUPER_MAGIC: i64 = 0x0BD0_0BD0;
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct for a valid NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    match st.f_type as i64 {
        NFS_SUPER_MAGIC => Some("NFS"),
        LUSTRE_SUPER_MAGIC => Some("Lustre"),
        _ => None,
    }
}

fn warn_if_lock_may_be_node_local(dir: &Path) {
    if let Some(fs) = lock_may_be_node_local(dir) {
        eprintln!(
            "note: {} is on {fs}, where the writer lock may hold on this node only (NFS mounted \
             nolock, Lustre mounted localflock): never run two writers of one store on two nodes; \
             give each array task its own --out",
            dir.display()
        );
    }
}

/// Whether the open `file` is still the one at `path` (not unlinked or replaced).
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev() && a.nlink() > 0,
        _ => false,
    }
}

/// This machine's host name (for the holder line), or `unknown`.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or errs.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
