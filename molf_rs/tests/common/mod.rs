//! Naive reference models of the router and ledger, written straight from the specification
//! (sorting instead of rank counting, per-row vectors instead of flat buffers), plus proptest
//! strategies shared by the property tests.
#![allow(dead_code)] // each test binary uses a different subset

use molf_rs::{Policy, RouterConfig};
use proptest::prelude::*;

pub struct RefRouter {
    pub cfg: RouterConfig,
    pub step: u64,
    pub incumbents: Vec<Vec<bool>>,
    pub last_change: Vec<u64>,
    /// Policy heldout: per module and expert, the step of its last flip in `regate`.
    pub expert_last_change: Vec<Vec<u64>>,
    /// Returns `regate` allowed that the per-module dwell (counted from the module's last
    /// change, the rule before the per-expert one) would have held back.
    pub returns_only_per_expert: u64,
}

pub fn ref_top_k(row: &[f64], k: u64, pref: Option<(&[bool], f64)>) -> Vec<bool> {
    let key = |e: usize| match pref {
        Some((inc, margin)) if inc[e] => (row[e] + margin * row[e].abs(), 1u8),
        _ => (row[e], 0u8),
    };
    let mut order: Vec<usize> = (0..row.len()).filter(|&e| row[e].is_finite()).collect();
    order.sort_by(|&a, &b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.partial_cmp(&ka.0)
            .unwrap()
            .then(kb.1.cmp(&ka.1))
            .then(a.cmp(&b))
    });
    let mut out = vec![false; row.len()];
    for &e in order.iter().take(k.min(row.len() as u64) as usize) {
        out[e] = true;
    }
    out
}

impl RefRouter {
    pub fn new(cfg: RouterConfig) -> Self {
        let (m, e) = (cfg.num_modules as usize, cfg.num_experts as usize);
        RefRouter {
            cfg,
            step: 0,
            // Policy heldout starts with every expert active.
            incumbents: vec![vec![cfg.policy.is_heldout(); e]; m],
            last_change: vec![0; m],
            expert_last_change: vec![vec![0; e]; m],
            returns_only_per_expert: 0,
        }
    }

    pub fn phase(&self) -> &'static str {
        let s = self.step;
        if s < self.cfg.warmup_steps {
            "warmup"
        } else if self.cfg.freeze_after.is_some_and(|f| s >= f) {
            "frozen"
        } else {
            "routing"
        }
    }

    pub fn route(&mut self, scores: &[Vec<f64>]) -> Vec<Vec<bool>> {
        let s = self.step;
        let phase = self.phase();
        let mut out = Vec::new();
        for (m, row) in scores.iter().enumerate() {
            let finite: Vec<bool> = row.iter().map(|x| x.is_finite()).collect();
            let inc = self.incumbents[m].clone();
            let has_inc = inc.iter().any(|&b| b);
            let held: Vec<bool> = inc.iter().zip(&finite).map(|(&i, &f)| i && f).collect();
            let win = match phase {
                "warmup" => finite.clone(),
                _ if self.cfg.policy.is_heldout() => held,
                "frozen" if has_inc => held,
                "frozen" => ref_top_k(row, self.cfg.policy.k(), None),
                _ => match self.cfg.policy {
                    Policy::TopK { k } => ref_top_k(row, k, None),
                    Policy::Heldout { .. } => unreachable!("handled above"),
                    Policy::Hysteresis {
                        k,
                        margin,
                        min_dwell,
                    } => {
                        if has_inc && held.iter().any(|&b| b) && s - self.last_change[m] < min_dwell
                        {
                            held
                        } else if has_inc {
                            ref_top_k(row, k, Some((&inc, margin)))
                        } else {
                            ref_top_k(row, k, None)
                        }
                    }
                },
            };
            let routes = !self.cfg.policy.is_heldout();
            if routes && phase == "routing" && win.iter().any(|&b| b) && win != inc {
                self.incumbents[m] = win.clone();
                self.last_change[m] = s;
            }
            out.push(win);
        }
        self.step += 1;
        out
    }

    /// Policy heldout: keep an active expert unless its descent is <= 0 (NaN keeps it);
    /// bring a dropped one back when its potential is finite and > 0 and that expert last
    /// changed >= min_dwell steps ago. Each flip stamps the expert and its module with the
    /// step. Nothing changes when frozen.
    pub fn regate(&mut self, descent: &[Vec<f64>], potential: &[Vec<f64>]) -> usize {
        if self.phase() == "frozen" {
            return 0;
        }
        let (s, dwell) = (self.step, self.cfg.policy.min_dwell());
        let mut changed = 0;
        for m in 0..self.incumbents.len() {
            let module_may_return = s - self.last_change[m] >= dwell;
            let mut new = self.incumbents[m].clone();
            for (e, next) in new.iter_mut().enumerate() {
                let (d, p) = (descent[m][e], potential[m][e]);
                *next = if self.incumbents[m][e] {
                    d.is_nan() || d > 0.0
                } else {
                    let may_return = s - self.expert_last_change[m][e] >= dwell;
                    let wants = p.is_finite() && p > 0.0;
                    if may_return && wants && !module_may_return {
                        self.returns_only_per_expert += 1;
                    }
                    may_return && wants
                };
                if *next != self.incumbents[m][e] {
                    self.expert_last_change[m][e] = s;
                }
            }
            if new != self.incumbents[m] {
                self.incumbents[m] = new;
                self.last_change[m] = self.step;
                changed += 1;
            }
        }
        changed
    }
}

