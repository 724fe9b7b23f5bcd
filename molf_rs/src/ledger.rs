//! The ledger: per-module, per-expert bookkeeping of scores and routing decisions, plus a
//! running checksum of the decision history so distributed ranks can check they agree. The
//! held-out record it also keeps lives in [`crate::heldout`].

use crate::error::{filled, Error, Result};
use crate::heldout::{check_unit, Heldout, HeldoutParts, RateRule};
use crate::router::{check_shape, Score, MAX_STEP};
use crate::serial::Fnv1a;

#[derive(Debug, Clone)]
pub struct Ledger {
    num_modules: usize,
    num_experts: usize,
    ema_decay: f64,
    step: u64,
    checksum: u64,
    /// Row-major `[modules × experts]`; NaN before the first record.
    last_scores: Vec<f64>,
    /// Row-major; NaN until the expert's first finite score.
    ema: Vec<f64>,
    wins: Vec<u64>,
    /// Per module.
    switches: Vec<u64>,
    /// Per module; -1 = never switched.
    last_switch_step: Vec<i64>,
    no_winner: Vec<u64>,
    /// Row-major; the last non-empty mask row of each module (all false before one).
    last_mask: Vec<bool>,
    heldout: Heldout,
}

/// Everything `Ledger::from_parts` needs; mirrors the serialised payload.
#[derive(Debug, Clone)]
pub struct LedgerParts {
    pub num_modules: u64,
    pub num_experts: u64,
    pub ema_decay: f64,
    pub step: u64,
    pub checksum: u64,
    pub last_scores: Vec<f64>,
    pub ema: Vec<f64>,
    pub wins: Vec<u64>,
    pub switches: Vec<u64>,
    pub last_switch_step: Vec<i64>,
    pub no_winner: Vec<u64>,
    pub last_mask: Vec<bool>,
    pub heldout: HeldoutParts,
}

/// Aggregates for logs; see `Ledger::summary`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub step: u64,
    pub checksum: u64,
    /// Per expert: its cumulative wins over all wins (zeros if none yet).
    pub win_share: Vec<f64>,
    /// Per expert: fraction of modules whose last non-empty mask row includes it.
    pub current_share: Vec<f64>,
    pub switches: u64,
    /// `switches / (num_modules · max(step − 1, 1))`.
    pub switch_rate: f64,
    pub no_winner_events: u64,
}

impl PartialEq for Ledger {
    /// Float state is compared bit for bit: "equal" means "identical state", NaNs included.
    fn eq(&self, other: &Self) -> bool {
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        self.num_modules == other.num_modules
            && self.num_experts == other.num_experts
            && self.ema_decay.to_bits() == other.ema_decay.to_bits()
            && self.step == other.step
            && self.checksum == other.checksum
            && bits(&self.last_scores) == bits(&other.last_scores)
            && bits(&self.ema) == bits(&other.ema)
            && self.wins == other.wins
            && self.switches == other.switches
            && self.last_switch_step == other.last_switch_step
            && self.no_winner == other.no_winner
            && self.last_mask == other.last_mask
            && self.heldout == other.heldout
    }
}

fn validate_config(num_modules: u64, num_experts: u64, ema_decay: f64) -> Result<()> {
    let cfg = |msg: String| Err(Error::Config(msg));
    if num_modules < 1 {
        return cfg(format!("num_modules must be >= 1, got {num_modules}"));
    }
    if num_experts < 1 {
        return cfg(format!("num_experts must be >= 1, got {num_experts}"));
    }
    check_shape(num_modules, num_experts)?;
    check_unit("ema_decay", ema_decay)
}

impl Ledger {
    pub fn new(num_modules: u64, num_experts: u64, ema_decay: f64) -> Result<Self> {
        validate_config(num_modules, num_experts, ema_decay)?;
        let (m, e) = (num_modules as usize, num_experts as usize);
        Ok(Ledger {
            num_modules: m,
            num_experts: e,
            ema_decay,
            step: 0,
            checksum: 0,
            last_scores: filled(m * e, f64::NAN, "last_scores")?,
            ema: filled(m * e, f64::NAN, "ema")?,
            wins: filled(m * e, 0, "wins")?,
            switches: filled(m, 0, "switches")?,
            last_switch_step: filled(m, -1, "last_switch_step")?,
            no_winner: filled(m, 0, "no_winner")?,
            last_mask: filled(m * e, false, "last_mask")?,
            heldout: Heldout::new(m * e, e)?,
        })
    }

    /// The same ledger with another kind of LoRA shrink trial (see
    /// [`Heldout::shrink_spectral`]).
    pub fn with_shrink_spectral(mut self, spectral: bool) -> Self {
        self.heldout.set_shrink_spectral(spectral);
        self
    }

    /// The same ledger with other held-out shrink fractions (see `record_shrink`): one for
    /// every expert, or one per expert.
    pub fn with_heldout_shrink(mut self, shrink: &[f64]) -> Result<Self> {
        self.heldout.set_shrink(shrink)?;
        Ok(self)
    }

    /// The same ledger with other numbers of shrink trials per measurement (see
    /// [`Heldout::shrink_steps`]): one for every expert, or one per expert.
    pub fn with_heldout_shrink_steps(mut self, steps: &[u64]) -> Result<Self> {
        self.heldout.set_shrink_steps(steps)?;
        Ok(self)
    }

    /// The same ledger with another decay for the held-out EMA.
    pub fn with_heldout_decay(mut self, decay: f64) -> Result<Self> {
        self.heldout.set_decay(decay)?;
        Ok(self)
    }

    /// The same ledger with another horizon for the held-out EMA (see `record_heldout`).
    pub fn with_heldout_horizon(mut self, horizon: f64) -> Result<Self> {
        self.heldout.set_horizon(horizon)?;
        Ok(self)
    }

    /// The same ledger with another minimum span (see [`Heldout::descent`]).
    pub fn with_heldout_min_span(mut self, min_span: u64) -> Result<Self> {
        self.heldout.set_min_span(min_span)?;
        Ok(self)
    }

