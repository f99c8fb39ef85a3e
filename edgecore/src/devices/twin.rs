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
