//! The held-out record of a ledger: per expert, a smoothed held-out loss decrease and the
//! span it covers (what `Router::regate` judges under policy heldout), and the books of the
//! held-out shrink trials.

use crate::error::{filled, Error, Result};
use crate::router::MAX_STEP;

/// Default held-out shrink of every expert: a trial scales an expert's update since the
/// start by 0.9 (the Python layer sets each expert's own, by its kind).
pub const DEFAULT_HELDOUT_SHRINK: f64 = 0.1;

/// Default number of shrink trials of an expert per measurement: one (the Python layer asks
/// for more of some; see [`Heldout::shrink_steps`]).
pub const DEFAULT_SHRINK_STEPS: u64 = 1;

/// The most shrink trials of an expert per measurement.
pub const MAX_SHRINK_STEPS: u64 = 16;

/// Default LoRA shrink trial: spectral (see [`Heldout::shrink_spectral`]).
pub const DEFAULT_SHRINK_SPECTRAL: bool = true;

/// Default decay of the held-out EMA: a window's measurement counts as much as all before.
pub const DEFAULT_HELDOUT_DECAY: f64 = 0.5;

/// Default held-out horizon: the EMA averages about the last quarter of the run.
pub const DEFAULT_HELDOUT_HORIZON: f64 = 0.25;

/// Default minimum span: an expert's record judges it from the first window (the Python
/// optimizer asks for 10 where a module has LoRA experts only; see [`Heldout::descent`]).
pub const DEFAULT_HELDOUT_MIN_SPAN: u64 = 0;

/// Default of the rate adaptation: off (opt-in in Python, `Heldout(adapt_rate=True)`; see
/// [`Heldout::adapt_rate`]). A ledger of format version 1, from before
/// the adaptation, decodes with it off and every multiplier 1: it resumes as it ran.
pub const DEFAULT_RATE_ADAPT: bool = false;

/// Default factor of a multiplier after a window whose movement lowered the held-out loss.
pub const DEFAULT_RATE_UP: f64 = 1.1;

/// Default factor of a multiplier after a window whose movement raised the held-out loss.
pub const DEFAULT_RATE_DOWN: f64 = 0.5;

/// Default ceiling of a multiplier.
pub const DEFAULT_RATE_CAP: f64 = 2.0;

/// Default floor of a multiplier: the set rate, so `down` only undoes earlier ups (without
/// a floor one window of noise halves a rate that seven good windows must win back; over a
/// long run a dense expert's rate decays where it should not: docs/algorithm.md).
pub const DEFAULT_RATE_FLOOR: f64 = 1.0;

/// Default trust condition of a raise: the window's realized held-out descent must be at
/// least 0.8 of what a first-order model of a step at the expert's rate predicted (its
/// potential). Where the loss is far from linear along the update, a larger step buys less
/// than it predicts; raising the rate there cost the LM tuning regimes (docs/algorithm.md).
pub const DEFAULT_RATE_TRUST: f64 = 0.8;

/// The settings of the rate adaptation (see [`Heldout::adapt_rate`]).
#[derive(Debug, Clone, Copy)]
pub struct RateRule {
    /// Whether the multipliers move at all (false: every one stays 1).
    pub adapt: bool,
    /// Factor after a window of held-out descent, >= 1.
    pub up: f64,
    /// Factor after a window of held-out ascent, in (0, 1].
    pub down: f64,
    /// Ceiling of a multiplier, >= 1.
    pub cap: f64,
    /// Floor of a multiplier after a window of held-out ascent, in [0, 1] (0: no floor).
    pub floor: f64,
    /// Trust condition of a raise, finite and >= 0: up only where the window's realized
    /// descent is at least `trust` × the expert's potential (0: no condition).
    pub trust: f64,
}

