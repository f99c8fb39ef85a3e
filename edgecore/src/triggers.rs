//! The local controller's incremental-learning train triggers: for each
//! IncrementalLearningJob whose Dataset is on this node, every `checkPeriodSeconds` it counts
//! the Dataset, and when `num_of_samples` (samples added since the job's last round) meets the
//! trigger's condition inside its daily `timer` window (node-local time), it reports
//! `status.trainTrigger` upstream through the outbox. The count and the decision are made on
//! the node, so a trigger fires while the cloud is unreachable; the report waits in the outbox
//! and the round starts after reconnection. A trigger fires once per round.
//!
//! [`Triggers::check`] decides (pure, given the time); [`run`] is the loop around it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sedna_api::incremental_learning::{IncrementalLearningJob, TriggerReport};
use sedna_proto::channel::{ObjectRef, Upstream, upstream::Kind as UpstreamKind};
use tokio::time::Instant;

use crate::datasets::{Count, count, local_path};
use crate::runtime::Reporter;
use crate::store::EdgeStore;

/// What one check concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Not checked now (its period has not passed, or it already fired for this round).
    NotDue,
    /// Checked; the condition or the window does not hold (why).
    Hold(String),
    /// Fire: report this.
    Fire(TriggerReport),
}

/// Per-job memory of the checks: when each job was last checked and the round it fired for.
#[derive(Debug, Default)]
pub struct Triggers {
    last_check: HashMap<String, Instant>,
    fired: HashMap<String, i64>,
}

impl Triggers {
    /// Checks `job` (uid `uid`) at `now`, with the dataset holding `samples` and the node's
    /// local time at minute `minute_of_day`.
    pub fn check(
        &mut self,
        uid: &str,
        job: &IncrementalLearningJob,
        samples: u64,
        now: Instant,
        minute_of_day: u32,
        wall: jiff::Timestamp,
    ) -> Decision {
        let trigger = &job.spec.train_spec.trigger;
        let status = job.status.clone().unwrap_or_default();
        let next_round = status.round + 1;
        let already = self
            .fired
            .get(uid)
            .copied()
            .unwrap_or(0)
            .max(status.train_trigger.as_ref().map_or(0, |t| t.round));
        if already >= next_round {
            return Decision::NotDue;
        }
        let period = Duration::from_secs(trigger.check_period_seconds.clamp(1, 86_400) as u64);
        if self
            .last_check
            .get(uid)
            .is_some_and(|last| now.duration_since(*last) < period)
        {
            return Decision::NotDue;
        }
        self.last_check.insert(uid.to_string(), now);
        if let Some(timer) = &trigger.timer
            && !timer.contains(minute_of_day)
        {
            return Decision::Hold(format!(
                "outside the window {}–{} (node time {:02}:{:02})",
                timer.start,
                timer.end,
                minute_of_day / 60,
                minute_of_day % 60
            ));
        }
        let new_samples = (samples as i64)
            .saturating_sub(status.last_round_samples)
            .max(0);
        let metric = |name: &str| (name == "num_of_samples").then_some(new_samples as f64);
        match trigger.condition.check(metric) {
            Ok((true, _)) => {
                self.fired.insert(uid.to_string(), next_round);
                Decision::Fire(TriggerReport {
                    round: next_round,
                    samples: samples as i64,
                    new_samples,
                    time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(wall)),
                })
            }
            Ok((false, value)) => Decision::Hold(format!(
                "{} does not hold ({value})",
                trigger.condition.describe()
            )),
            Err(e) => Decision::Hold(e),
        }
    }

    /// Forgets jobs not in `alive` (deleted).
    pub fn retain(&mut self, alive: &[String]) {
        self.last_check.retain(|uid, _| alive.contains(uid));
        self.fired.retain(|uid, _| alive.contains(uid));
    }
}

/// The node's local minute of the day.
fn local_minute() -> u32 {
    let now = jiff::Zoned::now();
    now.hour() as u32 * 60 + now.minute() as u32
}

