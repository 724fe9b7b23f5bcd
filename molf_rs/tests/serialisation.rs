//! The byte format: exact round trips, and no input whatsoever makes `from_bytes` panic.

mod common;

use common::{config_and_steps, fnv1a64, heldout_horizon};
use molf_rs::{Error, Ledger, RateRule, Router};
use proptest::prelude::*;

/// A router and a ledger that have seen a few steps (and held-out windows, which regate a
/// heldout router: the steps' scores double as measurements), and their serialisations.
fn states() -> impl Strategy<Value = (Router, Ledger)> {
    (
        config_and_steps(0..6),
        0.0f64..1.0,
        heldout_horizon(),
        any::<u8>(),
        // One shrink fraction for every expert, or (cycled) one per expert.
        prop::collection::vec(prop_oneof![Just(0.0), 0.0f64..1.0], 1..4),
        // And likewise the shrink trials per measurement.
        prop::collection::vec(1u64..=16, 1..4),
        prop::collection::vec((any::<u8>(), -1.0f64..1.0), 0..6),
        any::<bool>(),
        0u64..4,
        (
            any::<bool>(),
            1.0f64..2.0,
            0.1f64..=1.0,
            1.0f64..4.0,
            prop_oneof![Just(0.0), Just(1.0), 0.0f64..=1.0],
            prop_oneof![Just(0.0), Just(0.8), 0.0f64..2.0],
        ),
    )
        .prop_map(
            |(
                (cfg, steps),
                decay,
                horizon,
                windows,
                shrink,
                shrink_steps,
                trials,
                spectral,
                min_span,
                rate,
            )| {
                let (adapt, up, down, cap, floor, trust) = rate;
                let shrink: Vec<f64> = match shrink.len() {
                    1 => shrink,
                    n => (0..cfg.num_experts as usize)
                        .map(|e| shrink[e % n])
                        .collect(),
                };
                let shrink_steps: Vec<u64> = match shrink_steps.len() {
                    1 => shrink_steps,
                    n => (0..cfg.num_experts as usize)
                        .map(|e| shrink_steps[e % n])
                        .collect(),
                };
                let mut r = Router::new(cfg).unwrap();
                let mut l = Ledger::new(cfg.num_modules, cfg.num_experts, decay)
                    .unwrap()
                    .with_heldout_decay(decay)
                    .unwrap()
                    .with_heldout_horizon(horizon)
                    .unwrap()
                    .with_heldout_shrink(&shrink)
                    .unwrap()
                    .with_heldout_shrink_steps(&shrink_steps)
                    .unwrap()
                    .with_shrink_spectral(spectral)
                    .with_heldout_min_span(min_span)
                    .unwrap()
                    .with_heldout_rate(RateRule {
                        adapt,
                        up,
                        down,
                        cap,
                        floor,
                        trust,
                    })
                    .unwrap();
                for (e, loss) in trials {
                    let e = usize::from(e) % l.num_experts();
                    if shrink[e % shrink.len()] > 0.0 {
                        l.record_shrink(e, 0.0, loss).unwrap();
                    }
                }
                for (i, s) in steps.iter().enumerate() {
                    let mut out = vec![false; s.len()];
                    r.route(s, &mut out).unwrap();
                    l.record(s, &out).unwrap();
                    if windows >> (i % 8) & 1 == 1 {
                        l.record_heldout(s, &out).unwrap();
                        let potential: Vec<f64> = s.iter().map(|x| -x).collect();
                        l.adapt_heldout_rate(s, &potential).unwrap();
                        if cfg.policy.is_heldout() {
                            r.regate(&l.heldout().descent(), &potential).unwrap();
                        }
                    }
                }
                (r, l)
            },
        )
}

