//! The per-tensor sums behind the routing scores (SPEC §2), in one pass over the moments.
//!
//! For each element, the term is computed in the state's dtype with the ops of torch's
//! elementwise path (`denom = sqrt(v) + eps`; EPD: `(m * m) / denom`; PFN: `(m / denom)²`),
//! each a correctly rounded IEEE operation, never contracted into an FMA, as numpy computes
//! them (torch's vectorised CPU sqrt is 1 ulp off for ~0.7% of f32 inputs); then the
//! terms are added in `f64`. Every term is ≥ 0 or NaN, so a NaN term makes the sum NaN and an
//! infinite one (without a NaN) makes it +inf, as in torch.
//!
//! The order is fixed: each tensor is cut into blocks of [`BLOCK`] elements; a block is summed
//! in [`LANES`] interleaved `f64` accumulators (independent chains, which the compiler turns
//! into vector adds) added in order; the block sums are added in order. Per element the cost
//! is the square root and the division, which share the divider unit.

use crate::error::{Error, Result};

/// Elements per block: two levels of summation keep the rounding error near 2^-53 × (BLOCK /
/// LANES + blocks) relative, for terms that are all ≥ 0.
pub const BLOCK: usize = 1 << 14;
/// Interleaved accumulators per block: a whole number of vector registers for `f32` and `f64`.
pub const LANES: usize = 16;

/// Which score the sums are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoreKind {
    /// Expected preconditioned descent: Σ m² / (√v + ε).
    Epd,
    /// Preconditioned Frobenius norm: Σ (m / (√v + ε))².
    Pfn,
}

impl ScoreKind {
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "epd" => Ok(ScoreKind::Epd),
            "pfn" => Ok(ScoreKind::Pfn),
            _ => Err(Error::Config(format!(
                "unknown score {name:?}; expected \"epd\" or \"pfn\""
            ))),
        }
    }
}

/// A moment element type: `f32` or `f64`, with the operations torch uses on it.
pub trait StateFloat: Copy + Send + Sync + 'static {
    fn from_f64(x: f64) -> Self;
    fn widen(self) -> f64;
    fn sqrt(self) -> Self;
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    /// NaN or ±infinity: every exponent bit set. A test on the bits, so that a reduction of
    /// it is an integer OR, which the compiler vectorises (a float reduction it may not reorder).
    fn nonfinite(self) -> bool;
}

macro_rules! state_float {
    ($t:ty, $exponent:expr) => {
        impl StateFloat for $t {
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t // round to nearest, as torch casts a Python scalar to the tensor's dtype
            }
            #[inline(always)]
            fn widen(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline(always)]
            fn mul(self, o: Self) -> Self {
                self * o
            }
            #[inline(always)]
            fn div(self, o: Self) -> Self {
                self / o
            }
            #[inline(always)]
            fn nonfinite(self) -> bool {
                self.to_bits() & $exponent == $exponent
            }
        }
    };
}
state_float!(f32, 0x7f80_0000);
state_float!(f64, 0x7ff0_0000_0000_0000);

#[inline(always)]
fn term<T: StateFloat, const PFN: bool>(m: T, v: T, eps: T) -> f64 {
    let denom = v.sqrt().add(eps);
    if PFN {
        let q = m.div(denom);
        q.mul(q).widen()
    } else {
        m.mul(m).div(denom).widen()
    }
}

/// The sum of one block's terms (`m` and `v` of equal length, at most [`BLOCK`]).
#[inline(always)]
fn block_sum<T: StateFloat, const PFN: bool>(m: &[T], v: &[T], eps: T) -> f64 {
    let mut acc = [0.0f64; LANES];
    let mc = m.chunks_exact(LANES);
    let vc = v.chunks_exact(LANES);
    let (mt, vt) = (mc.remainder(), vc.remainder());
    for (mc, vc) in mc.zip(vc) {
        for j in 0..LANES {
            acc[j] += term::<T, PFN>(mc[j], vc[j], eps);
        }
    }
    // The ragged end in its own sum: indexing `acc` by a run-time lane would keep the
    // accumulators in memory instead of registers and halve the speed of the loop above.
    let tail = mt
        .iter()
        .zip(vt)
        .fold(0.0, |sum, (&m, &v)| sum + term::<T, PFN>(m, v, eps));
    // Lanes in order: a tree (lane j + lane j + 8, ...) here makes the compiler pair the
    // lanes of the loop above into half-filled vectors, at twice the time.
    acc.iter().fold(0.0, |sum, &a| sum + a) + tail
}

