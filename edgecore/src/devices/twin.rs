//! Twin coalescing: the latest reported value of every property of every device, sent
//! upstream at most once per device per interval.
//!
//! A sensor that changes ten times a second, or a node that was offline for an hour, costs one
//! status write per device per interval: each write carries every property's latest value and
//! time (a snapshot), so nothing but intermediate values is skipped, and a newer snapshot
//! replaces a queued one in the outbox. With a zero interval every change is written at once.
//!
//! Pure: time comes in as arguments, so the rules are tested without clocks or sockets.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sedna_api::devices::{Twin, TwinProperty};
use tokio::time::Instant;

/// How often the node's local API shows a device's new values (live, while the cloud gets
/// them at the report interval).
pub const LOCAL_INTERVAL: Duration = Duration::from_secs(1);

/// The latest twin snapshot of each device of the node, for the node's local API: the device
/// manager publishes, the local API overlays them on the Devices it serves. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct LiveTwins {
    inner: std::sync::Arc<std::sync::Mutex<LiveInner>>,
    changed: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

#[derive(Debug, Default)]
struct LiveInner {
    /// (namespace, name) → the status fields to show.
    status: HashMap<(String, String), serde_json::Value>,
    /// Devices published since the local API last looked.
    pending: std::collections::BTreeSet<(String, String)>,
}

impl LiveTwins {
    fn lock(&self) -> std::sync::MutexGuard<'_, LiveInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A device's latest status fields (`twins`, `state`, `lastOnlineTime`).
    pub fn publish(&self, namespace: &str, name: &str, status: serde_json::Value) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut inner = self.lock();
        inner.status.insert(key.clone(), status);
        inner.pending.insert(key);
        drop(inner);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Forgets a device that went.
    pub fn remove(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut inner = self.lock();
        inner.status.remove(&key);
        inner.pending.remove(&key);
    }

    /// The latest status fields of a device, if any were published.
    pub fn status(&self, namespace: &str, name: &str) -> Option<serde_json::Value> {
        self.lock()
            .status
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// The devices published since the last call.
    pub fn take_pending(&self) -> Vec<(String, String)> {
        std::mem::take(&mut self.lock().pending)
            .into_iter()
            .collect()
    }

    /// Ticks on every publication.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// `device` with its live status fields laid over the stored ones.
    pub fn overlay(&self, device: &mut serde_json::Value) {
        let (Some(ns), Some(name)) = (
            device
                .pointer("/metadata/namespace")
                .and_then(|v| v.as_str()),
            device.pointer("/metadata/name").and_then(|v| v.as_str()),
        ) else {
            return;
        };
        let Some(serde_json::Value::Object(live)) = self.status(ns, name) else {
            return;
        };
        if !device["status"].is_object() {
            device["status"] = serde_json::json!({});
        }
        if let Some(status) = device["status"].as_object_mut() {
            status.extend(live);
        }
    }
}

impl Flush {
    /// The Device status fields this snapshot sets.
    pub fn status(&self) -> serde_json::Value {
        let mut status = serde_json::json!({ "twins": self.twins });
        if let Some(state) = &self.state {
            status["state"] = serde_json::json!(state);
        }
        if let Some(at) = &self.last_online_time {
            status["lastOnlineTime"] = serde_json::json!(at);
        }
        status
    }
}

/// The longest property value kept, in bytes; longer readings are refused by the mappers.
pub const MAX_VALUE_BYTES: usize = 4096;

/// One device's twin snapshot, due upstream.
#[derive(Clone, Debug, PartialEq)]
pub struct Flush {
    /// The device's uid.
    pub uid: String,
    /// Every property's latest value (sorted by name).
    pub twins: Vec<Twin>,
    /// The device's state (`online`, `offline`, `unhealthy`), when known.
    pub state: Option<String>,
    /// When it was last seen online (RFC 3339).
    pub last_online_time: Option<String>,
}

#[derive(Debug, Default)]
struct DeviceTwins {
    reported: BTreeMap<String, TwinProperty>,
    applied: BTreeMap<String, TwinProperty>,
    state: Option<String>,
    last_online_time: Option<String>,
    dirty: bool,
    last_flush: Option<Instant>,
}

/// Counters of what the coalescer saw and sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TwinStats {
    /// Readings and state changes observed.
    pub observed: u64,
    /// Snapshots handed out for upstream.
    pub flushed: u64,
}

