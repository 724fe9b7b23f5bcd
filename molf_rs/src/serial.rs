//! Versioned, self-checking binary format for routers and ledgers.
//!
//! Layout, all little-endian:
//!
//! ```text
//! b"MOLF" | kind: u8 (1 router, 2 ledger) | version: u16 | payload length: u64
//!        | payload | checksum: u64 = FNV-1a 64 over every byte before it
//! ```
//!
//! Router payload: num_modules u64, num_experts u64, topk u64, policy u8 (0 topk,
//! 1 hysteresis, 2 heldout), margin f64 (0 unless hysteresis), min_dwell u64 (0 under topk),
//! warmup_steps u64, has_freeze u8 (0/1), freeze_after u64 (0 when absent), step u64,
//! incumbents u8×(M·E) (0/1, row-major), last_change u64×M, expert_last_change u64×(M·E)
//! (row-major: the step at which `regate` last flipped each expert; all 0 except under
//! policy heldout).
//!
//! Ledger payload: num_modules u64, num_experts u64, ema_decay f64, step u64, checksum u64,
//! last_scores f64×(M·E), ema f64×(M·E), wins u64×(M·E), switches u64×M,
//! last_switch_step i64×M, no_winner u64×M, last_mask u8×(M·E) (0/1); then the held-out
//! record: heldout_decay f64, heldout_windows u64, heldout_ema f64×(M·E), heldout_horizon
//! f64, heldout_span u64×(M·E) (row-major: the consecutive held-out windows, up to the last,
//! in which each expert moved), heldout_shrink f64×E (per expert its shrink fraction; before
//! version 4 one f64 for all), from version 4 heldout_shrink_steps u64×E (per expert its
//! most shrink trials per measurement), shrink_trials u64×E, shrinks u64×E (per
//! expert: held-out shrink trials and those kept), shrink_spectral u8 (0/1: how a shrink
//! trial shrinks a LoRA product), heldout_min_span u64 (the span a record needs before it
//! can drop its expert); from ledger version 2, the rate adaptation: rate_adapt u8 (0/1),
//! rate_up f64, rate_down f64, rate_cap f64, from version 3 rate_floor f64 and rate_trust
//! f64, then heldout_rate f64×(M·E) (row-major: each expert's learning-rate multiplier).
//!
//! Versions: a router is version 1; a ledger is written as version 4 and read as 1 to 4.
//! Each older ledger resumes as it ran: up to version 3 its one shrink fraction is every
//! expert's, with one shrink trial each per measurement; version 1, from before the rate adaptation, decodes
//! with it off and every multiplier 1, the other rate settings at their defaults; version
//! 2, from before the floor and the trust condition, with floor 0 and trust 0 where the
//! adaptation is on (the rule it ran under) and the default floor and trust where it is off
//! (where they have no effect, and the defaults are what a ledger built today with it off
//! has, so a resumed run does not report a changed setting).
//!
//! Floats are stored as their IEEE bit patterns, so NaN payloads and signed zeros survive.
//! Decoding is strict: one encoding per state (flags and bools must be exactly 0 or 1, a
//! setting the policy does not have must be 0, no trailing bytes), and the decoded state
//! must satisfy every invariant the live object keeps.

use crate::error::{Error, Result};
use crate::heldout::{
    HeldoutParts, RateRule, DEFAULT_RATE_FLOOR, DEFAULT_RATE_TRUST, DEFAULT_SHRINK_STEPS,
};
use crate::ledger::{Ledger, LedgerParts};
use crate::router::{Policy, Router, RouterConfig};

pub const MAGIC: &[u8; 4] = b"MOLF";
/// The version a router is written as and read in.
pub const ROUTER_VERSION: u16 = 1;
/// The version a ledger is written as (2: the rate adaptation; 3: its floor and trust
/// condition; 4: a shrink fraction and a number of shrink trials per expert).
pub const LEDGER_VERSION: u16 = 4;
/// The versions a ledger is read in.
pub const LEDGER_VERSIONS: [u16; 4] = [1, 2, 3, 4];

const HEADER_LEN: usize = 4 + 1 + 2 + 8;
const CHECKSUM_LEN: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Router = 1,
    Ledger = 2,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Router => "router",
            Kind::Ledger => "ledger",
        }
    }

    /// The versions this kind is read in; the last is the one it is written as.
    fn versions(self) -> &'static [u16] {
        match self {
            Kind::Router => &[ROUTER_VERSION],
            Kind::Ledger => &LEDGER_VERSIONS,
        }
    }
}

/// FNV-1a, 64 bit: tiny, dependency-free and fully specified, so other tools can recompute it.
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(u64);

impl Fnv1a {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    pub fn new() -> Self {
        Fnv1a(Self::OFFSET_BASIS)
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(Self::PRIME);
        }
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a::new();
    h.write(bytes);
    h.finish()
}

/// Appends little-endian fields to a buffer that starts with the header.
struct Writer(Vec<u8>);

impl Writer {
    fn new(kind: Kind) -> Self {
        let mut buf = Vec::new();
        buf.extend_from_slice(MAGIC);
        buf.push(kind as u8);
        let version = kind.versions().last().expect("a version");
        buf.extend_from_slice(&version.to_le_bytes());
        buf.extend_from_slice(&0u64.to_le_bytes()); // payload length, patched in `finish`
        Writer(buf)
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }
    fn bools(&mut self, v: &[bool]) {
        self.0.extend(v.iter().map(|&b| u8::from(b)));
    }
    fn u64s(&mut self, v: &[u64]) {
        v.iter().for_each(|&x| self.u64(x));
    }
    fn finish(mut self) -> Vec<u8> {
        let payload_len = (self.0.len() - HEADER_LEN) as u64;
        self.0[7..HEADER_LEN].copy_from_slice(&payload_len.to_le_bytes());
        let sum = fnv1a64(&self.0);
        self.0.extend_from_slice(&sum.to_le_bytes());
        self.0
    }
}

