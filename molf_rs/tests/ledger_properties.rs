//! Property tests of the ledger against the naive reference model in `common`.

mod common;

use common::{config_and_steps, heldout_decay, heldout_horizon, rows, RefLedger};
use molf_rs::{Ledger, RateRule, Router};
use proptest::prelude::*;

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn matches_reference_model(
        (cfg, steps) in config_and_steps(1..14),
        decay in prop_oneof![Just(0.0), Just(0.9), 0.0f64..1.0],
        random_masks in any::<bool>(),
        mask_bits in prop::collection::vec(any::<bool>(), 14 * 24),
        (hdecay, horizon) in (heldout_decay(), heldout_horizon()),
        windows in prop::collection::vec(any::<bool>(), 14),
        min_span in 0u64..5,
    ) {
        let (m, e) = (cfg.num_modules as usize, cfg.num_experts as usize);
        let mut router = Router::new(cfg).unwrap();
        let mut ledger = Ledger::new(cfg.num_modules, cfg.num_experts, decay)
            .unwrap()
            .with_heldout_decay(hdecay)
            .unwrap()
            .with_heldout_horizon(horizon)
            .unwrap()
            .with_heldout_min_span(min_span)
            .unwrap();
        let mut model = RefLedger::new(m, e, decay, hdecay, horizon);
        for (i, scores) in steps.iter().enumerate() {
            // Either the router's decisions or arbitrary masks (empty rows, many winners).
            let mask: Vec<bool> = if random_masks {
                mask_bits[i * m * e..(i + 1) * m * e].to_vec()
            } else {
                let mut out = vec![false; m * e];
                router.route(scores, &mut out).unwrap();
                out
            };
            let mask_rows: Vec<Vec<bool>> = mask.chunks(e).map(<[bool]>::to_vec).collect();
            ledger.record(scores, &mask).unwrap();
            model.record(&rows(scores, e), &mask_rows);
            if windows[i] {
                // The scores double as held-out descent, the mask as which experts moved.
                ledger.record_heldout(scores, &mask).unwrap();
                model.record_heldout(&rows(scores, e), &mask_rows);
            }
            prop_assert_eq!(ledger.heldout().windows(), model.heldout_windows);
            prop_assert_eq!(bits(ledger.heldout().ema()), bits(&model.heldout_ema.concat()));
            prop_assert_eq!(ledger.heldout().span().to_vec(), model.heldout_span.concat());
            // The record as regate judges it: the EMA once the span reaches min_span, else NaN.
            let judged: Vec<f64> = model.heldout_ema.concat().iter().zip(model.heldout_span.concat())
                .map(|(&x, n)| if n >= min_span { x } else { f64::NAN })
                .collect();
            prop_assert_eq!(bits(&ledger.heldout().descent()), bits(&judged));
            prop_assert_eq!(ledger.step(), model.step);
            prop_assert_eq!(ledger.checksum(), model.checksum);
            prop_assert_eq!(bits(ledger.last_scores()), bits(&model.last_scores.concat()));
            prop_assert_eq!(bits(ledger.ema()), bits(&model.ema.concat()));
            prop_assert_eq!(ledger.wins().to_vec(), model.wins.concat());
            prop_assert_eq!(ledger.switches(), model.switches.as_slice());
            prop_assert_eq!(ledger.last_switch_step(), model.last_switch_step.as_slice());
            prop_assert_eq!(ledger.no_winner(), model.no_winner.as_slice());
            let last_mask: Vec<bool> = model
                .prev
                .iter()
                .flat_map(|p| p.clone().unwrap_or(vec![false; e]))
                .collect();
            prop_assert_eq!(ledger.last_mask(), last_mask.as_slice());
            // Summary, from the model.
            let s = ledger.summary();
            let total: u64 = model.wins.iter().flatten().sum();
            for j in 0..e {
                let w: u64 = model.wins.iter().map(|r| r[j]).sum();
                let share = if total == 0 { 0.0 } else { w as f64 / total as f64 };
                prop_assert_eq!(s.win_share[j], share);
                let cur = model.prev.iter().filter(|p| p.as_ref().is_some_and(|p| p[j])).count();
                prop_assert_eq!(s.current_share[j], cur as f64 / m as f64);
            }
            let switches: u64 = model.switches.iter().sum();
            prop_assert_eq!(s.switches, switches);
            let denom = (m as u64 * model.step.saturating_sub(1).max(1)) as f64;
            prop_assert_eq!(s.switch_rate, switches as f64 / denom);
            prop_assert_eq!(s.no_winner_events, model.no_winner.iter().sum::<u64>());
        }
        let back = Ledger::from_bytes(&ledger.to_bytes()).unwrap();
        prop_assert_eq!(&back, &ledger);
    }
}

