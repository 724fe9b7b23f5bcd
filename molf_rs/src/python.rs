//! Python bindings (`molf._core`).
//!
//! Every entry point runs inside [`guarded`], so a Rust panic surfaces as
//! `molf._core.InternalError` instead of pyo3's `PanicException` (a `BaseException` that
//! ordinary `except Exception` handlers would not catch). Arrays cross the boundary as whole
//! numpy buffers: no per-element Python work, and the GIL is released for large inputs.
//!
//! `Router` and `Ledger` are shared between Python threads safely: each holds its state in a
//! mutex, taken inside the GIL-free section, so concurrent calls run one after another (in
//! the order they get the lock) instead of failing with pyo3's "Already borrowed". No thread
//! waits for the GIL while holding a lock, so the two cannot deadlock: state is copied out
//! under the lock and only then turned into Python objects (whose allocation may run arbitrary
//! Python code, e.g. a finaliser).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard};

use numpy::{
    dtype, Element, PyArray1, PyArray2, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods,
    PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyOverflowError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyTuple};

use crate::error::{at_least, Error};
use crate::heldout::{
    RateRule, DEFAULT_HELDOUT_DECAY, DEFAULT_HELDOUT_HORIZON, DEFAULT_HELDOUT_MIN_SPAN,
    DEFAULT_HELDOUT_SHRINK, DEFAULT_RATE_ADAPT, DEFAULT_RATE_CAP, DEFAULT_RATE_DOWN,
    DEFAULT_RATE_FLOOR, DEFAULT_RATE_TRUST, DEFAULT_RATE_UP, DEFAULT_SHRINK_SPECTRAL,
    DEFAULT_SHRINK_STEPS,
};
use crate::ledger::Ledger;
use crate::phase::PHASES;
use crate::router::{check_margin, check_shape, Forecast, Policy, Router, RouterConfig, POLICIES};
use crate::scores::{self, ScoreKind, StateFloat};

create_exception!(
    molf._core,
    ConfigError,
    PyValueError,
    "Invalid configuration or argument value."
);
create_exception!(
    molf._core,
    ScoreError,
    PyValueError,
    "Score or mask array of the wrong shape, dtype or number of dimensions."
);
create_exception!(
    molf._core,
    StateError,
    PyValueError,
    "Serialised state that is truncated, corrupt, of another kind or version, or inconsistent."
);
create_exception!(
    molf._core,
    InternalError,
    PyRuntimeError,
    "A broken invariant inside the molf core (a bug; please report it)."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Config(m) => ConfigError::new_err(m),
            Error::Score(m) => ScoreError::new_err(m),
            Error::State(m) => StateError::new_err(m),
            Error::Internal(m) => InternalError::new_err(m),
        }
    }
}

/// Above this many entries, `route` and `record` release the GIL while they compute; below
/// it, releasing and re-acquiring costs more than the work.
const DETACH_ENTRIES: usize = 4096;

/// Runs `f`, turning a panic into `InternalError`.
fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(InternalError::new_err(format!(
            "molf core panicked (a bug, please report it): {msg}"
        )))
    })
}

/// Locks a binding's state. A poisoned lock (a panic inside the core, already reported as
/// `InternalError`) is taken over as is, as a plain `&mut` borrow would have been.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` with the GIL released when the input is large.
fn maybe_detach<T: Send>(py: Python<'_>, entries: usize, f: impl FnOnce() -> T + Send) -> T {
    if entries > DETACH_ENTRIES {
        py.detach(f)
    } else {
        f()
    }
}

/// An integer argument. Python ints that do not fit in i64, and bools (an int subclass, so
/// `True` would silently mean 1), are kept aside so the constructor can report them as
/// `ConfigError` naming the argument, instead of pyo3's `OverflowError` or nothing at all.
enum Int {
    Small(i64),
    Huge(String),
    Bool(bool),
}

impl<'a, 'py> FromPyObject<'a, 'py> for Int {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if let Ok(b) = obj.cast::<PyBool>() {
            return Ok(Int::Bool(b.is_true()));
        }
        match obj.extract::<i64>() {
            Ok(v) => Ok(Int::Small(v)),
            Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
                Ok(Int::Huge(obj.repr()?.to_string()))
            }
            Err(e) => Err(e),
        }
    }
}

impl Int {
    fn count(&self, name: &str, min: u64) -> Result<u64, Error> {
        match self {
            Int::Small(v) => at_least(name, *v, min),
            Int::Huge(repr) => Err(Error::Config(format!(
                "{name} must be >= {min} and <= {}, got {repr}",
                i64::MAX
            ))),
            Int::Bool(b) => Err(Error::Config(format!(
                "{name} must be an integer, got the bool {}",
                if *b { "True" } else { "False" }
            ))),
        }
    }
}

/// The policy a constructor name means: one of [`POLICIES`], or `"paper"`, which names the
/// published EPD top-1 (`topk`) explicitly: code that wants the paper's semantics says so
/// even if the default policy changes.
fn policy_name(name: &str) -> Result<&'static str, Error> {
    match name {
        "paper" => Ok(POLICIES[0]),
        _ => POLICIES.into_iter().find(|&p| p == name).ok_or_else(|| {
            Error::Config(format!(
                "unknown policy '{name}'; expected one of 'topk', 'hysteresis', 'heldout', \
                 'paper' (an alias of 'topk')"
            ))
        }),
    }
}