/// Reads little-endian fields from a payload whose total length is already verified.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::State(format!("{} payload is truncated", self.what)));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_bits(self.u64()?))
    }
    fn flag(&mut self, field: &str) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(Error::State(format!("{field} must be 0 or 1, got {v}"))),
        }
    }
    fn bools(&mut self, n: usize, field: &str) -> Result<Vec<bool>> {
        self.take(n)?
            .iter()
            .map(|&v| match v {
                0 => Ok(false),
                1 => Ok(true),
                v => Err(Error::State(format!(
                    "{field} entries must be 0 or 1, got {v}"
                ))),
            })
            .collect()
    }
    fn u64s(&mut self, n: usize) -> Result<Vec<u64>> {
        Ok(self
            .take(n.checked_mul(8).ok_or_else(|| self.too_short())?)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
    fn too_short(&self) -> Error {
        Error::State(format!("{} payload is truncated", self.what))
    }
    /// Returns `(modules, modules × experts)` after checking, before anything is allocated,
    /// that exactly the bytes the arrays of that shape need remain.
    fn shape(
        &self,
        modules: u64,
        experts: u64,
        [per_entry, per_module, per_expert, fixed]: [u64; 4],
    ) -> Result<(usize, usize)> {
        let entries = modules.checked_mul(experts);
        let needed = entries
            .and_then(|n| n.checked_mul(per_entry))
            .zip(modules.checked_mul(per_module))
            .and_then(|(a, b)| a.checked_add(b))
            .zip(experts.checked_mul(per_expert))
            .and_then(|(a, b)| a.checked_add(b))
            .and_then(|n| n.checked_add(fixed));
        match (needed, entries) {
            (Some(n), Some(entries)) if n == self.buf.len() as u64 => {
                // Both fit in usize: they are at most the length of an in-memory buffer.
                Ok((modules as usize, entries as usize))
            }
            _ => Err(Error::State(format!(
                "{} payload has {} bytes of arrays, which does not match its shape ({modules}, {experts})",
                self.what,
                self.buf.len()
            ))),
        }
    }
}

/// Validates the envelope and returns the payload and its version.
fn open(data: &[u8], kind: Kind) -> Result<(&[u8], u16)> {
    let state = |msg: String| Err(Error::State(msg));
    if data.len() < HEADER_LEN + CHECKSUM_LEN {
        return state(format!(
            "serialised {} is truncated: {} bytes, the envelope alone needs {}",
            kind.name(),
            data.len(),
            HEADER_LEN + CHECKSUM_LEN
        ));
    }
    if &data[..4] != MAGIC {
        return state(format!(
            "not molf state: magic bytes {:?}, expected {:?}",
            &data[..4],
            MAGIC
        ));
    }
    if data[4] != kind as u8 {
        let seen = match data[4] {
            1 => "a router",
            2 => "a ledger",
            _ => "an unknown kind",
        };
        return state(format!(
            "serialised state is {seen} (kind byte {}), expected a {} (kind byte {})",
            data[4],
            kind.name(),
            kind as u8
        ));
    }
    let version = u16::from_le_bytes([data[5], data[6]]);
    if !kind.versions().contains(&version) {
        return state(format!(
            "unsupported {} format version {version}; supported versions: {:?}",
            kind.name(),
            kind.versions()
        ));
    }
    let payload_len = u64::from_le_bytes(data[7..HEADER_LEN].try_into().expect("8 bytes"));
    let actual = (data.len() - HEADER_LEN - CHECKSUM_LEN) as u64;
    if payload_len != actual {
        return state(format!(
            "serialised {} is truncated or has trailing bytes: header says {payload_len} \
             payload bytes, found {actual}",
            kind.name()
        ));
    }
    let (body, sum) = data.split_at(data.len() - CHECKSUM_LEN);
    let stored = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
    let computed = fnv1a64(body);
    if stored != computed {
        return state(format!(
            "serialised {} failed its checksum (stored {stored:#018x}, computed {computed:#018x}): \
             the data is corrupt or was modified",
            kind.name()
        ));
    }
    Ok((&body[HEADER_LEN..], version))
}

impl Router {
    pub fn to_bytes(&self) -> Vec<u8> {
        let c = self.config();
        let mut w = Writer::new(Kind::Router);
        w.u64(c.num_modules);
        w.u64(c.num_experts);
        w.u64(c.policy.k());
        w.u8(match c.policy {
            Policy::TopK { .. } => 0,
            Policy::Hysteresis { .. } => 1,
            Policy::Heldout { .. } => 2,
        });
        w.f64(c.policy.margin());
        w.u64(c.policy.min_dwell());
        w.u64(c.warmup_steps);
        w.u8(u8::from(c.freeze_after.is_some()));
        w.u64(c.freeze_after.unwrap_or(0));
        w.u64(self.step());
        w.bools(self.incumbents());
        w.u64s(self.last_change());
        w.u64s(self.expert_last_change());
        w.finish()
    }

    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let mut r = Reader {
            buf: open(data, Kind::Router)?.0,
            what: "router",
        };
        let num_modules = r.u64()?;
        let num_experts = r.u64()?;
        let k = r.u64()?;
        let code = r.u8()?;
        let margin = r.f64()?;
        let min_dwell = r.u64()?;
        // A setting the policy lacks is written as 0 (all bits, so -0.0 is no margin
        // either): anything else would decode to a state that re-encodes differently.
        let policy = match code {
            0 if margin.to_bits() == 0 && min_dwell == 0 => Policy::TopK { k },
            1 => Policy::Hysteresis {
                k,
                margin,
                min_dwell,
            },
            2 if margin.to_bits() == 0 => Policy::Heldout { k, min_dwell },
            0 | 2 => Err(Error::State(format!(
                "router state of policy code {code} sets margin={margin} min_dwell={min_dwell}, \
                 which that policy does not have"
            )))?,
            v => Err(Error::State(format!(
                "unknown policy code {v} in router state"
            )))?,
        };
        let warmup_steps = r.u64()?;
        let has_freeze = r.flag("has_freeze")?;
        let freeze = r.u64()?;
        if !has_freeze && freeze != 0 {
            return Err(Error::State(
                "freeze_after is absent but its field is non-zero".into(),
            ));
        }
        let step = r.u64()?;
        // Per entry: an incumbent byte and an expert's last change (8 bytes); per module:
        // its last change.
        let (m, entries) = r.shape(num_modules, num_experts, [9, 8, 0, 0])?;
        let incumbents = r.bools(entries, "incumbents")?;
        let last_change = r.u64s(m)?;
        let expert_last_change = r.u64s(entries)?;
        let config = RouterConfig {
            num_modules,
            num_experts,
            policy,
            warmup_steps,
            freeze_after: has_freeze.then_some(freeze),
        };
        Router::from_parts(config, step, incumbents, last_change, expert_last_change)
    }
}