/// Checks the node's jobs every `tick` (each at its own period) and reports fired triggers.
pub async fn run(node: String, store: EdgeStore, reporter: Arc<dyn Reporter>, tick: Duration) {
    let mut triggers = Triggers::default();
    loop {
        if let (Ok(jobs), Ok(datasets)) =
            (store.list("IncrementalLearningJob"), store.list("Dataset"))
        {
            let mut alive = Vec::new();
            for stored in jobs {
                alive.push(stored.uid.clone());
                let Ok(job) = serde_json::from_slice::<IncrementalLearningJob>(&stored.value)
                else {
                    continue;
                };
                let Some(dataset) = datasets
                    .iter()
                    .find(|d| d.namespace == stored.namespace && d.name == job.spec.dataset.name)
                else {
                    continue;
                };
                let Ok(value) = serde_json::from_slice::<serde_json::Value>(&dataset.value) else {
                    continue;
                };
                let spec = |key: &str| {
                    value
                        .pointer(&format!("/spec/{key}"))
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or_default()
                        .to_string()
                };
                if spec("nodeName") != node {
                    continue;
                }
                let Some(path) = local_path(&spec("url")) else {
                    continue;
                };
                let Count::Samples(samples) = count(&spec("format"), &path) else {
                    continue;
                };
                let decision = triggers.check(
                    &stored.uid,
                    &job,
                    samples,
                    Instant::now(),
                    local_minute(),
                    jiff::Timestamp::now(),
                );
                match decision {
                    Decision::Fire(report) => {
                        tracing::info!(job = %stored.name, round = report.round, new_samples = report.new_samples, "train trigger fired");
                        let upstream = Upstream {
                            kind: UpstreamKind::Status as i32,
                            object: Some(ObjectRef {
                                api_version: stored.api_version.clone(),
                                kind: stored.kind.clone(),
                                namespace: stored.namespace.clone(),
                                name: stored.name.clone(),
                                uid: stored.uid.clone(),
                            }),
                            payload: serde_json::json!({"status": {"trainTrigger": report}})
                                .to_string()
                                .into_bytes(),
                        };
                        if let Err(e) = reporter.report(&upstream) {
                            tracing::warn!(job = %stored.name, error = %e, "train trigger not queued");
                        }
                    }
                    Decision::Hold(why) => {
                        tracing::debug!(job = %stored.name, why, "train trigger holds")
                    }
                    Decision::NotDue => {}
                }
            }
            triggers.retain(&alive);
        }
        tokio::time::sleep(tick).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sedna_api::incremental_learning::IncrementalLearningJobStatus;

    fn job(
        trigger: serde_json::Value,
        round: i64,
        last_round_samples: i64,
    ) -> IncrementalLearningJob {
        let text = include_str!("../../examples/incremental-learning/helmet-detection.yaml");
        let mut doc = sedna_api::yaml_documents(text)
            .unwrap()
            .into_iter()
            .find(|d| d["kind"] == "IncrementalLearningJob")
            .unwrap();
        doc["spec"]["trainSpec"]["trigger"] = trigger;
        let mut job: IncrementalLearningJob = serde_json::from_value(doc).unwrap();
        job.status = Some(IncrementalLearningJobStatus {
            round,
            last_round_samples,
            ..Default::default()
        });
        job
    }

    fn wall() -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn new_samples_since_the_last_round_fire_once_per_round() {
        let j = job(
            serde_json::json!({"checkPeriodSeconds": 60, "condition": {"operator": "ge", "threshold": 100, "metric": "num_of_samples"}}),
            2,
            500,
        );
        let mut t = Triggers::default();
        let start = Instant::now();
        assert!(
            matches!(t.check("u", &j, 599, start, 0, wall()), Decision::Hold(w) if w.contains("num_of_samples >= 100 does not hold (99)"))
        );
        // checkPeriodSeconds: not checked again before 60 s.
        assert_eq!(
            t.check("u", &j, 700, start + Duration::from_secs(59), 0, wall()),
            Decision::NotDue
        );
        let Decision::Fire(report) =
            t.check("u", &j, 700, start + Duration::from_secs(60), 0, wall())
        else {
            panic!("should fire");
        };
        assert_eq!(
            (report.round, report.samples, report.new_samples),
            (3, 700, 200)
        );
        // Once per round: no second report for round 3, whatever the count.
        assert_eq!(
            t.check("u", &j, 900, start + Duration::from_secs(500), 0, wall()),
            Decision::NotDue
        );
        // The controller started round 3 from 700 samples: the next trigger counts from there.
        let next = job(
            serde_json::json!({"checkPeriodSeconds": 60, "condition": {"operator": ">", "threshold": 100, "metric": "num_of_samples"}}),
            3,
            700,
        );
        assert!(matches!(
            t.check("u", &next, 800, start + Duration::from_secs(600), 0, wall()),
            Decision::Hold(_)
        ));
        assert!(
            matches!(t.check("u", &next, 801, start + Duration::from_secs(660), 0, wall()), Decision::Fire(r) if r.round == 4)
        );
    }

    #[test]
    fn the_timer_window_is_node_local_and_wraps_past_midnight() {
        let j = job(
            serde_json::json!({"checkPeriodSeconds": 1, "timer": {"start": "22:00", "end": "2:00"},
                               "condition": {"operator": "gt", "threshold": 0, "metric": "num_of_samples"}}),
            0,
            0,
        );
        let mut t = Triggers::default();
        let start = Instant::now();
        assert!(
            matches!(t.check("u", &j, 5, start, 12 * 60, wall()), Decision::Hold(w) if w.contains("outside the window 22:00–2:00 (node time 12:00)"))
        );
        assert!(matches!(
            t.check("u", &j, 5, start + Duration::from_secs(1), 60, wall()),
            Decision::Fire(_)
        ));
    }

    #[test]
    fn every_sedna_operator_is_understood() {
        let start = Instant::now();
        for (op, fires) in [
            (">", false),
            (">=", true),
            ("=", true),
            ("==", true),
            ("!=", false),
            ("<=", true),
            ("<", false),
            ("gt", false),
            ("ge", true),
            ("eq", true),
            ("ne", false),
            ("le", true),
            ("lt", false),
        ] {
            let j = job(
                serde_json::json!({"condition": {"operator": op, "threshold": 10, "metric": "num_of_samples"}}),
                0,
                0,
            );
            let fired = matches!(
                Triggers::default().check("u", &j, 10, start, 0, wall()),
                Decision::Fire(_)
            );
            assert_eq!(fired, fires, "{op}");
        }
    }

    #[test]
    fn an_unknown_metric_holds_with_the_reason() {
        let j = job(
            serde_json::json!({"condition": {"operator": ">", "threshold": 1, "metric": "precision"}}),
            0,
            0,
        );
        assert!(
            matches!(Triggers::default().check("u", &j, 10, Instant::now(), 0, wall()), Decision::Hold(w) if w.contains("no metric \"precision\""))
        );
    }
}