/// Maps the constructor's `topk`, `margin` and `min_dwell` onto the [`Policy`] named
/// `name` (from [`policy_name`]), refusing a setting the policy does not have.
fn policy_from_args(name: &str, k: u64, margin: f64, min_dwell: u64) -> Result<Policy, Error> {
    check_margin(margin)?;
    match name {
        "hysteresis" => Ok(Policy::Hysteresis {
            k,
            margin,
            min_dwell,
        }),
        "heldout" if margin != 0.0 => Err(Error::Config(format!(
            "margin belongs to policy 'hysteresis'; with policy 'heldout' it must be 0, got {margin}"
        ))),
        "heldout" => Ok(Policy::Heldout { k, min_dwell }),
        _ if margin != 0.0 || min_dwell != 0 => Err(Error::Config(format!(
            "margin and min_dwell belong to policy 'hysteresis'; with policy 'topk' they \
             must be 0, got margin={margin} min_dwell={min_dwell}"
        ))),
        _ => Ok(Policy::TopK { k }),
    }
}

/// A 2-D input array borrowed from numpy when C-contiguous, else copied in row-major order.
enum Input<'py, T: Element> {
    Borrowed(PyReadonlyArray2<'py, T>),
    Copied(Vec<T>),
}

impl<T: Element + Copy> Input<'_, T> {
    fn slice(&self) -> &[T] {
        match self {
            Input::Borrowed(a) => a.as_slice().expect("checked C-contiguous in `read`"),
            Input::Copied(v) => v,
        }
    }
}

enum Scores<'py> {
    F32(Input<'py, f32>),
    F64(Input<'py, f64>),
}

/// The score buffer alone: plain slices, so it can cross into a GIL-free closure.
enum ScoreSlice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

impl Scores<'_> {
    fn view(&self) -> ScoreSlice<'_> {
        match self {
            Scores::F32(s) => ScoreSlice::F32(s.slice()),
            Scores::F64(s) => ScoreSlice::F64(s.slice()),
        }
    }
}

/// Checks that `obj` is a numpy array of shape `(m, e)` and an allowed dtype; the message
/// names the argument, the expected and the given shape and dtype.
fn check_array<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    name: &str,
    (m, e): (usize, usize),
    allowed: &str,
) -> PyResult<&'a Bound<'py, PyUntypedArray>> {
    let expected = format!("a numpy array of shape ({m}, {e}) and dtype {allowed}");
    let Ok(arr) = obj.cast::<PyUntypedArray>() else {
        let ty = obj.get_type().name()?;
        return Err(ScoreError::new_err(format!(
            "{name} must be {expected}, got an object of type {ty}"
        )));
    };
    if is_masked(obj)? {
        let fill = match (allowed, name) {
            ("bool", _) => format!("{name}.filled(False)"),
            (_, "scores") => "scores.filled(np.nan) (a NaN score never wins)".to_string(),
            _ => format!("{name}.filled(np.nan)"),
        };
        return Err(ScoreError::new_err(format!(
            "{name} must be {expected}, got a numpy.ma.MaskedArray, whose mask molf would not read: \
             fill the masked entries first, e.g. {fill}"
        )));
    }
    if arr.shape() != [m, e] {
        return Err(ScoreError::new_err(format!(
            "{name} must be {expected}, got shape {} (ndim {}) and dtype {}",
            arr.getattr("shape")?.repr()?,
            arr.ndim(),
            arr.dtype()
        )));
    }
    Ok(arr)
}

/// True for a `numpy.ma.MaskedArray` (an ndarray subclass: its buffer holds whatever lies
/// under the masked entries). Plain ndarrays skip the lookup.
fn is_masked(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    if obj.is_exact_instance_of::<PyUntypedArray>() {
        return Ok(false);
    }
    let masked = obj.py().import("numpy.ma")?.getattr("MaskedArray")?;
    obj.is_instance(&masked)
}

fn read<'py, T: Element + Copy>(arr: &Bound<'py, PyUntypedArray>) -> PyResult<Input<'py, T>> {
    let typed = arr.cast::<PyArray2<T>>()?;
    let ro = typed
        .try_readonly()
        .map_err(|e| ScoreError::new_err(format!("cannot read the array: {e}")))?;
    // `as_slice` also accepts Fortran order, whose buffer is column-major: check C order.
    Ok(if arr.is_c_contiguous() {
        Input::Borrowed(ro)
    } else {
        Input::Copied(ro.as_array().iter().copied().collect())
    })
}

fn read_scores<'py>(obj: &Bound<'py, PyAny>, shape: (usize, usize)) -> PyResult<Scores<'py>> {
    let py = obj.py();
    let arr = check_array(obj, "scores", shape, "float32 or float64")?;
    let dt = arr.dtype();
    if dt.is_equiv_to(&dtype::<f32>(py)) {
        Ok(Scores::F32(read(arr)?))
    } else if dt.is_equiv_to(&dtype::<f64>(py)) {
        Ok(Scores::F64(read(arr)?))
    } else {
        Err(ScoreError::new_err(format!(
            "scores must be a numpy array of shape ({}, {}) and dtype float32 or float64, got dtype {dt}",
            shape.0, shape.1
        )))
    }
}

