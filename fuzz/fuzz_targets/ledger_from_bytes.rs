//! Any byte string given to `Ledger::from_bytes` returns Ok or Err, never panics; whatever
//! is accepted re-encodes to exactly the same bytes and can record (scores, a held-out
//! window and a shrink trial) and summarise.
#![no_main]

use libfuzzer_sys::fuzz_target;
use molf_rs::serial::Fnv1a;
use molf_rs::heldout::MAX_SHRINK_STEPS;
use molf_rs::Ledger;

/// Replaces the trailing checksum with the correct one, so mutations reach the payload decoder
/// and the invariant checks instead of stopping at the checksum.
fn resealed(data: &[u8]) -> Vec<u8> {
    let mut blob = data.to_vec();
    if let Some(n) = blob.len().checked_sub(8) {
        let mut h = Fnv1a::new();
        h.write(&blob[..n]);
        blob[n..].copy_from_slice(&h.finish().to_le_bytes());
    }
    blob
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&resealed(data));
});

fn check(data: &[u8]) {
    if let Ok(mut ledger) = Ledger::from_bytes(data) {
        if data[5..7] != [3, 0] {
            // An older ledger (version 1 or 2) is written again as the current version,
            // which reads back to the same state.
            let again = ledger.to_bytes();
            assert_eq!(Ledger::from_bytes(&again).unwrap(), ledger);
        } else {
            assert_eq!(ledger.to_bytes(), data, "accepted state must be canonical");
        }
        let n = ledger.num_modules() * ledger.num_experts();
        if n <= 1 << 16 {
            let _ = ledger.record(&vec![0.5f32; n], &vec![true; n]);
            let _ = ledger.summary();
            // Every decoded span is at most the window count, so one more window cannot
            // overflow it.
            let moved: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
            if ledger.record_heldout(&vec![0.5; n], &moved).is_ok() {
                let windows = ledger.heldout().windows();
                assert!(ledger.heldout().span().iter().all(|&s| s <= windows));
                // The multipliers stay within [floor, cap] and the state within its
                // invariants, after a window of descent (trusted where the potential is
                // 0.5, not where it is NaN) and one of ascent.
                let rule = ledger.heldout().rate_rule();
                let in_range = |l: &Ledger| {
                    l.heldout()
                        .rate()
                        .iter()
                        .all(|&c| (rule.floor..=rule.cap).contains(&c))
                };
                let potential: Vec<f64> = (0..n)
                    .map(|i| if i % 3 == 0 { f64::NAN } else { 0.5 })
                    .collect();
                ledger.adapt_heldout_rate(&vec![0.5; n], &potential).unwrap();
                assert!(in_range(&ledger));
                ledger.adapt_heldout_rate(&vec![-0.5; n], &potential).unwrap();
                assert!(in_range(&ledger));
                assert_eq!(Ledger::from_bytes(&ledger.to_bytes()).unwrap(), ledger);
            }
            // A decoded ledger's shrink steps are in range.
            assert!(ledger
                .heldout()
                .shrink_steps()
                .iter()
                .all(|n| (1..=MAX_SHRINK_STEPS).contains(n)));
            // A shrink trial on a decoded ledger never overflows its counters, and the kept
            // ones never outnumber the trials.
            if ledger.heldout().shrink()[0] > 0.0 {
                let _ = ledger.record_shrink(0, 1.0, 0.5);
                assert!(ledger.heldout().shrinks().iter().zip(ledger.heldout().shrink_trials()).all(|(k, t)| k <= t));
            }
        }
    }
}
