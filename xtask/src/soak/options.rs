//! The command line of `cargo xtask soak`.

use anyhow::{Context as _, Result, anyhow, bail};

/// The command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Options {
    pub(super) seconds: u64,
    pub(super) processes: u64,
    pub(super) unsafe_mode: bool,
    /// The workers poll the log every this many milliseconds instead of listening.
    pub(super) poll_ms: Option<u64>,
    /// The workers' listeners resync after every reconnect instead of catching up.
    pub(super) untracked_writers: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seconds: 60,
            processes: 3,
            unsafe_mode: false,
            poll_ms: None,
            untracked_writers: false,
        }
    }
}

pub(super) fn usage() -> &'static str {
    "cargo xtask soak [--seconds N] [--processes P] [--unsafe | --poll-ms N | \
     --untracked-writers]: P deflookup processes \
     (default 3) look up, edit and invalidate modules for N seconds (default 60) on one \
     Postgres database ($DATABASE_URL or a throwaway cluster) while listener backends and \
     pooled connections are terminated and the server is restarted; then it audits the table. \
     Last line: `stale rows: S of R rows; invalidations: I; lookups: L; faults: F`. \
     --unsafe runs the workers without broadcast, durable guard and listener (the control); \
     --poll-ms N makes them poll the invalidation log instead of listening; \
     --untracked-writers makes their listeners resync after a reconnect instead of catching up."
}

pub(super) fn parse_options(args: &[String]) -> Result<Option<Options>> {
    let mut options = Options::default();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        let (flag, inline) = match word.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_owned())),
            None => (word.as_str(), None),
        };
        let mut value = |name: &str| -> Result<u64> {
            let text = inline.clone().or_else(|| words.next().cloned());
            let text = text.with_context(|| format!("{name} needs a value"))?;
            text.parse().map_err(|_| anyhow!("{name} expects a whole number, got {text:?}"))
        };
        match flag {
            "--help" | "-h" => return Ok(None),
            "--seconds" => options.seconds = value("--seconds")?,
            "--processes" => options.processes = value("--processes")?,
            "--unsafe" if inline.is_none() => options.unsafe_mode = true,
            "--poll-ms" => options.poll_ms = Some(value("--poll-ms")?),
            "--untracked-writers" if inline.is_none() => options.untracked_writers = true,
            _ => bail!("unknown argument {word:?}\n{}", usage()),
        }
    }
    if options.seconds == 0 || options.processes == 0 || options.poll_ms == Some(0) {
        bail!("--seconds, --processes and --poll-ms must be at least 1");
    }
    let modes = [options.unsafe_mode, options.poll_ms.is_some(), options.untracked_writers];
    if modes.iter().filter(|on| **on).count() > 1 {
        bail!("--unsafe, --poll-ms and --untracked-writers go one at a time");
    }
    Ok(Some(options))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let args = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_options(&[]).unwrap(), Some(Options::default()));
        assert_eq!(
            parse_options(&args(&["--seconds", "20", "--processes=2", "--unsafe"])).unwrap(),
            Some(Options { seconds: 20, processes: 2, unsafe_mode: true, ..Options::default() })
        );
        assert_eq!(
            parse_options(&args(&["--poll-ms=100"])).unwrap(),
            Some(Options { poll_ms: Some(100), ..Options::default() })
        );
        assert!(parse_options(&args(&["--poll-ms", "0"])).is_err());
        assert!(parse_options(&args(&["--poll-ms", "5", "--untracked-writers"])).is_err());
        assert_eq!(parse_options(&args(&["--help"])).unwrap(), None);
        assert!(parse_options(&args(&["--seconds"])).is_err());
        assert!(parse_options(&args(&["--seconds", "x"])).is_err());
        assert!(parse_options(&args(&["--processes", "0"])).is_err());
        assert!(parse_options(&args(&["--bogus"])).is_err());
    }
}
