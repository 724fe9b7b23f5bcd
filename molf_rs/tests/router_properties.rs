//! Property tests of the router against the naive reference model in `common`.

mod common;

use common::{config, config_and_steps, flatten, rows, score, RefRouter};
use molf_rs::{Forecast, Phase, Policy, Router, RouterConfig};
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestCaseError, TestRng, TestRunner};

fn route(r: &mut Router, scores: &[f64]) -> Vec<bool> {
    let mut out = vec![false; scores.len()];
    r.route(scores, &mut out).unwrap();
    out
}

/// A row of 6 scores whose finite values are pairwise distinct (non-finite ones may repeat).
fn distinct_row() -> impl Strategy<Value = Vec<f64>> {
    (
        Just((-50i32..50).collect::<Vec<_>>()).prop_shuffle(),
        prop::collection::vec(
            prop_oneof![6 => Just(None), 1 => Just(Some(f64::NAN)),
            1 => Just(Some(f64::INFINITY)), 1 => Just(Some(f64::NEG_INFINITY))],
            6,
        ),
        -1e3f64..1e3,
    )
        .prop_map(|(values, special, scale)| {
            values[..6]
                .iter()
                .zip(special)
                .map(|(&v, sp)| sp.unwrap_or(f64::from(v) * 0.37 + scale))
                .collect()
        })
}

/// Routes `steps` through a heldout router and the reference model, regating both after the
/// steps `measure` selects (the scores double as descent, their negation as potential), and
/// compares masks, active sets, module and expert last changes, and a `from_parts` rebuild.
/// Returns how many re-admissions only the per-expert dwell allowed.
fn check_heldout_against_reference(
    cfg: RouterConfig,
    steps: &[Vec<f64>],
    measure: &[bool],
) -> Result<u64, TestCaseError> {
    let cfg = RouterConfig {
        policy: Policy::Heldout {
            k: cfg.policy.k(),
            min_dwell: cfg.policy.min_dwell(),
        },
        ..cfg
    };
    let e = cfg.num_experts as usize;
    let mut r = Router::new(cfg).unwrap();
    let mut model = RefRouter::new(cfg);
    for (i, scores) in steps.iter().enumerate() {
        let warmup = r.phase() == Phase::Warmup;
        let got = route(&mut r, scores);
        let want = flatten(&model.route(&rows(scores, e)));
        prop_assert_eq!(&got, &want, "step {} scores {:?}", i, scores);
        // Outside warm-up a mask holds exactly the active experts with finite scores.
        for ((w, inc), x) in got.iter().zip(r.incumbents()).zip(scores) {
            prop_assert!(warmup || *w == (*inc && x.is_finite()));
        }
        if measure[i] {
            let potential: Vec<f64> = scores.iter().map(|x| -x).collect();
            let n = r.regate(scores, &potential).unwrap();
            let m = model.regate(&rows(scores, e), &rows(&potential, e));
            prop_assert_eq!(n, m, "step {}", i);
            prop_assert_eq!(r.incumbents().to_vec(), flatten(&model.incumbents));
            prop_assert_eq!(r.last_change(), model.last_change.as_slice());
            prop_assert_eq!(
                r.expert_last_change().to_vec(),
                model.expert_last_change.concat()
            );
            let back = Router::from_parts(
                cfg,
                r.step(),
                r.incumbents().to_vec(),
                r.last_change().to_vec(),
                r.expert_last_change().to_vec(),
            );
            prop_assert_eq!(back.unwrap(), r.clone());
        }
    }
    Ok(model.returns_only_per_expert)
}

/// The strategy of `heldout_regate_matches_reference_model` does reach states where the
/// per-expert dwell lets an expert back that the per-module one would have held: running
/// the same comparison over a fixed-seed sample finds such re-admissions.
#[test]
fn heldout_reference_comparison_exercises_the_per_expert_dwell() {
    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::with_cases(512),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let strategy = (
        config_and_steps(1..14),
        prop::collection::vec(any::<bool>(), 14),
    );
    let found = std::cell::Cell::new(0u64);
    runner
        .run(&strategy, |((cfg, steps), measure)| {
            found.set(found.get() + check_heldout_against_reference(cfg, &steps, &measure)?);
            Ok(())
        })
        .unwrap();
    assert!(
        found.get() > 0,
        "no re-admission depended on the per-expert dwell"
    );
}

