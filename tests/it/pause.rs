//! Processes paused at the moments a kill test wants them: `tests/c/pause_at.c`, preloaded,
//! stops the child before each fsync and rename and reports it on stderr; the test lets it
//! go on or kills it there. Every kill lands where the test chose, whatever the speed of
//! the machine.

use super::c_api::build_cdylib;
use crate::common::tmp_dir;
use std::io::{BufRead, BufReader, Lines, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, Command, Stdio};
use std::sync::OnceLock;

/// The shim, built once per test process.
fn shim() -> PathBuf {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        build_cdylib(); // the library's folder exists (and the test's gcc works)
        let dir = tmp_dir("pause-shim");
        let lib = dir.join("libpause_at.so");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/pause_at.c");
        let status = Command::new("gcc")
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
            .arg(&lib)
            .arg(&src)
            .arg("-ldl")
            .status()
            .unwrap();
        assert!(status.success(), "gcc failed on {}", src.display());
        lib
    })
    .clone()
}

/// One event: `fsync` of a file or folder, or `rename` to a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub call: String,
    pub path: PathBuf,
}

/// A child process that stops at every fsync and rename until told to go on.
pub struct Paused {
    child: Child,
    go: ChildStdin,
    stderr: Lines<BufReader<ChildStderr>>,
    /// What the child wrote to stderr besides the events (for failure messages).
    pub other: Vec<String>,
}

impl Paused {
    /// Starts `cmd` with the shim preloaded (its stdin and stderr become the channel).
    pub fn spawn(mut cmd: Command) -> Paused {
        let mut child = cmd
            .env("LD_PRELOAD", shim())
            .env("DINO_TEST_PAUSE", "1")
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Paused {
            go: child.stdin.take().unwrap(),
            stderr: BufReader::new(child.stderr.take().unwrap()).lines(),
            child,
            other: Vec::new(),
        }
    }

    /// The next fsync or rename the child is stopped at; None once it has exited.
    pub fn next(&mut self) -> Option<Event> {
        for line in self.stderr.by_ref() {
            let line = line.ok()?;
            if let Some(rest) = line.strip_prefix("@pause ") {
                let (call, path) = rest.split_once(' ')?;
                return Some(Event {
                    call: call.to_string(),
                    path: PathBuf::from(path),
                });
            }
            self.other.push(line);
        }
        None
    }

    /// Lets the child make the call it is stopped at, and run on.
    pub fn go(&mut self) {
        let _ = self.go.write_all(b"g");
    }

    /// SIGKILL, where the child is stopped; waits for it.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}
