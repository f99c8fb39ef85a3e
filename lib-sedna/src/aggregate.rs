//! Federated aggregation: combining the clients' weights of a round into new global weights.
//!
//! | name | what | parameters (default) |
//! |---|---|---|
//! | `FedAvg` | mean weighted by each client's sample count (Sedna's and McMahan et al.'s) | — |
//! | `FedAvgM` | FedAvg as a pseudo-gradient, with server momentum (Hsu et al.) | `server_learning_rate` (1.0), `server_momentum` (0.0) |
//! | `FedAdam` | adaptive server optimizer (Reddi et al., "Adaptive Federated Optimization") | `eta` (0.1), `beta_1` (0.9), `beta_2` (0.99), `tau` (1e-9) |
//! | `FedYogi` | the same with Yogi's second moment | `eta` (0.01), `beta_1` (0.9), `beta_2` (0.99), `tau` (1e-3) |
//! | `FedMedian` | coordinate-wise median (robust) | — |
//! | `FedTrimmedAvg` | coordinate-wise mean without the `beta` largest and smallest shares (robust) | `beta` (0.2) |
//! | `Krum` | the update closest to its n − f − 2 nearest others; Multi-Krum averages the m best (robust) | `num_malicious_clients` f (0), `num_clients_to_keep` m (0 = one) |
//!
//! Server optimizers follow the paper: with Δ = FedAvg(updates) − global,
//! m ← β₁m + (1 − β₁)Δ; v ← β₂v + (1 − β₂)Δ² (Adam) or v ← v − (1 − β₂)Δ²·sign(v − Δ²)
//! (Yogi); global ← global + η·m / (√v + τ), with m = v = 0 before the first round. FedAvgM:
//! g = global − FedAvg; u ← μu + g (u = g in the first round); global ← global − lr·u.
//!
//! Aggregation runs over all cores: each tensor is cut into chunks and every chunk reads each
//! client's values once.
//!
//! ```
//! use sedna::aggregate::{self, Update};
//! use sedna::weights::Weights;
//! use ndarray::{ArrayD, IxDyn};
//!
//! let w = |v: f32| Weights::new(vec![("w".into(), ArrayD::from_elem(IxDyn(&[2]), v))]).unwrap();
//! let mut fedavg = aggregate::build("FedAvg", &[])?;
//! let new = fedavg.aggregate(&w(0.0), &[
//!     Update { weights: w(1.0), num_samples: 30 },
//!     Update { weights: w(3.0), num_samples: 10 },
//! ])?;
//! assert_eq!(new.get("w").unwrap()[[0]], 1.5); // (30·1 + 10·3) / 40
//! # Ok::<(), sedna::aggregate::AggregateError>(())
//! ```

use crate::weights::Weights;

/// One client's result of a round.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    /// Its weights after local training.
    pub weights: Weights,
    /// How many samples it trained on.
    pub num_samples: u64,
}

/// Why a round could not be aggregated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregateError {
    /// No updates. Retryable (with updates).
    #[error("no client updates to aggregate")]
    NoUpdates,
    /// An update does not match the global weights' tensors. Not retryable.
    #[error("update of client {client}: {detail}")]
    Layout {
        /// Index of the update.
        client: usize,
        /// The first difference.
        detail: String,
    },
    /// Every update reports zero samples (FedAvg cannot weigh them). Not retryable.
    #[error("the updates report 0 samples in total")]
    NoSamples,
    /// Too few clients for the algorithm's settings. Retryable (with more clients).
    #[error("{algorithm} needs more than {needed} clients, got {got}")]
    TooFewClients {
        /// Algorithm.
        algorithm: &'static str,
        /// Clients it needs more than.
        needed: usize,
        /// Clients given.
        got: usize,
    },
    /// Unknown algorithm. Not retryable.
    #[error("unknown aggregation {name:?} (known: {known})")]
    Unknown {
        /// Asked for.
        name: String,
        /// Available.
        known: String,
    },
    /// An aggregation of the user's (e.g. a Python class) failed or answered badly. Not
    /// retryable.
    #[error("aggregation {algorithm} failed: {reason}")]
    Custom {
        /// Its name.
        algorithm: String,
        /// What went wrong.
        reason: String,
    },
    /// A bad parameter. Not retryable.
    #[error("aggregation {algorithm}: parameter {key} = {value:?}: {reason}")]
    InvalidParameter {
        /// Algorithm.
        algorithm: String,
        /// Parameter.
        key: String,
        /// Value.
        value: String,
        /// Why.
        reason: String,
    },
}

