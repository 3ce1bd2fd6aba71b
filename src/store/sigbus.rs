//! A clear message instead of a bare "Bus error" when a memory-mapped store file shrinks
//! under a reader (another process truncated or replaced it, or its disk failed): the kernel
//! then raises SIGBUS on the next touch of a page past the new end.
//!
//! Every mapping a reader makes is registered here (a fixed table of atomics, readable from a
//! signal handler); the handler names the file that faulted, says what happened and exits with
//! `EXIT_CODE`. A SIGBUS outside any registered mapping (model weights are mapped too) gets the
//! same message without a file name.
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;

/// Exit status after a mapped store file failed under us (BSD `EX_IOERR`).
pub const EXIT_CODE: i32 = 74;

const SLOTS: usize = 4096;

/// Registered mappings: start address (0 = free), length, and a leaked message for the slot.
static STARTS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static MESSAGES: [AtomicPtr<Vec<u8>>; SLOTS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];
static INSTALL: Once = Once::new();

/// A registered mapping; unregistered on drop.
#[derive(Debug)]
pub struct Registration(Option<usize>);

/// Installs the handler (once; `register` does too). The binary calls it first thing, so a
/// mapped model file that shrinks is reported as well.
pub fn install() {
    INSTALL.call_once(install_handler);
}

/// Registers `len` bytes at `start`, mapped from `path`, and installs the handler once.
pub fn register(start: *const u8, len: usize, path: &Path) -> Registration {
    INSTALL.call_once(install_handler);
    if len == 0 {
        return Registration(None);
    }
    let message = format!(
        "speechcache: {}: this memory-mapped file shrank while it was being read (truncated or \
         replaced by another process, or its storage failed); the run stopped here. Check the \
         store with `speechcache verify`; a stage rerun with the same command resumes.\n",
        path.display()
    )
    .into_bytes();
    let boxed = Box::into_raw(Box::new(message));
    for slot in 0..SLOTS {
        if STARTS[slot]
            .compare_exchange(0, usize::MAX, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let old = MESSAGES[slot].swap(boxed, Ordering::AcqRel);
            free_message(old);
            LENS[slot].store(len, Ordering::Release);
            STARTS[slot].store(start as usize, Ordering::Release);
            return Registration(Some(slot));
        }
    }
    free_message(boxed);
    Registration(None)
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            // The message stays allocated until the slot is reused: a handler running now may
            // still read it.
            STARTS[slot].store(0, Ordering::Release);
        }
    }
}

fn free_message(ptr: *mut Vec<u8>) {
    if !ptr.is_null() {
        // SAFETY: every non-null pointer here came from Box::into_raw in `register`.
        drop(unsafe { Box::from_raw(ptr) });
    }
}

fn install_handler() {
    // SAFETY: sigaction with a handler that only reads atomics and calls write/_exit/signal,
    // all async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in 0..SLOTS {
        let start = STARTS[slot].load(Ordering::Acquire);
        if start == 0 || start == usize::MAX {
            continue;
        }
        let len = LENS[slot].load(Ordering::Acquire);
        if addr >= start && addr - start < len {
            let message = MESSAGES[slot].load(Ordering::Acquire);
            if !message.is_null() {
                // SAFETY: the message outlives the slot's registration (see Drop).
                let bytes = unsafe { &*message };
                // SAFETY: writing a valid buffer to stderr.
                unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
            }
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(EXIT_CODE) };
        }
    }
    // Not a registered store file: on x86-64/aarch64 Linux a SIGBUS still almost always means
    // a mapped file shrank (model weights are mapped too).
    const GENERIC: &[u8] = b"speechcache: a memory-mapped file (model weights or a store file) \
shrank while it was being read (truncated or replaced by another process, or its storage \
failed); the run stopped here. A stage rerun with the same command resumes.\n";
    // SAFETY: writing a static buffer to stderr, then _exit; both async-signal-safe.
    unsafe {
        libc::write(2, GENERIC.as_ptr().cast(), GENERIC.len());
        libc::_exit(EXIT_CODE);
    }
}
