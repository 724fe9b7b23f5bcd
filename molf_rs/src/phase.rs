//! The routing phase schedule: warm-up -> routing -> (optionally) frozen.
//!
//! The phase is a pure function of the step index, so it needs no state of its own and
//! restores trivially from a checkpoint.

use crate::error::{Error, Result};

/// Phase names as exposed to Python (`molf._core.PHASES`), in schedule order.
pub const PHASES: [&str; 3] = ["warmup", "routing", "frozen"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Every expert with a finite score updates; no incumbents are recorded.
    Warmup,
    /// The routing policy picks the winners and incumbents follow them.
    Routing,
    /// Winners are the incumbents of the last routing step; nothing changes any more.
    Frozen,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Warmup => PHASES[0],
            Phase::Routing => PHASES[1],
            Phase::Frozen => PHASES[2],
        }
    }
}

/// When warm-up ends and (optionally) when routing freezes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub warmup_steps: u64,
    /// First step of the frozen phase; always > `warmup_steps` so at least one routing
    /// step sets incumbents before they freeze.
    pub freeze_after: Option<u64>,
}

impl Schedule {
    pub fn new(warmup_steps: u64, freeze_after: Option<u64>) -> Result<Self> {
        if let Some(f) = freeze_after {
            if f <= warmup_steps {
                return Err(Error::Config(format!(
                    "freeze_after must be None or > warmup_steps ({warmup_steps}), got {f}"
                )));
            }
        }
        Ok(Schedule {
            warmup_steps,
            freeze_after,
        })
    }

    /// Phase of the call with 0-based index `step`.
    pub fn phase_at(&self, step: u64) -> Phase {
        if step < self.warmup_steps {
            Phase::Warmup
        } else if self.freeze_after.is_some_and(|f| step >= f) {
            Phase::Frozen
        } else {
            Phase::Routing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_the_schedule() {
        let s = Schedule::new(2, Some(4)).unwrap();
        let got: Vec<_> = (0..6).map(|i| s.phase_at(i)).collect();
        use Phase::*;
        assert_eq!(got, [Warmup, Warmup, Routing, Routing, Frozen, Frozen]);
    }

    #[test]
    fn no_warmup_no_freeze_is_always_routing() {
        let s = Schedule::new(0, None).unwrap();
        assert!((0..100).all(|i| s.phase_at(i) == Phase::Routing));
        assert_eq!(s.phase_at(u64::MAX), Phase::Routing);
    }

    #[test]
    fn freeze_must_come_after_warmup() {
        assert!(matches!(Schedule::new(3, Some(3)), Err(Error::Config(_))));
        assert!(matches!(Schedule::new(3, Some(0)), Err(Error::Config(_))));
        assert!(Schedule::new(0, Some(1)).is_ok());
    }
}