impl Default for RateRule {
    fn default() -> Self {
        RateRule {
            adapt: DEFAULT_RATE_ADAPT,
            up: DEFAULT_RATE_UP,
            down: DEFAULT_RATE_DOWN,
            cap: DEFAULT_RATE_CAP,
            floor: DEFAULT_RATE_FLOOR,
            trust: DEFAULT_RATE_TRUST,
        }
    }
}

impl PartialEq for RateRule {
    /// Bit for bit, as the rest of the state.
    fn eq(&self, other: &Self) -> bool {
        self.adapt == other.adapt
            && self.up.to_bits() == other.up.to_bits()
            && self.down.to_bits() == other.down.to_bits()
            && self.cap.to_bits() == other.cap.to_bits()
            && self.floor.to_bits() == other.floor.to_bits()
            && self.trust.to_bits() == other.trust.to_bits()
    }
}

impl RateRule {
    /// Checks the factors, the ceiling, the floor and the trust condition (written so that
    /// NaN fails too).
    pub(crate) fn check(&self) -> Result<()> {
        let bad = |name: &str, want: &str, v: f64| {
            Err(Error::Config(format!("{name} must be {want}, got {v}")))
        };
        if !(self.up >= 1.0 && self.up.is_finite()) {
            return bad("heldout_rate_up", "finite and >= 1", self.up);
        }
        if !(self.down > 0.0 && self.down <= 1.0) {
            return bad("heldout_rate_down", "in (0, 1]", self.down);
        }
        if !(self.cap >= 1.0 && self.cap.is_finite()) {
            return bad("heldout_rate_cap", "finite and >= 1", self.cap);
        }
        if !(0.0..=1.0).contains(&self.floor) {
            return bad("heldout_rate_floor", "in [0, 1]", self.floor);
        }
        if !(self.trust >= 0.0 && self.trust.is_finite()) {
            return bad("heldout_rate_trust", "finite and >= 0", self.trust);
        }
        Ok(())
    }

    /// One multiplier after a window of realized held-out descent `x` per step, with `p` the
    /// expert's potential (the first-order descent one step at its current rate predicts):
    /// up (to the ceiling) where `x` > 0 and [`RateRule::trusts`] the window, down (to the
    /// floor) where `x` < 0, as it was otherwise (`x` 0 or NaN, or a descent not trusted).
    pub fn next(&self, c: f64, x: f64, p: f64) -> f64 {
        if x > 0.0 && self.trusts(x, p) {
            (c * self.up).min(self.cap)
        } else if x < 0.0 {
            (c * self.down).max(self.floor)
        } else {
            c
        }
    }

    /// Whether a window's descent `x` may raise a rate: with `trust` 0 always (`p` ignored,
    /// even NaN); else where the potential `p` is positive and finite and `x` >= trust·`p`,
    /// i.e. the loss is near linear along the update, so a larger step buys about what the
    /// first-order model predicts.
    pub fn trusts(&self, x: f64, p: f64) -> bool {
        self.trust == 0.0 || (p > 0.0 && p.is_finite() && x >= self.trust * p)
    }

    /// Whether `rate` are multipliers this rule can have reached after `windows` held-out
    /// windows: each in [floor, cap] (every step keeps it there) once the adaptation has had
    /// a window, every one 1 before that or with the adaptation off.
    fn holds(&self, windows: u64, rate: &[f64]) -> bool {
        if self.adapt && windows > 0 {
            rate.iter().all(|&c| (self.floor..=self.cap).contains(&c))
        } else {
            rate.iter().all(|&c| c == 1.0)
        }
    }
}