/// A score drawn to hit the hard cases: ties (small integers), NaN, ±Inf, subnormals,
/// extreme magnitudes, signed zeros, and arbitrary finite values.
pub fn score() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => (-3i32..=3).prop_map(f64::from),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(-0.0),
        1 => prop_oneof![Just(f64::MIN_POSITIVE / 4.0), Just(-5e-324), Just(5e-324)],
        1 => prop_oneof![Just(f64::MAX), Just(-f64::MAX), Just(1e300), Just(1e-300)],
        3 => proptest::num::f64::NORMAL,
    ]
}

pub fn config() -> impl Strategy<Value = RouterConfig> {
    (
        1u64..5,
        1u64..7,
        1u64..8,
        prop_oneof![Just(0.0), Just(0.1), Just(0.5), Just(2.0), 0.0f64..3.0],
        0u64..4,
        0u64..4,
        prop::option::of(1u64..8),
        0u8..3,
    )
        .prop_map(
            |(m, e, k, margin, dwell, warmup, freeze, policy)| RouterConfig {
                num_modules: m,
                num_experts: e,
                policy: match policy {
                    0 => Policy::TopK { k },
                    1 => Policy::Hysteresis {
                        k,
                        margin,
                        min_dwell: dwell,
                    },
                    _ => Policy::Heldout {
                        k,
                        min_dwell: dwell,
                    },
                },
                warmup_steps: warmup,
                freeze_after: freeze.map(|f| warmup + f),
            },
        )
}

/// A config and `steps` score matrices (row-major flat) of its shape.
pub fn config_and_steps(
    steps: std::ops::Range<usize>,
) -> impl Strategy<Value = (RouterConfig, Vec<Vec<f64>>)> {
    config().prop_flat_map(move |cfg| {
        let n = (cfg.num_modules * cfg.num_experts) as usize;
        (
            Just(cfg),
            prop::collection::vec(prop::collection::vec(score(), n), steps.clone()),
        )
    })
}

pub fn rows(flat: &[f64], e: usize) -> Vec<Vec<f64>> {
    flat.chunks(e).map(<[f64]>::to_vec).collect()
}

pub fn flatten(rows: &[Vec<bool>]) -> Vec<bool> {
    rows.concat()
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// A held-out decay: the default, the extremes, or any value in [0, 1).
pub fn heldout_decay() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.5), Just(0.0), 0.0f64..1.0]
}

/// A held-out horizon: 0 (the fixed decay) sometimes, else any value in [0, 0.999).
pub fn heldout_horizon() -> impl Strategy<Value = f64> {
    prop_oneof![1 => Just(0.0), 1 => Just(0.25), 3 => 0.0f64..0.999]
}

