//! The edge's local store (SQLite, WAL): every object the hub sent, keyed by uid and by
//! kind/namespace/name with its resourceVersion, and the outbox of upstream writes. Every
//! change is committed before it is acknowledged, so the store survives kill -9 at any point.
//! [`EdgeStore::in_memory`] keeps the same in plain maps instead, with the same rules and
//! nothing on disk: a simulator's thousands of nodes (an in-memory SQLite database cost
//! ≈ 50 KiB per node: its connection, schema pages and prepared statements).
//!
//! The outbox keeps upstream writes in order until the hub acknowledges them. It is bounded:
//! when full, older status writes to an object that has a newer one queued are dropped first
//! (the newer status supersedes them); if that frees nothing, the oldest events are dropped,
//! each drop logged and counted; writes of other kinds are then refused with
//! [`StoreError::OutboxFull`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use sedna_proto::channel::{ObjectRef, Upstream, upstream::Kind as UpstreamKind};
use sedna_proto::{Message, sync};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("edge store: {0}")]
    Database(String),
    /// The outbox holds its maximum and nothing could be dropped.
    #[error("the outbox is full ({0} entries) and holds nothing that may be dropped")]
    OutboxFull(usize),
    /// An upstream message exceeds the channel's size cap.
    #[error("the upstream message is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The cap.
        limit: usize,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

impl StoreError {
    /// Whether trying again could succeed (the outbox may drain, the disk may recover).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Database(_) | StoreError::OutboxFull(_))
    }
}

/// An object held by the edge.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredObject {
    /// apiVersion.
    pub api_version: String,
    /// kind.
    pub kind: String,
    /// Namespace (empty for cluster objects).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// uid.
    pub uid: String,
    /// resourceVersion.
    pub rv: u64,
    /// The object (JSON).
    pub value: Vec<u8>,
}

/// Which object changed (the object itself is read from the store: notifications stay small,
/// however many are buffered for slow subscribers).
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectId {
    /// apiVersion.
    pub api_version: String,
    /// kind.
    pub kind: String,
    /// Namespace (empty for cluster objects).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// uid.
    pub uid: String,
    /// resourceVersion stored.
    pub rv: u64,
}

/// A queued upstream write.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEntry {
    /// Sequence number (the envelope id).
    pub seq: u64,
    /// The write.
    pub upstream: Upstream,
}

/// What changed in the store, for whoever reacts to objects (the workload runtime).
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// An object was stored (read it with [`EdgeStore::get`]).
    Upserted(ObjectId),
    /// An object was removed.
    Deleted {
        /// kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// uid.
        uid: String,
    },
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS objects (
    uid TEXT PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    api_version TEXT NOT NULL,
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    rv INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    target TEXT NOT NULL,
    message BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_target ON outbox (target, seq);
";

/// Removes one outbox entry by its sequence number.
const DELETE_OUTBOX_ENTRY: &str = "DELETE FROM outbox WHERE seq = ?1";

/// Counters of the outbox's drop policy.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Status writes dropped because a newer one for the same object was queued.
    pub statuses_coalesced: AtomicU64,
    /// Events dropped because the outbox was full.
    pub events_dropped: AtomicU64,
}

/// Where a store keeps its data.
enum Backend {
    /// SQLite: durable.
    Sqlite(Mutex<Connection>),
    /// Plain maps: gone with the process.
    Memory(Mutex<Memory>),
}

/// The edge store. Cheap to clone.
#[derive(Clone)]
pub struct EdgeStore {
    backend: Arc<Backend>,
    outbox_limit: usize,
    max_message: usize,
    stats: Arc<OutboxStats>,
}

impl std::fmt::Debug for EdgeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeStore").finish_non_exhaustive()
    }
}