/// Wraps `payload` in a valid envelope of the given kind and version.
fn seal(kind: u8, version: u16, payload: &[u8]) -> Vec<u8> {
    let mut blob = b"MOLF".to_vec();
    blob.push(kind);
    blob.extend(version.to_le_bytes());
    blob.extend((payload.len() as u64).to_le_bytes());
    blob.extend(payload);
    blob.extend([0; 8]);
    reseal(blob)
}

/// Re-seals a modified blob with a valid checksum, to reach the payload decoder.
fn reseal(mut blob: Vec<u8>) -> Vec<u8> {
    if blob.len() >= 8 {
        let n = blob.len() - 8;
        let sum = fnv1a64(&blob[..n]);
        blob[n..].copy_from_slice(&sum.to_le_bytes());
    }
    blob
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trips_are_exact((r, l) in states()) {
        let rb = r.to_bytes();
        let lb = l.to_bytes();
        let r2 = Router::from_bytes(&rb).unwrap();
        let l2 = Ledger::from_bytes(&lb).unwrap();
        prop_assert_eq!(&r2, &r);
        prop_assert_eq!(&l2, &l);
        prop_assert_eq!(r2.to_bytes(), rb);
        prop_assert_eq!(&l2.to_bytes(), &lb);
        prop_assert_eq!(l2.heldout().span(), l.heldout().span());
        // The ledger payload ends with the spans, u64 × (M·E), then the shrink per expert,
        // f64 × E, the shrink steps and the shrink counters, u64 × E each, the kind of LoRA trial, one byte, the
        // minimum span, u64, and the rate adaptation: its flag, one byte, up, down, cap,
        // floor and trust, f64, and the multipliers, f64 × (M·E), before the checksum.
        let n = l.num_modules() * l.num_experts();
        let rate_tail = 1 + 40 + 8 * n;
        let tail = 32 * l.num_experts() + 1 + 8 + rate_tail;
        let r_at = lb.len() - 8 - rate_tail;
        let rule = l.heldout().rate_rule();
        prop_assert_eq!(lb[r_at], u8::from(rule.adapt));
        let words: Vec<u64> = lb[r_at + 1..lb.len() - 8]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want: Vec<u64> = [rule.up, rule.down, rule.cap, rule.floor, rule.trust].iter().chain(l.heldout().rate()).map(|x| x.to_bits()).collect();
        prop_assert_eq!(words, want);
        prop_assert_eq!(l2.heldout().rate_rule(), rule);
        prop_assert!(rule.adapt || l.heldout().rate().iter().all(|&c| c == 1.0));
        prop_assert_eq!(lb[r_at - 8..r_at].to_vec(), l.heldout().min_span().to_le_bytes().to_vec());
        prop_assert_eq!(lb[r_at - 9], u8::from(l.heldout().shrink_spectral()));
        prop_assert_eq!(l2.heldout().shrink_spectral(), l.heldout().shrink_spectral());
        prop_assert_eq!(l2.heldout().min_span(), l.heldout().min_span());
        let end = lb.len() - 8 - tail;
        let spans: Vec<u64> = lb[end - 8 * n..end]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        prop_assert_eq!(spans.as_slice(), l.heldout().span());
        prop_assert!(l.heldout().span().iter().all(|&s| s <= l.heldout().windows()));
        let e = l.num_experts();
        let steps: Vec<u64> = lb[end + 8 * e..end + 16 * e]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        prop_assert_eq!(steps.as_slice(), l.heldout().shrink_steps());
        prop_assert_eq!(l2.heldout().shrink_steps(), l.heldout().shrink_steps());
        prop_assert_eq!(l2.heldout().shrink_trials(), l.heldout().shrink_trials());
        prop_assert_eq!(l2.heldout().shrinks(), l.heldout().shrinks());
        prop_assert!(l.heldout().shrinks().iter().zip(l.heldout().shrink_trials()).all(|(k, t)| k <= t));
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Router::from_bytes(&data);
        let _ = Ledger::from_bytes(&data);
        // A valid envelope around random payload bytes reaches the payload decoder.
        let _ = Router::from_bytes(&seal(1, 1, &data));
        for version in [1, 2, 3] {
            let _ = Ledger::from_bytes(&seal(2, version, &data));
        }
    }

    #[test]
    fn truncation_is_rejected((r, l) in states(), cut in any::<prop::sample::Index>()) {
        let rb = r.to_bytes();
        let lb = l.to_bytes();
        prop_assert!(matches!(Router::from_bytes(&rb[..cut.index(rb.len())]), Err(Error::State(_))));
        prop_assert!(matches!(Ledger::from_bytes(&lb[..cut.index(lb.len())]), Err(Error::State(_))));
    }

    #[test]
    fn any_single_bit_flip_is_rejected(
        (r, l) in states(),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        // FNV-1a detects every single-byte change: each step is a bijection of the state.
        for blob in [r.to_bytes(), l.to_bytes()] {
            let mut bad = blob.clone();
            let i = pos.index(bad.len());
            bad[i] ^= 1 << bit;
            prop_assert!(matches!(Router::from_bytes(&bad), Err(Error::State(_))));
            prop_assert!(matches!(Ledger::from_bytes(&bad), Err(Error::State(_))));
        }
    }

    #[test]
    fn resealed_tampering_decodes_canonically_or_fails(
        (r, l) in states(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        // With a valid checksum the payload decoder and invariant checks are on their own:
        // they must never panic, and whatever they accept must re-encode to the same bytes.
        let (mut rb, mut lb) = (r.to_bytes(), l.to_bytes());
        for (i, v) in &edits {
            let ri = 15 + i.index(rb.len() - 23);
            rb[ri] = *v;
            let li = 15 + i.index(lb.len() - 23);
            lb[li] = *v;
        }
        let (rb, lb) = (reseal(rb), reseal(lb));
        if let Ok(x) = Router::from_bytes(&rb) {
            prop_assert_eq!(x.to_bytes(), rb);
        }
        if let Ok(x) = Ledger::from_bytes(&lb) {
            prop_assert_eq!(x.to_bytes(), lb);
        }
    }

    #[test]
    fn wrong_kind_and_version_are_rejected((r, l) in states(), version in 5u16..) {
        let msg = |e: Error| e.to_string();
        prop_assert!(msg(Ledger::from_bytes(&r.to_bytes()).unwrap_err()).contains("is a router"));
        prop_assert!(msg(Router::from_bytes(&l.to_bytes()).unwrap_err()).contains("is a ledger"));
        // A router is read in version 1, a ledger in 1 to 4.
        for (v, supported) in [(2, "[1]"), (version, "[1]")] {
            let mut rb = r.to_bytes();
            rb[5..7].copy_from_slice(&v.to_le_bytes());
            let m = msg(Router::from_bytes(&reseal(rb)).unwrap_err());
            prop_assert!(m.contains(&format!("version {v}")) && m.contains(&format!("supported versions: {supported}")), "{}", m);
        }
        let mut lb = l.to_bytes();
        lb[5..7].copy_from_slice(&version.to_le_bytes());
        let m = msg(Ledger::from_bytes(&reseal(lb)).unwrap_err());
        prop_assert!(m.contains(&format!("version {version}")) && m.contains("supported versions: [1, 2, 3, 4]"), "{}", m);
    }
}

#[test]
fn version_zero_and_bad_magic_are_rejected() {
    let r = Router::new(molf_rs::RouterConfig::topk(1, 1, 1)).unwrap();
    let mut b = r.to_bytes();
    b[5] = 0;
    assert!(Router::from_bytes(&reseal(b.clone()))
        .unwrap_err()
        .to_string()
        .contains("version 0"));
    b = r.to_bytes();
    b[0] = b'X';
    assert!(Router::from_bytes(&reseal(b))
        .unwrap_err()
        .to_string()
        .contains("magic"));
}