/// The block sums added left to right (from +0.0, as torch's sum of nothing).
fn blocks_in_order<T: StateFloat, const PFN: bool>(m: &[T], v: &[T], eps: T) -> f64 {
    m.chunks(BLOCK)
        .zip(v.chunks(BLOCK))
        .fold(0.0, |sum, (m, v)| sum + block_sum::<T, PFN>(m, v, eps))
}

/// `what` names the tensor in the error (built only then: this runs per tensor and step).
fn check_lengths<T>(m: &[T], v: &[T], what: impl FnOnce() -> String) -> Result<()> {
    if m.len() != v.len() {
        return Err(Error::Score(format!(
            "{}: exp_avg has {} elements, exp_avg_sq {}",
            what(),
            m.len(),
            v.len()
        )));
    }
    Ok(())
}

/// Σ over one tensor's elements of the EPD or PFN term, accumulated in `f64`.
/// `eps` is rounded to `T` first, as torch does with a scalar.
pub fn score_sum<T: StateFloat>(m: &[T], v: &[T], eps: f64, kind: ScoreKind) -> Result<f64> {
    check_lengths(m, v, || "score_sum".into())?;
    let eps = T::from_f64(eps);
    Ok(match kind {
        ScoreKind::Epd => blocks_in_order::<T, false>(m, v, eps),
        ScoreKind::Pfn => blocks_in_order::<T, true>(m, v, eps),
    })
}

/// [`score_sum`] over `f32` moments.
pub fn score_sum_f32(m: &[f32], v: &[f32], eps: f32, kind: ScoreKind) -> Result<f64> {
    score_sum(m, v, f64::from(eps), kind)
}

/// [`score_sum`] over `f64` moments.
pub fn score_sum_f64(m: &[f64], v: &[f64], eps: f64, kind: ScoreKind) -> Result<f64> {
    score_sum(m, v, eps, kind)
}

/// [`score_sum`] of every pair `(m[i], v[i])`.
///
/// One thread: splitting the tensors over threads was measured slower inside the optimizer
/// step (torch's OpenMP workers spin between ops on the very cores the threads would need)
/// and no faster on large inputs (memory-bound).
pub fn score_sums<T: StateFloat>(
    m: &[&[T]],
    v: &[&[T]],
    eps: f64,
    kind: ScoreKind,
) -> Result<Vec<f64>> {
    if m.len() != v.len() {
        return Err(Error::Score(format!(
            "score_sums: {} exp_avgs but {} exp_avg_sqs",
            m.len(),
            v.len()
        )));
    }
    m.iter()
        .zip(v)
        .enumerate()
        .map(|(i, (m, v))| {
            check_lengths(m, v, || format!("score_sums: tensor {i}"))?;
            score_sum(m, v, eps, kind)
        })
        .collect()
}