impl AggregateError {
    /// Whether the round could succeed with other inputs later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AggregateError::NoUpdates | AggregateError::TooFewClients { .. }
        )
    }
}

/// An aggregation strategy (stateful: server optimizers keep their moments across rounds).
pub trait Aggregator: Send + std::fmt::Debug {
    /// Its name.
    fn name(&self) -> &str;
    /// New global weights from the current ones and the round's updates.
    fn aggregate(
        &mut self,
        global: &Weights,
        updates: &[Update],
    ) -> Result<Weights, AggregateError>;
}

/// Names of the built-in aggregators.
pub const NAMES: [&str; 7] = [
    "FedAvg",
    "FedAvgM",
    "FedAdam",
    "FedYogi",
    "FedMedian",
    "FedTrimmedAvg",
    "Krum",
];

fn check(global: &Weights, updates: &[Update]) -> Result<(), AggregateError> {
    if updates.is_empty() {
        return Err(AggregateError::NoUpdates);
    }
    for (client, u) in updates.iter().enumerate() {
        global
            .check_same_layout(&u.weights)
            .map_err(|detail| AggregateError::Layout { client, detail })?;
    }
    Ok(())
}

const CHUNK: usize = 16 * 1024;

/// The same range of every input tensor, and the output's.
type Job<'a> = (Vec<&'a [f32]>, &'a mut [f32]);

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Applies `f` to every chunk of every tensor: `f(inputs, output)` gets the same range of
/// each update's tensor and the output's. Runs on all cores.
fn combine<F>(template: &Weights, updates: &[&Weights], f: F) -> Weights
where
    F: Fn(&[&[f32]], &mut [f32]) + Sync,
{
    let mut out = template.clone();
    let mut jobs: Vec<Job<'_>> = Vec::new();
    let inputs: Vec<Vec<std::borrow::Cow<'_, [f32]>>> = updates
        .iter()
        .map(|w| {
            w.tensors()
                .iter()
                .map(|(_, a)| match a.as_slice() {
                    Some(s) => std::borrow::Cow::Borrowed(s),
                    None => std::borrow::Cow::Owned(a.iter().copied().collect()),
                })
                .collect()
        })
        .collect();
    for (t, array) in out.arrays_mut().enumerate() {
        let Some(dest) = array.as_slice_mut() else {
            continue;
        };
        for (c, chunk) in dest.chunks_mut(CHUNK).enumerate() {
            let start = c * CHUNK;
            let end = start + chunk.len();
            let ins = inputs.iter().map(|u| &u[t][start..end]).collect();
            jobs.push((ins, chunk));
        }
    }
    let n = threads().min(jobs.len()).max(1);
    if n == 1 {
        for (ins, dest) in jobs {
            f(&ins, dest);
        }
        return out;
    }
    let mut buckets: Vec<Vec<Job<'_>>> = (0..n).map(|_| Vec::new()).collect();
    for (i, job) in jobs.into_iter().enumerate() {
        buckets[i % n].push(job);
    }
    std::thread::scope(|s| {
        for bucket in buckets {
            let f = &f;
            s.spawn(move || {
                for (ins, dest) in bucket {
                    f(&ins, dest);
                }
            });
        }
    });
    out
}