    /// The same ledger with other rate-adaptation settings (see [`Heldout::adapt_rate`]).
    pub fn with_heldout_rate(mut self, rule: RateRule) -> Result<Self> {
        self.heldout.set_rate_rule(rule)?;
        Ok(self)
    }

    /// Rebuilds a ledger from decoded state, checking every invariant `record` maintains;
    /// any violation is a `State` error.
    pub fn from_parts(p: LedgerParts) -> Result<Self> {
        let state = |msg: String| Err(Error::State(msg));
        if let Err(e) = validate_config(p.num_modules, p.num_experts, p.ema_decay) {
            return state(format!("invalid ledger configuration in state: {e}"));
        }
        let (m, e) = (p.num_modules as usize, p.num_experts as usize);
        let sizes = [
            p.last_scores.len(),
            p.ema.len(),
            p.wins.len(),
            p.last_mask.len(),
            p.switches.len() * e,
            p.last_switch_step.len() * e,
            p.no_winner.len() * e,
        ];
        if sizes.iter().any(|&n| n != m * e) {
            return state(format!("ledger state arrays do not match shape ({m}, {e})"));
        }
        if p.step > MAX_STEP {
            return state(format!("ledger step {} exceeds {MAX_STEP}", p.step));
        }
        let heldout = Heldout::from_parts(p.heldout, m, e)?;
        if p.step == 0
            && (p.checksum != 0 || p.last_scores.iter().chain(&p.ema).any(|x| !x.is_nan()))
        {
            return state("ledger at step 0 has recorded scores or a checksum".into());
        }
        for row in 0..m {
            let cells = row * e..(row + 1) * e;
            let wins = &p.wins[cells.clone()];
            let mask = &p.last_mask[cells];
            let (sw, last, empty) = (p.switches[row], p.last_switch_step[row], p.no_winner[row]);
            let Some(filled_rows) = p.step.checked_sub(empty) else {
                return state(format!(
                    "module {row}: {empty} no-winner events in {} steps",
                    p.step
                ));
            };
            // Each non-empty row adds at least one win; a switch needs an earlier non-empty row.
            let total_wins: u128 = wins.iter().map(|&w| u128::from(w)).sum();
            let ok = wins.iter().all(|&w| w <= filled_rows)
                && total_wins >= u128::from(filled_rows)
                && sw <= filled_rows.saturating_sub(1)
                && (sw == 0) == (last == -1)
                && (last == -1 || (last >= 0 && (last as u64) < p.step))
                && mask.iter().any(|&b| b) == (filled_rows > 0)
                && mask.iter().zip(wins).all(|(&b, &w)| !b || w > 0);
            if !ok {
                return state(format!(
                    "module {row}: inconsistent counters (step {}, wins {wins:?}, switches {sw}, \
                     last switch {last}, no-winner {empty}, last mask {mask:?})",
                    p.step
                ));
            }
        }
        Ok(Ledger {
            num_modules: m,
            num_experts: e,
            ema_decay: p.ema_decay,
            step: p.step,
            checksum: p.checksum,
            last_scores: p.last_scores,
            ema: p.ema,
            wins: p.wins,
            switches: p.switches,
            last_switch_step: p.last_switch_step,
            no_winner: p.no_winner,
            last_mask: p.last_mask,
            heldout,
        })
    }

    /// Decides one held-out shrink trial of `expert` (see [`Heldout::record_shrink`]):
    /// true when the shrunk update is to be kept.
    pub fn record_shrink(&mut self, expert: usize, base: f64, trial: f64) -> Result<bool> {
        self.heldout.record_shrink(expert, base, trial)
    }

    /// Records one held-out window (see [`Heldout::record`]): `descent` and `moved` are
    /// row-major `[modules × experts]`.
    pub fn record_heldout(&mut self, descent: &[f64], moved: &[bool]) -> Result<()> {
        let n = self.last_scores.len();
        if descent.len() != n || moved.len() != n {
            return Err(Error::Score(format!(
                "descent and moved must have {} x {} = {n} entries, got {} and {}",
                self.num_modules,
                self.num_experts,
                descent.len(),
                moved.len()
            )));
        }
        self.heldout.record(descent, moved)
    }

    /// Adapts each expert's learning-rate multiplier to the held-out window just recorded
    /// (see [`Heldout::adapt_rate`]): `descent` is row-major `[modules × experts]`, the
    /// realized descent per step that `record_heldout` took, `potential` the same shape,
    /// each expert's first-order descent of one step at its current rate.
    pub fn adapt_heldout_rate(&mut self, descent: &[f64], potential: &[f64]) -> Result<()> {
        let n = self.last_scores.len();
        for (name, v) in [("descent", descent), ("potential", potential)] {
            if v.len() != n {
                return Err(Error::Score(format!(
                    "{name} must have {} x {} = {n} entries, got {}",
                    self.num_modules,
                    self.num_experts,
                    v.len()
                )));
            }
        }
        self.heldout.adapt_rate(descent, potential)
    }

    /// Records one step's scores and winner mask (both row-major `[modules × experts]`).
    pub fn record<S: Score>(&mut self, scores: &[S], mask: &[bool]) -> Result<()> {
        let n = self.last_scores.len();
        if scores.len() != n || mask.len() != n {
            return Err(Error::Score(format!(
                "scores and mask must have {} x {} = {n} entries, got {} scores and {} mask entries",
                self.num_modules,
                self.num_experts,
                scores.len(),
                mask.len()
            )));
        }
        if self.step >= MAX_STEP {
            return Err(Error::Internal(format!(
                "ledger step counter reached {MAX_STEP}"
            )));
        }
        let s = self.step;
        let d = self.ema_decay;
        let cells = scores
            .iter()
            .zip(&mut self.last_scores)
            .zip(&mut self.ema)
            .zip(mask.iter().zip(&mut self.wins));
        for (((x, last), ema), (&won, wins)) in cells {
            let x = x.to_f64();
            *last = x;
            if x.is_finite() {
                *ema = if ema.is_nan() {
                    x
                } else {
                    d * *ema + (1.0 - d) * x
                };
            }
            *wins += u64::from(won);
        }
        let e = self.num_experts;
        let rows = mask
            .chunks_exact(e)
            .zip(self.last_mask.chunks_exact_mut(e))
            .zip(self.switches.iter_mut().zip(&mut self.last_switch_step))
            .zip(&mut self.no_winner);
        for (((row, prev), (switches, last_switch)), no_winner) in rows {
            if !row.iter().any(|&b| b) {
                *no_winner += 1;
                continue;
            }
            if prev.iter().any(|&b| b) && prev != row {
                *switches += 1;
                *last_switch = s as i64;
            }
            prev.copy_from_slice(row);
        }
        self.checksum = decision_checksum(self.checksum, s, mask);
        self.step += 1;
        Ok(())
    }