/// True when no element of any tensor is NaN or ±infinity (one pass; it stops at the first
/// block of [`BLOCK`] elements that holds one).
pub fn all_finite<T: StateFloat>(tensors: &[&[T]]) -> bool {
    tensors.iter().all(|t| {
        t.chunks(BLOCK)
            .all(|b| !b.iter().fold(false, |bad, x| bad | x.nonfinite()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The plain definition: term by term in `T`, summed in `f64` with Neumaier's compensation
    /// (so that the comparison measures the kernel's rounding alone); a non-finite term
    /// makes the sum non-finite, as a plain sum does.
    fn reference<T: StateFloat>(m: &[T], v: &[T], eps: f64, kind: ScoreKind) -> f64 {
        let eps = T::from_f64(eps);
        let terms: Vec<f64> = m
            .iter()
            .zip(v)
            .map(|(&m, &v)| match kind {
                ScoreKind::Epd => term::<T, false>(m, v, eps),
                ScoreKind::Pfn => term::<T, true>(m, v, eps),
            })
            .collect();
        let (mut sum, mut carry) = (0.0f64, 0.0f64);
        for &t in &terms {
            let next = sum + t;
            carry += if sum.abs() >= t.abs() {
                (sum - next) + t
            } else {
                (t - next) + sum
            };
            sum = next;
        }
        if (sum + carry).is_finite() {
            sum + carry
        } else {
            terms.iter().sum() // an f64 overflow: the compensation is inf - inf
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
    }

    #[test]
    fn terms_are_computed_in_the_state_dtype() {
        // m = 3, v = 4, eps = 1: denom = 3; EPD 9 / 3 = 3; PFN (3 / 3)² = 1.
        let m = [3.0f32; 5];
        let v = [4.0f32; 5];
        assert_eq!(score_sum_f32(&m, &v, 1.0, ScoreKind::Epd).unwrap(), 15.0);
        assert_eq!(score_sum_f32(&m, &v, 1.0, ScoreKind::Pfn).unwrap(), 5.0);
        // 0.1f32² / 1 rounds in f32 before widening: not 0.1f64².
        let got = score_sum_f32(&[0.1], &[0.0], 1.0, ScoreKind::Epd).unwrap();
        assert_eq!(got, f64::from(0.1f32 * 0.1f32));
        assert_ne!(got, 0.1f64 * 0.1f64);
        // eps rounds to f32 first: 1e-50 is 0 in f32, so the term is m² / sqrt(v) exactly.
        let got = score_sum_f32(&[1.0], &[4.0], 1e-50, ScoreKind::Epd).unwrap();
        assert_eq!(got, 0.5);
    }

    #[test]
    fn f64_moments_stay_f64() {
        let got = score_sum_f64(&[0.1], &[0.0], 1.0, ScoreKind::Epd).unwrap();
        assert_eq!(got, 0.1f64 * 0.1f64);
    }

    #[test]
    fn nonfinite_terms_propagate() {
        let v = [1.0f32; 40];
        let mut m = [0.5f32; 40];
        m[33] = f32::INFINITY;
        assert_eq!(
            score_sum_f32(&m, &v, 1e-8, ScoreKind::Epd).unwrap(),
            f64::INFINITY
        );
        m[7] = f32::NAN;
        assert!(score_sum_f32(&m, &v, 1e-8, ScoreKind::Pfn)
            .unwrap()
            .is_nan());
        let mut v = [1.0f32; 3];
        v[1] = -1.0; // sqrt of a negative: NaN, as in torch
        assert!(score_sum_f32(&[1.0; 3], &v, 1e-8, ScoreKind::Epd)
            .unwrap()
            .is_nan());
        // inf / inf in PFN: NaN.
        assert!(
            score_sum_f32(&[f32::INFINITY], &[f32::INFINITY], 0.0, ScoreKind::Pfn)
                .unwrap()
                .is_nan()
        );
    }

    #[test]
    fn empty_tensors_sum_to_zero() {
        assert_eq!(score_sum_f32(&[], &[], 1e-8, ScoreKind::Epd).unwrap(), 0.0);
        let got = score_sums::<f32>(&[&[], &[2.0]], &[&[], &[1.0]], 0.0, ScoreKind::Epd).unwrap();
        assert_eq!(got, [0.0, 4.0]);
        assert!(got[0].is_sign_positive()); // as torch's sum of nothing
        assert_eq!(
            score_sums::<f64>(&[], &[], 0.0, ScoreKind::Pfn).unwrap(),
            Vec::<f64>::new()
        );
    }

    #[test]
    fn length_mismatch_is_an_error() {
        assert!(matches!(
            score_sum_f32(&[1.0, 2.0], &[1.0], 1e-8, ScoreKind::Epd),
            Err(Error::Score(_))
        ));
        let err = score_sums::<f32>(
            &[&[1.0], &[1.0, 2.0]],
            &[&[1.0], &[1.0]],
            0.0,
            ScoreKind::Epd,
        )
        .unwrap_err();
        assert_eq!(
            err,
            Error::Score("score_sums: tensor 1: exp_avg has 2 elements, exp_avg_sq 1".into())
        );
        assert!(matches!(
            score_sums::<f32>(&[&[1.0]], &[], 0.0, ScoreKind::Epd),
            Err(Error::Score(_))
        ));
    }

    #[test]
    fn score_names() {
        assert_eq!(ScoreKind::from_name("epd").unwrap(), ScoreKind::Epd);
        assert_eq!(ScoreKind::from_name("pfn").unwrap(), ScoreKind::Pfn);
        assert!(matches!(ScoreKind::from_name("EPD"), Err(Error::Config(_))));
    }

    #[test]
    fn sums_around_block_and_lane_boundaries_match_the_reference() {
        let sizes = [
            0,
            1,
            15,
            16,
            17,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            5 * BLOCK + 3,
            33,
        ];
        let data: Vec<(Vec<f32>, Vec<f32>)> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let m = (0..n)
                    .map(|i| ((i * 7 + k) % 23) as f32 * 0.013 - 0.1)
                    .collect();
                let v = (0..n).map(|i| ((i * 5 + k) % 19) as f32 * 1e-4).collect();
                (m, v)
            })
            .collect();
        let m: Vec<&[f32]> = data.iter().map(|(m, _)| m.as_slice()).collect();
        let v: Vec<&[f32]> = data.iter().map(|(_, v)| v.as_slice()).collect();
        for kind in [ScoreKind::Epd, ScoreKind::Pfn] {
            let sums = score_sums(&m, &v, 1e-8, kind).unwrap();
            assert_eq!(sums.len(), sizes.len());
            for (k, (mi, vi)) in m.iter().zip(&v).enumerate() {
                let want = reference(mi, vi, 1e-8, kind);
                assert!(
                    close(sums[k], want),
                    "size {}: {} vs {want}",
                    sizes[k],
                    sums[k]
                );
                // Every element counts: dropping the last one changes the sum.
                if let Some(n) = mi.len().checked_sub(1).filter(|&n| mi[n] != 0.0) {
                    assert_ne!(sums[k], reference(&mi[..n], &vi[..n], 1e-8, kind));
                }
            }
        }
    }

    #[test]
    fn all_finite_finds_any_nan_or_infinity() {
        let mut a = vec![1.0f32; 3 * BLOCK + 5];
        let b = vec![f32::MAX; 17];
        assert!(all_finite::<f32>(&[&a, &b]));
        assert!(all_finite::<f64>(&[]));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 15, 16, BLOCK, a.len() - 1] {
                a[at] = bad;
                assert!(!all_finite::<f32>(&[&b, &a]));
                a[at] = 1.0;
            }
        }
        assert!(!all_finite::<f64>(&[&[f64::NAN]]));
        assert!(all_finite::<f64>(&[&[f64::MAX, f64::MIN_POSITIVE / 2.0]]));
    }

    fn f32_values() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => -10.0f32..10.0,
            1 => Just(0.0f32),
            1 => Just(-0.0f32),
            1 => (1u32..0x0080_0000).prop_map(f32::from_bits), // subnormals
            1 => prop_oneof![Just(f32::MAX), Just(-f32::MAX), Just(1e30f32)],
            1 => prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
        ]
    }

    fn f64_values() -> impl Strategy<Value = f64> {
        prop_oneof![
            8 => -10.0f64..10.0,
            1 => Just(0.0f64),
            1 => (1u64..(1u64 << 52)).prop_map(f64::from_bits), // subnormals
            1 => prop_oneof![Just(1e300f64), Just(-1e150f64)],
            1 => prop_oneof![Just(f64::NAN), Just(f64::INFINITY)],
        ]
    }

    fn kinds() -> impl Strategy<Value = ScoreKind> {
        prop_oneof![Just(ScoreKind::Epd), Just(ScoreKind::Pfn)]
    }

    proptest! {
        #[test]
        fn f32_sums_match_the_reference(
            pairs in prop::collection::vec((f32_values(), f32_values()), 0..300),
            eps in prop_oneof![Just(1e-8f64), Just(0.0), Just(1e-3)],
            kind in kinds(),
        ) {
            let (m, v): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let got = score_sum(&m, &v, eps, kind).unwrap();
            let want = reference(&m, &v, eps, kind);
            prop_assert!(close(got, want), "got {got:e}, want {want:e}");
            prop_assert_eq!(all_finite::<f32>(&[&m, &v]), m.iter().chain(&v).all(|x| x.is_finite()));
        }

        #[test]
        fn f64_sums_match_the_reference(
            pairs in prop::collection::vec((f64_values(), f64_values()), 0..300),
            kind in kinds(),
        ) {
            let (m, v): (Vec<f64>, Vec<f64>) = pairs.into_iter().unzip();
            let got = score_sum(&m, &v, 1e-8, kind).unwrap();
            let want = reference(&m, &v, 1e-8, kind);
            prop_assert!(close(got, want), "got {got:e}, want {want:e}");
        }

        #[test]
        fn many_tensors_match_the_reference(
            lens in prop::collection::vec(0usize..3 * BLOCK, 1..5),
            seed in 0usize..1000,
            kind in kinds(),
        ) {
            let data: Vec<(Vec<f32>, Vec<f32>)> = lens
                .iter()
                .map(|&n| ((0..n).map(|i| ((i + seed) % 97) as f32 * 1e-3 - 0.048).collect(),
                           (0..n).map(|i| ((i * 3 + seed) % 89) as f32 * 1e-6).collect()))
                .collect();
            let m: Vec<&[f32]> = data.iter().map(|(m, _)| m.as_slice()).collect();
            let v: Vec<&[f32]> = data.iter().map(|(_, v)| v.as_slice()).collect();
            let got = score_sums(&m, &v, 1e-8, kind).unwrap();
            prop_assert_eq!(got.len(), lens.len());
            for (k, (mi, vi)) in m.iter().zip(&v).enumerate() {
                let want = reference(mi, vi, 1e-8, kind);
                prop_assert!(close(got[k], want), "tensor {}: got {:e}, want {:e}", k, got[k], want);
            }
        }
    }
}