/// A window's realized descent for the rate rule: mostly signed values, with zeros, NaNs and
/// infinities among them.
fn descent_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => -1.0f64..1.0,
        1 => Just(0.0),
        1 => Just(-0.0),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The rate multipliers follow the plain rule, window by window: up by `up` to `cap`
    /// where the window descended by at least `trust` × the potential (any descent with
    /// `trust` 0), down by `down` to `floor` where it ascended, as they were otherwise; all 1
    /// with the adaptation off; and a round trip keeps them.
    #[test]
    fn rate_multipliers_match_the_plain_rule(
        (m, e) in (1usize..4, 1usize..4),
        adapt in any::<bool>(),
        up in prop_oneof![Just(1.0), Just(1.2), 1.0f64..3.0],
        down in prop_oneof![Just(1.0), Just(0.5), 0.05f64..=1.0],
        cap in prop_oneof![Just(1.0), Just(3.0), 1.0f64..10.0],
        floor in prop_oneof![Just(0.0), Just(1.0), 0.0f64..=1.0],
        trust in prop_oneof![Just(0.0), Just(0.8), 0.0f64..3.0],
        windows in prop::collection::vec(
            (prop::collection::vec(descent_value(), 9), prop::collection::vec(descent_value(), 9)),
            1..40,
        ),
    ) {
        let n = m * e;
        let rule = RateRule { adapt, up, down, cap, floor, trust };
        let mut ledger = Ledger::new(m as u64, e as u64, 0.9).unwrap().with_heldout_rate(rule).unwrap();
        let mut want = vec![1.0f64; n];
        for (w, p) in &windows {
            let (descent, potential) = (&w[..n], &p[..n]);
            ledger.record_heldout(descent, &vec![true; n]).unwrap();
            ledger.adapt_heldout_rate(descent, potential).unwrap();
            if adapt {
                for ((c, &x), &p) in want.iter_mut().zip(descent).zip(potential) {
                    let trusted = trust == 0.0 || (p.is_finite() && p > 0.0 && x >= trust * p);
                    if x > 0.0 && trusted {
                        *c = f64::min(*c * up, cap);
                    } else if x < 0.0 {
                        *c = f64::max(*c * down, floor);
                    }
                }
            }
            prop_assert_eq!(bits(ledger.heldout().rate()), bits(&want));
            prop_assert!(want.iter().all(|&c| (floor..=cap).contains(&c)));
        }
        let back = Ledger::from_bytes(&ledger.to_bytes()).unwrap();
        prop_assert_eq!(bits(back.heldout().rate()), bits(&want));
        prop_assert_eq!(&back, &ledger);
    }

    /// With the default floor (1) a multiplier never leaves [1, cap], whatever the windows
    /// measure: the rule only ever raises an expert's rate above the set one, and a window
    /// of ascent takes back at most what earlier ones gave.
    #[test]
    fn default_floor_keeps_the_set_rate(
        up in prop_oneof![Just(1.1), 1.0f64..3.0],
        down in prop_oneof![Just(0.5), 0.01f64..=1.0],
        cap in prop_oneof![Just(2.0), 1.0f64..10.0],
        windows in prop::collection::vec(prop::collection::vec(descent_value(), 4), 1..60),
    ) {
        let rule = RateRule { adapt: true, up, down, cap, ..RateRule::default() };
        prop_assert_eq!(rule.floor, 1.0);
        let mut ledger = Ledger::new(2, 2, 0.9).unwrap().with_heldout_rate(rule).unwrap();
        for descent in &windows {
            ledger.record_heldout(descent, &[true; 4]).unwrap();
            // A potential each window's descent meets (the trust condition holds).
            let potential: Vec<f64> = descent.iter().map(|x| x.abs()).collect();
            ledger.adapt_heldout_rate(descent, &potential).unwrap();
            prop_assert!(ledger.heldout().rate().iter().all(|&c| (1.0..=cap).contains(&c)), "{:?}", ledger.heldout().rate());
        }
        // Where the last window measured ascent, the multiplier is back at max(c·down, 1).
        let last = windows.last().unwrap();
        for (&c, &x) in ledger.heldout().rate().iter().zip(last) {
            if x < 0.0 && down * cap <= 1.0 {
                prop_assert_eq!(c, 1.0);
            }
        }
    }
}