    pub fn summary(&self) -> Summary {
        let (m, e) = (self.num_modules, self.num_experts);
        let mut per_expert = vec![0u128; e];
        let mut current = vec![0u64; e];
        for (wins, mask) in self
            .wins
            .chunks_exact(e)
            .zip(self.last_mask.chunks_exact(e))
        {
            for j in 0..e {
                per_expert[j] += u128::from(wins[j]);
                current[j] += u64::from(mask[j]);
            }
        }
        let total: u128 = per_expert.iter().sum();
        let switches: u64 = self.switches.iter().sum();
        let steps = self.step.saturating_sub(1).max(1);
        Summary {
            step: self.step,
            checksum: self.checksum,
            win_share: per_expert
                .iter()
                .map(|&w| {
                    if total == 0 {
                        0.0
                    } else {
                        w as f64 / total as f64
                    }
                })
                .collect(),
            current_share: current.iter().map(|&c| c as f64 / m as f64).collect(),
            switches,
            switch_rate: switches as f64 / (m as u128 * u128::from(steps)) as f64,
            no_winner_events: self.no_winner_total(),
        }
    }

    pub fn num_modules(&self) -> usize {
        self.num_modules
    }
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    pub fn ema_decay(&self) -> f64 {
        self.ema_decay
    }
    pub fn step(&self) -> u64 {
        self.step
    }
    pub fn checksum(&self) -> u64 {
        self.checksum
    }
    pub fn no_winner_total(&self) -> u64 {
        self.no_winner.iter().sum()
    }
    pub fn last_scores(&self) -> &[f64] {
        &self.last_scores
    }
    pub fn ema(&self) -> &[f64] {
        &self.ema
    }
    pub fn wins(&self) -> &[u64] {
        &self.wins
    }
    pub fn switches(&self) -> &[u64] {
        &self.switches
    }
    pub fn last_switch_step(&self) -> &[i64] {
        &self.last_switch_step
    }
    pub fn no_winner(&self) -> &[u64] {
        &self.no_winner
    }
    pub fn last_mask(&self) -> &[bool] {
        &self.last_mask
    }
    /// The held-out record (policy heldout's measurements and the shrink books).
    pub fn heldout(&self) -> &Heldout {
        &self.heldout
    }

    /// The state as `from_parts` takes it (tests build variants of a ledger from it).
    #[cfg(test)]
    pub(crate) fn parts(&self) -> LedgerParts {
        LedgerParts {
            num_modules: self.num_modules as u64,
            num_experts: self.num_experts as u64,
            ema_decay: self.ema_decay,
            step: self.step,
            checksum: self.checksum,
            last_scores: self.last_scores.clone(),
            ema: self.ema.clone(),
            wins: self.wins.clone(),
            switches: self.switches.clone(),
            last_switch_step: self.last_switch_step.clone(),
            no_winner: self.no_winner.clone(),
            last_mask: self.last_mask.clone(),
            heldout: self.heldout.parts(),
        }
    }
}

