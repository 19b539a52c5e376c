//! What the commands print on standard output. A reader that goes away
//! (`ldapsync account list | head -1`) is not an error: the rest of the
//! output is dropped and the command finishes its work quietly, as Unix
//! tools do. Any other failure to write is reported when the command ends.

use std::io::Write;
use std::sync::Mutex;

/// Set once a write failed: later output is dropped. `Some(None)` for a
/// closed pipe, `Some(Some(error))` for a failure worth reporting.
static FAILED: Mutex<Option<Option<String>>> = Mutex::new(None);

pub fn write(args: std::fmt::Arguments) {
    let mut failed = FAILED.lock().unwrap_or_else(|e| e.into_inner());
    if failed.is_some() {
        return;
    }
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        *failed = Some((e.kind() != std::io::ErrorKind::BrokenPipe).then(|| e.to_string()));
    }
}

/// Flushes what is buffered; the error of a write that failed other than
/// by a closed pipe.
pub fn finish() -> Result<(), String> {
    let _ = std::io::stdout().flush();
    match FAILED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        Some(Some(error)) => Err(format!("writing to standard output failed: {error}")),
        _ => Ok(()),
    }
}

/// `println!` that never panics (see the module doc).
macro_rules! outln {
    () => { $crate::cli::output::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::output::write(format_args!("{}\n", format_args!($($arg)*))) };
}

pub(crate) use outln;
