//! The router: per module, which experts win this step.
//!
//! Scores arrive as one row-major `[modules × experts]` buffer and the winner mask is written
//! into a caller-provided buffer of the same size, so a call allocates nothing: the Python
//! binding routes straight into the numpy output array.

use crate::error::{filled, Error, Result};
use crate::phase::{Phase, Schedule};

/// Policy names as exposed to Python (`molf._core.POLICIES`).
pub const POLICIES: [&str; 3] = ["topk", "hysteresis", "heldout"];

/// Largest `num_modules × num_experts` accepted. It keeps every size computation far from
/// overflow and turns absurd sizes into a `ConfigError` instead of an out-of-memory abort.
pub const MAX_ENTRIES: u64 = 1 << 32;

/// Step counters stay within `i64` so that they round-trip through Python ints and the
/// ledger's signed `last_switch_step`.
pub const MAX_STEP: u64 = i64::MAX as u64;

/// A routing policy with the settings it reads, so that a setting cannot be given to a
/// policy that would ignore it. Warm-up and freeze are phases of every policy
/// ([`RouterConfig`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Plain top-`k` by score (the paper).
    TopK { k: u64 },
    /// Top-`k` where incumbents keep their place unless beaten by a relative `margin`, and
    /// are held for at least `min_dwell` steps after they change.
    Hysteresis { k: u64, margin: f64, min_dwell: u64 },
    /// Every expert starts active; [`Router::regate`] drops an expert whose measured movement
    /// raised the held-out loss and re-admits a dropped one, `min_dwell` steps after that
    /// expert's last change (its drop), once a step of it would lower that loss. Training
    /// scores only veto non-finite experts. `k` is not read: it is kept because the Python
    /// constructor accepts any `topk` under this policy and `Router.config()` (which
    /// checkpoints compare) reads it back.
    Heldout { k: u64, min_dwell: u64 },
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::TopK { .. } => POLICIES[0],
            Policy::Hysteresis { .. } => POLICIES[1],
            Policy::Heldout { .. } => POLICIES[2],
        }
    }

    /// Winners per module and step (not read by policy heldout).
    pub fn k(self) -> u64 {
        match self {
            Policy::TopK { k } | Policy::Hysteresis { k, .. } | Policy::Heldout { k, .. } => k,
        }
    }

    /// The incumbents' relative advantage: 0 outside policy hysteresis.
    pub fn margin(self) -> f64 {
        match self {
            Policy::Hysteresis { margin, .. } => margin,
            _ => 0.0,
        }
    }

    /// Steps an incumbent is held (hysteresis) or a dropped expert kept out (heldout) after
    /// its last change: 0 under policy topk.
    pub fn min_dwell(self) -> u64 {
        match self {
            Policy::TopK { .. } => 0,
            Policy::Hysteresis { min_dwell, .. } | Policy::Heldout { min_dwell, .. } => min_dwell,
        }
    }

    pub fn is_heldout(self) -> bool {
        matches!(self, Policy::Heldout { .. })
    }
}

/// Everything the constructor takes. Validated by [`RouterConfig::validate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterConfig {
    pub num_modules: u64,
    pub num_experts: u64,
    pub policy: Policy,
    pub warmup_steps: u64,
    pub freeze_after: Option<u64>,
}

/// Checks that a `[num_modules × num_experts]` matrix is within [`MAX_ENTRIES`].
pub fn check_shape(num_modules: u64, num_experts: u64) -> Result<()> {
    if num_modules
        .checked_mul(num_experts)
        .is_none_or(|n| n > MAX_ENTRIES)
    {
        return Err(Error::Config(format!(
            "num_modules * num_experts must be <= {MAX_ENTRIES}, got {num_modules} * {num_experts}"
        )));
    }
    Ok(())
}

/// Checks a hysteresis margin: finite and >= 0.
pub fn check_margin(margin: f64) -> Result<()> {
    if !margin.is_finite() || margin < 0.0 {
        return Err(Error::Config(format!(
            "margin must be finite and >= 0, got {margin}"
        )));
    }
    Ok(())
}