/// `out = Σ factors[i] · ins[i]`, eight inputs per pass over `out` (an eighth of the cache
/// traffic of one pass per input, so the sum runs at the speed of reading the inputs).
fn weighted_sum(ins: &[&[f32]], factors: &[f32], out: &mut [f32]) {
    const WAYS: usize = 8;
    out.fill(0.0);
    let n = out.len();
    for (x, w) in ins.chunks_exact(WAYS).zip(factors.chunks_exact(WAYS)) {
        let x: [&[f32]; WAYS] = std::array::from_fn(|k| &x[k][..n]);
        for i in 0..n {
            let a = w[0] * x[0][i] + w[1] * x[1][i] + w[2] * x[2][i] + w[3] * x[3][i];
            let b = w[4] * x[4][i] + w[5] * x[5][i] + w[6] * x[6][i] + w[7] * x[7][i];
            out[i] += a + b;
        }
    }
    let done = ins.len() - ins.len() % WAYS;
    for (x, &w) in ins[done..].iter().zip(&factors[done..]) {
        for (o, v) in out.iter_mut().zip(x.iter()) {
            *o += w * v;
        }
    }
}

/// The sample-weighted mean of the updates.
pub fn fedavg(global: &Weights, updates: &[Update]) -> Result<Weights, AggregateError> {
    check(global, updates)?;
    let total: u64 = updates.iter().map(|u| u.num_samples).sum();
    if total == 0 {
        return Err(AggregateError::NoSamples);
    }
    let factors: Vec<f32> = updates
        .iter()
        .map(|u| (u.num_samples as f64 / total as f64) as f32)
        .collect();
    let refs: Vec<&Weights> = updates.iter().map(|u| &u.weights).collect();
    Ok(combine(global, &refs, |ins, out| {
        weighted_sum(ins, &factors, out)
    }))
}

/// `FedAvg`.
#[derive(Debug, Default)]
pub struct FedAvg;

impl Aggregator for FedAvg {
    fn name(&self) -> &str {
        "FedAvg"
    }
    fn aggregate(
        &mut self,
        global: &Weights,
        updates: &[Update],
    ) -> Result<Weights, AggregateError> {
        fedavg(global, updates)
    }
}

fn zip_map(a: &Weights, b: &Weights, f: impl Fn(f32, f32) -> f32) -> Weights {
    let mut out = a.clone();
    for (o, (_, y)) in out.arrays_mut().zip(b.tensors()) {
        o.zip_mut_with(y, |x, &y| *x = f(*x, y));
    }
    out
}

/// `FedAvgM`.
#[derive(Debug)]
pub struct FedAvgM {
    /// Server learning rate.
    pub lr: f32,
    /// Server momentum.
    pub momentum: f32,
    velocity: Option<Weights>,
}

impl FedAvgM {
    /// With a learning rate and momentum.
    pub fn new(lr: f32, momentum: f32) -> Self {
        Self {
            lr,
            momentum,
            velocity: None,
        }
    }
}

impl Aggregator for FedAvgM {
    fn name(&self) -> &str {
        "FedAvgM"
    }
    fn aggregate(
        &mut self,
        global: &Weights,
        updates: &[Update],
    ) -> Result<Weights, AggregateError> {
        let avg = fedavg(global, updates)?;
        let gradient = zip_map(global, &avg, |g, a| g - a);
        let step = if self.momentum > 0.0 {
            let v = match self.velocity.take() {
                Some(v) if v.check_same_layout(&gradient).is_ok() => {
                    zip_map(&v, &gradient, |v, g| self.momentum * v + g)
                }
                _ => gradient,
            };
            self.velocity = Some(v.clone());
            v
        } else {
            gradient
        };
        Ok(zip_map(global, &step, |g, s| g - self.lr * s))
    }
}

/// Which second moment an adaptive server optimizer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// Adam: v ← β₂v + (1 − β₂)Δ².
    Adam,
    /// Yogi: v ← v − (1 − β₂)Δ²·sign(v − Δ²).
    Yogi,
}

/// `FedAdam` and `FedYogi`.
#[derive(Debug)]
pub struct FedOpt {
    /// Adam or Yogi.
    pub moment: Moment,
    /// Server learning rate η.
    pub eta: f32,
    /// β₁.
    pub beta_1: f32,
    /// β₂.
    pub beta_2: f32,
    /// τ (adaptivity).
    pub tau: f32,
    state: Option<(Weights, Weights)>,
}

