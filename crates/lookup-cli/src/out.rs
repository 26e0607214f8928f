//! Everything the binary prints on stdout goes through [`write_line`] (the [`outln!`] macro),
//! so that a failed write is an error to handle instead of `println!`'s panic.
//!
//! A closed pipe (`deflookup … | head -1`) ends the command quietly with success, as
//! command-line tools do: `main` recognises [`is_broken_pipe`]. Any other write error (a full
//! disk, say) is an error naming stdout, with a non-zero exit.

use std::io::Write as _;

use anyhow::{Context as _, Result};

/// Writes one line to stdout (flushed at the newline, like `println!`).
pub(crate) fn write_line(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{args}").and_then(|()| stdout.flush()).context("cannot write to stdout")
}

/// Whether `error` comes from writing to a pipe whose reader has gone.
pub(crate) fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `println!` that returns the write's error instead of panicking.
macro_rules! outln {
    () => {
        $crate::out::write_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::write_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;