/// A matrix argument of shape `shape` and exactly the element type `T` (named `label` in
/// messages): masks, held-out measurements.
fn read_exact<'py, T: Element + Copy>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    shape: (usize, usize),
    label: &str,
) -> PyResult<Input<'py, T>> {
    let arr = check_array(obj, name, shape, label)?;
    let dt = arr.dtype();
    if !dt.is_equiv_to(&dtype::<T>(obj.py())) {
        return Err(ScoreError::new_err(format!(
            "{name} must be a numpy array of shape ({}, {}) and dtype {label}, got dtype {dt}",
            shape.0, shape.1
        )));
    }
    read(arr)
}

/// `Router.forecast()`'s value: the rule's name and, for "gated", its mask.
type ForecastRule<'py> = (&'static str, Option<Bound<'py, PyArray2<bool>>>);

fn matrix<'py, T: Element + Copy>(
    py: Python<'py>,
    data: &[T],
    shape: (usize, usize),
) -> PyResult<Bound<'py, PyArray2<T>>> {
    PyArray1::from_slice(py, data).reshape([shape.0, shape.1])
}

#[pyclass(name = "Router", module = "molf._core", eq, frozen)]
struct PyRouter {
    inner: Mutex<Router>,
    /// `(num_modules, num_experts)`, fixed at construction: readable without the lock.
    shape: (usize, usize),
}

impl PartialEq for PyRouter {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other) || *self.router() == *other.router()
    }
}

impl PyRouter {
    fn wrap(router: Router) -> Self {
        let c = router.config();
        PyRouter {
            shape: (c.num_modules as usize, c.num_experts as usize),
            inner: Mutex::new(router),
        }
    }

    fn router(&self) -> MutexGuard<'_, Router> {
        lock(&self.inner)
    }

    fn shape(&self) -> (usize, usize) {
        self.shape
    }
}

#[pymethods]
impl PyRouter {
    #[new]
    #[pyo3(signature = (
        num_modules, num_experts, topk = Int::Small(1), policy = "topk", margin = 0.0,
        min_dwell = Int::Small(0), warmup_steps = Int::Small(0), freeze_after = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_modules: Int,
        num_experts: Int,
        topk: Int,
        policy: &str,
        margin: f64,
        min_dwell: Int,
        warmup_steps: Int,
        freeze_after: Option<Int>,
    ) -> PyResult<Self> {
        guarded(|| {
            let num_modules = num_modules.count("num_modules", 1)?;
            let num_experts = num_experts.count("num_experts", 1)?;
            let k = topk.count("topk", 1)?;
            // Checked in the order they always were, so that a call with several faults keeps
            // its message: the policy name before the later arguments, the shape before the
            // policy's settings.
            let policy = policy_name(policy)?;
            let min_dwell = min_dwell.count("min_dwell", 0)?;
            let warmup_steps = warmup_steps.count("warmup_steps", 0)?;
            let freeze_after = freeze_after
                .map(|f| f.count("freeze_after", 0))
                .transpose()?;
            check_shape(num_modules, num_experts)?;
            let config = RouterConfig {
                num_modules,
                num_experts,
                policy: policy_from_args(policy, k, margin, min_dwell)?,
                warmup_steps,
                freeze_after,
            };
            Ok(PyRouter::wrap(Router::new(config)?))
        })
    }

    #[getter]
    fn num_modules(&self) -> u64 {
        self.router().config().num_modules
    }
    #[getter]
    fn num_experts(&self) -> u64 {
        self.router().config().num_experts
    }
    #[getter]
    fn topk(&self) -> u64 {
        self.router().config().policy.k()
    }
    #[getter]
    fn policy(&self) -> &'static str {
        self.router().config().policy.name()
    }
    #[getter]
    fn margin(&self) -> f64 {
        self.router().config().policy.margin()
    }
    #[getter]
    fn min_dwell(&self) -> u64 {
        self.router().config().policy.min_dwell()
    }
    #[getter]
    fn warmup_steps(&self) -> u64 {
        self.router().config().warmup_steps
    }
    #[getter]
    fn freeze_after(&self) -> Option<u64> {
        self.router().config().freeze_after
    }
    #[getter]
    fn step(&self) -> u64 {
        self.router().step()
    }
    #[getter]
    fn phase(&self) -> &'static str {
        self.router().phase().name()
    }

    fn route<'py>(
        &self,
        py: Python<'py>,
        scores: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<bool>>> {
        guarded(|| {
            let shape = self.shape();
            let scores = read_scores(scores, shape)?;
            let out = PyArray2::<bool>::zeros(py, [shape.0, shape.1], false);
            {
                let mut rw = out
                    .try_readwrite()
                    .map_err(|e| InternalError::new_err(e.to_string()))?;
                let dst = rw
                    .as_slice_mut()
                    .map_err(|e| InternalError::new_err(e.to_string()))?;
                let inner = &self.inner;
                let view = scores.view();
                maybe_detach(py, dst.len(), || {
                    let mut router = lock(inner);
                    match view {
                        ScoreSlice::F32(s) => router.route(s, dst),
                        ScoreSlice::F64(s) => router.route(s, dst),
                    }
                })?;
            }
            Ok(out)
        })
    }

    /// Policy 'heldout': updates the active experts from held-out measurements (see the
    /// Rust `Router::regate`); returns the number of modules whose set changed.
    fn regate(&self, descent: &Bound<'_, PyAny>, potential: &Bound<'_, PyAny>) -> PyResult<usize> {
        guarded(|| {
            let shape = self.shape();
            let descent = read_exact::<f64>(descent, "descent", shape, "float64")?;
            let potential = read_exact::<f64>(potential, "potential", shape, "float64")?;
            Ok(self.router().regate(descent.slice(), potential.slice())?)
        })
    }

    /// The next `route` call's winners as a rule of its scores, where one exists:
    /// `("gated", mask)`, `("top1", None)` or `None`.
    fn forecast<'py>(&self, py: Python<'py>) -> PyResult<Option<ForecastRule<'py>>> {
        let forecast = self.router().forecast();
        guarded(|| {
            Ok(match forecast {
                None => None,
                Some(Forecast::Top1) => Some(("top1", None)),
                Some(Forecast::Gated(mask)) => {
                    Some(("gated", Some(matrix(py, &mask, self.shape())?)))
                }
            })
        })
    }

    fn incumbents<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<bool>>> {
        let incumbents = self.router().incumbents().to_vec();
        guarded(|| matrix(py, &incumbents, self.shape()))
    }

    /// Copy, uint64 `(num_modules, num_experts)`: the step at which `regate` last flipped
    /// each expert (0: never; other policies leave it 0).
    fn expert_last_change<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u64>>> {
        let data = self.router().expert_last_change().to_vec();
        guarded(|| matrix(py, &data, self.shape()))
    }

    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        guarded(|| {
            let c = *self.router().config();
            let d = PyDict::new(py);
            d.set_item("num_modules", c.num_modules)?;
            d.set_item("num_experts", c.num_experts)?;
            d.set_item("topk", c.policy.k())?;
            d.set_item("policy", c.policy.name())?;
            d.set_item("margin", c.policy.margin())?;
            d.set_item("min_dwell", c.policy.min_dwell())?;
            d.set_item("warmup_steps", c.warmup_steps)?;
            d.set_item("freeze_after", c.freeze_after)?;
            Ok(d)
        })
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.router().to_bytes();
        guarded(|| Ok(PyBytes::new(py, &bytes)))
    }

    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        guarded(|| Ok(PyRouter::wrap(Router::from_bytes(data)?)))
    }

    /// Pickling (and `copy.deepcopy`) go through the versioned byte format.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let bytes = slf.get().to_bytes(slf.py())?;
        Ok((slf.get_type().getattr("from_bytes")?, (bytes,)))
    }

    fn __repr__(&self) -> String {
        let r = self.router();
        let c = r.config();
        let freeze = c.freeze_after.map_or("None".to_string(), |f| f.to_string());
        format!(
            "Router(num_modules={}, num_experts={}, topk={}, policy='{}', margin={:?}, \
             min_dwell={}, warmup_steps={}, freeze_after={freeze}, step={}, phase='{}')",
            c.num_modules,
            c.num_experts,
            c.policy.k(),
            c.policy.name(),
            c.policy.margin(),
            c.policy.min_dwell(),
            c.warmup_steps,
            r.step(),
            r.phase().name()
        )
    }
}

