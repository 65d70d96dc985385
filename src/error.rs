//! One error type for the whole crate. Each error carries the C status it maps to, so the
//! FFI layer never has to guess, and a message that names what is wrong.

use std::fmt;

/// What went wrong, as the C API reports it (`BRIDGE_ERR_*` in `dino_bridge.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    Shape,
    Io,
    Checkpoint,
    Unsupported,
    Device,
    NonFinite,
    Internal,
    AbiMismatch,
}

#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn shape(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Shape, message)
    }
    pub fn checkpoint(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Checkpoint, message)
    }
    pub fn io(path: &std::path::Path, err: std::io::Error) -> Self {
        Self::new(ErrorKind::Io, format!("{}: {err}", path.display()))
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// Prefixes the message with context, keeping the kind.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error {
            kind: self.kind,
            message: format!("{what}: {}", self.message),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        // A candle error past our own validation is a bug or a resource problem.
        Error::internal(format!("tensor operation failed: {e}"))
    }
}