fn fresh_routing(cfg: RouterConfig) -> Router {
    Router::new(RouterConfig {
        warmup_steps: 0,
        freeze_after: None,
        ..cfg
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn matches_reference_model((cfg, steps) in config_and_steps(1..14)) {
        let e = cfg.num_experts as usize;
        let mut r = Router::new(cfg).unwrap();
        let mut model = RefRouter::new(cfg);
        for (i, scores) in steps.iter().enumerate() {
            prop_assert_eq!(r.phase().name(), model.phase(), "phase before step {}", i);
            let got = route(&mut r, scores);
            let want = flatten(&model.route(&rows(scores, e)));
            prop_assert_eq!(&got, &want, "step {} scores {:?}", i, scores);
            prop_assert_eq!(r.step(), model.step);
            prop_assert_eq!(r.incumbents().to_vec(), flatten(&model.incumbents));
            prop_assert_eq!(r.last_change(), model.last_change.as_slice());
            prop_assert_eq!(r.expert_last_change(), model.expert_last_change.concat());
        }
    }

    #[test]
    fn heldout_regate_matches_reference_model(
        (cfg, steps) in config_and_steps(1..14),
        measure in prop::collection::vec(any::<bool>(), 14),
    ) {
        check_heldout_against_reference(cfg, &steps, &measure)?;
    }

    #[test]
    fn forecast_rule_gives_the_routed_mask(
        (cfg, steps) in config_and_steps(1..14),
        measure in prop::collection::vec(any::<bool>(), 14),
    ) {
        // Where `forecast` gives a rule, that rule applied to the scores is `route`'s mask,
        // through regates (policy heldout) and every phase.
        let e = cfg.num_experts as usize;
        let mut r = Router::new(cfg).unwrap();
        for (i, scores) in steps.iter().enumerate() {
            let forecast = r.forecast();
            let got = route(&mut r, scores);
            match forecast {
                Some(Forecast::Gated(mask)) => {
                    let want: Vec<bool> = mask.iter().zip(scores).map(|(&m, x)| m && x.is_finite()).collect();
                    prop_assert_eq!(&got, &want, "gated, step {} scores {:?}", i, scores);
                }
                Some(Forecast::Top1) => {
                    for (row, win) in scores.chunks(e).zip(got.chunks(e)) {
                        let best = (0..e).filter(|&j| row[j].is_finite()).fold(None, |b: Option<usize>, j| match b {
                            Some(b) if row[b] >= row[j] => Some(b),
                            _ => Some(j),
                        });
                        let want: Vec<bool> = (0..e).map(|j| Some(j) == best).collect();
                        prop_assert_eq!(win, want.as_slice(), "top1, step {} row {:?}", i, row);
                    }
                }
                None => prop_assert!(
                    matches!(cfg.policy, Policy::Hysteresis { .. } | Policy::TopK { .. }),
                    "no forecast under {:?} in phase {:?}", cfg.policy, r.phase()
                ),
            }
            if matches!(cfg.policy, Policy::Heldout { .. }) && measure[i] {
                let potential: Vec<f64> = scores.iter().map(|x| -x).collect();
                r.regate(scores, &potential).unwrap();
            }
        }
    }

    #[test]
    fn topk_routing_picks_min_k_finite((cfg, steps) in config_and_steps(1..2)) {
        let cfg = RouterConfig { policy: Policy::TopK { k: cfg.policy.k() }, ..cfg };
        let mut r = fresh_routing(cfg);
        let e = cfg.num_experts as usize;
        let out = route(&mut r, &steps[0]);
        for (row, win) in steps[0].chunks(e).zip(out.chunks(e)) {
            let finite = row.iter().filter(|x| x.is_finite()).count() as u64;
            let winners = win.iter().filter(|&&b| b).count() as u64;
            prop_assert_eq!(winners, finite.min(cfg.policy.k()));
            prop_assert!(row.iter().zip(win).all(|(x, &w)| !w || x.is_finite()));
        }
    }

    #[test]
    fn non_finite_never_wins((cfg, steps) in config_and_steps(1..12)) {
        let mut r = Router::new(cfg).unwrap();
        for scores in &steps {
            let out = route(&mut r, scores);
            prop_assert!(scores.iter().zip(&out).all(|(x, &w)| !w || x.is_finite()));
        }
    }

    #[test]
    fn equivariant_under_expert_permutation(
        cfg in config(),
        steps in prop::collection::vec(prop::collection::vec(distinct_row(), 4), 1..8),
        seed in any::<u64>(),
    ) {
        // Without ties among finite scores only the values decide, wherever they sit. Margin 0:
        // an adjusted incumbent score could otherwise tie with a challenger.
        let policy = match cfg.policy {
            Policy::Hysteresis { k, min_dwell, .. } => Policy::Hysteresis { k, margin: 0.0, min_dwell },
            p => p,
        };
        let cfg = RouterConfig { policy, ..cfg };
        let e = cfg.num_experts as usize;
        let mut perm: Vec<usize> = (0..e).collect();
        let mut x = seed;
        for i in (1..e).rev() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            perm.swap(i, (x >> 33) as usize % (i + 1));
        }
        let permute = |v: &[f64]| -> Vec<f64> {
            v.chunks(e).flat_map(|row| perm.iter().map(move |&p| row[p])).collect()
        };
        let mut a = Router::new(cfg).unwrap();
        let mut b = Router::new(cfg).unwrap();
        for s in &steps {
            let s: Vec<f64> = s[..cfg.num_modules as usize]
                .iter()
                .flat_map(|row| row[..e].to_vec())
                .collect();
            let wa = route(&mut a, &s);
            let wb = route(&mut b, &permute(&s));
            let wa_perm: Vec<bool> =
                wa.chunks(e).flat_map(|row| perm.iter().map(move |&p| row[p])).collect();
            prop_assert_eq!(wa_perm, wb);
        }
    }

    #[test]
    fn invariant_to_positive_row_scaling(
        cfg in config(),
        raw in prop::collection::vec(prop::collection::vec(
            prop_oneof![
                4 => (-3i32..=3).prop_map(f64::from),
                4 => -1e6f64..1e6,
                1 => Just(f64::NAN),
                1 => Just(f64::INFINITY),
                1 => Just(f64::NEG_INFINITY),
            ], 36), 1..10),
        exps in prop::collection::vec(-8i32..=8, 4),
    ) {
        // Powers of two scale exactly (no rounding, and no overflow or underflow at these
        // magnitudes), so ties and the margin comparison are preserved bit for bit.
        let n = (cfg.num_modules * cfg.num_experts) as usize;
        let e = cfg.num_experts as usize;
        let mut a = Router::new(cfg).unwrap();
        let mut b = Router::new(cfg).unwrap();
        for s in &raw {
            let s = &s[..n];
            let scaled: Vec<f64> = s
                .iter()
                .enumerate()
                .map(|(i, &x)| x * 2f64.powi(exps[i / e]))
                .collect();
            prop_assert_eq!(route(&mut a, s), route(&mut b, &scaled));
        }
    }

    #[test]
    fn monotone_in_own_score(
        (cfg, steps) in config_and_steps(1..8),
        target in any::<prop::sample::Index>(),
    ) {
        // In any state: raising a winner keeps it a winner, lowering a loser keeps it out.
        // Holds for margin <= 1 only: an incumbent's adjusted score s + margin·|s| is
        // s·(1 − margin) for s < 0, which decreases in s when margin > 1 (see the unit test
        // `hysteresis_margin_above_one_is_not_monotone_for_negative_scores` in router.rs).
        prop_assume!(cfg.policy.margin() <= 1.0);
        let mut r = Router::new(cfg).unwrap();
        let (last, prefix) = steps.split_last().unwrap();
        for s in prefix {
            route(&mut r, s);
        }
        let before = route(&mut r.clone(), last);
        let i = target.index(last.len());
        let x = last[i];
        prop_assume!(x.is_finite());
        let mut changed = last.clone();
        changed[i] = if before[i] { x + x.abs() + 1.0 } else { x - x.abs() - 1.0 };
        prop_assume!(changed[i].is_finite());
        let after = route(&mut r, &changed);
        prop_assert_eq!(after[i], before[i]);
    }

    #[test]
    fn serialise_restore_continues_identically(
        (cfg, steps) in config_and_steps(2..14),
        cut in any::<prop::sample::Index>(),
    ) {
        let cut = cut.index(steps.len());
        let mut a = Router::new(cfg).unwrap();
        for s in &steps[..cut] {
            route(&mut a, s);
        }
        let mut b = Router::from_bytes(&a.to_bytes()).unwrap();
        prop_assert_eq!(&a, &b);
        for s in &steps[cut..] {
            prop_assert_eq!(route(&mut a, s), route(&mut b, s));
        }
        prop_assert_eq!(&a, &b);
    }

    #[test]
    fn f32_routes_like_its_f64_widening((cfg, steps) in config_and_steps(1..8)) {
        let mut a = Router::new(cfg).unwrap();
        let mut b = Router::new(cfg).unwrap();
        for s in &steps {
            let narrow: Vec<f32> = s.iter().map(|&x| x as f32).collect();
            let wide: Vec<f64> = narrow.iter().map(|&x| f64::from(x)).collect();
            let mut out = vec![false; s.len()];
            a.route(&narrow, &mut out).unwrap();
            prop_assert_eq!(out, route(&mut b, &wide));
        }
    }

    #[test]
    fn deterministic((cfg, steps) in config_and_steps(1..8)) {
        let mut a = Router::new(cfg).unwrap();
        let mut b = Router::new(cfg).unwrap();
        for s in &steps {
            prop_assert_eq!(route(&mut a, s), route(&mut b, s));
        }
    }

    #[test]
    fn warmup_routes_every_finite_expert(cfg in config(), s in prop::collection::vec(score(), 36)) {
        let cfg = RouterConfig { warmup_steps: cfg.warmup_steps.max(1), freeze_after: None, ..cfg };
        let mut r = Router::new(cfg).unwrap();
        prop_assert_eq!(r.phase(), Phase::Warmup);
        let s = &s[..(cfg.num_modules * cfg.num_experts) as usize];
        let out = route(&mut r, s);
        prop_assert!(s.iter().zip(&out).all(|(x, &w)| w == x.is_finite()));
        // Warm-up sets no incumbent; policy heldout starts with every expert active.
        let heldout = cfg.policy.is_heldout();
        prop_assert!(r.incumbents().iter().all(|&b| b == heldout));
    }
}
