//! Watch: a chunked stream of newline-delimited `{"type", "object"}` events, fed from the
//! revision log, so a watch from any retained resourceVersion replays exactly the events it
//! missed, in order, once. Bookmarks, streaming lists (`sendInitialEvents`) ending with the
//! `k8s.io/initial-events-end` bookmark, and an expired resourceVersion answered with HTTP 200
//! and an `ERROR` event carrying a 410 Status.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::handlers::{Call, Filter, list_prefix, served, served_as_stored};
use crate::registry::ResourceType;
use crate::request::Representation;
use crate::server::Api;
use crate::store::{Event, EventKind, StoreError};
use crate::table;

/// How a watch starts.
enum Start {
    /// Replay events after this revision.
    After(u64),
    /// Send the current state as ADDED events, then events after it.
    Snapshot {
        /// End with an initial-events-end bookmark (streaming list).
        end_bookmark: bool,
    },
}

struct Encoder {
    t: Arc<ResourceType>,
    repr: Representation,
    headers_sent: bool,
    include_object: String,
}

impl Encoder {
    /// A change as a watch line. The object is serialized once per change and shared with the
    /// change's other watchers whenever they send it as stored (plain JSON objects of a
    /// resource served as it is stored).
    fn change(&mut self, kind: &str, event: &Event) -> Bytes {
        if self.repr != Representation::Object || !served_as_stored(&self.t) {
            return self.event(kind, &event.object);
        }
        let object = event
            .json
            .get_or_init(|| Bytes::from(serde_json::to_vec(&*event.object).unwrap_or_default()));
        // What `line` makes of {"type", "object"}: serde_json writes keys in order.
        let mut out = Vec::with_capacity(object.len() + kind.len() + 24);
        out.extend_from_slice(b"{\"object\":");
        out.extend_from_slice(object);
        out.extend_from_slice(b",\"type\":\"");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\"}\n");
        Bytes::from(out)
    }

    fn event(&mut self, kind: &str, obj: &Value) -> Bytes {
        let obj = served(&self.t, obj);
        let object = match self.repr {
            Representation::Object => obj,
            Representation::PartialMetadata => table::partial_metadata(&obj),
            Representation::Table => {
                let rv = obj
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let with_headers = !self.headers_sent;
                self.headers_sent = true;
                table::table(
                    &self.t,
                    &[&obj],
                    &rv,
                    None,
                    with_headers,
                    &self.include_object,
                )
            }
        };
        line(&json!({ "type": kind, "object": object }))
    }

    fn bookmark(&self, rev: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({ "resourceVersion": rev.to_string() });
        if initial_events_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        line(&json!({
            "type": "BOOKMARK",
            "object": { "kind": self.t.kind, "apiVersion": self.t.api_version(),
                        "metadata": metadata },
        }))
    }
}

fn line(v: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(v).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn expired_event(requested: u64, compacted: u64) -> Bytes {
    let status = ApiError::expired(format!(
        "too old resource version: {requested} ({compacted})"
    ))
    .to_status();
    line(&json!({ "type": "ERROR", "object": status }))
}

/// Decides the event a watcher with `filter` sees for a change, if any: an object that starts
/// matching is ADDED, one that stops matching is DELETED.
fn visible(filter: &Filter, event: &Event) -> Option<&'static str> {
    let now = filter.matches(&event.object);
    match event.kind {
        EventKind::Added => now.then_some("ADDED"),
        EventKind::Deleted => now.then_some("DELETED"),
        EventKind::Modified => {
            let before = event.prev.as_ref().is_some_and(|p| filter.matches(p));
            match (before, now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some(if event.prev.is_some() {
                    "ADDED"
                } else {
                    "MODIFIED"
                }),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            }
        }
    }
}