impl Ledger {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new(Kind::Ledger);
        w.u64(self.num_modules() as u64);
        w.u64(self.num_experts() as u64);
        w.f64(self.ema_decay());
        w.u64(self.step());
        w.u64(self.checksum());
        self.last_scores().iter().for_each(|&x| w.f64(x));
        self.ema().iter().for_each(|&x| w.f64(x));
        w.u64s(self.wins());
        w.u64s(self.switches());
        self.last_switch_step()
            .iter()
            .for_each(|&x| w.u64(x as u64));
        w.u64s(self.no_winner());
        w.bools(self.last_mask());
        let h = self.heldout();
        w.f64(h.decay());
        w.u64(h.windows());
        h.ema().iter().for_each(|&x| w.f64(x));
        w.f64(h.horizon());
        w.u64s(h.span());
        h.shrink().iter().for_each(|&x| w.f64(x));
        w.u64s(h.shrink_steps());
        w.u64s(h.shrink_trials());
        w.u64s(h.shrinks());
        w.bools(&[h.shrink_spectral()]);
        w.u64(h.min_span());
        let rule = h.rate_rule();
        w.bools(&[rule.adapt]);
        w.f64(rule.up);
        w.f64(rule.down);
        w.f64(rule.cap);
        w.f64(rule.floor);
        w.f64(rule.trust);
        h.rate().iter().for_each(|&x| w.f64(x));
        w.finish()
    }

    pub fn from_bytes(data: &[u8]) -> Result<Self> {
        let (buf, version) = open(data, Kind::Ledger)?;
        let mut r = Reader {
            buf,
            what: "ledger",
        };
        let num_modules = r.u64()?;
        let num_experts = r.u64()?;
        let ema_decay = r.f64()?;
        let step = r.u64()?;
        let checksum = r.u64()?;
        // Per entry: 5 arrays of 8-byte cells (scores, EMA, wins, held-out EMA and span) + 1
        // of 1-byte cells; per module: 3 of 8 bytes; per expert: the 2 shrink counters;
        // held-out scalars: decay, windows, horizon, shrink, min span (8 bytes each) and the
        // spectral flag; from version 2 per entry a rate multiplier, and the rate flag and
        // its up, down and cap; from version 3 its floor and trust; from version 4 the
        // shrink per expert instead of one, and the shrink steps per expert.
        let sizes = match version {
            1 => [41, 24, 16, 41],
            2 => [49, 24, 16, 66],
            3 => [49, 24, 16, 82],
            _ => [49, 24, 32, 74],
        };
        let (m, entries) = r.shape(num_modules, num_experts, sizes)?;
        let floats = |v: Vec<u64>| v.into_iter().map(f64::from_bits).collect();
        let last_scores = floats(r.u64s(entries)?);
        let ema = floats(r.u64s(entries)?);
        let wins = r.u64s(entries)?;
        let switches = r.u64s(m)?;
        let last_switch_step = r.u64s(m)?.into_iter().map(|x| x as i64).collect();
        let no_winner = r.u64s(m)?;
        let last_mask = r.bools(entries, "last_mask")?;
        let (decay, windows) = (r.f64()?, r.u64()?);
        let heldout_ema = floats(r.u64s(entries)?);
        let horizon = r.f64()?;
        let span = r.u64s(entries)?;
        // The shape check counted these bytes: num_experts fits in the buffer.
        let e = num_experts as usize;
        let (shrink, shrink_steps) = if version >= 4 {
            (floats(r.u64s(e)?), r.u64s(e)?)
        } else {
            (vec![r.f64()?; e], vec![DEFAULT_SHRINK_STEPS; e])
        };
        let (shrink_trials, shrinks) = (r.u64s(e)?, r.u64s(e)?);
        let shrink_spectral = r.flag("shrink_spectral")?;
        let min_span = r.u64()?;
        let (rate_rule, rate) = if version == 1 {
            // Off, so its settings (the defaults, a floor and trust condition included) have
            // no effect; they are what a ledger built with it off has, and they validate.
            (RateRule::default(), vec![1.0; entries])
        } else {
            let adapt = r.flag("rate_adapt")?;
            let (up, down, cap) = (r.f64()?, r.f64()?, r.f64()?);
            let (floor, trust) = match version {
                // Before the floor and the trust condition: neither where the rule ran;
                // where it was off they have no effect, and the defaults are what a ledger
                // built with it off has.
                2 if adapt => (0.0, 0.0),
                2 => (DEFAULT_RATE_FLOOR, DEFAULT_RATE_TRUST),
                _ => (r.f64()?, r.f64()?),
            };
            let rule = RateRule {
                adapt,
                up,
                down,
                cap,
                floor,
                trust,
            };
            (rule, floats(r.u64s(entries)?))
        };
        Ledger::from_parts(LedgerParts {
            num_modules,
            num_experts,
            ema_decay,
            step,
            checksum,
            last_scores,
            ema,
            wins,
            switches,
            last_switch_step,
            no_winner,
            last_mask,
            heldout: HeldoutParts {
                decay,
                horizon,
                windows,
                ema: heldout_ema,
                span,
                min_span,
                shrink,
                shrink_steps,
                shrink_trials,
                shrinks,
                shrink_spectral,
                rate_rule,
                rate,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heldout::MAX_SHRINK_STEPS;
    use crate::router::MAX_STEP;

    #[test]
    fn fnv1a_known_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn router_round_trip_and_envelope_checks() {
        let mut r = Router::new(RouterConfig::topk(2, 3, 1)).unwrap();
        let mut out = [false; 6];
        r.route(&[1.0f64, 2.0, 3.0, 3.0, 2.0, 1.0], &mut out)
            .unwrap();
        let bytes = r.to_bytes();
        assert_eq!(&bytes[..4], MAGIC);
        assert_eq!(Router::from_bytes(&bytes).unwrap(), r);
        assert!(
            matches!(Ledger::from_bytes(&bytes), Err(Error::State(m)) if m.contains("is a router"))
        );
        assert_eq!(bytes[5..7], 1u16.to_le_bytes());
        for version in [0, 2, 7, 8] {
            let other = envelope(Kind::Router, version, payload(&bytes));
            assert!(
                matches!(Router::from_bytes(&other), Err(Error::State(m)) if m.contains(&format!("version {version};")))
            );
        }
        for n in 0..bytes.len() {
            assert!(Router::from_bytes(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn settings_a_policy_lacks_are_rejected() {
        // Policy topk has neither margin nor min_dwell, heldout no margin: a state that sets
        // one does not decode (it would re-encode differently).
        let topk = Router::new(RouterConfig::topk(1, 2, 1)).unwrap();
        let heldout = Router::new(RouterConfig {
            policy: Policy::Heldout { k: 1, min_dwell: 2 },
            ..RouterConfig::topk(1, 2, 1)
        })
        .unwrap();
        // margin at payload offset 25, min_dwell at 33.
        for (r, at, v) in [
            (&topk, 25, 0.5f64.to_bits()),
            (&topk, 25, (-0.0f64).to_bits()),
            (&topk, 33, 1),
            (&heldout, 25, (-0.0f64).to_bits()),
        ] {
            let mut body = payload(&r.to_bytes()).to_vec();
            body[at..at + 8].copy_from_slice(&v.to_le_bytes());
            assert!(
                matches!(Router::from_bytes(&envelope(Kind::Router, 1, &body)), Err(Error::State(m)) if m.contains("does not have")),
                "{r:?} at {at}"
            );
        }
        assert_eq!(Router::from_bytes(&heldout.to_bytes()).unwrap(), heldout);
    }

    #[test]
    fn ledger_round_trip_keeps_nan_bits() {
        let mut l = Ledger::new(1, 2, 0.25).unwrap();
        l.record(
            &[f64::from_bits(0x7ff8_0000_0000_0001), -0.0],
            &[false, true],
        )
        .unwrap();
        let back = Ledger::from_bytes(&l.to_bytes()).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.last_scores()[0].to_bits(), 0x7ff8_0000_0000_0001);
    }

    /// Re-wraps `payload` in an envelope of the given version (checksum recomputed).
    fn envelope(kind: Kind, version: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.push(kind as u8);
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        v.extend_from_slice(payload);
        let sum = fnv1a64(&v);
        v.extend_from_slice(&sum.to_le_bytes());
        v
    }

    fn payload(bytes: &[u8]) -> &[u8] {
        &bytes[HEADER_LEN..bytes.len() - CHECKSUM_LEN]
    }

    /// The bytes of a ledger payload's rate adaptation, its tail (version 3): rate_adapt
    /// (1 byte), rate_up, rate_down, rate_cap, rate_floor, rate_trust (8 bytes each),
    /// heldout_rate f64×(M·E).
    fn rate_tail(l: &Ledger) -> usize {
        1 + 40 + 8 * l.num_modules() * l.num_experts()
    }

    /// A ledger's payload, and where its shrink books end: before shrink_spectral (1 byte),
    /// heldout_min_span (8 bytes) and the rate tail.
    fn ledger_payload(l: &Ledger) -> (Vec<u8>, usize) {
        let body = payload(&l.to_bytes()).to_vec();
        let books_end = body.len() - 9 - rate_tail(l);
        (body, books_end)
    }

    /// Where a ledger payload's held-out spans end: before the shrink books
    /// (heldout_shrink f64×E, heldout_shrink_steps, shrink_trials and shrinks u64×E).
    fn spans_end(l: &Ledger) -> usize {
        ledger_payload(l).1 - 32 * l.num_experts()
    }

    /// A ledger (1 module × 3 experts, horizon 0.25) after 4 held-out windows: the first
    /// expert moved in all, the second paused in the third, the third moved in the first only.
    fn paused_ledger() -> Ledger {
        let mut l = Ledger::new(1, 3, 0.5).unwrap();
        for (x, moved) in [
            ([1.0, 2.0, 3.0], [true, true, true]),
            ([2.0, -1.0, 0.5], [true, true, false]),
            ([-0.5, 4.0, 1.0], [true, false, false]),
            ([3.0, 1.5, 2.0], [true, true, false]),
        ] {
            l.record_heldout(&x, &moved).unwrap();
        }
        assert_eq!(l.heldout().windows(), 4);
        assert_eq!(l.heldout().span(), [4, 1, 0]);
        l
    }

    #[test]
    fn ledger_round_trips_the_span() {
        let l = paused_ledger();
        let bytes = l.to_bytes();
        assert_eq!(bytes[5..7], LEDGER_VERSION.to_le_bytes());
        assert_eq!(LEDGER_VERSION, 4);
        // The held-out horizon f64, then heldout_span u64×(M·E), precede the shrink books.
        let (body, end) = (payload(&bytes), spans_end(&l));
        let tail: Vec<u64> = body[end - 8 * 3..end]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(tail, [4, 1, 0]);
        let horizon = &body[end - 8 * 4..end - 8 * 3];
        assert_eq!(horizon, 0.25f64.to_bits().to_le_bytes());
        let back = Ledger::from_bytes(&bytes).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.heldout().span(), [4, 1, 0]);
        assert_eq!(back.to_bytes(), bytes);
        // The restored ledger goes on as the original.
        let (mut a, mut b) = (l, back);
        for l in [&mut a, &mut b] {
            l.record_heldout(&[1.0, 1.0, 1.0], &[true, true, true])
                .unwrap();
        }
        assert_eq!(a, b);
        assert_eq!(a.heldout().span(), [5, 2, 1]);
    }

    #[test]
    fn corrupt_heldout_span_is_rejected() {
        let l = paused_ledger();
        let (body, _) = ledger_payload(&l);
        let at = spans_end(&l) - 8; // expert (0, 2)
        let with = |v: u64| {
            let mut b = body.clone();
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            Ledger::from_bytes(&envelope(Kind::Ledger, LEDGER_VERSION, &b))
        };
        // Up to the window count (4) is accepted, beyond it rejected.
        assert_eq!(with(4).unwrap().heldout().span(), [4, 1, 4]);
        for v in [5, u64::MAX] {
            let err = with(v).unwrap_err();
            assert!(
                matches!(&err, Error::State(m) if m.contains("span") && m.contains("4 recorded windows")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn invalid_heldout_horizon_in_state_is_rejected() {
        let l = Ledger::new(1, 1, 0.5).unwrap();
        let (mut body, _) = ledger_payload(&l);
        // The horizon, then one span (1 entry).
        let at = spans_end(&l) - 16;
        for h in [f64::NAN, 1.0, -0.5, f64::INFINITY] {
            body[at..at + 8].copy_from_slice(&h.to_bits().to_le_bytes());
            let err =
                Ledger::from_bytes(&envelope(Kind::Ledger, LEDGER_VERSION, &body)).unwrap_err();
            assert!(
                matches!(&err, Error::State(m) if m.contains("heldout_horizon")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn heldout_state_round_trips() {
        let mut l = Ledger::new(1, 2, 0.5)
            .unwrap()
            .with_heldout_decay(0.3)
            .unwrap()
            .with_heldout_horizon(0.7)
            .unwrap();
        l.record_heldout(&[-1.5, f64::NAN], &[true, true]).unwrap();
        let back = Ledger::from_bytes(&l.to_bytes()).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.heldout().horizon().to_bits(), 0.7f64.to_bits());
        assert_ne!(back, l.clone().with_heldout_horizon(0.25).unwrap());

        let cfg = RouterConfig {
            policy: Policy::Heldout { k: 1, min_dwell: 3 },
            ..RouterConfig::topk(1, 2, 1)
        };
        let mut r = Router::new(cfg).unwrap();
        let mut out = [false; 2];
        r.route(&[1.0f64, 1.0], &mut out).unwrap();
        assert_eq!(r.regate(l.heldout().ema(), &[0.0, 0.0]).unwrap(), 1);
        let bytes = r.to_bytes();
        assert_eq!(Router::from_bytes(&bytes).unwrap(), r);
    }

    /// A heldout router (2 modules × 2 experts, min_dwell 3) at step 5 whose experts changed at
    /// different steps: expert (0, 1) at step 1, (0, 0) at 3 and (1, 1) at 4.
    fn staggered_heldout_router() -> Router {
        let cfg = RouterConfig {
            policy: Policy::Heldout { k: 1, min_dwell: 3 },
            ..RouterConfig::topk(2, 2, 1)
        };
        let mut r = Router::new(cfg).unwrap();
        let mut out = [false; 4];
        let mut at = |r: &mut Router, step: u64| {
            while r.step() < step {
                r.route(&[1.0f64; 4], &mut out).unwrap();
            }
        };
        at(&mut r, 1);
        assert_eq!(r.regate(&[1.0, -1.0, 1.0, 1.0], &[0.0; 4]).unwrap(), 1);
        at(&mut r, 3);
        assert_eq!(r.regate(&[-1.0, 1.0, 1.0, 1.0], &[0.0; 4]).unwrap(), 1);
        at(&mut r, 4);
        assert_eq!(r.regate(&[1.0, 1.0, 1.0, -1.0], &[0.0; 4]).unwrap(), 1);
        at(&mut r, 5);
        assert_eq!(r.incumbents(), [false, false, true, false]);
        assert_eq!(r.last_change(), [3, 4]);
        assert_eq!(r.expert_last_change(), [3, 1, 0, 4]);
        r
    }

    #[test]
    fn router_round_trips_expert_last_change() {
        let r = staggered_heldout_router();
        let bytes = r.to_bytes();
        assert_eq!(bytes[5..7], 1u16.to_le_bytes());
        let body = payload(&bytes);
        // The payload ends with last_change u64×M, then expert_last_change u64×(M·E).
        let tail: Vec<u64> = body[body.len() - 8 * 6..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(tail, [3, 4, 3, 1, 0, 4]);
        let back = Router::from_bytes(&bytes).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.expert_last_change(), [3, 1, 0, 4]);
        assert_eq!(back.to_bytes(), bytes);
        // At step 5 expert (0, 1), dropped at 1, may return; (0, 0), dropped at 3, may not:
        // the restored router decides as the original.
        let (mut a, mut b) = (r, back);
        let (d, p) = ([1.0; 4], [5.0; 4]);
        assert_eq!(a.regate(&d, &p).unwrap(), 1);
        assert_eq!(b.regate(&d, &p).unwrap(), 1);
        assert_eq!(a, b);
        assert_eq!(a.incumbents(), [false, true, true, false]);
    }

    #[test]
    fn corrupt_expert_last_change_is_rejected() {
        let r = staggered_heldout_router();
        let body = payload(&r.to_bytes()).to_vec();
        let at = body.len() - 8 * 4; // expert (0, 0)
        let with = |v: u64, at: usize| {
            let mut b = body.clone();
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            Router::from_bytes(&envelope(Kind::Router, 1, &b))
        };
        // After the router's step (5).
        let err = with(6, at).unwrap_err();
        assert!(
            matches!(&err, Error::State(m) if m.contains("expert 0") && m.contains("step 6")),
            "{err:?}"
        );
        assert!(matches!(with(u64::MAX, at), Err(Error::State(_))));
        // Not after the step, but no longer matching the module's last change (3).
        assert!(matches!(with(2, at), Err(Error::State(_))));
        // Set under a policy that never sets it.
        let mut t = Router::new(RouterConfig::topk(1, 2, 1)).unwrap();
        t.route(&[1.0f64, 0.0], &mut [false; 2]).unwrap();
        let mut tb = payload(&t.to_bytes()).to_vec();
        let n = tb.len();
        tb[n - 8] = 1; // expert (0, 1) = 1 <= step
        assert!(matches!(
            Router::from_bytes(&envelope(Kind::Router, 1, &tb)),
            Err(Error::State(m)) if m.contains("policy 'heldout'")
        ));
    }

    /// A ledger (1 module × 2 experts, shrink 0.2 and 0.05, one and three trials per
    /// measurement) after three shrink trials: expert 0 kept one of two, expert 1 its one.
    fn shrunk_ledger() -> Ledger {
        let mut l = Ledger::new(1, 2, 0.5)
            .unwrap()
            .with_heldout_shrink(&[0.2, 0.05])
            .unwrap()
            .with_heldout_shrink_steps(&[1, 3])
            .unwrap();
        assert!(l.record_shrink(0, 1.0, 0.5).unwrap());
        assert!(!l.record_shrink(0, 0.5, 0.6).unwrap());
        assert!(l.record_shrink(1, 0.5, 0.4).unwrap());
        l
    }

    #[test]
    fn ledger_round_trips_the_shrink_books() {
        let l = shrunk_ledger();
        let bytes = l.to_bytes();
        let (body, end) = ledger_payload(&l);
        // The shrink books: heldout_shrink f64×E, heldout_shrink_steps, shrink_trials and
        // shrinks u64×E.
        let tail: Vec<u64> = body[end - 8 * 6..end]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(tail, [1, 3, 2, 1, 1, 1]);
        let shrink = &body[end - 8 * 8..end - 8 * 6];
        assert_eq!(shrink[..8], 0.2f64.to_bits().to_le_bytes());
        assert_eq!(shrink[8..], 0.05f64.to_bits().to_le_bytes());
        let back = Ledger::from_bytes(&bytes).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.heldout().shrink(), [0.2, 0.05]);
        assert_eq!(back.heldout().shrink_steps(), [1, 3]);
        assert_eq!(back.heldout().shrink_trials(), [2, 1]);
        assert_eq!(back.heldout().shrinks(), [1, 1]);
        assert_eq!(back.to_bytes(), bytes);
        for n in 0..body.len() {
            assert!(matches!(
                Ledger::from_bytes(&envelope(Kind::Ledger, LEDGER_VERSION, &body[..n])),
                Err(Error::State(_))
            ));
        }
    }

    #[test]
    fn version_3_ledger_loads_with_one_shrink_for_every_expert() {
        // A version-3 payload is today's with one shrink fraction for all experts and no
        // shrink steps (one trial each per measurement).
        let mut l = Ledger::new(1, 3, 0.5)
            .unwrap()
            .with_heldout_shrink(&[0.05])
            .unwrap();
        assert!(l.record_shrink(2, 1.0, 0.5).unwrap());
        let (body, end) = ledger_payload(&l);
        let s = end - 8 * 4 * 3; // the fractions, before the steps, trials and kept counts
        let mut old = body[..s + 8].to_vec();
        old.extend_from_slice(&body[s + 48..]);
        let back = Ledger::from_bytes(&envelope(Kind::Ledger, 3, &old)).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.heldout().shrink(), [0.05; 3]);
        assert_eq!(back.heldout().shrink_steps(), [1; 3]);
        assert_eq!(back.to_bytes(), l.to_bytes());
        // Neither payload decodes under the other's version.
        for (version, b) in [(3, &body[..]), (LEDGER_VERSION, &old[..])] {
            assert!(matches!(
                Ledger::from_bytes(&envelope(Kind::Ledger, version, b)),
                Err(Error::State(m)) if m.contains("does not match its shape")
            ));
        }
    }

    #[test]
    fn ledger_round_trips_the_kind_of_lora_trial() {
        for spectral in [true, false] {
            let l = shrunk_ledger().with_shrink_spectral(spectral);
            assert_eq!(l.heldout().shrink_spectral(), spectral);
            let bytes = l.to_bytes();
            let (body, end) = ledger_payload(&l);
            assert_eq!(body[end], u8::from(spectral));
            let back = Ledger::from_bytes(&bytes).unwrap();
            assert_eq!((back.heldout().shrink_spectral(), &back), (spectral, &l));
        }
        assert!(Ledger::new(1, 1, 0.5).unwrap().heldout().shrink_spectral());
        // A flag byte other than 0 or 1 is rejected.
        let (mut body, end) = ledger_payload(&shrunk_ledger());
        body[end] = 2;
        assert!(matches!(
            Ledger::from_bytes(&envelope(Kind::Ledger, LEDGER_VERSION, &body)),
            Err(Error::State(m)) if m.contains("shrink_spectral")
        ));
    }

    #[test]
    fn corrupt_shrink_books_are_rejected() {
        let l = shrunk_ledger();
        let (body, n) = ledger_payload(&l);
        let with = |at: usize, v: u64| {
            let mut b = body.clone();
            b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            Ledger::from_bytes(&envelope(Kind::Ledger, LEDGER_VERSION, &b))
        };
        // More kept than tried (expert 1: 2 kept of 1 tried), trials beyond MAX_STEP.
        assert!(matches!(with(n - 8, 2), Err(Error::State(m)) if m.contains("shrink")));
        assert!(matches!(with(n - 32, u64::MAX), Err(Error::State(m)) if m.contains("shrink")));
        // Shrink steps outside [1, MAX_SHRINK_STEPS] (either expert's).
        for at in [n - 48, n - 40] {
            for bad in [0, MAX_SHRINK_STEPS + 1, u64::MAX] {
                assert!(
                    matches!(with(at, bad), Err(Error::State(m)) if m.contains("heldout_shrink_steps"))
                );
            }
        }
        // Trials recorded under shrink 0 (either expert's), and a shrink outside [0, 1).
        for at in [n - 64, n - 56] {
            assert!(
                matches!(with(at, 0.0f64.to_bits()), Err(Error::State(m)) if m.contains("shrink"))
            );
            for x in [f64::NAN, 1.0, -0.1] {
                assert!(
                    matches!(with(at, x.to_bits()), Err(Error::State(m)) if m.contains("heldout_shrink"))
                );
            }
        }
        // Consistent edits load.
        assert_eq!(with(n - 8, 0).unwrap().heldout().shrinks(), [1, 0]);
        let steps = with(n - 48, MAX_SHRINK_STEPS).unwrap();
        assert_eq!(steps.heldout().shrink_steps(), [MAX_SHRINK_STEPS, 3]);
    }

    #[test]
    fn ledger_round_trips_the_minimum_span() {
        for min_span in [0, 3, 10, MAX_STEP] {
            let l = paused_ledger().with_heldout_min_span(min_span).unwrap();
            let bytes = l.to_bytes();
            let body = payload(&bytes);
            let end = body.len() - rate_tail(&l);
            assert_eq!(body[end - 8..end], min_span.to_le_bytes());
            let back = Ledger::from_bytes(&bytes).unwrap();
            assert_eq!(back.heldout().min_span(), min_span);
            assert_eq!(back, l);
            // The minimum span is part of the state: ledgers that differ only there differ.
            assert_ne!(back, paused_ledger().with_heldout_min_span(5).unwrap());
        }
        assert_eq!(Ledger::new(1, 1, 0.5).unwrap().heldout().min_span(), 0);
        // Beyond MAX_STEP, and data without it, are rejected.
        let bytes = paused_ledger().to_bytes();
        let mut body = payload(&bytes).to_vec();
        let n = body.len() - rate_tail(&paused_ledger());
        body[n - 8..n].copy_from_slice(&(MAX_STEP + 1).to_le_bytes());
        assert!(matches!(
            Ledger::from_bytes(&envelope(Kind::Ledger, LEDGER_VERSION, &body)),
            Err(Error::State(m)) if m.contains("heldout_min_span")
        ));
        body.truncate(n - 8);
        assert!(matches!(
            Ledger::from_bytes(&envelope(Kind::Ledger, LEDGER_VERSION, &body)),
            Err(Error::State(_))
        ));
    }

    /// A version-1 ledger as molf wrote it before the rate adaptation (1 module x 2
    /// experts, ema_decay 0.5; steps with scores [1, 2] and [3, 1], held-out windows
    /// [0.5, -0.25] (both moved) and [1, 2] (the first moved)).
    const LEDGER_V1: [&str; 7] = [
        "4d4f4c46020100db0000000000000001000000000000000200000000000000000000000000e03f02",
        "0000000000000032bbf1cd19142f340000000000000840000000000000f03f000000000000004000",
        "0000000000f83f020000000000000001000000000000000100000000000000010000000000000000",
        "000000000000000100000000000000e03f0200000000000000000000000000e83f000000000000d0",
        "bf000000000000d03f020000000000000000000000000000009a9999999999b93f00000000000000",
        "00000000000000000000000000000000000000000000000000010000000000000000c834de2aeba7",
        "d316",
    ];

    fn unhex(parts: &[&str]) -> Vec<u8> {
        let s: String = parts.concat();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn version_1_ledger_loads_with_the_rate_adaptation_off() {
        let old = unhex(&LEDGER_V1);
        assert_eq!(old[5..7], 1u16.to_le_bytes());
        let l = Ledger::from_bytes(&old).unwrap();
        // What it recorded, as it recorded it.
        assert_eq!((l.step(), l.heldout().windows()), (2, 2));
        assert_eq!(l.last_scores(), [3.0, 1.0]);
        assert_eq!(l.heldout().ema(), [0.75, -0.25]);
        assert_eq!(l.heldout().span(), [2, 0]);
        // Off, every multiplier 1, the other settings at their defaults: it resumes as it ran.
        assert_eq!(l.heldout().rate_rule(), RateRule::default());
        assert!(!l.heldout().rate_rule().adapt);
        assert_eq!(l.heldout().rate(), [1.0, 1.0]);
        // Its one shrink fraction is both experts'.
        assert_eq!(l.heldout().shrink(), [0.1, 0.1]);
        assert_eq!(l.heldout().shrink_steps(), [1, 1]);
        // Written again, it is the current version: the old bytes with the shrink once per
        // expert and the shrink steps (1 each), plus the rate tail.
        let new = l.to_bytes();
        assert_eq!(new[5..7], LEDGER_VERSION.to_le_bytes());
        let (old_body, new_body) = (payload(&old), payload(&new));
        let at = old_body.len() - 8 - 1 - 16 * 2 - 8; // the shrink, before the books, flag and span
        let one: Vec<u8> = 1u64.to_le_bytes().repeat(2);
        assert_eq!(new_body[..at + 8], old_body[..at + 8]);
        assert_eq!(new_body[at + 8..at + 16], old_body[at..at + 8]);
        assert_eq!(new_body[at + 16..at + 32], one[..]);
        assert_eq!(new_body[at + 32..old_body.len() + 24], old_body[at + 8..]);
        assert_eq!(new_body.len() - old_body.len() - 24, rate_tail(&l));
        assert_eq!(Ledger::from_bytes(&new).unwrap(), l);
        // A current payload under a version-1 header (and the reverse) does not decode.
        for (version, body) in [(1, new_body), (LEDGER_VERSION, old_body)] {
            assert!(matches!(
                Ledger::from_bytes(&envelope(Kind::Ledger, version, body)),
                Err(Error::State(m)) if m.contains("does not match its shape")
            ));
        }
        for version in [0, 5, 7] {
            assert!(matches!(
                Ledger::from_bytes(&envelope(Kind::Ledger, version, old_body)),
                Err(Error::State(m)) if m.contains(&format!("version {version};")) && m.contains("[1, 2, 3, 4]")
            ));
        }
    }

    /// A version-2 ledger as molf wrote it before the floor (1 module x 3 experts,
    /// ema_decay 0.5, the adaptation on at up 1.25, down 0.5, cap 2; one step, held-out
    /// windows [1, -1, 0] (the third did not move) and [1, -1, 0.5]: multipliers
    /// [1.5625, 0.25, 1.25]).
    const LEDGER_V2: [&str; 9] = [
        "4d4f4c46020200450100000000000001000000000000000300000000000000000000000000e03f01",
        "00000000000000c443575b1629a376000000000000f03f0000000000000040000000000000084000",
        "0000000000f03f000000000000004000000000000008400000000000000000000000000000000001",
        "000000000000000000000000000000ffffffffffffffff0000000000000000000001000000000000",
        "e03f0200000000000000000000000000f03f000000000000f0bf000000000000e03f000000000000",
        "d03f0200000000000000020000000000000001000000000000009a9999999999b93f000000000000",
        "00000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "000001000000000000000001000000000000f43f000000000000e03f000000000000004000000000",
        "0000f93f000000000000d03f000000000000f43f2fd1c843dc207906",
    ];

    #[test]
    fn version_2_ledger_loads_without_a_floor_or_trust() {
        let old = unhex(&LEDGER_V2);
        assert_eq!(old[5..7], 2u16.to_le_bytes());
        let mut l = Ledger::from_bytes(&old).unwrap();
        assert_eq!(l.heldout().windows(), 2);
        assert_eq!(l.heldout().rate(), [1.5625, 0.25, 1.25]);
        // The rule it ran under: no floor (a multiplier of 0.25 is below any other) and no
        // trust condition (the second window raised c where [1, 0.5] descended).
        let rule = RateRule {
            adapt: true,
            up: 1.25,
            down: 0.5,
            cap: 2.0,
            floor: 0.0,
            trust: 0.0,
        };
        assert_eq!(l.heldout().rate_rule(), rule);
        // Written again, it is the current version: the old bytes with the shrink once per
        // expert, the shrink steps (1 each), the floor and the trust after the cap, and it
        // reads back the same.
        let new = l.to_bytes();
        assert_eq!(new[5..7], LEDGER_VERSION.to_le_bytes());
        let (old_body, new_body) = (payload(&old), payload(&new));
        let at = old_body.len() - 8 * 3; // the multipliers, after the cap
        let s = at - 24 - 1 - 8 - 1 - 48 - 8; // the shrink: before the books, flag, span and rule
        assert_eq!(new_body[..s + 8], old_body[..s + 8]);
        assert_eq!(new_body[s + 8..s + 16], old_body[s..s + 8]);
        assert_eq!(new_body[s + 16..s + 24], old_body[s..s + 8]);
        assert_eq!(new_body[s + 24..s + 48], 1u64.to_le_bytes().repeat(3)[..]);
        assert_eq!(new_body[s + 48..at + 40], old_body[s + 8..at]);
        assert_eq!(new_body[at + 40..at + 56], [0u8; 16]);
        assert_eq!(new_body[at + 56..], old_body[at..]);
        assert_eq!(Ledger::from_bytes(&new).unwrap(), l);
        // It goes on as it ran: down below 1 (and to 0.125), up whatever the potential.
        l.record_heldout(&[-1.0; 3], &[true; 3]).unwrap();
        l.adapt_heldout_rate(&[-1.0; 3], &[1.0; 3]).unwrap();
        assert_eq!(l.heldout().rate(), [0.78125, 0.125, 0.625]);
        l.record_heldout(&[1e-9; 3], &[true; 3]).unwrap();
        l.adapt_heldout_rate(&[1e-9; 3], &[1.0, f64::NAN, -1.0])
            .unwrap();
        assert_eq!(l.heldout().rate(), [0.9765625, 0.15625, 0.78125]);
        // With the adaptation off the floor and the trust have no effect: such a ledger
        // decodes with the defaults, the ones a ledger built with it off has.
        let mut off = old_body.to_vec();
        off[at - 25] = 0;
        let ones: Vec<u8> = [1.0f64; 3]
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect();
        off[at..].copy_from_slice(&ones);
        let l = Ledger::from_bytes(&envelope(Kind::Ledger, 2, &off)).unwrap();
        assert_eq!(
            l.heldout().rate_rule(),
            RateRule {
                adapt: false,
                floor: DEFAULT_RATE_FLOOR,
                trust: DEFAULT_RATE_TRUST,
                ..rule
            }
        );
        // A current payload under a version-2 header (and the reverse) does not decode.
        for (version, body) in [(2, new_body), (LEDGER_VERSION, old_body)] {
            assert!(matches!(
                Ledger::from_bytes(&envelope(Kind::Ledger, version, body)),
                Err(Error::State(m)) if m.contains("does not match its shape")
            ));
        }
    }

    /// An adapting rule with a floor under 1 and the trust condition, for the rate tests.
    fn floored_rule() -> RateRule {
        RateRule {
            adapt: true,
            up: 1.25,
            down: 0.5,
            cap: 2.0,
            floor: 0.75,
            trust: 0.8,
        }
    }

    #[test]
    fn ledger_round_trips_the_rate() {
        let mut l = paused_ledger().with_heldout_rate(floored_rule()).unwrap();
        l.record_heldout(&[1.0, -1.0, 0.0], &[true, true, false])
            .unwrap();
        l.adapt_heldout_rate(&[1.0, -1.0, 0.0], &[1.25, 1.0, 0.0])
            .unwrap();
        assert_eq!(l.heldout().rate(), [1.25, 0.75, 1.0]);
        let bytes = l.to_bytes();
        let body = payload(&bytes);
        let tail = &body[body.len() - rate_tail(&l)..];
        assert_eq!(tail[0], 1);
        let words: Vec<u64> = tail[1..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want: Vec<u64> = [1.25, 0.5, 2.0, 0.75, 0.8, 1.25, 0.75, 1.0]
            .iter()
            .map(|x: &f64| x.to_bits())
            .collect();
        assert_eq!(words, want);
        let back = Ledger::from_bytes(&bytes).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.to_bytes(), bytes);
        // Ledgers that differ only in a multiplier or a rate setting differ.
        let mut other = l.clone();
        other
            .adapt_heldout_rate(&[0.0, 0.0, 1.0], &[0.0, 0.0, 1.0])
            .unwrap();
        assert_ne!(other, l);
        for changed in [
            RateRule {
                cap: 3.0,
                ..floored_rule()
            },
            RateRule {
                trust: 0.5,
                ..floored_rule()
            },
        ] {
            assert_ne!(l.clone().with_heldout_rate(changed).unwrap(), l);
        }
        // A flag byte other than 0 or 1, and a multiplier above the cap, are rejected.
        let at = body.len() - rate_tail(&l);
        let mut b = body.to_vec();
        b[at] = 2;
        assert!(matches!(
            Ledger::from_bytes(&envelope(Kind::Ledger, LEDGER_VERSION, &b)),
            Err(Error::State(m)) if m.contains("rate_adapt")
        ));
        let mut b = body.to_vec();
        let n = b.len();
        b[n - 8..].copy_from_slice(&2.5f64.to_bits().to_le_bytes());
        assert!(matches!(
            Ledger::from_bytes(&envelope(Kind::Ledger, LEDGER_VERSION, &b)),
            Err(Error::State(m)) if m.contains("rate multipliers")
        ));
    }

    #[test]
    fn corrupt_rate_floor_is_rejected() {
        let mut l = paused_ledger().with_heldout_rate(floored_rule()).unwrap();
        l.record_heldout(&[1.0, -1.0, 0.0], &[true, true, false])
            .unwrap();
        l.adapt_heldout_rate(&[1.0, -1.0, 0.0], &[1.0; 3]).unwrap();
        let bytes = l.to_bytes();
        let body = payload(&bytes);
        let at = body.len() - 8 * 5; // the floor, before the trust and 3 multipliers
        assert_eq!(body[at..at + 8], 0.75f64.to_bits().to_le_bytes());
        let with = |floor: f64| {
            let mut b = body.to_vec();
            b[at..at + 8].copy_from_slice(&floor.to_bits().to_le_bytes());
            Ledger::from_bytes(&envelope(Kind::Ledger, LEDGER_VERSION, &b))
        };
        // Outside [0, 1], or NaN: an invalid setting.
        for floor in [f64::NAN, -0.25, 1.5, f64::INFINITY] {
            let err = with(floor).unwrap_err();
            assert!(
                matches!(&err, Error::State(m) if m.contains("heldout_rate_floor")),
                "{floor}: {err:?}"
            );
        }
        // Above a multiplier (0.75): a state the rule cannot reach.
        let err = with(0.8).unwrap_err();
        assert!(
            matches!(&err, Error::State(m) if m.contains("rate multipliers")),
            "{err:?}"
        );
        // Consistent edits load.
        for floor in [0.0, 0.5, 0.75] {
            assert_eq!(with(floor).unwrap().heldout().rate_rule().floor, floor);
        }
    }

    #[test]
    fn corrupt_rate_trust_is_rejected() {
        let rule = RateRule {
            adapt: true,
            up: 1.25,
            down: 0.5,
            cap: 2.0,
            floor: 1.0,
            trust: 0.8,
        };
        let mut l = paused_ledger().with_heldout_rate(rule).unwrap();
        l.record_heldout(&[1.0, -1.0, 0.0], &[true, true, false])
            .unwrap();
        l.adapt_heldout_rate(&[1.0, -1.0, 0.0], &[1.0; 3]).unwrap();
        assert_eq!(l.heldout().rate(), [1.25, 1.0, 1.0]);
        let bytes = l.to_bytes();
        let body = payload(&bytes);
        let at = body.len() - 8 * 4; // the trust, before 3 multipliers
        assert_eq!(body[at..at + 8], 0.8f64.to_bits().to_le_bytes());
        let with = |trust: f64| {
            let mut b = body.to_vec();
            b[at..at + 8].copy_from_slice(&trust.to_bits().to_le_bytes());
            Ledger::from_bytes(&envelope(Kind::Ledger, LEDGER_VERSION, &b))
        };
        // Negative, infinite or NaN: an invalid setting.
        for trust in [
            f64::NAN,
            -0.25,
            -0.0 - 1e-300,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let err = with(trust).unwrap_err();
            assert!(
                matches!(&err, Error::State(m) if m.contains("heldout_rate_trust")),
                "{trust}: {err:?}"
            );
        }
        // Any other trust fits any multipliers: it only decides whether a rate goes up.
        for trust in [0.0, 0.5, 3.0] {
            assert_eq!(with(trust).unwrap().heldout().rate_rule().trust, trust);
        }
    }
}