/// The ledger, per module, straight from the specification.
#[derive(Debug, Clone)]
pub struct RefLedger {
    pub decay: f64,
    pub step: u64,
    pub checksum: u64,
    pub last_scores: Vec<Vec<f64>>,
    pub ema: Vec<Vec<f64>>,
    pub wins: Vec<Vec<u64>>,
    pub switches: Vec<u64>,
    pub last_switch_step: Vec<i64>,
    pub no_winner: Vec<u64>,
    pub prev: Vec<Option<Vec<bool>>>,
    pub heldout_decay: f64,
    pub heldout_horizon: f64,
    pub heldout_windows: u64,
    pub heldout_ema: Vec<Vec<f64>>,
    /// Per module and expert: how many windows in a row, up to the last, it moved in.
    pub heldout_span: Vec<Vec<u64>>,
}

impl RefLedger {
    pub fn new(m: usize, e: usize, decay: f64, heldout_decay: f64, heldout_horizon: f64) -> Self {
        RefLedger {
            decay,
            step: 0,
            checksum: 0,
            last_scores: vec![vec![f64::NAN; e]; m],
            ema: vec![vec![f64::NAN; e]; m],
            wins: vec![vec![0; e]; m],
            switches: vec![0; m],
            last_switch_step: vec![-1; m],
            no_winner: vec![0; m],
            prev: vec![None; m],
            heldout_decay,
            heldout_horizon,
            heldout_windows: 0,
            heldout_ema: vec![vec![f64::NAN; e]; m],
            heldout_span: vec![vec![0; e]; m],
        }
    }

    /// An expert's span is the number of windows in a row, this one included, in which it
    /// moved (a window it did not move in resets it to 0, whatever its value). With span n
    /// its EMA decays by `heldout_decay`, or with a horizon h > 0 by
    /// `max(heldout_decay, 1 - (1/h - 1)/n)`; only experts that moved with a finite value
    /// update (the first such value initialises), but every call counts as a window.
    pub fn record_heldout(&mut self, descent: &[Vec<f64>], moved: &[Vec<bool>]) {
        let h = self.heldout_horizon;
        for m in 0..descent.len() {
            for (e, &x) in descent[m].iter().enumerate() {
                let span = &mut self.heldout_span[m][e];
                *span = if moved[m][e] { *span + 1 } else { 0 };
                let n = *span as f64;
                let d = if h == 0.0 {
                    self.heldout_decay
                } else {
                    f64::max(self.heldout_decay, 1.0 - (1.0 / h - 1.0) / n)
                };
                if moved[m][e] && x.is_finite() {
                    let old = self.heldout_ema[m][e];
                    self.heldout_ema[m][e] = if old.is_nan() {
                        x
                    } else {
                        d * old + (1.0 - d) * x
                    };
                }
            }
        }
        self.heldout_windows += 1;
    }

    pub fn record(&mut self, scores: &[Vec<f64>], mask: &[Vec<bool>]) {
        let s = self.step;
        for m in 0..scores.len() {
            for (e, &x) in scores[m].iter().enumerate() {
                self.last_scores[m][e] = x;
                if x.is_finite() {
                    let old = self.ema[m][e];
                    self.ema[m][e] = if old.is_nan() {
                        x
                    } else {
                        self.decay * old + (1.0 - self.decay) * x
                    };
                }
                self.wins[m][e] += u64::from(mask[m][e]);
            }
            if !mask[m].iter().any(|&b| b) {
                self.no_winner[m] += 1;
                continue;
            }
            if self.prev[m].as_ref().is_some_and(|p| p != &mask[m]) {
                self.switches[m] += 1;
                self.last_switch_step[m] = s as i64;
            }
            self.prev[m] = Some(mask[m].clone());
        }
        let mut bytes = self.checksum.to_le_bytes().to_vec();
        bytes.extend(s.to_le_bytes());
        bytes.extend(mask.iter().flatten().map(|&b| u8::from(b)));
        self.checksum = fnv1a64(&bytes);
        self.step += 1;
    }
}