impl FedOpt {
    /// A server optimizer.
    pub fn new(moment: Moment, eta: f32, beta_1: f32, beta_2: f32, tau: f32) -> Self {
        Self {
            moment,
            eta,
            beta_1,
            beta_2,
            tau,
            state: None,
        }
    }
}

impl Aggregator for FedOpt {
    fn name(&self) -> &str {
        match self.moment {
            Moment::Adam => "FedAdam",
            Moment::Yogi => "FedYogi",
        }
    }
    fn aggregate(
        &mut self,
        global: &Weights,
        updates: &[Update],
    ) -> Result<Weights, AggregateError> {
        let avg = fedavg(global, updates)?;
        let delta = zip_map(&avg, global, |a, g| a - g);
        let zeros = || {
            let mut z = global.clone();
            for a in z.arrays_mut() {
                a.fill(0.0);
            }
            z
        };
        let (m, v) = match self.state.take() {
            Some((m, v)) if m.check_same_layout(global).is_ok() => (m, v),
            _ => (zeros(), zeros()),
        };
        let (b1, b2) = (self.beta_1, self.beta_2);
        let m = zip_map(&m, &delta, |m, d| b1 * m + (1.0 - b1) * d);
        let v = match self.moment {
            Moment::Adam => zip_map(&v, &delta, |v, d| b2 * v + (1.0 - b2) * d * d),
            Moment::Yogi => zip_map(&v, &delta, |v, d| {
                let d2 = d * d;
                v - (1.0 - b2) * d2 * (v - d2).signum() * if v == d2 { 0.0 } else { 1.0 }
            }),
        };
        let mut new = global.clone();
        for ((g, (_, m)), (_, v)) in new.arrays_mut().zip(m.tensors()).zip(v.tensors()) {
            ndarray::Zip::from(g).and(m).and(v).for_each(|g, &m, &v| {
                *g += self.eta * m / (v.sqrt() + self.tau);
            });
        }
        self.state = Some((m, v));
        Ok(new)
    }
}

/// `FedMedian`.
#[derive(Debug, Default)]
pub struct FedMedian;

fn median_of(buf: &mut [f32]) -> f32 {
    let n = buf.len();
    let mid = n / 2;
    let (_, &mut hi, _) = buf.select_nth_unstable_by(mid, f32::total_cmp);
    if n % 2 == 1 {
        hi
    } else {
        let lo = buf[..mid].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (lo + hi) / 2.0
    }
}

impl Aggregator for FedMedian {
    fn name(&self) -> &str {
        "FedMedian"
    }
    fn aggregate(
        &mut self,
        global: &Weights,
        updates: &[Update],
    ) -> Result<Weights, AggregateError> {
        check(global, updates)?;
        let refs: Vec<&Weights> = updates.iter().map(|u| &u.weights).collect();
        Ok(combine(global, &refs, |ins, out| {
            let mut buf = vec![0.0f32; ins.len()];
            for (j, o) in out.iter_mut().enumerate() {
                for (b, x) in buf.iter_mut().zip(ins) {
                    *b = x[j];
                }
                *o = median_of(&mut buf);
            }
        }))
    }
}

/// `FedTrimmedAvg`.
#[derive(Debug)]
pub struct FedTrimmedAvg {
    /// Share cut at each end, in \[0, 0.5).
    pub beta: f32,
}

