//! Where the library's messages go: nowhere, or to a callback the host installs
//! (`bridge_set_log_callback`, in the style of `llama_log_set`). For what a status cannot
//! say: which BLAS or device path was taken, a train step skipped for a non-finite loss.

use parking_lot::RwLock;
use std::cell::{Cell, RefCell};
use std::ffi::{CString, c_char, c_void};
use std::marker::PhantomData;

/// Message levels (the C API's `BRIDGE_LOG_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// The host's function: `(level, message, user_data)`; the message is valid during the
/// call only.
pub type Callback = unsafe extern "C" fn(i32, *const c_char, *mut c_void);

struct Sink {
    callback: Callback,
    /// The host's pointer, handed back untouched (stored as an integer: it is opaque).
    user_data: usize,
}

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

/// Installs `callback` (None: messages go nowhere again).
pub fn set(callback: Option<Callback>, user_data: *mut c_void) {
    *SINK.write() = callback.map(|callback| Sink {
        callback,
        user_data: user_data as usize,
    });
}

thread_local! {
    /// Open `Held` scopes on this thread, and the messages they hold back.
    static HELD_DEPTH: Cell<usize> = const { Cell::new(0) };
    static HELD: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
}

/// While one is alive, messages emitted on this thread wait, and the last one dropped
/// delivers them. A bridge holds one beside each lock on its state, dropped after the
/// lock: the host's callback never runs while a handle's lock is held, so a slow callback
/// stalls no other call, and one that calls back into that handle cannot deadlock.
pub struct Held {
    /// Thread-bound: the count and the queue are this thread's.
    _thread: PhantomData<*const ()>,
}

/// Holds this thread's messages back until the returned guard is dropped.
pub fn hold() -> Held {
    HELD_DEPTH.with(|d| d.set(d.get() + 1));
    Held {
        _thread: PhantomData,
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let depth = HELD_DEPTH.with(|d| {
            d.set(d.get() - 1);
            d.get()
        });
        if depth == 0 {
            for (level, message) in HELD.with(|h| std::mem::take(&mut *h.borrow_mut())) {
                deliver(level, &message);
            }
        }
    }
}

/// Sends `message` to the host's callback, if one is installed: now, or when this
/// thread's `Held` scopes end.
pub fn emit(level: Level, message: impl AsRef<str>) {
    if HELD_DEPTH.with(|d| d.get()) > 0 {
        HELD.with(|h| h.borrow_mut().push((level, message.as_ref().to_string())));
        return;
    }
    deliver(level, message.as_ref());
}

fn deliver(level: Level, message: &str) {
    let sink = SINK.read();
    let Some(s) = sink.as_ref() else {
        return;
    };
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    // SAFETY: the host installed this function for exactly this signature and keeps it
    // (and `user_data`) valid until it installs another; the string lives across the call.
    unsafe { (s.callback)(level as i32, text.as_ptr(), s.user_data as *mut c_void) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    static SEEN: Mutex<Vec<(i32, String)>> = Mutex::new(Vec::new());
    /// The sink is process-wide: the tests that install one take turns.
    static SINK_TESTS: Mutex<()> = Mutex::new(());

    unsafe extern "C" fn record(level: i32, msg: *const c_char, user: *mut c_void) {
        assert_eq!(user as usize, 42);
        // SAFETY: `emit` passes a live NUL-terminated string.
        let text = unsafe { std::ffi::CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned();
        SEEN.lock().unwrap().push((level, text));
    }

    #[test]
    fn messages_reach_the_callback_and_stop_when_it_is_removed() {
        let _turn = SINK_TESTS.lock().unwrap();
        set(Some(record), 42 as *mut c_void);
        emit(Level::Warn, "step 3 skipped");
        set(None, std::ptr::null_mut());
        emit(Level::Warn, "not seen");
        let seen = SEEN.lock().unwrap();
        assert!(seen.contains(&(3, "step 3 skipped".into())), "{seen:?}");
        assert!(!seen.iter().any(|(_, m)| m == "not seen"));
    }

    static HELD_SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());

    unsafe extern "C" fn record_held(_: i32, msg: *const c_char, _: *mut c_void) {
        // SAFETY: `emit` passes a live NUL-terminated string.
        let text = unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy();
        if text.starts_with("held ") {
            HELD_SEEN.lock().unwrap().push(text.into_owned());
        }
    }

    #[test]
    fn held_messages_wait_for_the_outermost_scope() {
        let _turn = SINK_TESTS.lock().unwrap();
        set(Some(record_held), std::ptr::null_mut());
        let outer = hold();
        let inner = hold();
        emit(Level::Info, "held 1");
        drop(inner);
        emit(Level::Info, "held 2");
        assert!(HELD_SEEN.lock().unwrap().is_empty());
        drop(outer);
        emit(Level::Info, "held 3");
        set(None, std::ptr::null_mut());
        assert_eq!(*HELD_SEEN.lock().unwrap(), ["held 1", "held 2", "held 3"]);
    }
}
