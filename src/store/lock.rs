//! Locks: one writer per store (an exclusive `flock` on `STORE/writer.lock`, held for the whole
//! run; `HolderLock`, which the experiment lock shares), and readers' shared locks on
//! `meta.json`. The kernel drops a lock when the process dies, so a `kill -9` never leaves a
//! stale one; a lock file names its holder (pid, host, command) for the refusal message.
use super::StoreError;
use fs4::fs_std::FileExt;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The lock file inside a store; present only while a writer holds it.
pub const LOCK_FILE: &str = "writer.lock";

/// Who holds a lock (the lock file's content).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub command: String,
}

impl Holder {
    /// `COMMAND (pid N on host H)`, or a neutral phrase when the file says nothing readable.
    pub fn describe(holder: Option<&Holder>) -> String {
        match holder {
            Some(h) => format!("{} (pid {} on host {})", h.command.trim(), h.pid, h.host),
            None => "another speechcache process".into(),
        }
    }
}

/// An exclusive `flock` on a lock file that names its holder: the store writer lock and the
/// experiment lock. The kernel drops it when the process dies, so a `kill -9` never leaves a
/// stale lock. Released, and the file removed, on drop.
#[derive(Debug)]
pub struct HolderLock {
    file: File,
    path: PathBuf,
}

/// Why a `HolderLock` was not taken.
#[derive(Debug)]
pub enum LockRefusal {
    /// A live process holds it (None: its holder line is unreadable).
    Held(Option<Holder>),
    Io(std::io::Error),
}

impl HolderLock {
    /// Takes the lock at `path` (created; never through a symlink planted there, which the
    /// holder line would overwrite), recording `command` as the holder.
    pub fn try_acquire(path: &Path, command: &str) -> Result<Self, LockRefusal> {
        // A holder that was finishing may unlink the file we opened: retry on the new one.
        for _ in 0..100 {
            let file = crate::regular_file::open_owned(path).map_err(LockRefusal::Io)?;
            if !FileExt::try_lock_exclusive(&file).map_err(LockRefusal::Io)? {
                return Err(LockRefusal::Held(read_holder(&file)));
            }
            if !same_file(&file, path) {
                continue;
            }
            let mut lock = HolderLock {
                file,
                path: path.to_path_buf(),
            };
            lock.write_holder(command).map_err(LockRefusal::Io)?;
            return Ok(lock);
        }
        Err(LockRefusal::Io(std::io::Error::other(
            "the lock file kept being replaced",
        )))
    }

    /// Who holds the lock at `path` now, if anyone; read without taking it. A file that cannot
    /// be opened (none, a planted symlink, a FIFO) holds nobody.
    pub fn holder(path: &Path) -> Option<Option<Holder>> {
        let file = crate::regular_file::open_owned_readonly(path).ok()?;
        if FileExt::try_lock_shared(&file).unwrap_or(true) {
            let _ = FileExt::unlock(&file);
            return None;
        }
        Some(read_holder(&file))
    }

    fn write_holder(&mut self, command: &str) -> std::io::Result<()> {
        let holder = Holder {
            pid: std::process::id(),
            host: host_name(),
            command: command.to_string(),
        };
        let text = serde_json::to_string(&holder).map_err(std::io::Error::other)?;
        self.file.set_len(0)?;
        self.file.write_all(text.as_bytes())?;
        self.file.flush()
    }
}

impl Drop for HolderLock {
    fn drop(&mut self) {
        // Unlinked while still held, so a waiting opener sees a changed inode and retries.
        let _ = std::fs::remove_file(&self.path);
        let _ = FileExt::unlock(&self.file);
    }
}

/// The holder line of an open lock file, read through its handle (not its name).
fn read_holder(mut file: &File) -> Option<Holder> {
    use std::io::{Read, Seek};
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(64 * 1024).read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

/// An exclusive lock on a store directory (`STORE/writer.lock`).
#[derive(Debug)]
pub struct StoreLock {
    _lock: HolderLock,
}

impl StoreLock {
    /// Creates `dir` if needed and takes its writer lock, or refuses at once naming the holder.
    pub fn acquire(dir: &Path, command: &str) -> Result<Self, StoreError> {
        if dir.exists() && !dir.is_dir() {
            return Err(StoreError::refused(dir, "exists and is not a directory"));
        }
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        match HolderLock::try_acquire(&path, &format!("speechcache {command}")) {
            Ok(lock) => {
                warn_if_lock_may_be_node_local(dir);
                Ok(StoreLock { _lock: lock })
            }
            Err(LockRefusal::Held(holder)) => Err(StoreError::refused(
                dir,
                format!(
                    "is being written by {}; one writer per store: wait for it, or give \
                     each run (each array task) its own --out",
                    Holder::describe(holder.as_ref())
                ),
            )),
            Err(LockRefusal::Io(e)) => Err(StoreError::io(&path, e)),
        }
    }
}

/// Refuses a store whose writer lock is held by a live process (readers call this).
pub fn refuse_if_being_written(dir: &Path) -> Result<(), StoreError> {
    match HolderLock::holder(&dir.join(LOCK_FILE)) {
        None => Ok(()),
        Some(holder) => Err(StoreError::refused(
            dir,
            format!(
                "is being written by {}; read it when that run has finished",
                Holder::describe(holder.as_ref())
            ),
        )),
    }
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
    match (file.metadata(), std::fs::symlink_metadata(path)) {
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