#[pyclass(name = "Ledger", module = "molf._core", eq, frozen)]
struct PyLedger {
    inner: Mutex<Ledger>,
    /// `(num_modules, num_experts)`, fixed at construction: readable without the lock.
    shape: (usize, usize),
}

impl PartialEq for PyLedger {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other) || *self.ledger() == *other.ledger()
    }
}

impl PyLedger {
    fn wrap(ledger: Ledger) -> Self {
        PyLedger {
            shape: (ledger.num_modules(), ledger.num_experts()),
            inner: Mutex::new(ledger),
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.inner)
    }

    fn shape(&self) -> (usize, usize) {
        self.shape
    }
}

/// `heldout_shrink`: one fraction for every expert, or a sequence of one per expert.
#[derive(FromPyObject)]
enum Fractions {
    One(f64),
    Each(Vec<f64>),
}

impl Fractions {
    fn values(self) -> Vec<f64> {
        match self {
            Fractions::One(x) => vec![x],
            Fractions::Each(v) => v,
        }
    }
}

/// `heldout_shrink_steps`: one count for every expert, or a sequence of one per expert.
#[derive(FromPyObject)]
enum Counts {
    One(Int),
    Each(Vec<Int>),
}

impl Counts {
    fn values(self, name: &str, min: u64) -> Result<Vec<u64>, Error> {
        match self {
            Counts::One(n) => Ok(vec![n.count(name, min)?]),
            Counts::Each(v) => v.iter().map(|n| n.count(name, min)).collect(),
        }
    }
}