/// Starts a watch; returns the receiver of the stream's chunks.
pub(crate) fn start(api: &Arc<Api>, call: &Call) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let filter = Filter::of(call)?;
    let prefix = list_prefix(call, &filter);
    let bookmarks = call.query.flag("allowWatchBookmarks");
    let send_initial = call.query.flag("sendInitialEvents");
    let rv = call.query.get("resourceVersion");
    if send_initial {
        if call.query.get("resourceVersionMatch") != Some("NotOlderThan") {
            return Err(ApiError::invalid_field(
                "ListOptions",
                "meta.k8s.io",
                "",
                "resourceVersionMatch",
                "Forbidden: sendInitialEvents requires setting resourceVersionMatch to \
                 NotOlderThan",
            ));
        }
        if !bookmarks {
            return Err(ApiError::invalid_field(
                "ListOptions",
                "meta.k8s.io",
                "",
                "allowWatchBookmarks",
                "Forbidden: sendInitialEvents requires allowWatchBookmarks=true",
            ));
        }
    }
    let start = match rv {
        _ if send_initial => Start::Snapshot { end_bookmark: true },
        None | Some("0") => Start::Snapshot {
            end_bookmark: false,
        },
        Some(rv) => Start::After(
            rv.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let timeout = call
        .query
        .number("timeoutSeconds")?
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s as u64).min(api.config.watch_timeout))
        .unwrap_or(api.config.watch_timeout);
    let (tx, rx) = mpsc::channel(256);
    let mut encoder = Encoder {
        t: call.t.clone(),
        repr: call.repr,
        headers_sent: false,
        include_object: call
            .query
            .get("includeObject")
            .unwrap_or("Metadata")
            .to_owned(),
    };
    let api = api.clone();
    tokio::spawn(async move {
        let _ = run(
            &api,
            &mut encoder,
            &filter,
            &prefix,
            start,
            bookmarks,
            timeout,
            &tx,
        )
        .await;
    });
    Ok(rx)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    api: &Api,
    encoder: &mut Encoder,
    filter: &Filter,
    prefix: &str,
    start: Start,
    bookmarks: bool,
    timeout: Duration,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), ()> {
    let mut head = api.store.subscribe();
    let mut shutdown = api.shutdown.clone();
    let send = |chunk: Bytes| async move { tx.send(chunk).await.map_err(|_| ()) };
    let mut cursor = match start {
        Start::After(rev) => rev,
        Start::Snapshot { end_bookmark } => {
            let (items, rev) = api.store.list(prefix);
            for stored in items {
                if filter.matches(&stored.value) {
                    send(encoder.event("ADDED", &stored.value)).await?;
                }
            }
            if end_bookmark {
                send(encoder.bookmark(rev, true)).await?;
            }
            rev
        }
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut ticker = tokio::time::interval(api.config.bookmark_interval);
    ticker.tick().await;
    loop {
        loop {
            let observed_head = api.store.head();
            match api.store.events_since(cursor, prefix, 1000) {
                Err(StoreError::Compacted {
                    requested,
                    compacted,
                }) => {
                    send(expired_event(requested, compacted)).await?;
                    return Ok(());
                }
                Err(_) => return Ok(()),
                Ok(events) if events.is_empty() => {
                    cursor = cursor.max(observed_head);
                    break;
                }
                Ok(events) => {
                    for event in &events {
                        cursor = event.rev;
                        if let Some(kind) = visible(filter, event) {
                            send(encoder.change(kind, event)).await?;
                        }
                    }
                }
            }
        }
        tokio::select! {
            changed = head.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = ticker.tick(), if bookmarks => {
                send(encoder.bookmark(cursor, false)).await?;
            }
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = shutdown.changed() => return Ok(()),
            _ = tx.closed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::builtins;

    fn filter(labels: &str) -> Filter {
        let pods = builtins()
            .into_iter()
            .find(|t| t.resource == "pods")
            .unwrap();
        Filter {
            labels: crate::selector::LabelSelector::parse(labels).unwrap(),
            fields: crate::selector::FieldSelector::parse("", &pods).unwrap(),
        }
    }

    fn event(kind: EventKind, prev: Option<&str>, now: &str) -> Event {
        let obj = |app: &str| Arc::new(json!({ "metadata": { "labels": { "app": app } } }));
        Event {
            rev: 1,
            key: "k".into(),
            kind,
            object: obj(now),
            prev: prev.map(obj),
            json: Default::default(),
        }
    }

    #[test]
    fn objects_entering_or_leaving_a_selector_are_added_or_deleted() {
        let f = filter("app=web");
        assert_eq!(
            visible(&f, &event(EventKind::Added, None, "web")),
            Some("ADDED")
        );
        assert_eq!(visible(&f, &event(EventKind::Added, None, "db")), None);
        assert_eq!(
            visible(&f, &event(EventKind::Modified, Some("web"), "web")),
            Some("MODIFIED")
        );
        assert_eq!(
            visible(&f, &event(EventKind::Modified, Some("db"), "web")),
            Some("ADDED")
        );
        assert_eq!(
            visible(&f, &event(EventKind::Modified, Some("web"), "db")),
            Some("DELETED")
        );
        assert_eq!(
            visible(&f, &event(EventKind::Modified, Some("db"), "db")),
            None
        );
        assert_eq!(
            visible(&f, &event(EventKind::Deleted, None, "web")),
            Some("DELETED")
        );
    }

    /// A watcher's encoder for plain JSON objects of `t`.
    fn object_encoder(t: Arc<ResourceType>) -> Encoder {
        Encoder {
            t,
            repr: Representation::Object,
            headers_sent: false,
            include_object: "Metadata".into(),
        }
    }

    #[test]
    fn a_change_is_encoded_once_and_every_watcher_sends_the_same_line() {
        let pods = crate::registry::builtins()
            .into_iter()
            .find(|t| t.resource == "pods")
            .map(Arc::new)
            .unwrap();
        let encoder = || object_encoder(pods.clone());
        let change = Event {
            rev: 7,
            key: "core/pods/default/p".into(),
            kind: EventKind::Modified,
            object: Arc::new(json!({ "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "p", "namespace": "default", "resourceVersion": "7" },
                "spec": { "nodeName": "n\u{e9}\"quoted\"" } })),
            prev: None,
            json: Default::default(),
        };
        let first = encoder().change("MODIFIED", &change);
        assert!(
            change.json.get().is_some(),
            "the first watcher leaves the encoding"
        );
        let second = encoder().change("ADDED", &change);
        // Byte for byte what encoding the event alone makes.
        assert_eq!(first, encoder().event("MODIFIED", &change.object));
        assert_eq!(second, encoder().event("ADDED", &change.object));
        let line: Value = serde_json::from_slice(&second).unwrap();
        assert_eq!(line["type"], "ADDED");
        assert_eq!(line["object"], *change.object);
    }

    #[test]
    fn a_watcher_of_another_representation_encodes_its_own() {
        let events = crate::registry::builtins()
            .into_iter()
            .find(|t| t.group == "events.k8s.io")
            .map(Arc::new)
            .unwrap();
        let mut encoder = object_encoder(events);
        let change = Event {
            rev: 3,
            key: "core/events/default/e".into(),
            kind: EventKind::Added,
            object: Arc::new(json!({ "apiVersion": "v1", "kind": "Event",
                "metadata": { "name": "e", "namespace": "default" }, "message": "m" })),
            prev: None,
            json: Default::default(),
        };
        let line = encoder.change("ADDED", &change);
        assert!(
            change.json.get().is_none(),
            "not the stored form: nothing shared"
        );
        let line: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(line["object"]["apiVersion"], "events.k8s.io/v1");
    }
}
