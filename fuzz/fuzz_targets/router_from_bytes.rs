//! Any byte string given to `Router::from_bytes` returns Ok or Err, never panics; whatever
//! is accepted re-encodes to exactly the same bytes and can route.
#![no_main]

use libfuzzer_sys::fuzz_target;
use molf_rs::serial::Fnv1a;
use molf_rs::Router;

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
    if let Ok(mut router) = Router::from_bytes(data) {
        assert_eq!(router.to_bytes(), data, "accepted state must be canonical");
        let n = (router.config().num_modules * router.config().num_experts) as usize;
        if n <= 1 << 16 {
            let mut out = vec![false; n];
            let _ = router.route(&vec![1.0f64; n], &mut out);
        }
    }
}