fn key_of(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

fn target_of(u: &Upstream) -> String {
    u.object
        .as_ref()
        .map(|o| format!("{}/{}/{}/{}", o.api_version, o.kind, o.namespace, o.name))
        .unwrap_or_default()
}

impl EdgeStore {
    /// Opens (or creates) the store at `path`; `:memory:` keeps it in memory (simulated
    /// edges in benchmarks).
    pub fn open(path: &Path, outbox_limit: usize, max_message: usize) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            crate::private_dir(dir).map_err(|e| StoreError::Database(e.to_string()))?;
        }
        let conn = Connection::open(path)?;
        if path == Path::new(":memory:") {
            // Before anything is read or written. A simulated node's few objects: 1 KiB pages
            // (its empty schema of six b-trees took 26 KiB at SQLite's 4 KiB, and a simulator
            // holds thousands of stores).
            conn.pragma_update(None, "page_size", 1024)?;
        } else {
            // Before the first write: SQLite gives its WAL and shared-memory files the
            // database file's mode.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))?;
        }
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Small nodes: a 256 KiB page cache (SQLite's default is 2 MB).
        conn.pragma_update(None, "cache_size", -256)?;
        conn.execute_batch(SCHEMA)?;
        // Every statement of the hot paths stays prepared (rusqlite keeps 16 by default).
        conn.set_prepared_statement_cache_capacity(32);
        Ok(Self {
            backend: Arc::new(Backend::Sqlite(Mutex::new(conn))),
            outbox_limit,
            max_message,
            stats: Arc::default(),
        })
    }

    /// A store in plain maps, nothing on disk, with the same rules as a durable one (for
    /// simulated edges: thousands in one process).
    pub fn in_memory(outbox_limit: usize, max_message: usize) -> Self {
        Self {
            backend: Arc::new(Backend::Memory(Mutex::default())),
            outbox_limit,
            max_message,
            stats: Arc::default(),
        }
    }

    /// The SQLite connection, or the maps.
    fn backend(&self) -> Locked<'_> {
        match &*self.backend {
            Backend::Sqlite(c) => {
                Locked::Sqlite(c.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
            }
            Backend::Memory(m) => {
                Locked::Memory(m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
            }
        }
    }

    /// The SQLite connection (tests of the durable store).
    #[cfg(test)]
    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        match &*self.backend {
            Backend::Sqlite(c) => c.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            Backend::Memory(_) => panic!("an in-memory store has no connection"),
        }
    }

    /// Counters of the outbox drop policy.
    pub fn outbox_stats(&self) -> &OutboxStats {
        &self.stats
    }

    /// Stores an object unless a newer version is already stored. Returns the change, if any.
    pub fn upsert(
        &self,
        object: &ObjectRef,
        rv: u64,
        value: &[u8],
    ) -> Result<Option<Change>, StoreError> {
        Ok(self
            .write_all(&[Write::Upsert { object, rv, value }])?
            .pop())
    }

    /// Removes an object (by uid) unless a newer version is stored.
    pub fn delete(&self, uid: &str, rv: u64) -> Result<Option<Change>, StoreError> {
        Ok(self.write_all(&[Write::Delete { uid, rv }])?.pop())
    }

    /// Applies writes in order in one transaction: all or none, and one disk sync for all of
    /// them (a first sync of a thousand objects is a few syncs, not a thousand). Returns the
    /// changes made; a write older than what is stored changes nothing.
    pub fn write_all(&self, writes: &[Write<'_>]) -> Result<Vec<Change>, StoreError> {
        let mut conn = match self.backend() {
            Locked::Sqlite(conn) => conn,
            Locked::Memory(mut m) => {
                return Ok(writes
                    .iter()
                    .filter_map(|w| match w {
                        Write::Upsert { object, rv, value } => m.upsert(object, *rv, value),
                        Write::Delete { uid, rv } => m.delete(uid, *rv),
                    })
                    .collect());
            }
        };
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut changes = Vec::with_capacity(writes.len());
        for w in writes {
            let change = match w {
                Write::Upsert { object, rv, value } => upsert_in(&tx, object, *rv, value)?,
                Write::Delete { uid, rv } => delete_in(&tx, uid, *rv)?,
            };
            changes.extend(change);
        }
        tx.commit()?;
        Ok(changes)
    }

    /// Every (uid, resourceVersion) pair held.
    pub fn inventory(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let conn = match self.backend() {
            Locked::Sqlite(conn) => conn,
            Locked::Memory(m) => {
                return Ok(m.objects.iter().map(|(u, o)| (u.clone(), o.rv)).collect());
            }
        };
        let mut stmt = conn.prepare_cached("SELECT uid, rv FROM objects")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Reconciles one bucket against the hub's manifest: removes what the hub does not list
    /// and returns the uids to ask for (missing, or held at another version).
    pub fn reconcile_bucket(
        &self,
        buckets: u32,
        bucket: u32,
        hub: &[(String, u64)],
    ) -> Result<(Vec<String>, Vec<Change>), StoreError> {
        let local: Vec<(String, u64)> = self
            .inventory()?
            .into_iter()
            .filter(|(uid, _)| sync::bucket_of(uid, buckets) == bucket)
            .collect();
        let mut changes = Vec::new();
        for (uid, rv) in &local {
            if !hub.iter().any(|(h, _)| h == uid)
                && let Some(c) = self.delete(uid, *rv)?
            {
                changes.push(c);
            }
        }
        let want = hub
            .iter()
            .filter(|(uid, rv)| !local.iter().any(|(l, lrv)| l == uid && lrv == rv))
            .map(|(uid, _)| uid.clone())
            .collect();
        Ok((want, changes))
    }

    /// One object by kind, namespace and name.
    pub fn get(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<StoredObject>, StoreError> {
        let conn = match self.backend() {
            Locked::Sqlite(conn) => conn,
            Locked::Memory(m) => {
                let key = key_of(kind, namespace, name);
                return Ok(m.keys.get(&key).and_then(|u| m.objects.get(u)).cloned());
            }
        };
        Ok(conn
            .query_row(
                "SELECT api_version, kind, namespace, name, uid, rv, value FROM objects WHERE key = ?1",
                params![key_of(kind, namespace, name)],
                row_object,
            )
            .optional()?)
    }

    /// Every object of a kind.
    pub fn list(&self, kind: &str) -> Result<Vec<StoredObject>, StoreError> {
        let conn = match self.backend() {
            Locked::Sqlite(conn) => conn,
            Locked::Memory(m) => return Ok(m.in_key_order().filter(|o| o.kind == kind).collect()),
        };
        let mut stmt = conn.prepare_cached(
            "SELECT api_version, kind, namespace, name, uid, rv, value FROM objects
             WHERE kind = ?1 ORDER BY key",
        )?;
        let rows = stmt.query_map(params![kind], row_object)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every object held.
    pub fn list_all(&self) -> Result<Vec<StoredObject>, StoreError> {
        let conn = match self.backend() {
            Locked::Sqlite(conn) => conn,
            Locked::Memory(m) => return Ok(m.in_key_order().collect()),
        };
        let mut stmt = conn.prepare_cached(
            "SELECT api_version, kind, namespace, name, uid, rv, value FROM objects ORDER BY key",
        )?;
        let rows = stmt.query_map([], row_object)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Number of objects held.
    pub fn len(&self) -> Result<usize, StoreError> {
        let conn = match self.backend() {
            Locked::Sqlite(conn) => conn,
            Locked::Memory(m) => return Ok(m.objects.len()),
        };
        Ok(conn.query_row("SELECT COUNT(*) FROM objects", [], |r| r.get::<_, i64>(0))? as usize)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Queues an upstream write; returns its sequence number.
    pub fn push(&self, upstream: &Upstream) -> Result<u64, StoreError> {
        let message = upstream.encode_to_vec();
        if message.len() > self.max_message {
            return Err(StoreError::TooLarge {
                size: message.len(),
                limit: self.max_message,
            });
        }
        // A node's status and lease are snapshots: a newer one of the same object makes queued
        // ones pointless. So are a device's twins (each write carries every property's latest
        // value): however long the hub is away, one waits per device.
        let (target, replaces) = queue_target(upstream);
        let mut conn = match self.backend() {
            Locked::Sqlite(conn) => conn,
            Locked::Memory(mut m) => {
                if replaces {
                    m.outbox
                        .retain(|_, q| !(q.kind == upstream.kind && q.target == target));
                }
                if m.outbox.len() >= self.outbox_limit {
                    m.make_room(&self.stats, upstream)?;
                }
                m.next_seq += 1;
                let seq = m.next_seq;
                m.outbox.insert(
                    seq,
                    Queued {
                        kind: upstream.kind,
                        target,
                        message,
                    },
                );
                return Ok(seq);
            }
        };
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if replaces {
            tx.prepare_cached("DELETE FROM outbox WHERE kind = ?1 AND target = ?2")?
                .execute(params![upstream.kind, target])?;
        }
        let count = tx
            .prepare_cached("SELECT COUNT(*) FROM outbox")?
            .query_row([], |r| r.get::<_, i64>(0))? as usize;
        if count >= self.outbox_limit {
            make_room(&tx, &self.stats, upstream)?;
        }
        tx.prepare_cached("INSERT INTO outbox (kind, target, message) VALUES (?1, ?2, ?3)")?
            .execute(params![upstream.kind, target, message])?;
        let seq = tx.last_insert_rowid() as u64;
        tx.commit()?;
        Ok(seq)
    }

    /// Up to `max` queued writes after `after`, in order.
    pub fn pending(&self, after: u64, max: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let conn = match self.backend() {
            Locked::Sqlite(conn) => conn,
            Locked::Memory(m) => {
                // Each was encoded here from a valid message: it decodes.
                return Ok(m
                    .outbox
                    .range(after.saturating_add(1)..)
                    .take(max)
                    .filter_map(|(seq, q)| {
                        Some(OutboxEntry {
                            seq: *seq,
                            upstream: Upstream::decode(q.message.as_slice()).ok()?,
                        })
                    })
                    .collect());
            }
        };
        // No `LIMIT ?`: SQLite re-prepares a statement whose LIMIT is a bound parameter on
        // every new binding; the rows come in key order, so stopping after `max` is the same.
        let mut stmt =
            conn.prepare_cached("SELECT seq, message FROM outbox WHERE seq > ?1 ORDER BY seq")?;
        let rows = stmt.query_map(params![after as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows.take(max) {
            let (seq, bytes) = row?;
            match Upstream::decode(bytes.as_slice()) {
                Ok(upstream) => out.push(OutboxEntry { seq, upstream }),
                Err(e) => {
                    tracing::error!(seq, error = %e, "dropping an undecodable outbox entry");
                    conn.prepare_cached(DELETE_OUTBOX_ENTRY)?
                        .execute(params![seq as i64])?;
                }
            }
        }
        Ok(out)
    }

    /// Removes acknowledged (or rejected) writes.
    pub fn remove(&self, seqs: &[u64]) -> Result<(), StoreError> {
        let mut conn = match self.backend() {
            Locked::Sqlite(conn) => conn,
            Locked::Memory(mut m) => {
                for seq in seqs {
                    m.outbox.remove(seq);
                }
                return Ok(());
            }
        };
        if let [seq] = seqs {
            // One statement is atomic by itself.
            conn.prepare_cached(DELETE_OUTBOX_ENTRY)?
                .execute(params![*seq as i64])?;
            return Ok(());
        }
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for seq in seqs {
            tx.prepare_cached(DELETE_OUTBOX_ENTRY)?
                .execute(params![*seq as i64])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Number of queued writes.
    pub fn outbox_len(&self) -> Result<usize, StoreError> {
        let conn = match self.backend() {
            Locked::Sqlite(conn) => conn,
            Locked::Memory(m) => return Ok(m.outbox.len()),
        };
        Ok(conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))? as usize)
    }
}

/// A store's backend, locked.
enum Locked<'a> {
    Sqlite(std::sync::MutexGuard<'a, Connection>),
    Memory(std::sync::MutexGuard<'a, Memory>),
}

/// Where an upstream write is queued (its `target`), and whether it replaces what is queued
/// for the same kind and target. A node's status and lease are snapshots, keyed by the
/// node's name; so are a device's twins, keyed by the device.
fn queue_target(upstream: &Upstream) -> (String, bool) {
    let snapshot = [UpstreamKind::Node as i32, UpstreamKind::Lease as i32];
    let device_twins = upstream.kind == UpstreamKind::Status as i32
        && upstream
            .object
            .as_ref()
            .is_some_and(|o| o.kind == "Device" && o.api_version.starts_with("devices.sedna.io/"));
    if device_twins {
        (target_of(upstream), true)
    } else if snapshot.contains(&upstream.kind) {
        let name = serde_json::from_slice::<serde_json::Value>(&upstream.payload)
            .ok()
            .and_then(|v| v.pointer("/metadata/name")?.as_str().map(str::to_owned))
            .unwrap_or_default();
        (name, true)
    } else {
        (target_of(upstream), false)
    }
}

/// A queued upstream write of an in-memory store.
struct Queued {
    kind: i32,
    target: String,
    message: Vec<u8>,
}

/// An in-memory store's data: the same tables as the SQLite schema, as maps.
#[derive(Default)]
struct Memory {
    /// uid → object.
    objects: BTreeMap<String, StoredObject>,
    /// kind/namespace/name → uid.
    keys: BTreeMap<String, String>,
    /// seq → queued write.
    outbox: BTreeMap<u64, Queued>,
    /// The last sequence number given (never reused, as SQLite's AUTOINCREMENT).
    next_seq: u64,
}

impl Memory {
    fn in_key_order(&self) -> impl Iterator<Item = StoredObject> + '_ {
        self.keys
            .values()
            .filter_map(|u| self.objects.get(u))
            .cloned()
    }

    /// As [`upsert_in`].
    fn upsert(&mut self, object: &ObjectRef, rv: u64, value: &[u8]) -> Option<Change> {
        if self
            .objects
            .get(&object.uid)
            .is_some_and(|c| c.rv > rv && rv != 0)
        {
            return None;
        }
        let key = key_of(&object.kind, &object.namespace, &object.name);
        // Another object under the same name (recreated with a new uid) gives way.
        if let Some(other) = self.keys.get(&key).filter(|u| **u != object.uid).cloned() {
            self.objects.remove(&other);
        }
        match self.objects.get_mut(&object.uid) {
            Some(stored) => {
                let old = key_of(&stored.kind, &stored.namespace, &stored.name);
                if old != key && self.keys.get(&old) == Some(&object.uid) {
                    self.keys.remove(&old);
                }
                stored.rv = rv;
                stored.value = value.to_vec();
            }
            None => {
                self.objects.insert(
                    object.uid.clone(),
                    StoredObject {
                        api_version: object.api_version.clone(),
                        kind: object.kind.clone(),
                        namespace: object.namespace.clone(),
                        name: object.name.clone(),
                        uid: object.uid.clone(),
                        rv,
                        value: value.to_vec(),
                    },
                );
            }
        }
        self.keys.insert(key, object.uid.clone());
        Some(Change::Upserted(ObjectId {
            api_version: object.api_version.clone(),
            kind: object.kind.clone(),
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            uid: object.uid.clone(),
            rv,
        }))
    }

    /// As [`delete_in`].
    fn delete(&mut self, uid: &str, rv: u64) -> Option<Change> {
        let current = self.objects.get(uid)?;
        if current.rv > rv && rv != 0 {
            return None;
        }
        let o = self.objects.remove(uid)?;
        let key = key_of(&o.kind, &o.namespace, &o.name);
        if self.keys.get(&key).is_some_and(|u| u == uid) {
            self.keys.remove(&key);
        }
        Some(Change::Deleted {
            kind: o.kind,
            namespace: o.namespace,
            name: o.name,
            uid: o.uid,
        })
    }

    /// As [`make_room`].
    fn make_room(&mut self, stats: &OutboxStats, incoming: &Upstream) -> Result<(), StoreError> {
        let status = UpstreamKind::Status as i32;
        // 1. A status superseded by a newer queued status of the same object: the first
        // status (in order) whose target comes up again later.
        let mut last_of: HashMap<&str, u64> = HashMap::new();
        for (seq, q) in self.outbox.iter().filter(|(_, q)| q.kind == status) {
            last_of.insert(q.target.as_str(), *seq);
        }
        let superseded = self
            .outbox
            .iter()
            .find(|(seq, q)| q.kind == status && last_of[q.target.as_str()] > **seq)
            .map(|(seq, _)| *seq);
        // 2. A queued status of the object the incoming status is for.
        let replaced = (incoming.kind == status)
            .then(|| target_of(incoming))
            .and_then(|t| {
                self.outbox
                    .iter()
                    .find(|(_, q)| q.kind == status && q.target == t)
                    .map(|(seq, _)| *seq)
            });
        if let Some(seq) = superseded.or(replaced) {
            self.outbox.remove(&seq);
            stats.statuses_coalesced.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                seq,
                "outbox full: dropped a status superseded by a newer one"
            );
            return Ok(());
        }
        // 3. The oldest event.
        let event = UpstreamKind::Event as i32;
        if let Some(seq) = self
            .outbox
            .iter()
            .find(|(_, q)| q.kind == event)
            .map(|(seq, _)| *seq)
        {
            self.outbox.remove(&seq);
            let total = stats.events_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(seq, total, "outbox full: dropped the oldest event");
            return Ok(());
        }
        Err(StoreError::OutboxFull(self.outbox.len()))
    }
}

fn row_object(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredObject> {
    Ok(StoredObject {
        api_version: r.get(0)?,
        kind: r.get(1)?,
        namespace: r.get(2)?,
        name: r.get(3)?,
        uid: r.get(4)?,
        rv: r.get::<_, i64>(5)? as u64,
        value: r.get(6)?,
    })
}

/// Frees one outbox slot by the drop policy, or fails.
fn make_room(
    tx: &rusqlite::Transaction<'_>,
    stats: &OutboxStats,
    incoming: &Upstream,
) -> Result<(), StoreError> {
    let status = UpstreamKind::Status as i32;
    // 1. A status superseded by a newer queued status of the same object.
    let superseded: Option<i64> = tx
        .query_row(
            "SELECT o.seq FROM outbox o WHERE o.kind = ?1 AND EXISTS
               (SELECT 1 FROM outbox n WHERE n.kind = ?1 AND n.target = o.target AND n.seq > o.seq)
             ORDER BY o.seq LIMIT 1",
            params![status],
            |r| r.get(0),
        )
        .optional()?;
    // 2. A queued status of the object the incoming status is for.
    let replaced: Option<i64> = if incoming.kind == status {
        tx.query_row(
            "SELECT seq FROM outbox WHERE kind = ?1 AND target = ?2 ORDER BY seq LIMIT 1",
            params![status, target_of(incoming)],
            |r| r.get(0),
        )
        .optional()?
    } else {
        None
    };
    if let Some(seq) = superseded.or(replaced) {
        tx.execute(DELETE_OUTBOX_ENTRY, params![seq])?;
        stats.statuses_coalesced.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            seq,
            "outbox full: dropped a status superseded by a newer one"
        );
        return Ok(());
    }
    // 3. The oldest event.
    let event: Option<i64> = tx
        .query_row(
            "SELECT seq FROM outbox WHERE kind = ?1 ORDER BY seq LIMIT 1",
            params![UpstreamKind::Event as i32],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(seq) = event {
        tx.execute(DELETE_OUTBOX_ENTRY, params![seq])?;
        let total = stats.events_dropped.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(seq, total, "outbox full: dropped the oldest event");
        return Ok(());
    }
    let count = tx.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get::<_, i64>(0))? as usize;
    Err(StoreError::OutboxFull(count))
}

/// One write of [`EdgeStore::write_all`].
#[derive(Debug, Clone, Copy)]
pub enum Write<'a> {
    /// Store an object unless a newer version is stored.
    Upsert {
        /// The object.
        object: &'a ObjectRef,
        /// Its resourceVersion.
        rv: u64,
        /// The object (JSON).
        value: &'a [u8],
    },
    /// Remove an object unless a newer version is stored.
    Delete {
        /// Its uid.
        uid: &'a str,
        /// The resourceVersion of the deletion.
        rv: u64,
    },
}

fn upsert_in(
    tx: &Connection,
    object: &ObjectRef,
    rv: u64,
    value: &[u8],
) -> Result<Option<Change>, StoreError> {
    let current: Option<u64> = tx
        .prepare_cached("SELECT rv FROM objects WHERE uid = ?1")?
        .query_row(params![object.uid], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|v| v as u64);
    if current.is_some_and(|c| c > rv && rv != 0) {
        return Ok(None);
    }
    let key = key_of(&object.kind, &object.namespace, &object.name);
    // Another object under the same name (recreated with a new uid) gives way.
    tx.prepare_cached("DELETE FROM objects WHERE key = ?1 AND uid != ?2")?
        .execute(params![key, object.uid])?;
    tx.prepare_cached(
        "INSERT INTO objects (uid, key, api_version, kind, namespace, name, rv, value)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (uid) DO UPDATE SET key = excluded.key, rv = excluded.rv,
             value = excluded.value",
    )?
    .execute(params![
        object.uid,
        key,
        object.api_version,
        object.kind,
        object.namespace,
        object.name,
        rv as i64,
        value
    ])?;
    Ok(Some(Change::Upserted(ObjectId {
        api_version: object.api_version.clone(),
        kind: object.kind.clone(),
        namespace: object.namespace.clone(),
        name: object.name.clone(),
        uid: object.uid.clone(),
        rv,
    })))
}

fn delete_in(tx: &Connection, uid: &str, rv: u64) -> Result<Option<Change>, StoreError> {
    let row: Option<(String, String, String, i64)> = tx
        .prepare_cached("SELECT kind, namespace, name, rv FROM objects WHERE uid = ?1")?
        .query_row(params![uid], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let Some((kind, namespace, name, current)) = row else {
        return Ok(None);
    };
    if current as u64 > rv && rv != 0 {
        return Ok(None);
    }
    tx.prepare_cached("DELETE FROM objects WHERE uid = ?1")?
        .execute(params![uid])?;
    Ok(Some(Change::Deleted {
        kind,
        namespace,
        name,
        uid: uid.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oref(kind: &str, name: &str, uid: &str) -> ObjectRef {
        ObjectRef {
            api_version: "v1".into(),
            kind: kind.into(),
            namespace: "default".into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    fn status(name: &str, phase: &str) -> Upstream {
        Upstream {
            kind: UpstreamKind::Status as i32,
            object: Some(oref("Pod", name, "")),
            payload: format!(r#"{{"status":{{"phase":"{phase}"}}}}"#).into_bytes(),
        }
    }

    fn event(n: u32) -> Upstream {
        Upstream {
            kind: UpstreamKind::Event as i32,
            object: None,
            payload: format!("event {n}").into_bytes(),
        }
    }

    #[test]
    fn the_store_and_its_directory_are_readable_by_the_agent_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        let store = EdgeStore::open(&data.join("edge.db"), 4, 1024).unwrap();
        store.push(&event(1)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        for file in ["edge.db", "edge.db-wal", "edge.db-shm"] {
            assert_eq!(mode(&data.join(file)), 0o600, "{file}");
        }
    }

    /// Runs `check` on a durable store and on an in-memory one (outbox of 4, messages of at
    /// most 1 KiB): both follow the same rules.
    fn each_store(check: impl Fn(&EdgeStore)) {
        let dir = tempfile::tempdir().unwrap();
        let durable = EdgeStore::open(&dir.path().join("edge.db"), 4, 1024).unwrap();
        check(&durable);
        check(&EdgeStore::in_memory(4, 1024));
    }

    /// A statement's run and re-prepare counts, through the connection's statement cache.
    fn runs(store: &EdgeStore, sql: &str) -> (i32, i32) {
        let conn = store.conn();
        let stmt = conn.prepare_cached(sql).unwrap();
        (
            stmt.get_status(rusqlite::StatementStatus::Run),
            stmt.get_status(rusqlite::StatementStatus::RePrepare),
        )
    }

    #[test]
    fn an_in_memory_store_uses_small_pages_and_keeps_objects_larger_than_one() {
        let s = EdgeStore::open(Path::new(":memory:"), 4, 1 << 20).unwrap();
        let page: i64 = s
            .conn()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(page, 1024);
        let object = ObjectRef {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: "default".into(),
            name: "big".into(),
            uid: "u-big".into(),
        };
        let value = vec![b'x'; 20_000];
        s.upsert(&object, 3, &value).unwrap();
        let stored = s.get("ConfigMap", "default", "big").unwrap().unwrap();
        assert_eq!((stored.rv, stored.value.len()), (3, 20_000));
    }

    #[test]
    fn the_outbox_paths_prepare_their_statements_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = EdgeStore::open(&dir.path().join("edge.db"), 1000, 1024).unwrap();
        for n in 0..20u32 {
            let seq = s.push(&event(n)).unwrap();
            // A new `after` and a new `max` each time: neither may cost a new plan.
            let got = s.pending(seq - 1, 1 + n as usize).unwrap();
            assert_eq!(got.len(), 1);
            s.remove(&[seq]).unwrap();
        }
        let insert = runs(
            &s,
            "INSERT INTO outbox (kind, target, message) VALUES (?1, ?2, ?3)",
        );
        assert_eq!(insert, (20, 0), "push: (runs, re-prepares)");
        let read = runs(
            &s,
            "SELECT seq, message FROM outbox WHERE seq > ?1 ORDER BY seq",
        );
        assert_eq!(read, (20, 0), "pending: (runs, re-prepares)");
        // `max` still bounds what one read returns.
        for n in 0..5 {
            s.push(&event(n)).unwrap();
        }
        assert_eq!(s.pending(0, 3).unwrap().len(), 3);
    }

    #[test]
    fn upserts_keep_the_newest_version_and_deletes_respect_it() {
        each_store(|s| {
            let r = oref("ConfigMap", "c", "u1");
            assert!(s.upsert(&r, 5, b"v5").unwrap().is_some());
            assert!(
                s.upsert(&r, 3, b"v3").unwrap().is_none(),
                "an older version is ignored"
            );
            assert_eq!(
                s.get("ConfigMap", "default", "c").unwrap().unwrap().value,
                b"v5"
            );
            assert!(
                s.delete("u1", 4).unwrap().is_none(),
                "an older delete is ignored"
            );
            assert!(s.delete("u1", 6).unwrap().is_some());
            assert!(s.is_empty().unwrap());
        });
    }

    #[test]
    fn a_batch_is_applied_in_order_and_skips_what_is_older_than_stored() {
        each_store(|s| {
            let a = oref("ConfigMap", "a", "ua");
            let b = oref("ConfigMap", "b", "ub");
            s.upsert(&a, 5, b"a5").unwrap();
            let changes = s
                .write_all(&[
                    Write::Upsert {
                        object: &b,
                        rv: 1,
                        value: b"b1",
                    },
                    Write::Upsert {
                        object: &a,
                        rv: 3,
                        value: b"a3",
                    },
                    Write::Upsert {
                        object: &b,
                        rv: 2,
                        value: b"b2",
                    },
                    Write::Delete { uid: "ua", rv: 6 },
                ])
                .unwrap();
            let kinds: Vec<&str> = changes
                .iter()
                .map(|c| match c {
                    Change::Upserted(o) if o.rv == 1 => "b1",
                    Change::Upserted(o) if o.rv == 2 => "b2",
                    Change::Upserted(_) => "other",
                    Change::Deleted { uid, .. } if uid == "ua" => "-a",
                    Change::Deleted { .. } => "-other",
                })
                .collect();
            assert_eq!(kinds, ["b1", "b2", "-a"], "a3 is older than a5: no change");
            assert_eq!(s.inventory().unwrap(), [("ub".to_owned(), 2)]);
            assert!(s.write_all(&[]).unwrap().is_empty());
        });
    }

    #[test]
    fn sequence_numbers_keep_growing_after_the_outbox_empties() {
        each_store(|s| {
            let first = s.push(&event(1)).unwrap();
            s.remove(&[first]).unwrap();
            let second = s.push(&event(2)).unwrap();
            assert!(second > first, "{second} after {first}");
            assert_eq!(s.pending(first, 10).unwrap().len(), 1);
            assert_eq!(s.outbox_len().unwrap(), 1);
        });
    }

    #[test]
    fn a_recreated_object_replaces_the_old_uid() {
        each_store(|s| {
            s.upsert(&oref("ConfigMap", "c", "u1"), 1, b"old").unwrap();
            s.upsert(&oref("ConfigMap", "c", "u2"), 2, b"new").unwrap();
            assert_eq!(s.inventory().unwrap(), [("u2".to_owned(), 2)]);
        });
    }

    #[test]
    fn reconciling_a_bucket_deletes_extras_and_wants_missing_or_stale() {
        each_store(|s| {
            let buckets = 16;
            // Find three uids in the same bucket.
            let uids: Vec<String> = (0..1000)
                .map(|i| format!("uid-{i}"))
                .filter(|u| sync::bucket_of(u, buckets) == 3)
                .take(3)
                .collect();
            s.upsert(&oref("ConfigMap", "a", &uids[0]), 1, b"a")
                .unwrap();
            s.upsert(&oref("ConfigMap", "b", &uids[1]), 1, b"b")
                .unwrap();
            let hub = vec![(uids[1].clone(), 2), (uids[2].clone(), 1)];
            let (want, changes) = s.reconcile_bucket(buckets, 3, &hub).unwrap();
            assert_eq!(want, [uids[1].clone(), uids[2].clone()]);
            assert_eq!(changes.len(), 1, "a is no longer the node's");
            assert!(s.get("ConfigMap", "default", "a").unwrap().is_none());
        });
    }

    #[test]
    fn the_outbox_is_ordered_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge.db");
        {
            let s = EdgeStore::open(&path, 100, 1024).unwrap();
            s.push(&status("p", "Pending")).unwrap();
            s.push(&status("p", "Running")).unwrap();
            s.push(&event(1)).unwrap();
        }
        let s = EdgeStore::open(&path, 100, 1024).unwrap();
        let pending = s.pending(0, 10).unwrap();
        assert_eq!(pending.len(), 3);
        assert!(pending.windows(2).all(|w| w[0].seq < w[1].seq));
        s.remove(&[pending[0].seq]).unwrap();
        assert_eq!(s.pending(0, 10).unwrap().len(), 2);
        assert_eq!(s.pending(pending[1].seq, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_full_outbox_coalesces_statuses_then_drops_old_events_then_refuses() {
        each_store(|s| {
            s.push(&status("p", "Pending")).unwrap();
            s.push(&event(1)).unwrap();
            s.push(&status("p", "Running")).unwrap();
            s.push(&event(2)).unwrap();
            // Full (4): the superseded Pending status goes first.
            s.push(&event(3)).unwrap();
            assert_eq!(
                s.outbox_stats().statuses_coalesced.load(Ordering::Relaxed),
                1
            );
            // Then the oldest event.
            s.push(&event(4)).unwrap();
            assert_eq!(s.outbox_stats().events_dropped.load(Ordering::Relaxed), 1);
            let payloads: Vec<Vec<u8>> = s
                .pending(0, 10)
                .unwrap()
                .into_iter()
                .map(|e| e.upstream.payload)
                .collect();
            assert!(
                payloads.contains(&b"event 2".to_vec()) && !payloads.contains(&b"event 1".to_vec())
            );
            // Only one status left and no events to drop: a new status replaces it; a node
            // write is refused.
            s.remove(
                &s.pending(0, 10)
                    .unwrap()
                    .iter()
                    .filter(|e| e.upstream.kind == UpstreamKind::Event as i32)
                    .map(|e| e.seq)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            for i in 0..3 {
                s.push(&status(&format!("q{i}"), "Running")).unwrap();
            }
            let node = Upstream {
                kind: UpstreamKind::Node as i32,
                object: None,
                payload: vec![],
            };
            assert!(matches!(s.push(&node), Err(StoreError::OutboxFull(4))));
        });
    }

    #[test]
    fn node_status_and_lease_snapshots_replace_queued_ones() {
        each_store(|s| {
            let lease = |name: &str, n: u8| Upstream {
                kind: UpstreamKind::Lease as i32,
                object: None,
                payload: format!(r#"{{"metadata":{{"name":"{name}"}},"n":{n}}}"#).into_bytes(),
            };
            s.push(&status("p", "Running")).unwrap();
            s.push(&lease("edge-1", 1)).unwrap();
            s.push(&lease("edge-1", 2)).unwrap();
            s.push(&lease("other", 9)).unwrap();
            s.push(&lease("edge-1", 3)).unwrap();
            let pending = s.pending(0, 10).unwrap();
            assert_eq!(
                pending.len(),
                3,
                "one per object: the status and two leases"
            );
            assert_eq!(pending[1].upstream.payload, lease("other", 9).payload);
            assert_eq!(pending[2].upstream.payload, lease("edge-1", 3).payload);
        });
    }

    #[test]
    fn a_devices_twin_snapshot_replaces_its_queued_one_and_pod_statuses_pile_up() {
        each_store(|s| {
            let twins = |device: &str, n: u8| Upstream {
                kind: UpstreamKind::Status as i32,
                object: Some(ObjectRef {
                    api_version: "devices.sedna.io/v1beta1".into(),
                    kind: "Device".into(),
                    namespace: "default".into(),
                    name: device.into(),
                    uid: format!("u-{device}"),
                }),
                payload: format!(r#"{{"status":{{"n":{n}}}}}"#).into_bytes(),
            };
            for n in 0..50 {
                s.push(&twins("sensor", n)).unwrap();
                s.push(&twins("other", n)).unwrap();
            }
            s.push(&status("p", "Pending")).unwrap();
            s.push(&status("p", "Running")).unwrap();
            let pending = s.pending(0, 100).unwrap();
            assert_eq!(
                pending.len(),
                4,
                "one snapshot per device, every pod status"
            );
            assert_eq!(pending[0].upstream.payload, twins("sensor", 49).payload);
            assert_eq!(pending[1].upstream.payload, twins("other", 49).payload);
        });
    }

    #[test]
    fn an_oversized_upstream_message_is_refused() {
        each_store(|s| {
            let big = Upstream {
                kind: 4,
                object: None,
                payload: vec![0; 2048],
            };
            assert!(matches!(
                s.push(&big),
                Err(StoreError::TooLarge { limit: 1024, .. })
            ));
        });
    }
}
