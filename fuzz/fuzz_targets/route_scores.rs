//! `route` on arbitrary configurations and score matrices (every f64/f32 bit pattern):
//! never panics, never lets a non-finite score win, never exceeds `topk` winners outside
//! warm-up (policy heldout: never routes an inactive expert outside warm-up), and survives a
//! serialisation round trip mid-run with identical decisions. Under policy heldout every
//! other step's scores also serve as a held-out window (descent, and negated as potential).
#![no_main]

use libfuzzer_sys::fuzz_target;
use molf_rs::{Ledger, Phase, Policy, Router, RouterConfig};

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<16>() else {
        return;
    };
    let (k, min_dwell) = (1 + u64::from(head[2] % 9), u64::from(head[5] % 4));
    let policy = match head[3] % 3 {
        0 => Policy::TopK { k },
        1 => Policy::Hysteresis {
            k,
            margin: f64::from(head[4]) / 32.0,
            min_dwell,
        },
        _ => Policy::Heldout { k, min_dwell },
    };
    let config = RouterConfig {
        num_modules: 1 + u64::from(head[0] % 8),
        num_experts: 1 + u64::from(head[1] % 8),
        policy,
        warmup_steps: u64::from(head[6] % 3),
        freeze_after: (head[7] & 1 == 1)
            .then(|| u64::from(head[6] % 3) + 1 + u64::from(head[8] % 6)),
    };
    let narrow = head[9] & 1 == 1;
    let mut router = Router::new(config).expect("valid by construction");
    let mut ledger = Ledger::new(config.num_modules, config.num_experts, 0.9).unwrap();
    let n = (config.num_modules * config.num_experts) as usize;
    let width = if narrow { 4 } else { 8 };
    let mut out = vec![false; n];
    for (i, chunk) in body.chunks_exact(n * width).enumerate() {
        let scores: Vec<f64> = chunk
            .chunks_exact(width)
            .map(|b| match b.len() {
                4 => f64::from(f32::from_le_bytes(b.try_into().unwrap())),
                _ => f64::from_le_bytes(b.try_into().unwrap()),
            })
            .collect();
        if i == 1 {
            let restored = Router::from_bytes(&router.to_bytes()).unwrap();
            assert_eq!(restored, router);
            router = restored;
        }
        let phase = if narrow {
            let s32: Vec<f32> = scores.iter().map(|&x| x as f32).collect();
            router.route(&s32, &mut out).unwrap()
        } else {
            router.route(&scores, &mut out).unwrap()
        };
        ledger.record(&scores, &out).unwrap();
        let e = config.num_experts as usize;
        for ((row, win), inc) in scores
            .chunks(e)
            .zip(out.chunks(e))
            .zip(router.incumbents().chunks(e))
        {
            assert!(row.iter().zip(win).all(|(x, &w)| !w || x.is_finite()));
            if phase == Phase::Warmup {
                continue;
            }
            if policy.is_heldout() {
                assert!(win.iter().zip(inc).all(|(&w, &i)| !w || i));
            } else {
                assert!(win.iter().filter(|&&w| w).count() as u64 <= k);
            }
        }
        if i % 2 == 1 {
            ledger.record_heldout(&scores, &out).unwrap();
            let potential: Vec<f64> = scores.iter().map(|x| -x).collect();
            let regated = router.regate(&ledger.heldout().descent(), &potential);
            assert_eq!(regated.is_ok(), policy.is_heldout());
        }
    }
    assert_eq!(Ledger::from_bytes(&ledger.to_bytes()).unwrap(), ledger);
});