#[pymethods]
impl PyLedger {
    #[new]
    #[pyo3(signature = (
        num_modules,
        num_experts,
        ema_decay = 0.9,
        heldout_decay = DEFAULT_HELDOUT_DECAY,
        heldout_horizon = DEFAULT_HELDOUT_HORIZON,
        heldout_shrink = Fractions::One(DEFAULT_HELDOUT_SHRINK),
        heldout_shrink_steps = Counts::One(Int::Small(DEFAULT_SHRINK_STEPS as i64)),
        shrink_spectral = DEFAULT_SHRINK_SPECTRAL,
        heldout_min_span = Int::Small(DEFAULT_HELDOUT_MIN_SPAN as i64),
        heldout_adapt_rate = DEFAULT_RATE_ADAPT,
        heldout_rate_up = DEFAULT_RATE_UP,
        heldout_rate_down = DEFAULT_RATE_DOWN,
        heldout_rate_cap = DEFAULT_RATE_CAP,
        heldout_rate_floor = DEFAULT_RATE_FLOOR,
        heldout_rate_trust = DEFAULT_RATE_TRUST,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_modules: Int,
        num_experts: Int,
        ema_decay: f64,
        heldout_decay: f64,
        heldout_horizon: f64,
        heldout_shrink: Fractions,
        heldout_shrink_steps: Counts,
        shrink_spectral: bool,
        heldout_min_span: Int,
        heldout_adapt_rate: bool,
        heldout_rate_up: f64,
        heldout_rate_down: f64,
        heldout_rate_cap: f64,
        heldout_rate_floor: f64,
        heldout_rate_trust: f64,
    ) -> PyResult<Self> {
        guarded(|| {
            Ok(PyLedger::wrap(
                Ledger::new(
                    num_modules.count("num_modules", 1)?,
                    num_experts.count("num_experts", 1)?,
                    ema_decay,
                )?
                .with_heldout_decay(heldout_decay)?
                .with_heldout_horizon(heldout_horizon)?
                .with_heldout_shrink(&heldout_shrink.values())?
                .with_heldout_shrink_steps(
                    &heldout_shrink_steps.values("heldout_shrink_steps", 1)?,
                )?
                .with_shrink_spectral(shrink_spectral)
                .with_heldout_min_span(heldout_min_span.count("heldout_min_span", 0)?)?
                .with_heldout_rate(RateRule {
                    adapt: heldout_adapt_rate,
                    up: heldout_rate_up,
                    down: heldout_rate_down,
                    cap: heldout_rate_cap,
                    floor: heldout_rate_floor,
                    trust: heldout_rate_trust,
                })?,
            ))
        })
    }

    /// Records one held-out window (see the Rust `Ledger::record_heldout`).
    fn record_heldout(&self, descent: &Bound<'_, PyAny>, moved: &Bound<'_, PyAny>) -> PyResult<()> {
        guarded(|| {
            let shape = self.shape();
            let descent = read_exact::<f64>(descent, "descent", shape, "float64")?;
            let moved = read_exact::<bool>(moved, "moved", shape, "bool")?;
            Ok(self
                .ledger()
                .record_heldout(descent.slice(), moved.slice())?)
        })
    }

    /// Adapts the rate multipliers to the window just recorded (see the Rust
    /// `Ledger::adapt_heldout_rate`).
    fn adapt_heldout_rate(
        &self,
        descent: &Bound<'_, PyAny>,
        potential: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guarded(|| {
            let shape = self.shape();
            let descent = read_exact::<f64>(descent, "descent", shape, "float64")?;
            let potential = read_exact::<f64>(potential, "potential", shape, "float64")?;
            Ok(self
                .ledger()
                .adapt_heldout_rate(descent.slice(), potential.slice())?)
        })
    }
    fn heldout_rate<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let data = self.ledger().heldout().rate().to_vec();
        guarded(|| matrix(py, &data, self.shape()))
    }
    #[getter]
    fn heldout_adapt_rate(&self) -> bool {
        self.ledger().heldout().rate_rule().adapt
    }
    #[getter]
    fn heldout_rate_up(&self) -> f64 {
        self.ledger().heldout().rate_rule().up
    }
    #[getter]
    fn heldout_rate_down(&self) -> f64 {
        self.ledger().heldout().rate_rule().down
    }
    #[getter]
    fn heldout_rate_cap(&self) -> f64 {
        self.ledger().heldout().rate_rule().cap
    }
    #[getter]
    fn heldout_rate_floor(&self) -> f64 {
        self.ledger().heldout().rate_rule().floor
    }
    #[getter]
    fn heldout_rate_trust(&self) -> f64 {
        self.ledger().heldout().rate_rule().trust
    }
    #[getter]
    fn heldout_decay(&self) -> f64 {
        self.ledger().heldout().decay()
    }
    #[getter]
    fn heldout_horizon(&self) -> f64 {
        self.ledger().heldout().horizon()
    }
    #[getter]
    fn heldout_windows(&self) -> u64 {
        self.ledger().heldout().windows()
    }
    fn heldout_ema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let data = self.ledger().heldout().ema().to_vec();
        guarded(|| matrix(py, &data, self.shape()))
    }
    fn heldout_span<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u64>>> {
        let data = self.ledger().heldout().span().to_vec();
        guarded(|| matrix(py, &data, self.shape()))
    }
    #[getter]
    fn heldout_min_span(&self) -> u64 {
        self.ledger().heldout().min_span()
    }
    /// The held-out record as `Router.regate` judges it (see the Rust `Ledger::heldout_descent`).
    fn heldout_descent<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let data = self.ledger().heldout().descent();
        guarded(|| matrix(py, &data, self.shape()))
    }

    /// Decides one held-out shrink trial of `expert` (see the Rust `Ledger::record_shrink`):
    /// True when the scaled-back update is to be kept.
    fn record_shrink(&self, expert: Int, base: f64, trial: f64) -> PyResult<bool> {
        guarded(|| {
            let expert = usize::try_from(expert.count("expert", 0)?)
                .map_err(|_| Error::Config("expert out of range".into()))?;
            Ok(self.ledger().record_shrink(expert, base, trial)?)
        })
    }
    /// Per expert: its shrink fraction.
    #[getter]
    fn heldout_shrink(&self) -> Vec<f64> {
        self.ledger().heldout().shrink().to_vec()
    }
    /// Per expert: the most shrink trials per measurement.
    #[getter]
    fn heldout_shrink_steps(&self) -> Vec<u64> {
        self.ledger().heldout().shrink_steps().to_vec()
    }
    #[getter]
    fn shrink_spectral(&self) -> bool {
        self.ledger().heldout().shrink_spectral()
    }
    fn shrink_trials<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        PyArray1::from_slice(py, self.ledger().heldout().shrink_trials())
    }
    fn shrinks<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        PyArray1::from_slice(py, self.ledger().heldout().shrinks())
    }

    fn record(
        &self,
        py: Python<'_>,
        scores: &Bound<'_, PyAny>,
        mask: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        guarded(|| {
            let shape = self.shape();
            let scores = read_scores(scores, shape)?;
            let mask = read_exact::<bool>(mask, "mask", shape, "bool")?;
            let mask = mask.slice();
            let inner = &self.inner;
            let view = scores.view();
            maybe_detach(py, mask.len(), || {
                let mut ledger = lock(inner);
                match view {
                    ScoreSlice::F32(s) => ledger.record(s, mask),
                    ScoreSlice::F64(s) => ledger.record(s, mask),
                }
            })?;
            Ok(())
        })
    }

    #[getter]
    fn num_modules(&self) -> usize {
        self.ledger().num_modules()
    }
    #[getter]
    fn num_experts(&self) -> usize {
        self.ledger().num_experts()
    }
    #[getter]
    fn ema_decay(&self) -> f64 {
        self.ledger().ema_decay()
    }
    #[getter]
    fn step(&self) -> u64 {
        self.ledger().step()
    }
    #[getter]
    fn checksum(&self) -> u64 {
        self.ledger().checksum()
    }
    #[getter]
    fn no_winner_total(&self) -> u64 {
        self.ledger().no_winner_total()
    }

    fn last_scores<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let data = self.ledger().last_scores().to_vec();
        guarded(|| matrix(py, &data, self.shape()))
    }
    fn ema<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let data = self.ledger().ema().to_vec();
        guarded(|| matrix(py, &data, self.shape()))
    }
    fn wins<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u64>>> {
        let data = self.ledger().wins().to_vec();
        guarded(|| matrix(py, &data, self.shape()))
    }
    fn last_mask<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<bool>>> {
        let data = self.ledger().last_mask().to_vec();
        guarded(|| matrix(py, &data, self.shape()))
    }
    fn switches<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let data = self.ledger().switches().to_vec();
        guarded(|| Ok(PyArray1::from_slice(py, &data)))
    }
    fn last_switch_step<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let data = self.ledger().last_switch_step().to_vec();
        guarded(|| Ok(PyArray1::from_slice(py, &data)))
    }
    fn no_winner<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let data = self.ledger().no_winner().to_vec();
        guarded(|| Ok(PyArray1::from_slice(py, &data)))
    }

    fn summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        guarded(|| {
            let s = self.ledger().summary();
            let d = PyDict::new(py);
            d.set_item("step", s.step)?;
            d.set_item("checksum", s.checksum)?;
            d.set_item("win_share", s.win_share)?;
            d.set_item("current_share", s.current_share)?;
            d.set_item("switches", s.switches)?;
            d.set_item("switch_rate", s.switch_rate)?;
            d.set_item("no_winner_events", s.no_winner_events)?;
            Ok(d)
        })
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.ledger().to_bytes();
        guarded(|| Ok(PyBytes::new(py, &bytes)))
    }

    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        guarded(|| Ok(PyLedger::wrap(Ledger::from_bytes(data)?)))
    }

    /// Pickling (and `copy.deepcopy`) go through the versioned byte format.
    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let bytes = slf.get().to_bytes(slf.py())?;
        Ok((slf.get_type().getattr("from_bytes")?, (bytes,)))
    }

    fn __repr__(&self) -> String {
        let l = self.ledger();
        format!(
            "Ledger(num_modules={}, num_experts={}, ema_decay={:?}, step={}, checksum={:#018x})",
            l.num_modules(),
            l.num_experts(),
            l.ema_decay(),
            l.step(),
            l.checksum()
        )
    }
}