#[derive(Debug, Clone)]
pub struct Heldout {
    /// Decay of `ema` per held-out window; with a horizon, its floor.
    decay: f64,
    /// Fraction of each expert's span that its EMA averages over (0: the fixed `decay`);
    /// see [`Heldout::record`].
    horizon: f64,
    /// Held-out windows recorded.
    windows: u64,
    /// Row-major `[modules × experts]`: EMA of each expert's held-out loss decrease per step
    /// over the windows in which it moved; NaN until the first.
    ema: Vec<f64>,
    /// Row-major: the number of consecutive windows, up to the last one, in which each
    /// expert moved (0 after a window in which it did not).
    span: Vec<u64>,
    /// The span an expert's record needs before it can drop the expert: until then its
    /// descent is NaN (not judged yet); see [`Heldout::descent`].
    min_span: u64,
    /// Per expert: the fraction by which a shrink trial scales its update back (0: no trials
    /// of it); see [`Heldout::record_shrink`].
    shrink: Vec<f64>,
    /// Per expert: the most shrink trials per measurement, each from where the last kept
    /// one left the update, stopping at the first refused (the tensor side runs them; the
    /// held-out data chooses the strength, up to about `shrink` × `shrink_steps`).
    shrink_steps: Vec<u64>,
    /// Per expert: shrink trials recorded, and how many of them were kept.
    shrink_trials: Vec<u64>,
    shrinks: Vec<u64>,
    /// How a shrink trial shrinks a LoRA expert's product s·B·A (the tensor side applies
    /// it): true soft-thresholds its singular values by `shrink` × the largest (a
    /// nuclear-norm proximal step), false scales it by 1 − `shrink`.
    shrink_spectral: bool,
    /// The rate adaptation's settings.
    rate_rule: RateRule,
    /// Row-major `[modules × experts]`: each expert's learning-rate multiplier (1 at the
    /// start; see [`Heldout::adapt_rate`]).
    rate: Vec<f64>,
}

/// Everything [`Heldout::from_parts`] needs; mirrors the serialised fields.
#[derive(Debug, Clone)]
pub struct HeldoutParts {
    pub decay: f64,
    pub horizon: f64,
    pub windows: u64,
    pub ema: Vec<f64>,
    pub span: Vec<u64>,
    pub min_span: u64,
    pub shrink: Vec<f64>,
    pub shrink_steps: Vec<u64>,
    pub shrink_trials: Vec<u64>,
    pub shrinks: Vec<u64>,
    pub shrink_spectral: bool,
    pub rate_rule: RateRule,
    pub rate: Vec<f64>,
}

impl PartialEq for Heldout {
    /// Floats are compared bit for bit: "equal" means "identical state", NaNs included.
    fn eq(&self, other: &Self) -> bool {
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        self.decay.to_bits() == other.decay.to_bits()
            && self.horizon.to_bits() == other.horizon.to_bits()
            && self.windows == other.windows
            && bits(&self.ema) == bits(&other.ema)
            && self.span == other.span
            && self.min_span == other.min_span
            && bits(&self.shrink) == bits(&other.shrink)
            && self.shrink_steps == other.shrink_steps
            && self.shrink_trials == other.shrink_trials
            && self.shrinks == other.shrinks
            && self.shrink_spectral == other.shrink_spectral
            && self.rate_rule == other.rate_rule
            && bits(&self.rate) == bits(&other.rate)
    }
}

/// Checks a decay, horizon or shrink: in [0, 1).
pub(crate) fn check_unit(name: &str, value: f64) -> Result<()> {
    // Written so that NaN fails too.
    if !(0.0..1.0).contains(&value) {
        return Err(Error::Config(format!(
            "{name} must be in [0, 1), got {value}"
        )));
    }
    Ok(())
}

/// A setting of `experts` experts given as one value for all, or one per expert.
fn per_expert<T: Copy>(name: &str, values: &[T], experts: usize) -> Result<Vec<T>> {
    match values.len() {
        1 => Ok(vec![values[0]; experts]),
        n if n == experts => Ok(values.to_vec()),
        n => Err(Error::Config(format!(
            "{name} needs one value or one per expert ({experts}), got {n}"
        ))),
    }
}