impl Aggregator for FedTrimmedAvg {
    fn name(&self) -> &str {
        "FedTrimmedAvg"
    }
    fn aggregate(
        &mut self,
        global: &Weights,
        updates: &[Update],
    ) -> Result<Weights, AggregateError> {
        check(global, updates)?;
        let n = updates.len();
        let cut = (self.beta * n as f32).floor() as usize;
        if 2 * cut >= n {
            return Err(AggregateError::TooFewClients {
                algorithm: "FedTrimmedAvg",
                needed: 2 * cut,
                got: n,
            });
        }
        let refs: Vec<&Weights> = updates.iter().map(|u| &u.weights).collect();
        Ok(combine(global, &refs, |ins, out| {
            let mut buf = vec![0.0f32; ins.len()];
            for (j, o) in out.iter_mut().enumerate() {
                for (b, x) in buf.iter_mut().zip(ins) {
                    *b = x[j];
                }
                buf.sort_unstable_by(f32::total_cmp);
                let kept = &buf[cut..n - cut];
                *o = kept.iter().sum::<f32>() / kept.len() as f32;
            }
        }))
    }
}

/// `Krum` / Multi-Krum.
#[derive(Debug)]
pub struct Krum {
    /// f: clients assumed malicious.
    pub malicious: usize,
    /// m: updates kept and averaged (0: the single best one is returned).
    pub keep: usize,
}

impl Krum {
    /// Krum scores (sum of squared distances to the n − f − 2 nearest others), per update.
    pub fn scores(&self, updates: &[Update]) -> Result<Vec<f64>, AggregateError> {
        let n = updates.len();
        if n < self.malicious + 3 {
            return Err(AggregateError::TooFewClients {
                algorithm: "Krum",
                needed: self.malicious + 2,
                got: n,
            });
        }
        let closest = n - self.malicious - 2;
        let mut d = vec![vec![0.0f64; n]; n];
        for i in 0..n {
            for j in i + 1..n {
                let x = updates[i].weights.squared_distance(&updates[j].weights);
                d[i][j] = x;
                d[j][i] = x;
            }
        }
        Ok((0..n)
            .map(|i| {
                let mut others: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d[i][j]).collect();
                others.sort_unstable_by(f64::total_cmp);
                others[..closest].iter().sum()
            })
            .collect())
    }
}

impl Aggregator for Krum {
    fn name(&self) -> &str {
        "Krum"
    }
    fn aggregate(
        &mut self,
        global: &Weights,
        updates: &[Update],
    ) -> Result<Weights, AggregateError> {
        check(global, updates)?;
        let scores = self.scores(updates)?;
        let mut order: Vec<usize> = (0..updates.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        if self.keep == 0 {
            return Ok(updates[order[0]].weights.clone());
        }
        let kept: Vec<Update> = order
            .iter()
            .take(self.keep)
            .map(|&i| updates[i].clone())
            .collect();
        fedavg(global, &kept)
    }
}

struct Params<'a> {
    algorithm: &'a str,
    pairs: &'a [(&'a str, &'a str)],
}

impl Params<'_> {
    fn check(&self, accepted: &[&str]) -> Result<(), AggregateError> {
        for (k, v) in self.pairs {
            if !accepted.contains(k) {
                return Err(AggregateError::InvalidParameter {
                    algorithm: self.algorithm.into(),
                    key: (*k).into(),
                    value: (*v).into(),
                    reason: format!(
                        "unknown parameter (accepted: {})",
                        if accepted.is_empty() {
                            "none".into()
                        } else {
                            accepted.join(", ")
                        }
                    ),
                });
            }
        }
        Ok(())
    }

    fn get<T: std::str::FromStr>(
        &self,
        key: &str,
        default: T,
        valid: impl Fn(&T) -> bool,
        rule: &str,
    ) -> Result<T, AggregateError> {
        let Some((_, raw)) = self.pairs.iter().find(|(k, _)| *k == key) else {
            return Ok(default);
        };
        let invalid = |reason: &str| AggregateError::InvalidParameter {
            algorithm: self.algorithm.into(),
            key: key.into(),
            value: (*raw).into(),
            reason: reason.into(),
        };
        let v: T = raw.trim().parse().map_err(|_| invalid("not a number"))?;
        if valid(&v) { Ok(v) } else { Err(invalid(rule)) }
    }
}

