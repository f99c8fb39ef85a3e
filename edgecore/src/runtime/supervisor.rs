//! The pure part of supervising a pod: what happens after a container exits (restart now,
//! after a back-off, or never), and the pod status that results. Back-off doubles from
//! `base` to `max` and resets once a container ran for ten minutes, as the kubelet's does.

use std::time::Duration;

use serde_json::{Value, json};

/// Restart policy of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Always restart.
    Always,
    /// Restart on a non-zero exit.
    OnFailure,
    /// Never restart.
    Never,
}

impl RestartPolicy {
    /// Parses the pod's `restartPolicy` (default Always).
    pub fn of(s: Option<&str>) -> Self {
        match s {
            Some("OnFailure") => Self::OnFailure,
            Some("Never") => Self::Never,
            _ => Self::Always,
        }
    }
}

/// Back-off settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Running at least this long resets the count.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(600),
        }
    }
}

impl Backoff {
    /// The delay after `count` restarts in a row: `base` doubled per restart up to `max`,
    /// from `base` again when the last run lasted `reset_after`.
    pub fn delay(&self, count: u32, ran_for: Duration) -> Duration {
        let count = if ran_for >= self.reset_after {
            0
        } else {
            count
        };
        self.base
            .checked_mul(1u32 << count.min(16))
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// How a container ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Exit {
    /// Exit code (128 + signal when killed by a signal).
    pub code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// `Completed`, `Error`, `OOMKilled`…
    pub reason: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: String,
}

/// The state of one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Not running: why (`ContainerCreating`, `CrashLoopBackOff`, `CreateContainerConfigError`…).
    Waiting {
        /// Reason.
        reason: String,
        /// Message.
        message: String,
    },
    /// Running since `started_at`, as process `pid`.
    Running {
        /// RFC 3339 start time.
        started_at: String,
        /// The process id.
        pid: u32,
    },
    /// Ended and will not be restarted.
    Terminated(Exit),
}

/// One container's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Container name.
    pub name: String,
    /// Image (as in the spec).
    pub image: String,
    /// Current state.
    pub state: State,
    /// The previous termination.
    pub last: Option<Exit>,
    /// Restarts so far.
    pub restarts: u32,
}

impl Record {
    /// A container about to be created.
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            last: None,
            restarts: 0,
        }
    }
}

/// What to do after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start again after this delay (`CrashLoopBackOff` while waiting if non-zero).
    Restart(Duration),
    /// Leave it terminated.
    Stay,
}

/// Decides what follows an exit. `restarts` counts earlier restarts; `ran_for` is how long
/// the process ran.
pub fn after_exit(
    policy: RestartPolicy,
    code: i32,
    restarts: u32,
    ran_for: Duration,
    backoff: Backoff,
) -> (Decision, u32) {
    let restart = match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => code != 0,
        RestartPolicy::Never => false,
    };
    if !restart {
        return (Decision::Stay, restarts);
    }
    (
        Decision::Restart(backoff.delay(restarts, ran_for)),
        restarts + 1,
    )
}

fn terminated_json(e: &Exit) -> Value {
    let mut t = json!({ "exitCode": e.code, "reason": e.reason, "startedAt": e.started_at,
                        "finishedAt": e.finished_at });
    if let Some(s) = e.signal {
        t["signal"] = json!(s);
    }
    json!({ "terminated": t })
}

/// The pod phase that records imply.
pub fn phase(records: &[Record], policy: RestartPolicy) -> &'static str {
    if records
        .iter()
        .any(|r| matches!(r.state, State::Running { .. }))
    {
        return "Running";
    }
    let all_done = records
        .iter()
        .all(|r| matches!(r.state, State::Terminated(_)));
    if all_done && !records.is_empty() {
        let all_ok = records
            .iter()
            .all(|r| matches!(&r.state, State::Terminated(e) if e.code == 0));
        return if all_ok { "Succeeded" } else { "Failed" };
    }
    let restarting = records
        .iter()
        .any(|r| matches!(&r.state, State::Waiting { reason, .. } if reason == "CrashLoopBackOff"));
    if restarting && policy != RestartPolicy::Never {
        return "Running";
    }
    "Pending"
}