/// `fnv1a64(prev.to_le_bytes() ++ step.to_le_bytes() ++ [one byte 0/1 per mask entry])`.
pub fn decision_checksum(prev: u64, step: u64, mask: &[bool]) -> u64 {
    let mut h = Fnv1a::new();
    h.write(&prev.to_le_bytes());
    h.write(&step.to_le_bytes());
    for &b in mask {
        h.write(&[u8::from(b)]);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heldout::{
        DEFAULT_HELDOUT_HORIZON, DEFAULT_HELDOUT_MIN_SPAN, DEFAULT_HELDOUT_SHRINK,
        DEFAULT_RATE_CAP, DEFAULT_RATE_DOWN, DEFAULT_RATE_FLOOR, DEFAULT_RATE_TRUST,
        DEFAULT_RATE_UP, MAX_SHRINK_STEPS,
    };

    /// The rule on, without a floor or a trust condition.
    fn bold(up: f64, down: f64, cap: f64) -> RateRule {
        RateRule {
            adapt: true,
            up,
            down,
            cap,
            floor: 0.0,
            trust: 0.0,
        }
    }

    #[test]
    fn rate_adaptation_is_off_by_default_and_starts_at_one() {
        let mut l = Ledger::new(1, 3, 0.9).unwrap();
        let rule = l.heldout().rate_rule();
        assert!(!rule.adapt);
        assert_eq!(
            (rule.up, rule.down, rule.cap, rule.floor, rule.trust),
            (
                DEFAULT_RATE_UP,
                DEFAULT_RATE_DOWN,
                DEFAULT_RATE_CAP,
                1.0,
                0.8
            )
        );
        assert_eq!((DEFAULT_RATE_FLOOR, DEFAULT_RATE_TRUST), (1.0, 0.8));
        assert_eq!(l.heldout().rate(), [1.0; 3]);
        // Before a window there is nothing to adapt to.
        assert!(matches!(
            l.adapt_heldout_rate(&[1.0, -1.0, 0.0], &[1.0; 3]),
            Err(Error::State(m)) if m.contains("no held-out window")
        ));
        l.record_heldout(&[1.0, -1.0, 0.0], &[true; 3]).unwrap();
        l.adapt_heldout_rate(&[1.0, -1.0, 0.0], &[1.0; 3]).unwrap();
        assert_eq!(
            l.heldout().rate(),
            [1.0; 3],
            "off: every multiplier stays 1"
        );
    }

    #[test]
    fn rate_goes_up_to_the_cap_and_down_on_harm() {
        let mut l = Ledger::new(1, 4, 0.9)
            .unwrap()
            .with_heldout_rate(bold(1.5, 0.5, 2.0))
            .unwrap();
        let windows: [([f64; 4], [f64; 4]); 4] = [
            ([1.0, -1.0, 0.0, f64::NAN], [1.5, 0.5, 1.0, 1.0]),
            ([1e-300, -0.0, -1e-300, 2.0], [2.0, 0.5, 0.5, 1.5]),
            ([3.0, 5.0, 1.0, -2.0], [2.0, 0.75, 0.75, 0.75]),
            (
                [f64::INFINITY, f64::NEG_INFINITY, 0.0, 1.0],
                [2.0, 0.375, 0.75, 1.125],
            ),
        ];
        for (descent, want) in windows {
            l.record_heldout(&descent, &[true; 4]).unwrap();
            // Without a trust condition the potential is ignored, even NaN.
            l.adapt_heldout_rate(&descent, &[f64::NAN; 4]).unwrap();
            assert_eq!(l.heldout().rate(), want);
        }
        assert!(matches!(
            l.adapt_heldout_rate(&[1.0], &[1.0; 4]),
            Err(Error::Score(m)) if m.contains("descent")
        ));
        assert!(matches!(
            l.adapt_heldout_rate(&[1.0; 4], &[1.0; 5]),
            Err(Error::Score(m)) if m.contains("potential must have 1 x 4 = 4 entries, got 5")
        ));
        assert_eq!(l.heldout().rate(), [2.0, 0.375, 0.75, 1.125]);
        assert_eq!(Ledger::from_parts(l.parts()).unwrap(), l);
    }

    #[test]
    fn rate_goes_down_to_the_floor_only() {
        // Up 1.5, down 0.5, cap 2: with the floor at 1 (the default) a harmful window only
        // undoes earlier ups; at 0.625 it stops there; at 0 (no floor) it halves.
        let descents = [1.0, -1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 0.0, -1.0];
        for (floor, want) in [
            (1.0, [1.5, 1.0, 1.0, 1.5, 2.0, 2.0, 1.0, 1.0, 1.0]),
            (
                0.625,
                [1.5, 0.75, 0.625, 0.9375, 1.40625, 2.0, 1.0, 1.0, 0.625],
            ),
            (
                0.0,
                [
                    1.5, 0.75, 0.375, 0.5625, 0.84375, 1.265625, 0.6328125, 0.6328125, 0.31640625,
                ],
            ),
        ] {
            let rule = RateRule {
                floor,
                ..bold(1.5, 0.5, 2.0)
            };
            let mut l = Ledger::new(1, 1, 0.9)
                .unwrap()
                .with_heldout_rate(rule)
                .unwrap();
            for (x, c) in descents.iter().zip(want) {
                l.record_heldout(&[*x], &[true]).unwrap();
                l.adapt_heldout_rate(&[*x], &[0.0]).unwrap();
                assert_eq!(l.heldout().rate(), [c], "floor {floor}, after {x}");
            }
            assert_eq!(Ledger::from_parts(l.parts()).unwrap(), l);
        }
    }

    #[test]
    fn rate_goes_up_only_where_the_step_is_trusted() {
        // Up 1.5, down 0.5, cap 2, floor 1, trust 0.8: a window of descent x raises c only
        // where x >= 0.8·p (p, the potential, > 0 and finite); ascent still lowers it.
        let rule = RateRule {
            floor: 1.0,
            trust: 0.8,
            ..bold(1.5, 0.5, 2.0)
        };
        let windows: [([f64; 6], [f64; 6], [f64; 6]); 3] = [
            (
                [0.8, 0.79, 1.0, 1.0, 1.0, 1.0],
                [1.0, 1.0, 0.0, -1.0, f64::NAN, f64::INFINITY],
                [1.5, 1.0, 1.0, 1.0, 1.0, 1.0],
            ),
            (
                [2.0, 0.5, 1e-9, -1.0, 0.0, f64::NAN],
                [2.5, 0.5, 1e-9, -5.0, 1.0, 1.0],
                [2.0, 1.5, 1.5, 1.0, 1.0, 1.0],
            ),
            (
                [-1.0, 0.35, 1.0, 1.0, 1.0, 1.0],
                [1.0, 0.4, f64::NEG_INFINITY, 1.25, 1.26, f64::MIN_POSITIVE],
                [1.0, 2.0, 1.5, 1.5, 1.0, 1.5],
            ),
        ];
        let mut l = Ledger::new(1, 6, 0.9)
            .unwrap()
            .with_heldout_rate(rule)
            .unwrap();
        for (descent, potential, want) in windows {
            l.record_heldout(&descent, &[true; 6]).unwrap();
            l.adapt_heldout_rate(&descent, &potential).unwrap();
            assert_eq!(l.heldout().rate(), want, "{descent:?} / {potential:?}");
        }
        assert_eq!(Ledger::from_parts(l.parts()).unwrap(), l);
        // The rule itself: trust 0 ignores the potential (NaN, infinite, negative, 0).
        let free = RateRule { trust: 0.0, ..rule };
        for p in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 0.0, 1e300] {
            assert_eq!(free.next(1.0, 1e-12, p), 1.5, "{p}");
            assert_eq!(free.next(1.5, -1.0, p), 1.0, "{p}");
            assert_eq!(free.next(1.5, 0.0, p), 1.5, "{p}");
            assert!(free.next(1.5, f64::NAN, p) == 1.5);
            // Under trust 0.8 none of them raises c: only a finite positive p that x reaches.
            assert_eq!(rule.next(1.0, 1.0, p), 1.0, "{p}");
        }
        assert_eq!(rule.next(1.0, 1.0, 1.25), 1.5); // 1 >= 0.8·1.25
        assert_eq!(rule.next(1.0, f64::INFINITY, 1.0), 1.5);
        assert_eq!(rule.next(1.0, f64::INFINITY, f64::INFINITY), 1.0);
        assert_eq!(rule.next(1.5, -1e-300, f64::NAN), 1.0);
    }

    #[test]
    fn rate_settings_are_validated() {
        let with = |rule| Ledger::new(1, 1, 0.5).unwrap().with_heldout_rate(rule);
        let bad = [
            (bold(0.9, 0.5, 3.0), "heldout_rate_up"),
            (bold(f64::INFINITY, 0.5, 3.0), "heldout_rate_up"),
            (bold(f64::NAN, 0.5, 3.0), "heldout_rate_up"),
            (bold(1.2, 0.0, 3.0), "heldout_rate_down"),
            (bold(1.2, 1.5, 3.0), "heldout_rate_down"),
            (bold(1.2, f64::NAN, 3.0), "heldout_rate_down"),
            (bold(1.2, 0.5, 0.5), "heldout_rate_cap"),
            (bold(1.2, 0.5, f64::INFINITY), "heldout_rate_cap"),
        ];
        let base = bold(1.2, 0.5, 3.0);
        let floors = [-0.1, 1.5, f64::NAN, f64::INFINITY]
            .map(|floor| (RateRule { floor, ..base }, "heldout_rate_floor"));
        let trusts = [-0.1, f64::NAN, f64::INFINITY]
            .map(|trust| (RateRule { trust, ..base }, "heldout_rate_trust"));
        for (rule, name) in bad.into_iter().chain(floors).chain(trusts) {
            let err = with(rule).unwrap_err();
            assert!(
                matches!(&err, Error::Config(m) if m.contains(name)),
                "{rule:?}: {err:?}"
            );
        }
        // The edges: no change at all (1, 1, 1) is a valid rule, so are floors 0 and 1,
        // trust 0 and any finite trust above it (above 1 asks for more than first order).
        assert!(with(bold(1.0, 1.0, 1.0)).is_ok());
        for trust in [0.0, 1.0, 2.5] {
            assert!(with(RateRule { trust, ..base }).is_ok());
        }
        assert!(with(RateRule {
            floor: 1.0,
            ..bold(1.0, 1.0, 1.0)
        })
        .is_ok());
        assert!(with(RateRule {
            adapt: false,
            ..bold(1.0, 1.0, 1.0)
        })
        .is_ok());
    }

    #[test]
    fn from_parts_checks_the_rate() {
        let mut l = Ledger::new(1, 2, 0.9)
            .unwrap()
            .with_heldout_rate(bold(1.2, 0.5, 3.0))
            .unwrap();
        let with = |l: &Ledger, rate: Vec<f64>, adapt: bool| {
            Ledger::from_parts(LedgerParts {
                heldout: HeldoutParts {
                    rate,
                    rate_rule: RateRule {
                        adapt,
                        ..l.heldout().rate_rule()
                    },
                    ..l.heldout().parts()
                },
                ..l.parts()
            })
        };
        // Before a window every multiplier is 1.
        assert!(with(&l, vec![1.0, 1.0], true).is_ok());
        assert!(
            matches!(with(&l, vec![1.2, 1.0], true), Err(Error::State(m)) if m.contains("rate"))
        );
        l.record_heldout(&[1.0, -1.0], &[true, true]).unwrap();
        l.adapt_heldout_rate(&[1.0, -1.0], &[1.0, 1.0]).unwrap();
        assert_eq!(l.heldout().rate(), [1.2, 0.5]);
        // Anything in [floor, cap] after a window (floor 0 here); nothing else; off means 1
        // everywhere.
        assert!(with(&l, vec![0.0, 3.0], true).is_ok());
        for rate in [
            vec![3.5, 1.0],
            vec![-0.5, 1.0],
            vec![f64::NAN, 1.0],
            vec![1.0],
        ] {
            assert!(matches!(with(&l, rate, true), Err(Error::State(_))));
        }
        assert!(
            matches!(with(&l, vec![1.2, 0.5], false), Err(Error::State(m)) if m.contains("rate"))
        );
        assert!(with(&l, vec![1.0, 1.0], false).is_ok());
        let bad = LedgerParts {
            heldout: HeldoutParts {
                rate_rule: bold(0.5, 0.5, 3.0),
                ..l.heldout().parts()
            },
            ..l.parts()
        };
        assert!(
            matches!(Ledger::from_parts(bad), Err(Error::State(m)) if m.contains("heldout_rate_up"))
        );
        // Under a floor, nothing below it: [1.2, 0.5] fits a floor of 0.5, not one of 0.6.
        let floored = |floor: f64| {
            Ledger::from_parts(LedgerParts {
                heldout: HeldoutParts {
                    rate_rule: RateRule {
                        floor,
                        ..bold(1.2, 0.5, 3.0)
                    },
                    ..l.heldout().parts()
                },
                ..l.parts()
            })
        };
        assert!(floored(0.5).is_ok());
        assert!(matches!(floored(0.6), Err(Error::State(m)) if m.contains("rate multipliers")));
        // Nor can a new rule be set that the multipliers so far do not fit: a higher floor, a
        // lower ceiling, or off.
        for rule in [
            RateRule {
                floor: 0.6,
                ..bold(1.2, 0.5, 3.0)
            },
            bold(1.2, 0.5, 1.1),
            RateRule {
                adapt: false,
                ..bold(1.2, 0.5, 3.0)
            },
        ] {
            assert!(
                matches!(l.clone().with_heldout_rate(rule), Err(Error::Config(m)) if m.contains("does not fit")),
                "{rule:?}"
            );
        }
        assert!(l
            .clone()
            .with_heldout_rate(RateRule {
                floor: 0.5,
                ..bold(1.1, 0.9, 1.2)
            })
            .is_ok());
    }

    #[test]
    fn records_counts_switches_and_ema() {
        let mut l = Ledger::new(2, 2, 0.5).unwrap();
        l.record(
            &[1.0f64, 2.0, f64::NAN, f64::NAN],
            &[false, true, false, false],
        )
        .unwrap();
        l.record(
            &[3.0f64, 0.0, 1.0, f64::INFINITY],
            &[true, false, true, false],
        )
        .unwrap();
        assert_eq!(l.step(), 2);
        assert_eq!(l.wins(), [1, 1, 1, 0]);
        assert_eq!(l.switches(), [1, 0]);
        assert_eq!(l.last_switch_step(), [1, -1]);
        assert_eq!(l.no_winner(), [0, 1]);
        assert_eq!(l.last_mask(), [true, false, true, false]);
        assert_eq!(&l.ema()[..3], [2.0, 1.0, 1.0]);
        assert!(l.ema()[3].is_nan());
        assert!(l.last_scores()[3].is_infinite());
        let s = l.summary();
        assert_eq!(s.win_share, [2.0 / 3.0, 1.0 / 3.0]);
        assert_eq!(s.current_share, [1.0, 0.0]);
        assert_eq!(s.switch_rate, 0.5);
        assert_eq!(s.no_winner_events, 1);
    }

    #[test]
    fn heldout_ema_takes_moved_finite_values_only() {
        let mut l = Ledger::new(1, 3, 0.9)
            .unwrap()
            .with_heldout_decay(0.25)
            .unwrap();
        l.record_heldout(&[1.0, 2.0, f64::NAN], &[true, false, true])
            .unwrap();
        assert_eq!(l.heldout().ema()[0], 1.0);
        assert!(l.heldout().ema()[1].is_nan() && l.heldout().ema()[2].is_nan());
        l.record_heldout(&[-3.0, 4.0, f64::INFINITY], &[true, true, true])
            .unwrap();
        assert_eq!(l.heldout().ema()[0], 0.25 * 1.0 + 0.75 * -3.0);
        assert_eq!(l.heldout().ema()[1], 4.0);
        assert!(l.heldout().ema()[2].is_nan());
        assert_eq!(l.heldout().windows(), 2);
        assert!(matches!(
            l.record_heldout(&[1.0], &[true]),
            Err(Error::Score(_))
        ));
        assert!(matches!(
            Ledger::new(1, 1, 0.5).unwrap().with_heldout_decay(1.0),
            Err(Error::Config(_))
        ));
    }

    /// Held-out EMAs of two experts, the second moving in odd windows only, by the plain
    /// recurrence with decay `decay(n)` for an expert that has moved in n consecutive windows
    /// (the first in all of them, the second in 1 each time).
    fn heldout_by_hand(xs: &[f64], decay: impl Fn(f64) -> f64) -> Vec<[f64; 2]> {
        let mut ema = [f64::NAN; 2];
        let mut out = Vec::new();
        for (i, &x) in xs.iter().enumerate() {
            for (e, v) in ema.iter_mut().enumerate() {
                if e == 0 || i % 2 == 0 {
                    let d = decay(if e == 0 { (i + 1) as f64 } else { 1.0 });
                    *v = if v.is_nan() {
                        x
                    } else {
                        d * *v + (1.0 - d) * x
                    };
                }
            }
            out.push(ema);
        }
        out
    }

    fn heldout_run(l: &mut Ledger, xs: &[f64]) -> Vec<[f64; 2]> {
        xs.iter()
            .enumerate()
            .map(|(i, &x)| {
                l.record_heldout(&[x, x], &[true, i % 2 == 0]).unwrap();
                [l.heldout().ema()[0], l.heldout().ema()[1]]
            })
            .collect()
    }

    const XS: [f64; 12] = [
        4.0, -2.0, 1.0, 3.0, -1.0, 0.5, 2.0, -3.0, 1.5, 0.25, -0.75, 5.0,
    ];

    #[test]
    fn heldout_horizon_grows_the_span_above_the_floor() {
        let mut l = Ledger::new(1, 2, 0.9).unwrap();
        assert_eq!(l.heldout().horizon(), DEFAULT_HELDOUT_HORIZON);
        let got = heldout_run(&mut l, &XS);
        // h = 0.25: a = 3, so windows 1..=6 use the floor 0.5, window 7 uses 4/7, 12 uses 3/4.
        let want = heldout_by_hand(&XS, |n| f64::max(0.5, 1.0 - 3.0 / n));
        assert_eq!(got, want);
        let fixed = heldout_by_hand(&XS, |_| 0.5);
        assert_eq!(got[..6], fixed[..6]);
        assert_ne!(got[6], fixed[6]);
        assert!((got[6][0] - (4.0 / 7.0 * got[5][0] + 3.0 / 7.0 * XS[6])).abs() < 1e-15);
        assert_eq!(
            got[7][1], got[6][1],
            "window 8 leaves the resting expert alone"
        );
        assert_eq!(l.heldout().windows(), 12);
        // The second expert paused in window 12, after moving in window 11.
        assert_eq!(l.heldout().span(), [12, 0]);
    }

    #[test]
    fn heldout_descent_waits_for_the_minimum_span() {
        let mut l = Ledger::new(1, 3, 0.9)
            .unwrap()
            .with_heldout_min_span(2)
            .unwrap();
        assert_eq!(l.heldout().min_span(), 2);
        let nan = |v: Vec<f64>| v.iter().map(|x| x.is_nan()).collect::<Vec<_>>();
        // Nothing recorded: every entry NaN, whatever the span asks.
        assert_eq!(nan(l.heldout().descent()), [true; 3]);
        l.record_heldout(&[1.0, -2.0, 3.0], &[true, true, false])
            .unwrap();
        assert_eq!(nan(l.heldout().descent()), [true; 3], "spans [1, 1, 0] < 2");
        l.record_heldout(&[1.0, -2.0, 3.0], &[true, false, true])
            .unwrap();
        // Spans [2, 0, 1]: the first is judged on its EMA; the second, paused, waits again.
        let d = l.heldout().descent();
        assert_eq!(d[0], l.heldout().ema()[0]);
        assert_eq!(nan(d), [false, true, true]);
        l.record_heldout(&[1.0, -2.0, 3.0], &[true, true, true])
            .unwrap();
        let d = l.heldout().descent();
        assert_eq!(
            d[2].to_bits(),
            l.heldout().ema()[2].to_bits(),
            "span 2 from its return"
        );
        assert!(d[1].is_nan(), "span 1 since its return");
        // Minimum span 0 (the default) is the EMA itself, NaNs included.
        let mut z = Ledger::new(1, 2, 0.9).unwrap();
        assert_eq!(z.heldout().min_span(), DEFAULT_HELDOUT_MIN_SPAN);
        z.record_heldout(&[0.5, 1.0], &[true, false]).unwrap();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&z.heldout().descent()), bits(z.heldout().ema()));
        assert!(matches!(
            Ledger::new(1, 1, 0.9).unwrap().with_heldout_min_span(MAX_STEP + 1),
            Err(Error::Config(m)) if m.contains("heldout_min_span")
        ));
    }

    #[test]
    fn heldout_span_counts_consecutive_moved_windows() {
        let mut l = Ledger::new(1, 3, 0.9).unwrap();
        assert_eq!(l.heldout().span(), [0, 0, 0]);
        let windows: [([f64; 3], [bool; 3], [u64; 3]); 5] = [
            ([1.0, 1.0, 1.0], [true, true, false], [1, 1, 0]),
            // A non-finite measurement still counts a moved window.
            ([f64::NAN, 1.0, 1.0], [true, true, true], [2, 2, 1]),
            // A finite measurement of an expert that did not move still resets it.
            ([1.0, 1.0, 1.0], [true, false, true], [3, 0, 2]),
            (
                [1.0, f64::INFINITY, f64::NAN],
                [true, true, false],
                [4, 1, 0],
            ),
            ([1.0, 1.0, 1.0], [true, true, true], [5, 2, 1]),
        ];
        for (i, (x, moved, span)) in windows.iter().enumerate() {
            l.record_heldout(x, moved).unwrap();
            assert_eq!(l.heldout().span(), span, "after window {}", i + 1);
        }
        assert_eq!(l.heldout().windows(), 5);
    }

    #[test]
    fn heldout_horizon_restarts_after_a_pause() {
        // h = 0.25 (a = 3), floor 0.5. Both experts move in windows 1..=7 (measuring 0, so
        // both EMAs are 0), the second pauses in window 8, both move in windows 9 and 10.
        let mut l = Ledger::new(1, 2, 0.9).unwrap();
        assert_eq!(
            (l.heldout().decay(), l.heldout().horizon()),
            (0.5, DEFAULT_HELDOUT_HORIZON)
        );
        for _ in 0..7 {
            l.record_heldout(&[0.0, 0.0], &[true, true]).unwrap();
        }
        assert_eq!(l.heldout().ema(), [0.0, 0.0]);
        assert_eq!(l.heldout().span(), [7, 7]);
        l.record_heldout(&[8.0, 100.0], &[true, false]).unwrap();
        // Window 8: 1 - 3/8 = 0.625 for the first; the second keeps its EMA.
        assert_eq!(l.heldout().ema(), [0.375 * 8.0, 0.0]);
        assert_eq!(l.heldout().span(), [8, 0]);
        l.record_heldout(&[4.0, 4.0], &[true, true]).unwrap();
        // Window 9: 1 - 3/9 for the first; the second is back with span 1: the floor 0.5
        // (the global count would give it 2/3 and an EMA of 4/3).
        let (a9, b9) = (2.0 / 3.0 * 3.0 + 1.0 / 3.0 * 4.0, 0.5 * 0.0 + 0.5 * 4.0);
        assert!(
            (l.heldout().ema()[0] - a9).abs() < 1e-12,
            "{:?}",
            l.heldout().ema()
        );
        assert_eq!(l.heldout().ema()[1], b9);
        assert_eq!(l.heldout().span(), [9, 1]);
        l.record_heldout(&[2.0, 6.0], &[true, true]).unwrap();
        // Window 10: 1 - 3/10 = 0.7 for the first; span 2 for the second: still the floor.
        let (a10, b10) = (0.7 * a9 + 0.3 * 2.0, 0.5 * b9 + 0.5 * 6.0);
        assert!(
            (l.heldout().ema()[0] - a10).abs() < 1e-12,
            "{:?}",
            l.heldout().ema()
        );
        assert_eq!(l.heldout().ema()[1], b10);
        assert_eq!(b10, 4.0);
        assert_eq!(l.heldout().span(), [10, 2]);
        assert_eq!(l.heldout().windows(), 10);
    }

    #[test]
    fn from_parts_checks_heldout_span() {
        let mut l = Ledger::new(1, 2, 0.9).unwrap();
        l.record_heldout(&[1.0, 2.0], &[true, false]).unwrap();
        l.record_heldout(&[1.0, 2.0], &[true, true]).unwrap();
        assert_eq!(Ledger::from_parts(l.parts()).unwrap(), l);
        // Any span up to the window count is a state some history reaches.
        let p = LedgerParts {
            heldout: HeldoutParts {
                span: vec![0, 2],
                ..l.heldout().parts()
            },
            ..l.parts()
        };
        assert_eq!(Ledger::from_parts(p).unwrap().heldout().span(), [0, 2]);
        for span in [vec![3, 1], vec![2, u64::MAX]] {
            let p = LedgerParts {
                heldout: HeldoutParts {
                    span,
                    ..l.heldout().parts()
                },
                ..l.parts()
            };
            let err = Ledger::from_parts(p).unwrap_err();
            assert!(
                matches!(&err, Error::State(m) if m.contains("span") && m.contains("2 recorded windows")),
                "{err:?}"
            );
        }
        let fresh = Ledger::new(1, 2, 0.9).unwrap();
        let p = LedgerParts {
            heldout: HeldoutParts {
                span: vec![1, 0],
                ..fresh.heldout().parts()
            },
            ..fresh.parts()
        };
        assert!(matches!(Ledger::from_parts(p), Err(Error::State(_))));
        let p = LedgerParts {
            heldout: HeldoutParts {
                span: vec![0],
                ..l.heldout().parts()
            },
            ..l.parts()
        };
        assert!(matches!(Ledger::from_parts(p), Err(Error::State(m)) if m.contains("shape")));
    }

    #[test]
    fn heldout_horizon_zero_is_the_fixed_decay() {
        let mut l = Ledger::new(1, 2, 0.9)
            .unwrap()
            .with_heldout_decay(0.3)
            .unwrap()
            .with_heldout_horizon(0.0)
            .unwrap();
        assert_eq!(heldout_run(&mut l, &XS), heldout_by_hand(&XS, |_| 0.3));
    }

    #[test]
    fn heldout_horizon_is_validated() {
        for h in [1.0, 1.5, -0.1, f64::NAN, f64::INFINITY] {
            let err = Ledger::new(1, 1, 0.5).unwrap().with_heldout_horizon(h);
            assert!(
                matches!(&err, Err(Error::Config(m)) if m.contains("heldout_horizon") && m.contains(&h.to_string())),
                "{err:?}"
            );
        }
        for h in [0.0, 0.5, 0.999] {
            let l = Ledger::new(1, 1, 0.5).unwrap().with_heldout_horizon(h);
            assert_eq!(l.unwrap().heldout().horizon(), h);
        }
    }

    #[test]
    fn checksum_follows_documented_formula() {
        let mut l = Ledger::new(1, 2, 0.9).unwrap();
        l.record(&[1.0f32, 0.0], &[true, false]).unwrap();
        let mut h = Fnv1a::new();
        h.write(&0u64.to_le_bytes());
        h.write(&0u64.to_le_bytes());
        h.write(&[1, 0]);
        assert_eq!(l.checksum(), h.finish());
        let first = l.checksum();
        l.record(&[1.0f32, 0.0], &[true, false]).unwrap();
        assert_eq!(l.checksum(), decision_checksum(first, 1, &[true, false]));
    }

    #[test]
    fn equality_is_bitwise_and_reflexive_with_nan() {
        let l = Ledger::new(1, 1, 0.0).unwrap();
        assert_eq!(l, l.clone());
    }

    #[test]
    fn config_validation() {
        assert!(matches!(Ledger::new(0, 1, 0.5), Err(Error::Config(_))));
        assert!(matches!(Ledger::new(1, 0, 0.5), Err(Error::Config(_))));
        for d in [1.0, -0.1, f64::NAN] {
            assert!(matches!(Ledger::new(1, 1, d), Err(Error::Config(_))));
        }
        assert!(Ledger::new(1, 1, 0.0).is_ok());
    }

    #[test]
    fn record_shrink_keeps_a_lower_loss_only() {
        let mut l = Ledger::new(2, 3, 0.5).unwrap();
        assert_eq!(l.heldout().shrink(), [DEFAULT_HELDOUT_SHRINK; 3]);
        assert!(l.record_shrink(2, 1.0, 0.99).unwrap());
        assert!(!l.record_shrink(2, 1.0, 1.0).unwrap()); // a tie keeps the update
        assert!(!l.record_shrink(0, 1.0, 1.5).unwrap());
        assert!(!l.record_shrink(1, 1.0, f64::NAN).unwrap());
        assert!(!l.record_shrink(1, f64::NAN, 0.5).unwrap());
        assert!(l.record_shrink(1, f64::INFINITY, 0.5).unwrap()); // recovers from an overflow
        assert_eq!(l.heldout().shrink_trials(), [1, 3, 2]);
        assert_eq!(l.heldout().shrinks(), [0, 1, 1]);
        assert!(
            matches!(l.record_shrink(3, 1.0, 0.5), Err(Error::Config(m)) if m.contains("out of range"))
        );
        assert_eq!(l.heldout().shrink_trials(), [1, 3, 2]);
        let mut off = Ledger::new(1, 1, 0.5)
            .unwrap()
            .with_heldout_shrink(&[0.0])
            .unwrap();
        assert!(
            matches!(off.record_shrink(0, 1.0, 0.5), Err(Error::Config(m)) if m.contains("heldout_shrink is 0"))
        );
        for bad in [1.0, -0.1, f64::NAN] {
            assert!(Ledger::new(1, 1, 0.5)
                .unwrap()
                .with_heldout_shrink(&[bad])
                .is_err());
        }
    }

    #[test]
    fn shrink_per_expert() {
        // One value for every expert, or one per expert; an expert at 0 has no trials.
        let mut l = Ledger::new(1, 3, 0.5)
            .unwrap()
            .with_heldout_shrink(&[0.1, 0.0, 0.05])
            .unwrap();
        assert_eq!(l.heldout().shrink(), [0.1, 0.0, 0.05]);
        assert!(l.record_shrink(0, 1.0, 0.5).unwrap());
        assert!(l.record_shrink(2, 1.0, 0.5).unwrap());
        assert!(
            matches!(l.record_shrink(1, 1.0, 0.5), Err(Error::Config(m)) if m.contains("heldout_shrink is 0 for expert 1"))
        );
        assert_eq!(l.heldout().shrink_trials(), [1, 0, 1]);
        let all = Ledger::new(1, 3, 0.5)
            .unwrap()
            .with_heldout_shrink(&[0.2])
            .unwrap();
        assert_eq!(all.heldout().shrink(), [0.2; 3]);
        for bad in [&[0.1, 0.1][..], &[], &[0.1, 0.1, 1.0]] {
            assert!(matches!(
                Ledger::new(1, 3, 0.5).unwrap().with_heldout_shrink(bad),
                Err(Error::Config(_))
            ));
        }
    }

    #[test]
    fn shrink_steps_per_expert() {
        // One trial each by default; one count for every expert, or one per expert, each in
        // [1, MAX_SHRINK_STEPS].
        let l = Ledger::new(1, 3, 0.5).unwrap();
        assert_eq!(l.heldout().shrink_steps(), [1; 3]);
        let l = l.with_heldout_shrink_steps(&[1, 2, 1]).unwrap();
        assert_eq!(l.heldout().shrink_steps(), [1, 2, 1]);
        let l = l.with_heldout_shrink_steps(&[4]).unwrap();
        assert_eq!(l.heldout().shrink_steps(), [4; 3]);
        for bad in [&[1, 1][..], &[], &[0], &[1, 1, MAX_SHRINK_STEPS + 1]] {
            assert!(matches!(
                Ledger::new(1, 3, 0.5).unwrap().with_heldout_shrink_steps(bad),
                Err(Error::Config(m)) if m.contains("heldout_shrink_steps")
            ));
        }
    }
}