/// The element type of a moment array: `float32` or `float64`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Float {
    F32,
    F64,
}

/// Checks that `obj` (item `i` of the list argument `name`) is a C-contiguous numpy array of
/// dtype float32 or float64, and says which.
fn float_array<'a, 'py>(
    obj: &'a Bound<'py, PyAny>,
    name: &str,
    i: usize,
) -> PyResult<(&'a Bound<'py, PyUntypedArray>, Float)> {
    let expected = "a C-contiguous numpy array of dtype float32 or float64";
    let Ok(arr) = obj.cast::<PyUntypedArray>() else {
        let ty = obj.get_type().name()?;
        return Err(ScoreError::new_err(format!(
            "{name}[{i}] must be {expected}, got an object of type {ty}"
        )));
    };
    if is_masked(obj)? {
        return Err(ScoreError::new_err(format!(
            "{name}[{i}] must be {expected}, got a numpy.ma.MaskedArray, whose mask molf would not read"
        )));
    }
    let py = obj.py();
    let dt = arr.dtype();
    let float = if dt.is_equiv_to(&dtype::<f32>(py)) {
        Float::F32
    } else if dt.is_equiv_to(&dtype::<f64>(py)) {
        Float::F64
    } else {
        return Err(ScoreError::new_err(format!(
            "{name}[{i}] must be {expected}, got dtype {dt}"
        )));
    };
    // The kernels read the buffer in order: a Fortran-ordered or strided view would be read wrong.
    if !arr.is_c_contiguous() {
        return Err(ScoreError::new_err(format!(
            "{name}[{i}] must be {expected}, got a non-contiguous array of shape {}",
            arr.getattr("shape")?.repr()?
        )));
    }
    Ok((arr, float))
}