/// The pod status to report: `{"status": {...}}`, a merge patch.
pub fn status(
    records: &[Record],
    policy: RestartPolicy,
    host_ip: &str,
    start_time: &str,
    now: &str,
) -> Value {
    let ready = !records.is_empty()
        && records
            .iter()
            .all(|r| matches!(r.state, State::Running { .. }));
    let statuses: Vec<Value> = records
        .iter()
        .map(|r| {
            let (state, container_id, started) = match &r.state {
                State::Waiting { reason, message } => {
                    let mut w = json!({ "reason": reason });
                    if !message.is_empty() {
                        w["message"] = json!(message);
                    }
                    (json!({ "waiting": w }), String::new(), false)
                }
                State::Running { started_at, pid } => (
                    json!({ "running": { "startedAt": started_at } }),
                    format!("process://{pid}"),
                    true,
                ),
                State::Terminated(e) => (terminated_json(e), String::new(), false),
            };
            let mut s = json!({
                "name": r.name,
                "image": r.image,
                "imageID": "",
                "state": state,
                "lastState": r.last.as_ref().map(terminated_json).unwrap_or_else(|| json!({})),
                "ready": started,
                "restartCount": r.restarts,
                "started": started,
            });
            if !container_id.is_empty() {
                s["containerID"] = json!(container_id);
            }
            s
        })
        .collect();
    let condition = |t: &str, ok: bool| json!({ "type": t, "status": if ok { "True" } else { "False" }, "lastTransitionTime": now });
    json!({ "status": {
        "phase": phase(records, policy),
        "conditions": [
            condition("PodScheduled", true),
            condition("Initialized", true),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ],
        "hostIP": host_ip,
        "hostIPs": [{ "ip": host_ip }],
        "podIP": host_ip,
        "podIPs": [{ "ip": host_ip }],
        "startTime": start_time,
        "containerStatuses": statuses,
    } })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32) -> Exit {
        Exit {
            code,
            signal: None,
            reason: if code == 0 {
                "Completed".into()
            } else {
                "Error".into()
            },
            started_at: "t0".into(),
            finished_at: "t1".into(),
        }
    }

    #[test]
    fn back_off_doubles_to_the_cap_and_resets_after_a_long_run() {
        let b = Backoff::default();
        let short = Duration::from_secs(1);
        let mut restarts = 0;
        let mut delays = Vec::new();
        for _ in 0..8 {
            let (d, r) = after_exit(RestartPolicy::Always, 1, restarts, short, b);
            restarts = r;
            if let Decision::Restart(d) = d {
                delays.push(d.as_secs());
            }
        }
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300, 300]);
        let (d, _) = after_exit(
            RestartPolicy::Always,
            1,
            restarts,
            Duration::from_secs(601),
            b,
        );
        assert_eq!(d, Decision::Restart(Duration::from_secs(10)));
    }

    #[test]
    fn restart_policies_decide() {
        let b = Backoff::default();
        let t = Duration::from_secs(1);
        assert_eq!(
            after_exit(RestartPolicy::Never, 1, 0, t, b).0,
            Decision::Stay
        );
        assert_eq!(
            after_exit(RestartPolicy::OnFailure, 0, 0, t, b).0,
            Decision::Stay
        );
        assert!(matches!(
            after_exit(RestartPolicy::OnFailure, 2, 0, t, b).0,
            Decision::Restart(_)
        ));
        assert!(matches!(
            after_exit(RestartPolicy::Always, 0, 0, t, b).0,
            Decision::Restart(_)
        ));
    }

    #[test]
    fn phases_follow_the_containers() {
        let mut a = Record::new("a", "img");
        assert_eq!(
            phase(std::slice::from_ref(&a), RestartPolicy::Always),
            "Pending"
        );
        a.state = State::Running {
            started_at: "t".into(),
            pid: 7,
        };
        assert_eq!(
            phase(std::slice::from_ref(&a), RestartPolicy::Always),
            "Running"
        );
        a.state = State::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: String::new(),
        };
        assert_eq!(
            phase(std::slice::from_ref(&a), RestartPolicy::Always),
            "Running"
        );
        a.state = State::Terminated(exit(0));
        assert_eq!(
            phase(std::slice::from_ref(&a), RestartPolicy::Never),
            "Succeeded"
        );
        let mut b = Record::new("b", "img");
        b.state = State::Terminated(exit(3));
        assert_eq!(phase(&[a, b], RestartPolicy::Never), "Failed");
    }

    #[test]
    fn statuses_read_like_the_kubelets() {
        let mut a = Record::new("a", "img");
        a.state = State::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: "back-off 20s restarting failed container".into(),
        };
        a.last = Some(exit(3));
        a.restarts = 2;
        let s = status(&[a], RestartPolicy::Always, "10.0.0.5", "t0", "t2");
        let c = &s["status"]["containerStatuses"][0];
        assert_eq!(c["state"]["waiting"]["reason"], "CrashLoopBackOff");
        assert_eq!(c["lastState"]["terminated"]["exitCode"], 3);
        assert_eq!(c["restartCount"], 2);
        assert_eq!(s["status"]["podIP"], "10.0.0.5");
        assert_eq!(s["status"]["conditions"][3]["status"], "False");
    }
}
