//! The four failure kinds of the core. Each maps one-to-one onto a Python exception class
//! (`ConfigError`, `ScoreError`, `StateError`, `InternalError`), so callers can tell a bad
//! argument from a corrupt checkpoint from a bug.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Invalid configuration or argument value.
    Config(String),
    /// Score or mask input of the wrong size, shape or element type.
    Score(String),
    /// Serialised state that is truncated, tampered with, of another kind or version,
    /// or internally inconsistent.
    State(String),
    /// A broken invariant of the core itself; never expected.
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(m) | Error::Score(m) | Error::State(m) | Error::Internal(m) => {
                f.write_str(m)
            }
        }
    }
}

impl std::error::Error for Error {}

/// Allocates `n` copies of `value`, reporting allocation failure as an error instead of
/// aborting the process (an abort would kill the Python interpreter, which no exception
/// handler can catch).
pub(crate) fn filled<T: Clone>(n: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| Error::Config(format!("cannot allocate {what} of {n} entries")))?;
    v.resize(n, value);
    Ok(v)
}

/// Converts a signed integer argument (Python ints are signed) into a count, rejecting values
/// below `min` with a message that names the argument.
pub fn at_least(name: &str, value: i64, min: u64) -> Result<u64> {
    match u64::try_from(value) {
        Ok(v) if v >= min => Ok(v),
        _ => Err(Error::Config(format!(
            "{name} must be >= {min}, got {value}"
        ))),
    }
}
