//! Where the library's messages go: nowhere, or to a callback the host installs
//! (`bridge_set_log_callback`, in the style of `llama_log_set`). For what a status cannot
//! say: which BLAS or device path was taken, a train step skipped for a non-finite loss.

use parking_lot::RwLock;
use std::ffi::{CString, c_char, c_void};

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

/// Sends `message` to the host's callback, if one is installed.
pub fn emit(level: Level, message: impl AsRef<str>) {
    let sink = SINK.read();
    let Some(s) = sink.as_ref() else {
        return;
    };
    let text = CString::new(message.as_ref().replace('\0', " ")).unwrap_or_default();
    // SAFETY: the host installed this function for exactly this signature and keeps it
    // (and `user_data`) valid until it installs another; the string lives across the call.
    unsafe { (s.callback)(level as i32, text.as_ptr(), s.user_data as *mut c_void) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    static SEEN: Mutex<Vec<(i32, String)>> = Mutex::new(Vec::new());

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
        set(Some(record), 42 as *mut c_void);
        emit(Level::Warn, "step 3 skipped");
        set(None, std::ptr::null_mut());
        emit(Level::Warn, "not seen");
        let seen = SEEN.lock().unwrap();
        assert!(seen.contains(&(3, "step 3 skipped".into())), "{seen:?}");
        assert!(!seen.iter().any(|(_, m)| m == "not seen"));
    }
}