/// Builds an aggregator by name with string parameters (as a CRD or the environment carries
/// them); every parameter is checked.
pub fn build(
    name: &str,
    parameters: &[(&str, &str)],
) -> Result<Box<dyn Aggregator>, AggregateError> {
    let p = Params {
        algorithm: name,
        pairs: parameters,
    };
    let positive = |x: &f32| x.is_finite() && *x > 0.0;
    let unit = |x: &f32| (0.0..1.0).contains(x);
    Ok(match name {
        "FedAvg" => {
            p.check(&[])?;
            Box::new(FedAvg)
        }
        "FedAvgM" => {
            p.check(&["server_learning_rate", "server_momentum"])?;
            Box::new(FedAvgM::new(
                p.get("server_learning_rate", 1.0, positive, "must be positive")?,
                p.get("server_momentum", 0.0, unit, "must be in [0, 1)")?,
            ))
        }
        "FedAdam" | "FedYogi" => {
            p.check(&["eta", "beta_1", "beta_2", "tau"])?;
            let (moment, eta, tau) = if name == "FedAdam" {
                (Moment::Adam, 0.1, 1e-9)
            } else {
                (Moment::Yogi, 0.01, 1e-3)
            };
            Box::new(FedOpt::new(
                moment,
                p.get("eta", eta, positive, "must be positive")?,
                p.get("beta_1", 0.9, unit, "must be in [0, 1)")?,
                p.get("beta_2", 0.99, unit, "must be in [0, 1)")?,
                p.get("tau", tau, positive, "must be positive")?,
            ))
        }
        "FedMedian" => {
            p.check(&[])?;
            Box::new(FedMedian)
        }
        "FedTrimmedAvg" => {
            p.check(&["beta"])?;
            Box::new(FedTrimmedAvg {
                beta: p.get(
                    "beta",
                    0.2,
                    |b| (0.0..0.5).contains(b),
                    "must be in [0, 0.5)",
                )?,
            })
        }
        "Krum" => {
            p.check(&["num_malicious_clients", "num_clients_to_keep"])?;
            Box::new(Krum {
                malicious: p.get("num_malicious_clients", 0usize, |_| true, "")?,
                keep: p.get("num_clients_to_keep", 0usize, |_| true, "")?,
            })
        }
        other => {
            return Err(AggregateError::Unknown {
                name: other.into(),
                known: NAMES.join(", "),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn w(values: &[f32]) -> Weights {
        Weights::new(vec![(
            "w".into(),
            ArrayD::from_shape_vec(IxDyn(&[values.len()]), values.to_vec()).unwrap(),
        )])
        .unwrap()
    }

    fn u(values: &[f32], n: u64) -> Update {
        Update {
            weights: w(values),
            num_samples: n,
        }
    }

    fn values(w: &Weights) -> Vec<f32> {
        w.tensors()[0].1.iter().copied().collect()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn fedavg_weighs_by_samples() {
        let g = w(&[0.0, 0.0]);
        let out = build("FedAvg", &[])
            .unwrap()
            .aggregate(
                &g,
                &[u(&[1.0, 2.0], 10), u(&[3.0, 6.0], 30), u(&[5.0, -2.0], 60)],
            )
            .unwrap();
        // (10·1 + 30·3 + 60·5)/100 = 4.0; (10·2 + 30·6 − 60·2)/100 = 0.8
        close(&values(&out), &[4.0, 0.8]);
        assert_eq!(
            fedavg(&g, &[u(&[1.0, 1.0], 0)]).unwrap_err(),
            AggregateError::NoSamples
        );
        assert_eq!(fedavg(&g, &[]).unwrap_err(), AggregateError::NoUpdates);
        let e = fedavg(&g, &[u(&[1.0, 1.0], 1), u(&[1.0], 1)]).unwrap_err();
        assert!(e.to_string().starts_with("update of client 1"), "{e}");
    }

    #[test]
    fn fedavg_over_many_chunks_and_threads_matches_a_plain_loop() {
        let n = 3 * CHUNK + 17;
        let updates: Vec<Update> = (0..5)
            .map(|c| Update {
                weights: w(&(0..n)
                    .map(|j| ((j * 7 + c * 13) % 101) as f32 / 10.0)
                    .collect::<Vec<_>>()),
                num_samples: (c as u64 + 1) * 3,
            })
            .collect();
        let g = w(&vec![0.0; n]);
        let out = values(&fedavg(&g, &updates).unwrap());
        let total: f64 = updates.iter().map(|u| u.num_samples as f64).sum();
        for j in [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 5, n - 1] {
            let want: f64 = updates
                .iter()
                .map(|u| f64::from(values(&u.weights)[j]) * u.num_samples as f64 / total)
                .sum();
            assert!(
                (f64::from(out[j]) - want).abs() < 1e-4,
                "index {j}: {} vs {want}",
                out[j]
            );
        }
    }

    #[test]
    fn fedavgm_applies_server_momentum() {
        let mut a = build(
            "FedAvgM",
            &[("server_learning_rate", "0.5"), ("server_momentum", "0.9")],
        )
        .unwrap();
        let g0 = w(&[1.0]);
        // round 1: avg 0.0, g = 1 − 0 = 1, u = 1, new = 1 − 0.5·1 = 0.5
        let g1 = a.aggregate(&g0, &[u(&[0.0], 1)]).unwrap();
        close(&values(&g1), &[0.5]);
        // round 2: avg 0.0, g = 0.5, u = 0.9·1 + 0.5 = 1.4, new = 0.5 − 0.7 = −0.2
        let g2 = a.aggregate(&g1, &[u(&[0.0], 1)]).unwrap();
        close(&values(&g2), &[-0.2]);
        // without momentum and lr 1 it is FedAvg
        let mut plain = build("FedAvgM", &[]).unwrap();
        close(
            &values(&plain.aggregate(&g0, &[u(&[3.0], 1), u(&[5.0], 1)]).unwrap()),
            &[4.0],
        );
    }

    /// The paper's update written out for one scalar.
    fn reference_fedopt(
        yogi: bool,
        eta: f64,
        b1: f64,
        b2: f64,
        tau: f64,
        rounds: &[(f64, f64)],
    ) -> Vec<f64> {
        let (mut m, mut v) = (0.0, 0.0);
        let mut out = vec![];
        for &(global, avg) in rounds {
            let d = avg - global;
            m = b1 * m + (1.0 - b1) * d;
            v = if yogi {
                v - (1.0 - b2) * d * d * (v - d * d).signum() * if v == d * d { 0.0 } else { 1.0 }
            } else {
                b2 * v + (1.0 - b2) * d * d
            };
            out.push(global + eta * m / (v.sqrt() + tau));
        }
        out
    }

    #[test]
    fn fedadam_and_fedyogi_match_the_paper() {
        for (name, yogi, eta, tau) in [("FedAdam", false, 0.1, 1e-9), ("FedYogi", true, 0.01, 1e-3)]
        {
            let mut a = build(name, &[]).unwrap();
            let mut global = 1.0f32;
            let avgs = [0.2f32, 0.5, -0.3];
            let mut rounds = vec![];
            let mut got = vec![];
            for avg in avgs {
                rounds.push((f64::from(global), f64::from(avg)));
                let new = a.aggregate(&w(&[global]), &[u(&[avg], 4)]).unwrap();
                global = values(&new)[0];
                got.push(f64::from(global));
            }
            let want = reference_fedopt(yogi, eta, 0.9, 0.99, tau, &rounds);
            for (g, r) in got.iter().zip(&want) {
                assert!((g - r).abs() < 1e-5, "{name}: {got:?} vs {want:?}");
            }
        }
        // Hand-computed first Adam step: Δ = −0.8, m = −0.08, v = 0.0064, step = 0.1·(−0.08)/0.08 = −0.1
        let mut adam = build("FedAdam", &[]).unwrap();
        close(
            &values(&adam.aggregate(&w(&[1.0]), &[u(&[0.2], 1)]).unwrap()),
            &[0.9],
        );
    }

    #[test]
    fn fedmedian_takes_the_coordinate_median() {
        let g = w(&[0.0, 0.0]);
        let mut m = build("FedMedian", &[]).unwrap();
        let odd = m
            .aggregate(
                &g,
                &[u(&[1.0, 9.0], 1), u(&[100.0, 2.0], 1), u(&[3.0, 4.0], 1)],
            )
            .unwrap();
        close(&values(&odd), &[3.0, 4.0]);
        let even = m
            .aggregate(
                &g,
                &[
                    u(&[1.0, 9.0], 1),
                    u(&[100.0, 2.0], 1),
                    u(&[3.0, 4.0], 1),
                    u(&[4.0, 5.0], 1),
                ],
            )
            .unwrap();
        // (3 + 4)/2 and (4 + 5)/2
        close(&values(&even), &[3.5, 4.5]);
    }

    #[test]
    fn fedtrimmedavg_drops_the_extremes() {
        let g = w(&[0.0]);
        let ups: Vec<Update> = [1.0, 2.0, 3.0, 4.0, 1000.0]
            .iter()
            .map(|&v| u(&[v], 1))
            .collect();
        // beta 0.2 of 5 → cut 1 per side → mean(2, 3, 4) = 3
        close(
            &values(
                &build("FedTrimmedAvg", &[("beta", "0.2")])
                    .unwrap()
                    .aggregate(&g, &ups)
                    .unwrap(),
            ),
            &[3.0],
        );
        // beta 0.1 → cut 0 → plain mean 202
        close(
            &values(
                &build("FedTrimmedAvg", &[("beta", "0.1")])
                    .unwrap()
                    .aggregate(&g, &ups)
                    .unwrap(),
            ),
            &[202.0],
        );
        let e = build("FedTrimmedAvg", &[("beta", "0.5")]).unwrap_err();
        assert!(e.to_string().contains("must be in [0, 0.5)"), "{e}");
    }

    #[test]
    fn krum_picks_the_update_closest_to_its_neighbours() {
        let g = w(&[0.0, 0.0]);
        let ups = vec![
            u(&[1.0, 1.0], 1),
            u(&[1.1, 0.9], 1),
            u(&[0.9, 1.0], 1),
            u(&[1.0, 1.2], 1),
            u(&[50.0, -50.0], 1),
        ];
        let krum = Krum {
            malicious: 1,
            keep: 0,
        };
        // n − f − 2 = 2 nearest: client 0: d² to 1 = 0.02, to 2 = 0.01, to 3 = 0.04 → 0.03
        let scores = krum.scores(&ups).unwrap();
        assert!((scores[0] - 0.03).abs() < 1e-6, "{scores:?}");
        let best = build("Krum", &[("num_malicious_clients", "1")])
            .unwrap()
            .aggregate(&g, &ups)
            .unwrap();
        close(&values(&best), &[1.0, 1.0]);
        // Multi-Krum keeps the 3 best (0, 2, 1) and averages them: ((1 + 0.9 + 1.1)/3, (1 + 1 + 0.9)/3)
        let multi = build(
            "Krum",
            &[("num_malicious_clients", "1"), ("num_clients_to_keep", "3")],
        )
        .unwrap()
        .aggregate(&g, &ups)
        .unwrap();
        close(&values(&multi), &[1.0, 2.9 / 3.0]);
        assert!(matches!(
            Krum {
                malicious: 3,
                keep: 0
            }
            .scores(&ups),
            Err(AggregateError::TooFewClients { .. })
        ));
    }

    #[test]
    fn unknown_names_and_bad_parameters_are_errors() {
        assert!(
            build("FedProx", &[])
                .unwrap_err()
                .to_string()
                .contains("known: FedAvg, FedAvgM")
        );
        let e = build("FedAdam", &[("eta", "-1")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "aggregation FedAdam: parameter eta = \"-1\": must be positive"
        );
        let e = build("FedAvg", &[("momentum", "1")]).unwrap_err();
        assert!(
            e.to_string().contains("unknown parameter (accepted: none)"),
            "{e}"
        );
        assert!(build("Krum", &[("num_malicious_clients", "x")]).is_err());
    }
}