/// Checks an expert's shrink trials per measurement: 1 to `MAX_SHRINK_STEPS`.
fn check_shrink_steps(steps: u64) -> Result<()> {
    if !(1..=MAX_SHRINK_STEPS).contains(&steps) {
        return Err(Error::Config(format!(
            "heldout_shrink_steps must be in [1, {MAX_SHRINK_STEPS}], got {steps}"
        )));
    }
    Ok(())
}

/// Checks a minimum span: a window count, at most `MAX_STEP`.
fn check_min_span(min_span: u64) -> Result<()> {
    if min_span > MAX_STEP {
        return Err(Error::Config(format!(
            "heldout_min_span must be <= {MAX_STEP}, got {min_span}"
        )));
    }
    Ok(())
}

impl Heldout {
    /// An empty record of `entries` (= modules × experts) experts' measurements, with the
    /// default settings.
    pub(crate) fn new(entries: usize, num_experts: usize) -> Result<Self> {
        Ok(Heldout {
            decay: DEFAULT_HELDOUT_DECAY,
            horizon: DEFAULT_HELDOUT_HORIZON,
            windows: 0,
            ema: filled(entries, f64::NAN, "heldout_ema")?,
            span: filled(entries, 0, "heldout_span")?,
            min_span: DEFAULT_HELDOUT_MIN_SPAN,
            shrink: filled(num_experts, DEFAULT_HELDOUT_SHRINK, "heldout_shrink")?,
            shrink_steps: filled(num_experts, DEFAULT_SHRINK_STEPS, "heldout_shrink_steps")?,
            shrink_trials: filled(num_experts, 0, "shrink_trials")?,
            shrinks: filled(num_experts, 0, "shrinks")?,
            shrink_spectral: DEFAULT_SHRINK_SPECTRAL,
            rate_rule: RateRule::default(),
            rate: filled(entries, 1.0, "heldout_rate")?,
        })
    }

    /// Sets the rate adaptation's settings. A rule that the multipliers adapted so far do
    /// not fit (one below its floor or above its ceiling, or one off 1 with the adaptation
    /// off) is a `Config` error: the ledger would not decode.
    pub(crate) fn set_rate_rule(&mut self, rule: RateRule) -> Result<()> {
        rule.check()?;
        if !rule.holds(self.windows, &self.rate) {
            return Err(Error::Config(format!(
                "the rate rule {rule:?} does not fit the multipliers adapted so far"
            )));
        }
        self.rate_rule = rule;
        Ok(())
    }

    pub(crate) fn set_decay(&mut self, decay: f64) -> Result<()> {
        check_unit("heldout_decay", decay)?;
        self.decay = decay;
        Ok(())
    }

    pub(crate) fn set_horizon(&mut self, horizon: f64) -> Result<()> {
        check_unit("heldout_horizon", horizon)?;
        self.horizon = horizon;
        Ok(())
    }

    /// Every expert's shrink fraction (one value, or one per expert).
    pub(crate) fn set_shrink(&mut self, shrink: &[f64]) -> Result<()> {
        let values = per_expert("heldout_shrink", shrink, self.shrink.len())?;
        values
            .iter()
            .try_for_each(|&x| check_unit("heldout_shrink", x))?;
        self.shrink = values;
        Ok(())
    }

    /// Every expert's shrink trials per measurement (one value, or one per expert).
    pub(crate) fn set_shrink_steps(&mut self, steps: &[u64]) -> Result<()> {
        let values = per_expert("heldout_shrink_steps", steps, self.shrink_steps.len())?;
        values.iter().try_for_each(|&n| check_shrink_steps(n))?;
        self.shrink_steps = values;
        Ok(())
    }

    pub(crate) fn set_shrink_spectral(&mut self, spectral: bool) {
        self.shrink_spectral = spectral;
    }

    pub(crate) fn set_min_span(&mut self, min_span: u64) -> Result<()> {
        check_min_span(min_span)?;
        self.min_span = min_span;
        Ok(())
    }