impl RouterConfig {
    /// Plain top-k routing with no warm-up and no freeze.
    pub fn topk(num_modules: u64, num_experts: u64, topk: u64) -> Self {
        RouterConfig {
            num_modules,
            num_experts,
            policy: Policy::TopK { k: topk },
            warmup_steps: 0,
            freeze_after: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let cfg = |msg: String| Err(Error::Config(msg));
        let (k, min_dwell) = (self.policy.k(), self.policy.min_dwell());
        for (name, v) in [
            ("num_modules", self.num_modules),
            ("num_experts", self.num_experts),
            ("topk", k),
        ] {
            if v < 1 {
                return cfg(format!("{name} must be >= 1, got {v}"));
            }
        }
        check_shape(self.num_modules, self.num_experts)?;
        for (name, v) in [
            ("topk", k),
            ("min_dwell", min_dwell),
            ("warmup_steps", self.warmup_steps),
            ("freeze_after", self.freeze_after.unwrap_or(0)),
        ] {
            if v > MAX_STEP {
                return cfg(format!("{name} must be <= {MAX_STEP}, got {v}"));
            }
        }
        check_margin(self.policy.margin())?;
        Schedule::new(self.warmup_steps, self.freeze_after)?;
        Ok(())
    }

    fn schedule(&self) -> Schedule {
        Schedule {
            warmup_steps: self.warmup_steps,
            freeze_after: self.freeze_after,
        }
    }
}

/// A score element type. Scores are compared as `f64`, which represents every `f32` exactly,
/// so `f32` and `f64` inputs route identically.
pub trait Score: Copy + Send + Sync {
    fn to_f64(self) -> f64;
}

impl Score for f32 {
    #[inline]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}

impl Score for f64 {
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
}

/// Picks each step's winners per module under a [`Policy`] and the phase schedule. Under
/// policy heldout the active set changes only in [`Router::regate`], and a dropped expert may
/// return `min_dwell` steps after that expert's last change ([`Router::expert_last_change`]),
/// whatever the other experts of its module did since.
#[derive(Debug, Clone, PartialEq)]
pub struct Router {
    config: RouterConfig,
    schedule: Schedule,
    /// Cached `config.num_experts`, `config.policy.k()` as `usize`.
    experts: usize,
    k: usize,
    /// Number of `route` calls so far.
    step: u64,
    /// Row-major `[modules × experts]`: the last non-empty winner set of a routing step.
    incumbents: Vec<bool>,
    /// Per module: step at which its incumbents last changed (0 while it has none).
    last_change: Vec<u64>,
    /// Row-major `[modules × experts]`, policy heldout: step at which [`Router::regate`] last
    /// flipped each expert's active flag (0: never). The re-admission dwell counts from it.
    /// Other policies leave it 0.
    expert_last_change: Vec<u64>,
}

impl Router {
    pub fn new(config: RouterConfig) -> Result<Self> {
        config.validate()?;
        let entries = (config.num_modules * config.num_experts) as usize;
        Ok(Router {
            config,
            schedule: config.schedule(),
            experts: config.num_experts as usize,
            k: usize::try_from(config.policy.k()).unwrap_or(usize::MAX),
            step: 0,
            incumbents: filled(entries, config.policy.is_heldout(), "incumbents")?,
            last_change: filled(config.num_modules as usize, 0, "last_change")?,
            expert_last_change: filled(entries, 0, "expert_last_change")?,
        })
    }