/// The latest values of every device, flushed at a bounded rate.
#[derive(Debug)]
pub struct Coalescer {
    interval: Duration,
    devices: HashMap<String, DeviceTwins>,
    stats: TwinStats,
}

impl Coalescer {
    /// At most one snapshot per device per `interval` (zero: one per change).
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            devices: HashMap::new(),
            stats: TwinStats::default(),
        }
    }

    /// What was observed and flushed so far.
    pub fn stats(&self) -> TwinStats {
        self.stats
    }

    /// A property's reported value, read at `at` (RFC 3339).
    pub fn report(&mut self, uid: &str, property: &str, value: &str, at: &str) {
        self.set(uid, property, value, at, false);
    }

    /// A desired value the mapper wrote to the device.
    pub fn applied(&mut self, uid: &str, property: &str, value: &str, at: &str) {
        self.set(uid, property, value, at, true);
    }

    fn set(&mut self, uid: &str, property: &str, value: &str, at: &str, applied: bool) {
        let device = self.devices.entry(uid.to_owned()).or_default();
        self.stats.observed += 1;
        let values = if applied {
            &mut device.applied
        } else {
            &mut device.reported
        };
        let twin = values.entry(property.to_owned()).or_default();
        twin.value = value.to_owned();
        twin.metadata.insert("timestamp".into(), at.to_owned());
        device.dirty = true;
    }

    /// The device's state; `online` also records the time.
    pub fn state(&mut self, uid: &str, state: &str, at: &str) {
        let device = self.devices.entry(uid.to_owned()).or_default();
        if device.state.as_deref() == Some(state) {
            return;
        }
        self.stats.observed += 1;
        device.state = Some(state.to_owned());
        if state == "online" {
            device.last_online_time = Some(at.to_owned());
        }
        device.dirty = true;
    }

    /// Forgets a device (deleted, or moved to another node).
    pub fn forget(&mut self, uid: &str) {
        self.devices.remove(uid);
    }

    /// When the next snapshot is due, if any is waiting.
    pub fn next_due(&self) -> Option<Instant> {
        self.devices
            .values()
            .filter(|d| d.dirty)
            .map(|d| {
                d.last_flush
                    .map_or_else(Instant::now, |t| t + self.interval)
            })
            .min()
    }

    /// The snapshots due at `now`; each device flushed is not due again for `interval`.
    pub fn due(&mut self, now: Instant) -> Vec<Flush> {
        let mut out = Vec::new();
        for (uid, device) in &mut self.devices {
            if !device.dirty || device.last_flush.is_some_and(|t| now < t + self.interval) {
                continue;
            }
            device.dirty = false;
            device.last_flush = Some(now);
            let names = device
                .reported
                .keys()
                .chain(device.applied.keys())
                .collect::<std::collections::BTreeSet<_>>();
            let twins = names
                .into_iter()
                .map(|name| Twin {
                    property_name: name.clone(),
                    reported: device.reported.get(name).cloned().unwrap_or_default(),
                    observed_desired: device.applied.get(name).cloned(),
                })
                .collect();
            out.push(Flush {
                uid: uid.clone(),
                twins,
                state: device.state.clone(),
                last_online_time: device.last_online_time.clone(),
            });
        }
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        self.stats.flushed += out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn live_values_are_laid_over_the_stored_status_and_forgotten_with_the_device() {
        let live = LiveTwins::default();
        let changes = live.subscribe();
        live.publish(
            "default",
            "d",
            serde_json::json!({ "state": "online", "twins": [1] }),
        );
        assert!(changes.has_changed().unwrap());
        assert_eq!(
            live.take_pending(),
            [("default".to_owned(), "d".to_owned())]
        );
        assert!(live.take_pending().is_empty());
        let mut stored = serde_json::json!({
            "metadata": { "namespace": "default", "name": "d" },
            "status": { "state": "offline", "twins": [0], "conditions": ["kept"] }
        });
        live.overlay(&mut stored);
        assert_eq!(
            stored["status"],
            serde_json::json!({ "state": "online", "twins": [1], "conditions": ["kept"] })
        );
        let mut other = serde_json::json!({ "metadata": { "namespace": "default", "name": "e" } });
        live.overlay(&mut other);
        assert!(
            other.get("status").is_none(),
            "only the device's own values"
        );
        live.remove("default", "d");
        assert_eq!(live.status("default", "d"), None);
    }

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_noisy_sensor_is_sent_once_per_interval_with_its_latest_value() {
        let mut c = Coalescer::new(Duration::from_secs(10));
        let start = Instant::now();
        c.report("d1", "temperature", "20.0", "t0");
        let first = c.due(start);
        assert_eq!(first.len(), 1, "the first reading goes at once");
        assert_eq!(first[0].twins[0].reported.value, "20.0");
        // 10 changes a second for 25 seconds: three snapshots (at 0, 10 and 20 s), no more.
        let mut sent = Vec::new();
        for tick in 1..=250u64 {
            let now = start + Duration::from_millis(100 * tick);
            c.report("d1", "temperature", &format!("{tick}"), &format!("t{tick}"));
            sent.extend(c.due(now));
        }
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[0].twins[0].reported.value, "100");
        assert_eq!(sent[1].twins[0].reported.value, "200");
        // The last value is not lost: it is due when the interval has passed.
        assert_eq!(c.next_due(), Some(start + Duration::from_secs(30)));
        let last = c.due(start + Duration::from_secs(30));
        assert_eq!(last[0].twins[0].reported.value, "250");
        assert_eq!(
            last[0].twins[0].reported.metadata.get("timestamp"),
            Some(&"t250".to_string())
        );
        assert_eq!(c.stats().flushed, 4);
        assert_eq!(c.stats().observed, 251);
        assert!(
            c.due(start + Duration::from_secs(60)).is_empty(),
            "nothing new"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_carries_every_property_and_the_state() {
        let mut c = Coalescer::new(Duration::from_secs(10));
        let now = Instant::now();
        c.state("d1", "online", "t0");
        c.report("d1", "temperature", "21.5", "t1");
        c.report("d1", "humidity", "40", "t1");
        c.applied("d1", "setpoint", "22", "t2");
        c.report("d2", "switch", "true", "t1");
        let out = c.due(now);
        assert_eq!(out.len(), 2);
        let d1 = &out[0];
        assert_eq!(d1.state.as_deref(), Some("online"));
        assert_eq!(d1.last_online_time.as_deref(), Some("t0"));
        let names: Vec<_> = d1.twins.iter().map(|t| t.property_name.as_str()).collect();
        assert_eq!(names, ["humidity", "setpoint", "temperature"]);
        assert_eq!(
            d1.twins[1]
                .observed_desired
                .as_ref()
                .map(|t| t.value.as_str()),
            Some("22")
        );
        // A repeated state is not a change.
        c.state("d1", "online", "t3");
        assert!(c.due(now + Duration::from_secs(20)).is_empty());
        c.forget("d2");
        c.report("d1", "temperature", "22", "t4");
        assert_eq!(c.due(now + Duration::from_secs(30)).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_interval_sends_every_change() {
        let mut c = Coalescer::new(Duration::ZERO);
        let now = Instant::now();
        for i in 0..5 {
            c.report("d1", "p", &i.to_string(), "t");
            assert_eq!(c.due(now).len(), 1);
        }
    }
}