    /// Rebuilds a record of a `[num_modules × num_experts]` ledger from decoded state,
    /// checking every invariant that `record` and `record_shrink` maintain; any violation
    /// is a `State` error.
    pub fn from_parts(p: HeldoutParts, num_modules: usize, num_experts: usize) -> Result<Self> {
        let state = |msg: String| Err(Error::State(msg));
        let (m, e) = (num_modules, num_experts);
        if p.ema.len() != m * e || p.span.len() != m * e {
            return state(format!(
                "held-out state arrays do not match shape ({m}, {e})"
            ));
        }
        if let Err(err) = check_unit("heldout_decay", p.decay)
            .and_then(|()| check_unit("heldout_horizon", p.horizon))
            .and_then(|()| {
                p.shrink
                    .iter()
                    .try_for_each(|&x| check_unit("heldout_shrink", x))
            })
            .and_then(|()| {
                p.shrink_steps
                    .iter()
                    .try_for_each(|&n| check_shrink_steps(n))
            })
            .and_then(|()| check_min_span(p.min_span))
        {
            return state(format!("invalid ledger configuration in state: {err}"));
        }
        if p.windows > MAX_STEP
            || (p.windows == 0 && p.ema.iter().any(|x| !x.is_nan()))
            || p.ema.iter().any(|x| x.is_infinite())
        {
            return state(format!(
                "held-out EMA is inconsistent with {} recorded windows (or not finite)",
                p.windows
            ));
        }
        if let Some(span) = p.span.iter().find(|&&s| s > p.windows) {
            return state(format!(
                "held-out span {span} exceeds the {} recorded windows",
                p.windows
            ));
        }
        if [&p.shrink_trials, &p.shrinks, &p.shrink_steps]
            .iter()
            .any(|v| v.len() != e)
            || p.shrink.len() != e
        {
            return state(format!("ledger shrink counters do not match {e} experts"));
        }
        let trials_ok = p
            .shrink_trials
            .iter()
            .zip(&p.shrinks)
            .all(|(&t, &k)| k <= t && t <= MAX_STEP);
        let unshrunk_tried = p
            .shrink
            .iter()
            .zip(&p.shrink_trials)
            .any(|(&d, &t)| d == 0.0 && t > 0);
        if !trials_ok || unshrunk_tried {
            return state(format!(
                "held-out shrink counters are inconsistent (shrink {:?}, trials {:?}, kept {:?})",
                p.shrink, p.shrink_trials, p.shrinks
            ));
        }
        if let Err(err) = p.rate_rule.check() {
            return state(format!("invalid ledger configuration in state: {err}"));
        }
        // Every multiplier starts at 1 and moves only under the adaptation, by steps that
        // keep it in [floor, cap] (with floor 0 a long run of harmful windows may take it
        // down to 0).
        let rule = p.rate_rule;
        if p.rate.len() != m * e || !rule.holds(p.windows, &p.rate) {
            return state(format!(
                "held-out rate multipliers are inconsistent with the rate adaptation \
                 (adapt {}, floor {}, cap {}, {} windows, multipliers {:?})",
                rule.adapt,
                rule.floor,
                rule.cap,
                p.windows,
                &p.rate[..p.rate.len().min(8)]
            ));
        }
        Ok(Heldout {
            decay: p.decay,
            horizon: p.horizon,
            windows: p.windows,
            ema: p.ema,
            span: p.span,
            min_span: p.min_span,
            shrink: p.shrink,
            shrink_steps: p.shrink_steps,
            shrink_trials: p.shrink_trials,
            shrinks: p.shrinks,
            shrink_spectral: p.shrink_spectral,
            rate_rule: p.rate_rule,
            rate: p.rate,
        })
    }