    /// Rebuilds a router from decoded state, checking every invariant that `route` and
    /// `regate` maintain; any violation is a `State` error. `expert_last_change` (row-major
    /// `[modules × experts]`) has every entry <= `step`; under policy heldout each module's
    /// `last_change` is the latest of its experts', under the other policies it is all 0.
    pub fn from_parts(
        config: RouterConfig,
        step: u64,
        incumbents: Vec<bool>,
        last_change: Vec<u64>,
        expert_last_change: Vec<u64>,
    ) -> Result<Self> {
        let state = |msg: String| Err(Error::State(msg));
        if let Err(e) = config.validate() {
            return state(format!("invalid router configuration in state: {e}"));
        }
        let (m, e) = (config.num_modules as usize, config.num_experts as usize);
        if incumbents.len() != m * e || last_change.len() != m || expert_last_change.len() != m * e
        {
            return state(format!(
                "router state arrays do not match shape ({m}, {e}): {} incumbents, {} \
                 last_change, {} expert_last_change",
                incumbents.len(),
                last_change.len(),
                expert_last_change.len()
            ));
        }
        if step > MAX_STEP {
            return state(format!("router step {step} exceeds {MAX_STEP}"));
        }
        let heldout = config.policy.is_heldout();
        let max_winners = if heldout {
            e
        } else {
            e.min(usize::try_from(config.policy.k()).unwrap_or(usize::MAX))
        };
        let rows = incumbents
            .chunks_exact(e)
            .zip(&last_change)
            .zip(expert_last_change.chunks_exact(e));
        for (row, ((inc, &changed), since)) in rows.enumerate() {
            // Only `regate` (policy heldout) stamps experts, between routing steps (so the
            // current step may be one); every flip also stamps the module, so its last change
            // is its experts' latest.
            if let Some((col, &t)) = since.iter().enumerate().find(|&(_, &t)| t > step) {
                return state(format!(
                    "module {row}, expert {col}: last change at step {t} is after the router's \
                     step {step}"
                ));
            }
            let latest = since.iter().copied().max().unwrap_or(0);
            if heldout && latest != changed {
                return state(format!(
                    "module {row}: last change at step {changed} is not its experts' latest \
                     ({latest})"
                ));
            }
            if !heldout && latest != 0 {
                return state(format!(
                    "module {row}: expert last changes are set (latest {latest}), but only \
                     policy 'heldout' sets them"
                ));
            }
            let n = inc.iter().filter(|&&b| b).count();
            if n > max_winners {
                return state(format!(
                    "module {row} has {n} incumbents, more than min(topk, num_experts) = {max_winners}"
                ));
            }
            let ok = if heldout {
                // `regate` runs between routing steps, so a change can be stamped `step`
                // (0 included); any set, all experts dropped included, is reachable.
                changed <= step
            } else if n == 0 {
                changed == 0
            } else {
                // Incumbents only change in routing steps: warmup_steps <= changed < step,
                // and before the freeze.
                changed >= config.warmup_steps
                    && changed < step
                    && config.freeze_after.is_none_or(|f| changed < f)
            };
            if !ok {
                return state(format!(
                    "module {row}: last change at step {changed} is inconsistent with {n} \
                     incumbents at step {step} (warmup_steps={}, freeze_after={:?})",
                    config.warmup_steps, config.freeze_after
                ));
            }
        }
        let mut router = Router::new(config).map_err(|e| Error::State(e.to_string()))?;
        router.step = step;
        router.incumbents = incumbents;
        router.last_change = last_change;
        router.expert_last_change = expert_last_change;
        Ok(router)
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Phase of the next `route` call.
    pub fn phase(&self) -> Phase {
        self.schedule.phase_at(self.step)
    }

    pub fn incumbents(&self) -> &[bool] {
        &self.incumbents
    }

    pub fn last_change(&self) -> &[u64] {
        &self.last_change
    }

    /// Row-major `[modules × experts]`: the step at which [`Router::regate`] last flipped each
    /// expert (0: never; always 0 under policies other than heldout).
    pub fn expert_last_change(&self) -> &[u64] {
        &self.expert_last_change
    }

    /// How the next [`Router::route`] call's winners follow from its scores, where a rule
    /// simpler than `route` gives them exactly; `None` where only `route` can (hysteresis,
    /// top-k with 1 < k < experts, a frozen module without incumbents). A device that has
    /// the scores before the host can then decide the step itself; `route` still books it
    /// (and the caller can check the two agree).
    pub fn forecast(&self) -> Option<Forecast> {
        let e = self.experts;
        let gated_incumbents = || Some(Forecast::Gated(self.incumbents.clone()));
        match (self.phase(), self.config.policy) {
            (Phase::Warmup, _) => Some(Forecast::Gated(vec![true; self.incumbents.len()])),
            (_, Policy::Heldout { .. }) => gated_incumbents(),
            (Phase::Frozen, _) if self.incumbents.chunks_exact(e).all(|r| r.contains(&true)) => {
                gated_incumbents()
            }
            (Phase::Routing, Policy::TopK { .. }) if self.k >= e => {
                Some(Forecast::Gated(vec![true; self.incumbents.len()]))
            }
            (Phase::Routing, Policy::TopK { .. }) if self.k == 1 => Some(Forecast::Top1),
            _ => None,
        }
    }

    /// Routes one step: writes the winner mask of `scores` (row-major `[modules × experts]`)
    /// into `out`, advances the step, and returns the phase the call ran in.
    pub fn route<S: Score>(&mut self, scores: &[S], out: &mut [bool]) -> Result<Phase> {
        let n = self.incumbents.len();
        if scores.len() != n || out.len() != n {
            return Err(Error::Score(format!(
                "scores and mask must have {} x {} = {n} entries, got {} scores and {} mask entries",
                self.config.num_modules,
                self.config.num_experts,
                scores.len(),
                out.len()
            )));
        }
        if self.step >= MAX_STEP {
            return Err(Error::Internal(format!(
                "router step counter reached {MAX_STEP}"
            )));
        }
        let phase = self.phase();
        let e = self.experts;
        match phase {
            Phase::Warmup => {
                for (o, s) in out.iter_mut().zip(scores) {
                    *o = s.to_f64().is_finite();
                }
            }
            // The paper's setting has its own loop; `route_top1` declines expert counts it
            // has no loop for, which then take the general one below.
            Phase::Routing
                if self.config.policy == (Policy::TopK { k: 1 })
                    && self.route_top1(scores, out) => {}
            Phase::Routing => {
                let (s, policy) = (self.step, self.config.policy);
                let rows = scores
                    .chunks_exact(e)
                    .zip(out.chunks_exact_mut(e))
                    .zip(self.incumbents.chunks_exact_mut(e))
                    .zip(self.last_change.iter_mut());
                for (((row, win), inc), changed) in rows {
                    match policy {
                        Policy::TopK { .. } => top_k(row, self.k, None, win),
                        // The active set changes in `regate` only.
                        Policy::Heldout { .. } => {
                            hold(row, inc, win);
                            continue;
                        }
                        Policy::Hysteresis {
                            margin, min_dwell, ..
                        } => {
                            let has_inc = inc.iter().any(|&b| b);
                            let held = has_inc && s - *changed < min_dwell && hold(row, inc, win);
                            if !held {
                                let pref = has_inc.then_some((&*inc, margin));
                                top_k(row, self.k, pref, win);
                            }
                        }
                    }
                    // An empty row (no finite score) leaves the incumbents alone.
                    // Element loops rather than slice `!=`/`copy_from_slice`: rows are a few
                    // bytes long, and memcmp/memcpy calls per row would dominate.
                    let (mut any, mut differs) = (false, false);
                    for (&w, &i) in win.iter().zip(inc.iter()) {
                        any |= w;
                        differs |= w != i;
                    }
                    if any && differs {
                        for (i, &w) in inc.iter_mut().zip(win.iter()) {
                            *i = w;
                        }
                        *changed = s;
                    }
                }
            }
            Phase::Frozen => {
                // A heldout module with every expert dropped stays without updates.
                let heldout = self.config.policy.is_heldout();
                let rows = scores
                    .chunks_exact(e)
                    .zip(out.chunks_exact_mut(e))
                    .zip(self.incumbents.chunks_exact(e));
                for ((row, win), inc) in rows {
                    if heldout || inc.iter().any(|&b| b) {
                        hold(row, inc, win);
                    } else {
                        top_k(row, self.k, None, win);
                    }
                }
            }
        }
        self.step += 1;
        Ok(phase)
    }

    /// Policy `heldout`: updates each module's active experts from a held-out measurement and
    /// returns how many modules changed. `descent` (row-major `[modules × experts]`) is each
    /// expert's smoothed held-out loss decrease per step while it moved (NaN: not measured
    /// yet), `potential` the first-order decrease one step of it would buy now. An active
    /// expert stays while `descent` is NaN or positive; an inactive one returns when
    /// `potential` is positive and finite and that expert's last change (its drop) was at
    /// least `min_dwell` steps ago, whatever its module's other experts did since. A flip
    /// stamps the expert ([`Router::expert_last_change`]) and its module
    /// ([`Router::last_change`]) with the current step. Nothing changes in the frozen phase.
    pub fn regate(&mut self, descent: &[f64], potential: &[f64]) -> Result<usize> {
        let Policy::Heldout { min_dwell, .. } = self.config.policy else {
            return Err(Error::Config(format!(
                "regate needs policy 'heldout', this router's is '{}'",
                self.config.policy.name()
            )));
        };
        let n = self.incumbents.len();
        if descent.len() != n || potential.len() != n {
            return Err(Error::Score(format!(
                "descent and potential must have {} x {} = {n} entries, got {} and {}",
                self.config.num_modules,
                self.config.num_experts,
                descent.len(),
                potential.len()
            )));
        }
        if self.phase() == Phase::Frozen {
            return Ok(0);
        }
        let (e, s, dwell) = (self.experts, self.step, min_dwell);
        let mut changed_modules = 0;
        let rows = self
            .incumbents
            .chunks_exact_mut(e)
            .zip(self.expert_last_change.chunks_exact_mut(e))
            .zip(self.last_change.iter_mut())
            .zip(descent.chunks_exact(e).zip(potential.chunks_exact(e)));
        for (((inc, since), changed), (d, p)) in rows {
            let mut differs = false;
            for (((i, t), &d), &p) in inc.iter_mut().zip(since.iter_mut()).zip(d).zip(p) {
                // Written so that a NaN descent keeps the expert and a NaN potential does
                // not bring one back. The dwell counts from this expert's own last change.
                let next = if *i {
                    d.is_nan() || d > 0.0
                } else {
                    s - *t >= dwell && p.is_finite() && p > 0.0
                };
                if next != *i {
                    *i = next;
                    *t = s;
                    differs = true;
                }
            }
            if differs {
                *changed = s;
                changed_modules += 1;
            }
        }
        Ok(changed_modules)
    }

    /// The paper's setting (top-1, no hysteresis) in a routing step, for 2 to 8 experts: the
    /// expert count is a compile-time constant so that each row's loops unroll into
    /// straight-line code (~3 ns a row). Returns false (nothing written) for other counts.
    fn route_top1<S: Score>(&mut self, scores: &[S], out: &mut [bool]) -> bool {
        let args = (
            scores,
            out,
            &mut self.incumbents[..],
            &mut self.last_change[..],
            self.step,
        );
        match self.experts {
            2 => top1_rows::<S, 2>(args),
            3 => top1_rows::<S, 3>(args),
            4 => top1_rows::<S, 4>(args),
            5 => top1_rows::<S, 5>(args),
            6 => top1_rows::<S, 6>(args),
            7 => top1_rows::<S, 7>(args),
            8 => top1_rows::<S, 8>(args),
            _ => return false,
        }
        true
    }
}

type Top1Args<'a, S> = (&'a [S], &'a mut [bool], &'a mut [bool], &'a mut [u64], u64);

/// The rule of [`Router::forecast`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forecast {
    /// Winners: the experts set in the mask (row-major `[modules × experts]`) whose score is
    /// finite.
    Gated(Vec<bool>),
    /// Per module the highest finite score wins, ties to the lower index; none finite: none.
    Top1,
}

/// Row `e` is the winner mask of expert `e` among up to 8; row 8 is the empty mask.
const ONE_HOT: [[bool; 8]; 9] = {
    let mut t = [[false; 8]; 9];
    let mut e = 0;
    while e < 8 {
        t[e][e] = true;
        e += 1;
    }
    t
};

/// Top-1 routing of every row of `E` experts, and the incumbents' bookkeeping: a row with
/// a winner makes it the incumbent, changed at `step` when it differs.
fn top1_rows<S: Score, const E: usize>(
    (scores, out, incumbents, last_change, step): Top1Args<'_, S>,
) {
    let rows = scores
        .chunks_exact(E)
        .zip(out.chunks_exact_mut(E))
        .zip(incumbents.chunks_exact_mut(E))
        .zip(last_change.iter_mut());
    for (((row, win), inc), changed) in rows {
        let best = top1::<S, E>(row);
        let hot = &ONE_HOT[best.min(8)][..E];
        win.copy_from_slice(hot);
        let any = best < E;
        // Arithmetic, not a branch or select (which LLVM may turn into one): winners change
        // at random, and a mispredicted branch per row costs more than the rest of the row.
        let moved = u64::from(any & (*inc != *hot));
        *changed += moved * (step - *changed); // last_change <= step always
        if any {
            inc.copy_from_slice(hot); // an empty row (no finite score) keeps its incumbents
        }
    }
}

/// [`argmax_finite`] of a row of `E` scores, fast when all are finite (the usual case): one
/// predictable check, then a maximum and a comparison per score without branches.
#[inline(always)]
fn top1<S: Score, const E: usize>(row: &[S]) -> usize {
    // A NaN or an infinity makes the sum non-finite (so does an overflow, which only takes
    // the exact path below needlessly).
    let all_finite = row.iter().fold(0.0, |a, s| a + s.to_f64()).is_finite();
    if !all_finite {
        return argmax_finite(row);
    }
    let top = row.iter().fold(f64::NEG_INFINITY, |t, s| t.max(s.to_f64()));
    let mut at_top = 1u32 << E;
    for (e, s) in row.iter().enumerate() {
        at_top |= u32::from(s.to_f64() == top) << e;
    }
    at_top.trailing_zeros() as usize // the lowest index holding the maximum
}

/// The lowest index holding the maximum finite score of `row`, or `row.len()` when no score
/// is finite.
#[inline]
fn argmax_finite<S: Score>(row: &[S]) -> usize {
    let (mut best, mut top) = (row.len(), f64::NEG_INFINITY);
    for (e, s) in row.iter().enumerate() {
        let v = s.to_f64();
        // A strict `>` keeps the lowest index among equal maxima; -inf never beats the start.
        let better = v.is_finite() & (v > top);
        best = if better { e } else { best };
        top = if better { v } else { top };
    }
    best
}

/// Writes `incumbents ∩ finite` into `win`; returns whether it is non-empty.
fn hold<S: Score>(row: &[S], inc: &[bool], win: &mut [bool]) -> bool {
    let mut any = false;
    for ((w, &i), s) in win.iter_mut().zip(inc).zip(row) {
        *w = i && s.to_f64().is_finite();
        any |= *w;
    }
    any
}

/// Writes the top-`k` experts of `row` among finite scores into `win`.
///
/// With `pref = Some((incumbents, margin))` an incumbent's score `s` counts as
/// `s + margin·|s|` and incumbents win ties; otherwise ties go to the lower index.
/// No allocation: O(E) for k = 1, O(E²) otherwise (E, the experts per module, is small).
fn top_k<S: Score>(row: &[S], k: usize, pref: Option<(&[bool], f64)>, win: &mut [bool]) {
    let key = |e: usize| -> (f64, bool) {
        let s = row[e].to_f64();
        match pref {
            Some((inc, margin)) if inc[e] => (s + margin * s.abs(), true),
            _ => (s, false),
        }
    };
    // Does expert a (key ka) rank strictly before expert b (key kb)? Lower index breaks ties.
    let before = |a: usize, ka: (f64, bool), b: usize, kb: (f64, bool)| {
        ka.0 > kb.0 || (ka.0 == kb.0 && ((ka.1 && !kb.1) || (ka.1 == kb.1 && a < b)))
    };
    let finite = |e: usize| row[e].to_f64().is_finite();
    if k == 1 && pref.is_none() {
        let best = argmax_finite(row);
        for (e, w) in win.iter_mut().enumerate() {
            *w = e == best;
        }
        return;
    }
    win.fill(false);
    if k == 1 {
        let mut best: Option<(usize, (f64, bool))> = None;
        for e in (0..row.len()).filter(|&e| finite(e)) {
            let ke = key(e);
            if best.is_none_or(|(b, kb)| before(e, ke, b, kb)) {
                best = Some((e, ke));
            }
        }
        if let Some((b, _)) = best {
            win[b] = true;
        }
        return;
    }
    for a in (0..row.len()).filter(|&a| finite(a)) {
        let ka = key(a);
        let rank = (0..row.len())
            .filter(|&b| b != a && finite(b) && before(b, key(b), a, ka))
            .count();
        win[a] = rank < k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hyst(m: u64, e: u64, k: u64, margin: f64, min_dwell: u64) -> RouterConfig {
        RouterConfig {
            policy: Policy::Hysteresis {
                k,
                margin,
                min_dwell,
            },
            ..RouterConfig::topk(m, e, k)
        }
    }

    fn route(r: &mut Router, scores: &[f64]) -> Vec<bool> {
        let mut out = vec![false; scores.len()];
        r.route(scores, &mut out).unwrap();
        out
    }

    #[test]
    fn topk_picks_highest_and_breaks_ties_low() {
        let mut r = Router::new(RouterConfig::topk(3, 3, 1)).unwrap();
        let out = route(
            &mut r,
            &[1.0, 3.0, 2.0, 5.0, 5.0, 1.0, f64::NAN, f64::INFINITY, -1.0],
        );
        assert_eq!(
            out,
            [false, true, false, true, false, false, false, false, true]
        );
        assert_eq!(r.step(), 1);
    }

    #[test]
    fn topk_two_with_too_few_finite() {
        let mut r = Router::new(RouterConfig::topk(2, 3, 2)).unwrap();
        let nan = f64::NAN;
        let out = route(&mut r, &[nan, 1.0, f64::NEG_INFINITY, 0.0, 0.0, 0.0]);
        assert_eq!(out, [false, true, false, true, true, false]);
    }

    #[test]
    fn warmup_then_routing_then_frozen() {
        let cfg = RouterConfig {
            warmup_steps: 1,
            freeze_after: Some(2),
            ..RouterConfig::topk(1, 2, 1)
        };
        let mut r = Router::new(cfg).unwrap();
        assert_eq!(r.phase(), Phase::Warmup);
        assert_eq!(route(&mut r, &[1.0, f64::NAN]), [true, false]);
        assert!(r.incumbents().iter().all(|&b| !b));
        assert_eq!(r.phase(), Phase::Routing);
        assert_eq!(route(&mut r, &[1.0, 2.0]), [false, true]);
        assert_eq!(r.phase(), Phase::Frozen);
        assert_eq!(route(&mut r, &[9.0, 2.0]), [false, true]);
        assert_eq!(route(&mut r, &[9.0, f64::NAN]), [false, false]);
        assert_eq!(r.incumbents(), [false, true]);
    }

    #[test]
    fn hysteresis_margin_protects_incumbent() {
        let mut r = Router::new(hyst(1, 2, 1, 0.5, 0)).unwrap();
        assert_eq!(route(&mut r, &[2.0, 1.0]), [true, false]);
        // 2.9 < 2 + 0.5·2 = 3: incumbent stays.
        assert_eq!(route(&mut r, &[2.0, 2.9]), [true, false]);
        // Tie with the adjusted score: incumbent wins.
        assert_eq!(route(&mut r, &[2.0, 3.0]), [true, false]);
        assert_eq!(route(&mut r, &[2.0, 3.1]), [false, true]);
        assert_eq!(r.last_change(), [3]);
    }

    #[test]
    fn hysteresis_margin_above_one_is_not_monotone_for_negative_scores() {
        // Pins a consequence of the specified formula: for s < 0 the adjusted incumbent score
        // s + margin·|s| = s·(1 − margin) grows as s falls when margin > 1, so lowering a
        // negative incumbent's score can win it back. Non-negative scores (molf's EPD and
        // PFN) and margins <= 1 are monotone.
        let mut r = Router::new(hyst(1, 2, 1, 2.0, 0)).unwrap();
        assert_eq!(route(&mut r, &[1.0, 0.0]), [true, false]);
        let mut lowered = r.clone();
        // Adjusted -0.01·(1 − 2) = 0.01 < 0.1: the challenger wins ...
        assert_eq!(route(&mut r, &[-0.01, 0.1]), [false, true]);
        // ... but the lower -1·(1 − 2) = 1 > 0.1 keeps the incumbent.
        assert_eq!(route(&mut lowered, &[-1.0, 0.1]), [true, false]);
    }

    #[test]
    fn hysteresis_min_dwell_holds() {
        let mut r = Router::new(hyst(1, 2, 1, 0.0, 2)).unwrap();
        assert_eq!(route(&mut r, &[1.0, 0.0]), [true, false]); // change at 0
        assert_eq!(route(&mut r, &[0.0, 1.0]), [true, false]); // 1 - 0 < 2: held
        assert_eq!(route(&mut r, &[0.0, 1.0]), [false, true]); // 2 - 0 >= 2
                                                               // Incumbent non-finite: not held even inside the dwell time.
        assert_eq!(route(&mut r, &[1.0, f64::NAN]), [true, false]);
    }

    #[test]
    fn empty_row_keeps_incumbents() {
        let mut r = Router::new(hyst(1, 2, 1, 0.1, 0)).unwrap();
        route(&mut r, &[1.0, 0.0]);
        assert_eq!(route(&mut r, &[f64::NAN, f64::NAN]), [false, false]);
        assert_eq!(r.incumbents(), [true, false]);
        assert_eq!(r.last_change(), [0]);
    }

    #[test]
    fn f32_and_f64_route_alike() {
        let s32 = [1.5f32, 1.5, f32::NAN, 0.25];
        let s64: Vec<f64> = s32.iter().map(|&x| x.into()).collect();
        let mut a = Router::new(RouterConfig::topk(2, 2, 1)).unwrap();
        let mut b = a.clone();
        let (mut o1, mut o2) = ([false; 4], [false; 4]);
        a.route(&s32, &mut o1).unwrap();
        b.route(&s64, &mut o2).unwrap();
        assert_eq!(o1, o2);
        assert_eq!(a, b);
    }

    #[test]
    fn top1_loops_match_the_general_top_k() {
        // Every expert count, with ties, signed zeros and non-finite scores: the unrolled
        // top-1 loops decide as `top_k` does and keep the incumbents as the general loop.
        let values = [
            0.0,
            -0.0,
            1.0,
            2.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for e in 1..=9usize {
            let m = 64;
            let mut r = Router::new(RouterConfig::topk(m as u64, e as u64, 1)).unwrap();
            for step in 0..20u64 {
                let scores: Vec<f64> = (0..m * e)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        values[(seed % values.len() as u64) as usize]
                    })
                    .collect();
                let (before, changed_before) = (r.incumbents().to_vec(), r.last_change().to_vec());
                let out = route(&mut r, &scores);
                for (row, &changed_then) in changed_before.iter().enumerate() {
                    let span = row * e..(row + 1) * e;
                    let mut want = vec![false; e];
                    top_k(&scores[span.clone()], 1, None, &mut want);
                    assert_eq!(out[span.clone()], want[..], "e={e} step={step} row={row}");
                    let (inc, changed) = if !want.contains(&true) {
                        (before[span.clone()].to_vec(), changed_then)
                    } else if want[..] != before[span.clone()] {
                        (want.clone(), step)
                    } else {
                        (want.clone(), changed_then)
                    };
                    assert_eq!(r.incumbents()[span], inc[..]);
                    assert_eq!(r.last_change()[row], changed);
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_are_score_errors() {
        let mut r = Router::new(RouterConfig::topk(2, 2, 1)).unwrap();
        let mut out = [false; 4];
        assert!(matches!(
            r.route(&[1.0f64; 3], &mut out),
            Err(Error::Score(_))
        ));
        assert_eq!(r.step(), 0);
    }

    #[test]
    fn config_validation_messages() {
        let bad = |c: RouterConfig| match Router::new(c) {
            Err(Error::Config(m)) => m,
            other => panic!("expected ConfigError, got {other:?}"),
        };
        assert_eq!(bad(RouterConfig::topk(1, 1, 0)), "topk must be >= 1, got 0");
        assert!(bad(RouterConfig::topk(0, 1, 1)).starts_with("num_modules must be >= 1"));
        assert!(bad(hyst(1, 1, 1, f64::NAN, 0)).starts_with("margin must be finite"));
        assert!(bad(hyst(1, 1, 1, -1.0, 0)).starts_with("margin must be finite"));
        assert!(bad(RouterConfig::topk(1 << 20, 1 << 20, 1)).contains("<= 4294967296"));
        assert!(bad(RouterConfig {
            warmup_steps: 3,
            freeze_after: Some(3),
            ..RouterConfig::topk(1, 1, 1)
        })
        .starts_with("freeze_after must be None or > warmup_steps"));
        // topk >= num_experts is allowed.
        assert!(Router::new(RouterConfig::topk(1, 2, 5)).is_ok());
    }

    #[test]
    fn from_parts_rejects_inconsistent_state() {
        let cfg = RouterConfig {
            warmup_steps: 2,
            ..RouterConfig::topk(1, 2, 1)
        };
        // Incumbents recorded during warm-up.
        assert!(matches!(
            Router::from_parts(cfg, 3, vec![true, false], vec![1], vec![0, 0]),
            Err(Error::State(_))
        ));
        // More incumbents than topk.
        assert!(matches!(
            Router::from_parts(cfg, 3, vec![true, true], vec![2], vec![0, 0]),
            Err(Error::State(_))
        ));
        // Change in the future.
        assert!(matches!(
            Router::from_parts(cfg, 3, vec![true, false], vec![3], vec![0, 0]),
            Err(Error::State(_))
        ));
        assert!(Router::from_parts(cfg, 3, vec![true, false], vec![2], vec![0, 0]).is_ok());
        // Expert last changes belong to policy heldout; wrong lengths are state errors too.
        for elc in [vec![0, 2], vec![0], vec![0, 0, 0]] {
            assert!(matches!(
                Router::from_parts(cfg, 3, vec![true, false], vec![2], elc),
                Err(Error::State(_))
            ));
        }
    }

    fn heldout(modules: u64, experts: u64, min_dwell: u64) -> Router {
        Router::new(RouterConfig {
            policy: Policy::Heldout { k: 1, min_dwell },
            ..RouterConfig::topk(modules, experts, 1)
        })
        .unwrap()
    }

    #[test]
    fn heldout_starts_all_active_and_routes_the_active_finite_experts() {
        let mut r = heldout(2, 2, 0);
        let mut out = [false; 4];
        r.route(&[1.0f64, 9.0, f64::NAN, 0.0], &mut out).unwrap();
        assert_eq!(out, [true, true, false, true]);
        assert_eq!(r.incumbents(), [true; 4]);
    }

    #[test]
    fn heldout_regate_drops_harm_and_readmits_after_the_dwell() {
        let mut r = heldout(1, 2, 2);
        let mut out = [false; 2];
        r.route(&[1.0f64, 1.0], &mut out).unwrap(); // step 1
                                                    // Dense raised the held-out loss, LoRA lowered it: dense leaves.
        assert_eq!(r.regate(&[-1.0, 2.0], &[5.0, 5.0]).unwrap(), 1);
        assert_eq!(r.incumbents(), [false, true]);
        assert_eq!(r.last_change(), [1]);
        assert_eq!(r.expert_last_change(), [1, 0]);
        r.route(&[1.0f64, 1.0], &mut out).unwrap();
        assert_eq!(out, [false, true]);
        // Within the dwell a positive potential does not bring it back ...
        assert_eq!(r.regate(&[-1.0, 2.0], &[5.0, 5.0]).unwrap(), 0);
        r.route(&[1.0f64, 1.0], &mut out).unwrap(); // step 3
                                                    // ... after it, a NaN or non-positive potential does not either ...
        assert_eq!(r.regate(&[-1.0, 2.0], &[f64::NAN, 5.0]).unwrap(), 0);
        assert_eq!(r.regate(&[-1.0, 2.0], &[0.0, 5.0]).unwrap(), 0);
        // ... a positive one does; a NaN descent keeps an active expert.
        assert_eq!(r.regate(&[-1.0, f64::NAN], &[1e-30, 5.0]).unwrap(), 1);
        assert_eq!(r.incumbents(), [true, true]);
        assert_eq!(r.last_change(), [3]);
        assert_eq!(r.expert_last_change(), [3, 0]);
        // Every expert may leave: the module then gets no update.
        r.route(&[1.0f64, 1.0], &mut out).unwrap();
        assert_eq!(r.regate(&[0.0, -1.0], &[0.0, 0.0]).unwrap(), 1);
        assert_eq!(r.expert_last_change(), [4, 4]);
        r.route(&[1.0f64, 1.0], &mut out).unwrap();
        assert_eq!(out, [false, false]);
        let back = Router::from_parts(
            *r.config(),
            r.step(),
            r.incumbents().to_vec(),
            r.last_change().to_vec(),
            r.expert_last_change().to_vec(),
        )
        .unwrap();
        assert_eq!(back, r);
    }

    /// Advances a router by `n` routing steps (all scores 1).
    fn advance(r: &mut Router, n: u64) {
        let mut out = vec![false; r.incumbents().len()];
        let ones = vec![1.0f64; out.len()];
        for _ in 0..n {
            r.route(&ones, &mut out).unwrap();
        }
    }

    #[test]
    fn heldout_dwell_counts_from_each_experts_own_change() {
        // Expert 1 leaves at step 10, expert 0 at step 20; min_dwell 15. At step 25 expert 1
        // (15 steps after its drop) may return, expert 0 (5 steps) may not. The old per-module
        // rule (25 − 20 < 15) would have held both back.
        let mut r = heldout(1, 2, 15);
        advance(&mut r, 10);
        assert_eq!(r.regate(&[1.0, -1.0], &[5.0, 5.0]).unwrap(), 1);
        assert_eq!(r.incumbents(), [true, false]);
        assert_eq!(r.expert_last_change(), [0, 10]);
        advance(&mut r, 10);
        // Expert 1 is 10 steps into its dwell: a positive potential does not bring it back.
        assert_eq!(r.regate(&[0.0, 1.0], &[5.0, 5.0]).unwrap(), 1);
        assert_eq!(r.incumbents(), [false, false]);
        assert_eq!(r.expert_last_change(), [20, 10]);
        assert_eq!(r.last_change(), [20]);
        advance(&mut r, 4);
        // Step 24: 14 steps after expert 1's drop, still inside.
        assert_eq!(r.regate(&[0.0, 0.0], &[5.0, 5.0]).unwrap(), 0);
        advance(&mut r, 1);
        assert_eq!(r.step(), 25);
        assert!(r.step() - r.last_change()[0] < r.config().policy.min_dwell());
        assert_eq!(r.regate(&[0.0, 0.0], &[5.0, 5.0]).unwrap(), 1);
        assert_eq!(r.incumbents(), [false, true]);
        assert_eq!(r.expert_last_change(), [20, 25]);
        assert_eq!(r.last_change(), [25]);
        // Expert 0 returns 15 steps after its own drop, at step 35.
        advance(&mut r, 9);
        assert_eq!(r.regate(&[0.0, 1.0], &[5.0, 5.0]).unwrap(), 0);
        advance(&mut r, 1);
        assert_eq!(r.regate(&[0.0, 1.0], &[5.0, 5.0]).unwrap(), 1);
        assert_eq!(r.incumbents(), [true, true]);
        assert_eq!(r.expert_last_change(), [35, 25]);
        assert_eq!(r.last_change(), [35]);
        // Other policies never stamp experts.
        let mut t = Router::new(hyst(1, 2, 1, 0.0, 1)).unwrap();
        assert_eq!(route(&mut t, &[1.0, 0.0]), [true, false]);
        assert_eq!(route(&mut t, &[0.0, 1.0]), [false, true]);
        assert_eq!(t.expert_last_change(), [0, 0]);
    }

    #[test]
    fn heldout_from_parts_checks_expert_last_change() {
        let cfg = *heldout(1, 2, 3).config();
        let parts =
            |elc: Vec<u64>, lc: u64| Router::from_parts(cfg, 7, vec![true, false], vec![lc], elc);
        assert!(parts(vec![2, 7], 7).is_ok());
        assert!(parts(vec![0, 0], 0).is_ok());
        // An expert stamped after the router's step.
        assert!(matches!(parts(vec![2, 8], 8), Err(Error::State(m)) if m.contains("expert 1")));
        // The module's last change is not its experts' latest.
        assert!(matches!(parts(vec![2, 5], 7), Err(Error::State(_))));
        assert!(matches!(parts(vec![2, 7], 5), Err(Error::State(_))));
        // Wrong length.
        assert!(matches!(parts(vec![7], 7), Err(Error::State(_))));
    }

    #[test]
    fn heldout_checks_its_inputs_and_policy() {
        let mut r = heldout(1, 2, 0);
        assert!(matches!(
            r.regate(&[1.0], &[1.0, 1.0]),
            Err(Error::Score(_))
        ));
        let mut t = Router::new(RouterConfig::topk(1, 2, 1)).unwrap();
        assert!(matches!(
            t.regate(&[1.0, 1.0], &[1.0, 1.0]),
            Err(Error::Config(_))
        ));
        // A change stamped after the router's step is impossible; at step 0 it is not.
        assert!(
            Router::from_parts(*r.config(), 0, vec![false, true], vec![1], vec![1, 0]).is_err()
        );
        assert!(Router::from_parts(*r.config(), 0, vec![false, true], vec![0], vec![0, 0]).is_ok());
    }

    #[test]
    fn heldout_frozen_phase_keeps_the_set() {
        let cfg = RouterConfig {
            policy: Policy::Heldout { k: 1, min_dwell: 0 },
            freeze_after: Some(1),
            ..RouterConfig::topk(1, 2, 1)
        };
        let mut r = Router::new(cfg).unwrap();
        let mut out = [false; 2];
        r.route(&[1.0f64, 1.0], &mut out).unwrap();
        assert_eq!(r.regate(&[-1.0, -1.0], &[0.0, 0.0]).unwrap(), 0);
        r.route(&[1.0f64, 1.0], &mut out).unwrap();
        assert_eq!(out, [true, true]);
    }
}