/// Read-only borrows of arrays already checked by [`float_array`] to be of element type `T`.
fn borrow_all<'py, T: Element>(
    arrays: &[&Bound<'py, PyUntypedArray>],
) -> PyResult<Vec<PyReadonlyArrayDyn<'py, T>>> {
    arrays
        .iter()
        .map(|a| {
            a.cast::<PyArrayDyn<T>>()?
                .try_readonly()
                .map_err(|e| ScoreError::new_err(format!("cannot read the array: {e}")))
        })
        .collect()
}

fn slices<'a, T: Element>(arrays: &'a [PyReadonlyArrayDyn<'_, T>]) -> PyResult<Vec<&'a [T]>> {
    arrays
        .iter()
        .map(|a| {
            a.as_slice()
                .map_err(|e| InternalError::new_err(format!("checked C-contiguous, yet: {e}")))
        })
        .collect()
}

fn typed_score_sums<T: Element + StateFloat>(
    py: Python<'_>,
    m: &[&Bound<'_, PyUntypedArray>],
    v: &[&Bound<'_, PyUntypedArray>],
    eps: f64,
    kind: ScoreKind,
) -> PyResult<Vec<f64>> {
    let (m, v) = (borrow_all::<T>(m)?, borrow_all::<T>(v)?);
    let (m, v) = (slices(&m)?, slices(&v)?);
    let elements = m.iter().map(|t| t.len()).sum();
    Ok(maybe_detach(py, elements, || {
        scores::score_sums(&m, &v, eps, kind)
    })?)
}

/// Per tensor, the float64 sum behind its score (see `molf_rs::scores`): EPD
/// `Σ m² / (√v + eps)`, PFN `Σ (m / (√v + eps))²`, each term in the moments' dtype.
/// `exp_avgs[i]` and `exp_avg_sqs[i]` must have one shape, every array one dtype (float32 or
/// float64) and C order. The GIL is released while it computes.
#[pyfunction]
fn score_sums<'py>(
    py: Python<'py>,
    exp_avgs: Vec<Bound<'py, PyAny>>,
    exp_avg_sqs: Vec<Bound<'py, PyAny>>,
    eps: f64,
    score: &str,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    guarded(|| {
        let kind = ScoreKind::from_name(score)?;
        if exp_avgs.len() != exp_avg_sqs.len() {
            return Err(ScoreError::new_err(format!(
                "exp_avgs and exp_avg_sqs must be lists of equal length, got {} and {}",
                exp_avgs.len(),
                exp_avg_sqs.len()
            )));
        }
        let mut m = Vec::with_capacity(exp_avgs.len());
        let mut v = Vec::with_capacity(exp_avgs.len());
        let mut first = None;
        for (i, (mo, vo)) in exp_avgs.iter().zip(&exp_avg_sqs).enumerate() {
            let (ma, mf) = float_array(mo, "exp_avgs", i)?;
            let (va, vf) = float_array(vo, "exp_avg_sqs", i)?;
            let want = *first.get_or_insert(mf);
            if mf != want || vf != want {
                return Err(ScoreError::new_err(format!(
                    "every array must have the dtype of exp_avgs[0] ({}), got exp_avgs[{i}] {} and exp_avg_sqs[{i}] {}",
                    exp_avgs[0].getattr("dtype")?,
                    ma.dtype(),
                    va.dtype()
                )));
            }
            if ma.shape() != va.shape() {
                return Err(ScoreError::new_err(format!(
                    "exp_avgs[{i}] has shape {} but exp_avg_sqs[{i}] {}",
                    ma.getattr("shape")?.repr()?,
                    va.getattr("shape")?.repr()?
                )));
            }
            m.push(ma);
            v.push(va);
        }
        let sums = match first {
            None => Vec::new(),
            Some(Float::F32) => typed_score_sums::<f32>(py, &m, &v, eps, kind)?,
            Some(Float::F64) => typed_score_sums::<f64>(py, &m, &v, eps, kind)?,
        };
        Ok(PyArray1::from_vec(py, sums))
    })
}

/// True when no element of any array is NaN or ±infinity. Each array must be C-contiguous, of
/// dtype float32 or float64 (they may differ). The GIL is released while it reads.
#[pyfunction]
fn all_finite(py: Python<'_>, arrays: Vec<Bound<'_, PyAny>>) -> PyResult<bool> {
    guarded(|| {
        let (mut f32s, mut f64s) = (Vec::new(), Vec::new());
        for (i, obj) in arrays.iter().enumerate() {
            match float_array(obj, "arrays", i)? {
                (a, Float::F32) => f32s.push(a),
                (a, Float::F64) => f64s.push(a),
            }
        }
        let (f32s, f64s) = (borrow_all::<f32>(&f32s)?, borrow_all::<f64>(&f64s)?);
        let (f32s, f64s) = (slices(&f32s)?, slices(&f64s)?);
        let elements = f32s.iter().map(|t| t.len()).sum::<usize>()
            + f64s.iter().map(|t| t.len()).sum::<usize>();
        Ok(maybe_detach(py, elements, || {
            scores::all_finite(&f32s) && scores::all_finite(&f64s)
        }))
    })
}

#[pymodule]
#[pyo3(name = "_core")]
fn core_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyRouter>()?;
    m.add_class::<PyLedger>()?;
    m.add_function(wrap_pyfunction!(score_sums, m)?)?;
    m.add_function(wrap_pyfunction!(all_finite, m)?)?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("ScoreError", py.get_type::<ScoreError>())?;
    m.add("StateError", py.get_type::<StateError>())?;
    m.add("InternalError", py.get_type::<InternalError>())?;
    m.add("PHASES", PyTuple::new(py, PHASES)?)?;
    m.add("POLICIES", PyTuple::new(py, POLICIES)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Run with `cargo test -p molf_rs --features python` (embeds the Python interpreter).
    use super::*;

    #[test]
    fn panics_become_internal_error() {
        Python::initialize();
        Python::attach(|py| {
            let err = guarded::<()>(|| panic!("boom")).unwrap_err();
            assert!(err.is_instance_of::<InternalError>(py));
            assert!(err.to_string().contains("boom"));
            assert!(err.is_instance_of::<PyRuntimeError>(py));
        });
    }

    #[test]
    fn expert_last_change_is_a_uint64_matrix() {
        use numpy::{PyArrayMethods, PyUntypedArrayMethods};
        Python::initialize();
        Python::attach(|py| {
            // The embedded interpreter may lack numpy (the Python test suite covers the
            // getter then).
            if py.import("numpy").is_err() {
                eprintln!("numpy not importable in the embedded interpreter: skipped");
                return;
            }
            let cfg = RouterConfig {
                policy: Policy::Heldout { k: 1, min_dwell: 2 },
                ..RouterConfig::topk(2, 3, 1)
            };
            let mut router = Router::new(cfg).unwrap();
            let mut out = [false; 6];
            router.route(&[1.0f64; 6], &mut out).unwrap();
            router
                .regate(&[1.0, -1.0, 1.0, 1.0, 1.0, 1.0], &[0.0; 6])
                .unwrap();
            let r = PyRouter::wrap(router);
            let a = r.expert_last_change(py).unwrap();
            assert_eq!(a.shape(), [2, 3]);
            assert!(a.dtype().is_equiv_to(&numpy::dtype::<u64>(py)));
            assert_eq!(a.to_vec().unwrap(), [0, 1, 0, 0, 0, 0]);
        });
    }

    #[test]
    fn policy_arguments_map_onto_the_policy_or_are_refused() {
        assert_eq!(policy_name("paper").unwrap(), "topk");
        assert_eq!(
            policy_from_args("topk", 2, 0.0, 0).unwrap(),
            Policy::TopK { k: 2 }
        );
        assert_eq!(
            policy_from_args("heldout", 1, 0.0, 3).unwrap(),
            Policy::Heldout { k: 1, min_dwell: 3 }
        );
        let msg = |r: Result<Policy, Error>| r.unwrap_err().to_string();
        assert!(msg(policy_from_args("topk", 1, 0.1, 0)).contains("belong to policy 'hysteresis'"));
        assert!(msg(policy_from_args("heldout", 1, 0.1, 0)).contains("with policy 'heldout'"));
        assert!(msg(policy_from_args("topk", 1, f64::NAN, 0)).starts_with("margin must be finite"));
        assert_eq!(
            policy_name("foo").unwrap_err().to_string(),
            "unknown policy 'foo'; expected one of 'topk', 'hysteresis', 'heldout', 'paper' (an alias of 'topk')"
        );
    }

    #[test]
    fn a_bool_is_no_integer_argument() {
        let err = Int::Bool(true).count("topk", 1).unwrap_err();
        assert_eq!(
            err,
            Error::Config("topk must be an integer, got the bool True".into())
        );
        assert_eq!(Int::Small(1).count("topk", 1).unwrap(), 1);
    }

    #[test]
    fn errors_map_to_their_classes() {
        Python::initialize();
        Python::attach(|py| {
            let cases = [
                (Error::Config("c".into()), py.get_type::<ConfigError>()),
                (Error::Score("s".into()), py.get_type::<ScoreError>()),
                (Error::State("t".into()), py.get_type::<StateError>()),
                (Error::Internal("i".into()), py.get_type::<InternalError>()),
            ];
            for (e, ty) in cases {
                let err = PyErr::from(e);
                assert!(err.get_type(py).is(&ty));
                assert!(
                    err.is_instance_of::<PyValueError>(py) != ty.is(py.get_type::<InternalError>())
                );
            }
        });
    }
}