    /// Decides one held-out shrink trial of `expert`: `base` is the held-out loss as the
    /// parameters are, `trial` the loss with the expert's update since the start shrunk by
    /// its fraction δ = `shrink[expert]` (its dense weights' distance from where training
    /// began scaled by 1 − δ; its LoRA product's singular values soft-thresholded by δ × the
    /// largest, or with
    /// `shrink_spectral` false scaled like the dense update). The shrunk update is kept
    /// when it lowers the loss: a pull towards the starting point (towards a lower rank,
    /// for LoRA) whose strength the held-out data chooses, one expert at a time. A NaN on
    /// either side keeps the update as it is.
    pub(crate) fn record_shrink(&mut self, expert: usize, base: f64, trial: f64) -> Result<bool> {
        let experts = self.shrink_trials.len();
        if expert >= experts {
            return Err(Error::Config(format!(
                "expert {expert} out of range for {experts} experts"
            )));
        }
        if self.shrink[expert] == 0.0 {
            return Err(Error::Config(format!(
                "heldout_shrink is 0 for expert {expert}: it has no shrink trials"
            )));
        }
        if self.shrink_trials[expert] >= MAX_STEP {
            return Err(Error::State(format!("shrink trials exceed {MAX_STEP}")));
        }
        let keep = trial < base;
        self.shrink_trials[expert] += 1;
        self.shrinks[expert] += u64::from(keep);
        Ok(keep)
    }

    /// Records one held-out window (the ledger checked the shapes): `descent` (row-major
    /// `[modules × experts]`) is each expert's held-out loss decrease per step over the
    /// window, `moved` whether the expert was active in it. The EMA takes the finite values
    /// of experts that moved; the others keep their estimate (a frozen expert's last
    /// measurement stands until it moves again).
    ///
    /// The decay of an entry is `decay` when `horizon` h is 0, else `max(decay, 1 − a/n)`
    /// with a = 1/h − 1, where n is the entry's span: the number of consecutive windows,
    /// this one included, in which the expert moved (it counts per expert from its last
    /// pause; an expert that moved in every window has n = the window count). Late in a long
    /// run one window's change is noise around a small drift, and the noise of an average
    /// over a span shrinks like 1/span, so the span grows with the run: window k enters with
    /// weight a/k and has shrunk by about (k/n)^a at window n, a weight of about
    /// (a/n)(k/n)^(a−1), so the EMA's mean age is about h × n (h = 0.25: the last quarter of
    /// the run), never shorter than the fixed decay gives. The span restarts after a pause
    /// so that a re-admitted expert's EMA is not held to the long record that got it
    /// dropped. h = 0 is a fixed decay.
    pub(crate) fn record(&mut self, descent: &[f64], moved: &[bool]) -> Result<()> {
        if self.windows >= MAX_STEP {
            return Err(Error::Internal(format!(
                "held-out window counter reached {MAX_STEP}"
            )));
        }
        let (floor, h) = (self.decay, self.horizon);
        let entries = self
            .ema
            .iter_mut()
            .zip(&mut self.span)
            .zip(descent.iter().zip(moved));
        for ((ema, span), (&x, &m)) in entries {
            // Bounded by windows (< MAX_STEP, checked above): no overflow.
            *span = if m { *span + 1 } else { 0 };
            if m && x.is_finite() {
                let d = if h == 0.0 {
                    floor
                } else {
                    floor.max(1.0 - (1.0 / h - 1.0) / *span as f64)
                };
                *ema = if ema.is_nan() {
                    x
                } else {
                    d * *ema + (1.0 - d) * x
                };
            }
        }
        self.windows += 1;
        Ok(())
    }

