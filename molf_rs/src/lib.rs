//! Rust core of molf: the deterministic part of optimizer-level routing between full
//! fine-tuning and LoRA experts.
//!
//! * [`router`] — picks the winning experts per module from a score matrix, under a policy
//!   (`topk`, `hysteresis`) and a phase schedule ([`phase`]: warm-up → routing → frozen);
//! * [`ledger`] — score and decision bookkeeping with a decision checksum;
//! * [`heldout`] — the ledger's held-out record (policy heldout's measurements, shrink books);
//! * [`serial`] — the versioned, self-checking byte format of both;
//! * [`scores`] — the per-tensor sums behind the EPD and PFN scores, in one pass over the moments;
//! * `python` (feature `python`) — the `molf._core` extension module.
//!
//! Without the `python` feature the crate is plain Rust with no Python dependency.

pub mod error;
pub mod heldout;
pub mod ledger;
pub mod phase;
pub mod router;
pub mod scores;
pub mod serial;

#[cfg(feature = "python")]
mod python;

pub use error::{Error, Result};
pub use heldout::{Heldout, HeldoutParts, RateRule};
pub use ledger::{Ledger, LedgerParts, Summary};
pub use phase::{Phase, Schedule, PHASES};
pub use router::{Forecast, Policy, Router, RouterConfig, Score, POLICIES};
pub use scores::{score_sum_f32, score_sum_f64, ScoreKind};