    /// The rate adaptation after one held-out window (the ledger checked the shapes): with
    /// `adapt` on, each expert's multiplier c becomes min(c·up, cap) where `descent` (its
    /// realized held-out loss decrease per step in the window, as given to `record`, before
    /// the EMA) is > 0 and at least `trust` × its `potential` (the first-order decrease one
    /// step at rate c predicts, measured at the window's end), max(c·down, floor) where it is
    /// < 0, and stays otherwise: where it is 0 or NaN (an expert that did not move measures
    /// 0) or fell short of the trust condition ([`RateRule::next`]). The optimizer scales
    /// the expert's learning rate by c: a "bold driver" per expert on the held-out loss, so
    /// one fixed rate per model can be too low for one expert and too high for another; with
    /// the floor at 1 (the default) c never goes below the set rate, `down` only undoes
    /// earlier ups; with the trust condition a rate goes up only where the loss is near
    /// linear along the update, where a larger step buys about what it predicts (why:
    /// docs/algorithm.md).
    /// A `State` error before the first recorded window (there is no window to adapt to).
    pub(crate) fn adapt_rate(&mut self, descent: &[f64], potential: &[f64]) -> Result<()> {
        if self.windows == 0 {
            return Err(Error::State(
                "no held-out window recorded yet: record one before adapting the rates".into(),
            ));
        }
        if self.rate_rule.adapt {
            let rule = self.rate_rule;
            for (c, (&x, &p)) in self.rate.iter_mut().zip(descent.iter().zip(potential)) {
                *c = rule.next(*c, x, p);
            }
        }
        Ok(())
    }

    /// Each expert's record as `Router::regate` judges it (row-major
    /// `[modules × experts]`): its EMA once its span has reached `min_span` windows, NaN
    /// (not judged yet: an active expert stays) before. So a drop needs a record of that
    /// many windows since the start or the expert's last return, and a returning expert
    /// stays at least that long: a first fit can raise the held-out loss and still pay off
    /// (why: docs/algorithm.md, "Minimum span"); 0 judges from the first window.
    pub fn descent(&self) -> Vec<f64> {
        self.ema
            .iter()
            .zip(&self.span)
            .map(|(&x, &span)| if span >= self.min_span { x } else { f64::NAN })
            .collect()
    }

    pub fn decay(&self) -> f64 {
        self.decay
    }
    pub fn horizon(&self) -> f64 {
        self.horizon
    }
    pub fn windows(&self) -> u64 {
        self.windows
    }
    pub fn ema(&self) -> &[f64] {
        &self.ema
    }
    pub fn span(&self) -> &[u64] {
        &self.span
    }
    pub fn min_span(&self) -> u64 {
        self.min_span
    }
    /// Per expert: its shrink fraction.
    pub fn shrink(&self) -> &[f64] {
        &self.shrink
    }
    /// Per expert: the most shrink trials per measurement.
    pub fn shrink_steps(&self) -> &[u64] {
        &self.shrink_steps
    }
    pub fn shrink_trials(&self) -> &[u64] {
        &self.shrink_trials
    }
    pub fn shrinks(&self) -> &[u64] {
        &self.shrinks
    }
    /// How a shrink trial shrinks a LoRA expert's product: spectrally (true) or by scaling.
    pub fn shrink_spectral(&self) -> bool {
        self.shrink_spectral
    }
    pub fn rate_rule(&self) -> RateRule {
        self.rate_rule
    }
    /// Row-major `[modules × experts]`: each expert's learning-rate multiplier.
    pub fn rate(&self) -> &[f64] {
        &self.rate
    }

    /// The state as `from_parts` takes it (tests build variants of a record from it).
    #[cfg(test)]
    pub(crate) fn parts(&self) -> HeldoutParts {
        HeldoutParts {
            decay: self.decay,
            horizon: self.horizon,
            windows: self.windows,
            ema: self.ema.clone(),
            span: self.span.clone(),
            min_span: self.min_span,
            shrink: self.shrink.clone(),
            shrink_steps: self.shrink_steps.clone(),
            shrink_trials: self.shrink_trials.clone(),
            shrinks: self.shrinks.clone(),
            shrink_spectral: self.shrink_spectral,
            rate_rule: self.rate_rule,
            rate: self.rate.clone(),
        }
    }
}
