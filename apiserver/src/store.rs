//! The revision log: every create, update and delete appends one row to a SQLite table whose
//! row id is the new `resourceVersion` (kine's model).
//!
//! - A single writer thread commits writes in groups: each group is one transaction and one
//!   `fsync`, and no write is acknowledged before its group is durable.
//! - Compare-and-swap loses a race in the database: a row names the revision it replaces
//!   (`prev_revision`) and `UNIQUE(name, prev_revision)` refuses a second row replacing the same
//!   one.
//! - After each commit the latest object per key and a window of recent events are updated in
//!   memory, so reads and watches rarely touch the database; a watch from an older retained
//!   revision catches up from the log.
//! - Compaction removes superseded rows and tombstones older than a window of revisions and
//!   time; a read or watch at a compacted revision is answered with [`StoreError::Compacted`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::{oneshot, watch};

/// How many recent events are kept in memory for watchers.
const EVENT_WINDOW: usize = 16_384;
/// The most writes committed in one transaction.
const MAX_GROUP: usize = 512;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Create of a key that exists.
    #[error("already exists")]
    AlreadyExists,
    /// Update or delete of a key that does not exist.
    #[error("not found")]
    NotFound,
    /// The object changed since the revision the write was based on.
    #[error(
        "the object has been modified; please apply your changes to the latest version and try again"
    )]
    Conflict,
    /// The requested revision has been compacted away.
    #[error(
        "the requested revision {requested} has been compacted (oldest available: {compacted})"
    )]
    Compacted {
        /// The revision asked for.
        requested: u64,
        /// The compaction point: revisions at or below it are gone.
        compacted: u64,
    },
    /// The database failed.
    #[error("storage error: {0}")]
    Database(String),
    /// A stored value could not be decoded.
    #[error("corrupt stored value at revision {rev}: {source}")]
    Corrupt {
        /// The row.
        rev: u64,
        /// The decoder's error.
        source: serde_json::Error,
    },
    /// Another process holds the store.
    #[error("{0} is in use by another process")]
    Locked(String),
    /// I/O outside the database (the lock file).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The store is shutting down.
    #[error("the store is closed")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

impl StoreError {
    /// Whether the same request may succeed later (conflicts succeed after a re-read).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict | StoreError::Database(_) | StoreError::Closed
        )
    }
}

/// How writes reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `fsync` at every group commit: an acknowledged write survives power loss.
    Full,
    /// WAL without `fsync` per commit: an acknowledged write survives a crash of the process
    /// (kill -9) but not of the machine.
    Process,
}

/// Store settings.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Compaction keeps at least this many revisions.
    pub keep_revisions: u64,
    /// Compaction keeps at least this much time.
    pub keep_duration: Duration,
    /// How writes reach the disk.
    pub durability: Durability,
    /// SQLite page cache per connection, in KiB (objects are served from memory; the cache
    /// only speeds up writes and reads of the log).
    pub cache_kib: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            keep_revisions: 1000,
            keep_duration: Duration::from_secs(300),
            durability: Durability::Full,
            cache_kib: 2000,
        }
    }
}

/// The latest version of an object.
#[derive(Debug)]
pub struct Stored {
    /// Its resourceVersion.
    pub rev: u64,
    /// The object, with `metadata.resourceVersion` set.
    pub value: Arc<Value>,
}

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Created.
    Added,
    /// Updated.
    Modified,
    /// Deleted.
    Deleted,
}

/// One committed change.
#[derive(Debug)]
pub struct Event {
    /// Revision of the change.
    pub rev: u64,
    /// The object's key.
    pub key: String,
    /// What happened.
    pub kind: EventKind,
    /// The object after the change (for a deletion: as it was deleted, at `rev`).
    pub object: Arc<Value>,
    /// The object before the change, when known (absent for creations and for changes read
    /// back from a compacted log).
    pub prev: Option<Arc<Value>>,
    /// `object` as JSON, made by the first watcher that sends it and shared by the others
    /// (every hub watches every change: encoding once per event, not once per watcher).
    pub(crate) json: OnceLock<Bytes>,
}

/// A condition a write must meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// The key must not exist (create).
    Absent,
    /// The key must exist (any revision).
    Exists,
    /// The key must exist at exactly this revision.
    Revision(u64),
    /// No condition (a cache mirroring another store).
    Any,
}

/// A write.
#[derive(Debug)]
pub enum Mutation {
    /// Store this object (without `resourceVersion`; the store sets it).
    Put(Value),
    /// Delete the key.
    Delete,
}

struct WriteRequest {
    key: String,
    precondition: Precondition,
    mutation: Mutation,
    reply: oneshot::Sender<Result<Arc<Stored>, StoreError>>,
}

enum Request {
    Write(WriteRequest),
    Compact {
        at: u64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

struct State {
    objects: BTreeMap<String, Arc<Stored>>,
    events: VecDeque<Arc<Event>>,
    head: u64,
    compacted: u64,
    /// owner uid → keys of objects that list it in `ownerReferences`.
    dependents: HashMap<String, HashSet<String>>,
}

struct Inner {
    path: PathBuf,
    state: RwLock<State>,
    head: watch::Sender<u64>,
    writer: Mutex<Option<mpsc::Sender<Request>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    options: StoreOptions,
    _lock: std::fs::File,
}

/// The revision log and its in-memory view. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    created INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    prev_revision INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS log_name_prev ON log (name, prev_revision);
CREATE INDEX IF NOT EXISTS log_name_id ON log (name, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
";

fn open_connection(path: &Path, options: &StoreOptions) -> Result<Connection, StoreError> {
    let durability = options.durability;
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Process => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "cache_size", -i64::from(options.cache_kib.max(64)))?;
    Ok(conn)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Sets `metadata.resourceVersion` on a stored value.
fn with_rev(mut value: Value, rev: u64) -> Value {
    if let Some(obj) = value.as_object_mut() {
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Some(meta) = meta.as_object_mut() {
            meta.insert("resourceVersion".into(), Value::String(rev.to_string()));
        }
    }
    value
}

fn owner_uids(value: &Value) -> Vec<String> {
    value
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

impl State {
    fn index_owners(&mut self, key: &str, old: Option<&Value>, new: Option<&Value>) {
        for uid in old.map(owner_uids).unwrap_or_default() {
            if let Some(set) = self.dependents.get_mut(&uid) {
                set.remove(key);
                if set.is_empty() {
                    self.dependents.remove(&uid);
                }
            }
        }
        for uid in new.map(owner_uids).unwrap_or_default() {
            self.dependents
                .entry(uid)
                .or_default()
                .insert(key.to_owned());
        }
    }
}

impl Store {
    /// Opens (or creates) the store at `path`. Fails if another process has it open.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StoreError::Io {
                path: lock_path.display().to_string(),
                source,
            })?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Locked(path.display().to_string()));
        }
        let conn = open_connection(path, &options)?;
        conn.execute_batch(SCHEMA)?;
        let compacted: u64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'compacted'", [], |r| {
                r.get::<_, i64>(0)
            })
            .optional()?
            .unwrap_or(0) as u64;
        let head: u64 = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'log'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .unwrap_or(0) as u64;
        let mut state = State {
            objects: BTreeMap::new(),
            events: VecDeque::new(),
            head,
            compacted,
            dependents: HashMap::new(),
        };
        {
            let mut stmt = conn.prepare(
                "SELECT l.id, l.name, l.value FROM log l
                 JOIN (SELECT MAX(id) AS id FROM log GROUP BY name) m ON l.id = m.id
                 WHERE l.deleted = 0",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let rev = row.get::<_, i64>(0)? as u64;
                let key: String = row.get(1)?;
                let bytes: Vec<u8> = row.get(2)?;
                let value: Value = serde_json::from_slice(&bytes)
                    .map_err(|source| StoreError::Corrupt { rev, source })?;
                let value = Arc::new(with_rev(value, rev));
                state.index_owners(&key, None, Some(&value));
                state.objects.insert(key, Arc::new(Stored { rev, value }));
            }
        }
        let (head_tx, _) = watch::channel(head);
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            path: path.to_owned(),
            state: RwLock::new(state),
            head: head_tx,
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(None),
            readers: Mutex::new(Vec::new()),
            options,
            _lock: lock,
        });
        let weak = Arc::downgrade(&inner);
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(conn, rx, weak))
            .map_err(|source| StoreError::Io {
                path: "store-writer thread".into(),
                source,
            })?;
        *lock_or_recover(&inner.writer_thread) = Some(thread);
        Ok(Store { inner })
    }

    /// The newest committed revision.
    pub fn head(&self) -> u64 {
        self.read_state().head
    }

    /// Revisions at or below this are compacted.
    pub fn compacted(&self) -> u64 {
        self.read_state().compacted
    }

    /// A receiver that changes whenever a new revision is committed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.head.subscribe()
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The latest version of `key`.
    pub fn get(&self, key: &str) -> Option<Arc<Stored>> {
        self.read_state().objects.get(key).cloned()
    }

    /// Every object whose key starts with `prefix`, in key order, and the revision they are
    /// consistent at.
    pub fn list(&self, prefix: &str) -> (Vec<Arc<Stored>>, u64) {
        let state = self.read_state();
        let items = state
            .objects
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        (items, state.head)
    }

    /// Keys of the objects that name `uid` as an owner.
    pub fn dependents(&self, uid: &str) -> Vec<String> {
        let state = self.read_state();
        let mut keys: Vec<String> = state
            .dependents
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// Every object whose key starts with `prefix` as it was at revision `rev`.
    pub fn list_at(&self, prefix: &str, rev: u64) -> Result<Vec<Arc<Stored>>, StoreError> {
        let compacted = self.compacted();
        if rev < compacted {
            return Err(StoreError::Compacted {
                requested: rev,
                compacted,
            });
        }
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT l.id, l.deleted, l.value FROM log l
                 JOIN (SELECT MAX(id) AS id FROM log
                       WHERE id <= ?1 AND name >= ?2 AND name < ?3 GROUP BY name) m
                 ON l.id = m.id ORDER BY l.name",
            )?;
            let mut rows = stmt.query(params![rev as i64, prefix, prefix_end(prefix)])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let id = row.get::<_, i64>(0)? as u64;
                if row.get::<_, i64>(1)? != 0 {
                    continue;
                }
                let bytes: Vec<u8> = row.get(2)?;
                let value: Value = serde_json::from_slice(&bytes)
                    .map_err(|source| StoreError::Corrupt { rev: id, source })?;
                out.push(Arc::new(Stored {
                    rev: id,
                    value: Arc::new(with_rev(value, id)),
                }));
            }
            Ok(out)
        })
    }

    /// The events after revision `after` whose key starts with `prefix`, oldest first, at most
    /// `limit`. Fails with [`StoreError::Compacted`] when events after `after` were compacted.
    pub fn events_since(
        &self,
        after: u64,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Arc<Event>>, StoreError> {
        {
            let state = self.read_state();
            if after < state.compacted {
                return Err(StoreError::Compacted {
                    requested: after,
                    compacted: state.compacted,
                });
            }
            if after >= state.head {
                return Ok(Vec::new());
            }
            let window_start = state.events.front().map(|e| e.rev);
            if let Some(start) = window_start
                && after + 1 >= start
            {
                let skip = state.events.partition_point(|e| e.rev <= after);
                return Ok(state
                    .events
                    .iter()
                    .skip(skip)
                    .filter(|e| e.key.starts_with(prefix))
                    .take(limit)
                    .cloned()
                    .collect());
            }
        }
        self.events_from_log(after, prefix, limit)
    }

    fn events_from_log(
        &self,
        after: u64,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<Arc<Event>>, StoreError> {
        self.with_reader(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, name, created, deleted, prev_revision, value FROM log
                 WHERE id > ?1 AND name >= ?2 AND name < ?3 ORDER BY id LIMIT ?4",
            )?;
            let mut prev_stmt = conn.prepare_cached("SELECT value FROM log WHERE id = ?1")?;
            let mut rows = stmt.query(params![
                after as i64,
                prefix,
                prefix_end(prefix),
                limit as i64
            ])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let rev = row.get::<_, i64>(0)? as u64;
                let key: String = row.get(1)?;
                let created = row.get::<_, i64>(2)? != 0;
                let deleted = row.get::<_, i64>(3)? != 0;
                let prev_rev = row.get::<_, i64>(4)?;
                let bytes: Vec<u8> = row.get(5)?;
                let value: Value = serde_json::from_slice(&bytes)
                    .map_err(|source| StoreError::Corrupt { rev, source })?;
                let prev = if created {
                    None
                } else {
                    prev_stmt
                        .query_row(params![prev_rev], |r| r.get::<_, Vec<u8>>(0))
                        .optional()?
                        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                        .map(|v| Arc::new(with_rev(v, prev_rev as u64)))
                };
                let kind = if deleted {
                    EventKind::Deleted
                } else if created {
                    EventKind::Added
                } else {
                    EventKind::Modified
                };
                out.push(Arc::new(Event {
                    rev,
                    key,
                    kind,
                    object: Arc::new(with_rev(value, rev)),
                    prev,
                    json: OnceLock::new(),
                }));
            }
            Ok(out)
        })
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = lock_or_recover(&self.inner.readers).pop();
        let conn = match conn {
            Some(c) => c,
            None => open_connection(&self.inner.path, &self.inner.options)?,
        };
        let result = f(&conn);
        lock_or_recover(&self.inner.readers).push(conn);
        result
    }

    /// Applies one write and waits until it is durable. Returns the stored object.
    pub async fn write(
        &self,
        key: String,
        precondition: Precondition,
        mutation: Mutation,
    ) -> Result<Arc<Stored>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Write(WriteRequest {
            key,
            precondition,
            mutation,
            reply,
        }))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn send(&self, request: Request) -> Result<(), StoreError> {
        let writer = lock_or_recover(&self.inner.writer);
        let sender = writer.as_ref().ok_or(StoreError::Closed)?;
        sender.send(request).map_err(|_| StoreError::Closed)
    }

    /// Compacts the log if the retention window allows; returns the compaction point.
    pub async fn compact(&self) -> Result<u64, StoreError> {
        let head = self.head();
        let keep = self.inner.options.keep_revisions;
        if head <= keep {
            return Ok(self.compacted());
        }
        let cutoff_ms = now_ms() - self.inner.options.keep_duration.as_millis() as i64;
        let at = self.with_reader(|conn| {
            Ok(conn
                .query_row(
                    "SELECT MAX(id) FROM log WHERE id <= ?1 AND ts <= ?2",
                    params![(head - keep) as i64, cutoff_ms],
                    |r| r.get::<_, Option<i64>>(0),
                )?
                .unwrap_or(0) as u64)
        })?;
        if at <= self.compacted() {
            return Ok(self.compacted());
        }
        self.compact_at(at).await
    }

    /// Compacts every revision at or below `at`, whatever the retention window.
    pub async fn compact_at(&self, at: u64) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Compact { at, reply })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stops the writer after the writes already queued; later writes fail with `Closed`.
    pub fn close(&self) {
        lock_or_recover(&self.inner.writer).take();
        if let Some(thread) = lock_or_recover(&self.inner.writer_thread).take() {
            let _ = thread.join();
        }
    }
}

fn lock_or_recover<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The smallest string greater than every string starting with `prefix`.
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_owned();
    end.push(char::MAX);
    end
}

struct Pending {
    key: String,
    result: Result<Arc<Stored>, StoreError>,
    event: Option<Arc<Event>>,
    reply: oneshot::Sender<Result<Arc<Stored>, StoreError>>,
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Request>, inner: std::sync::Weak<Inner>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let mut writes = Vec::new();
        for request in batch {
            match request {
                Request::Write(w) => writes.push(w),
                Request::Compact { at, reply } => {
                    if !writes.is_empty() {
                        commit_group(&mut conn, &inner, std::mem::take(&mut writes));
                    }
                    let _ = reply.send(compact_log(&mut conn, &inner, at));
                }
            }
        }
        if !writes.is_empty() {
            commit_group(&mut conn, &inner, writes);
        }
    }
}

/// Commits a group of writes in one transaction and publishes them.
fn commit_group(conn: &mut Connection, inner: &Inner, writes: Vec<WriteRequest>) {
    let ts = now_ms();
    // The latest version of each key as seen by this group: earlier writes of the group
    // shadow the committed state.
    let mut overlay: HashMap<String, Option<Arc<Stored>>> = HashMap::new();
    let mut pending = Vec::with_capacity(writes.len());
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let message = e.to_string();
            for w in writes {
                let _ = w.reply.send(Err(StoreError::Database(message.clone())));
            }
            return;
        }
    };
    {
        let state = inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for w in writes {
            let current = match overlay.get(&w.key) {
                Some(c) => c.clone(),
                None => state.objects.get(&w.key).cloned(),
            };
            let WriteRequest {
                key,
                precondition,
                mutation,
                reply,
            } = w;
            let result = apply_one(&tx, &key, precondition, mutation, current.as_ref(), ts);
            let (result, event) = match result {
                Ok((stored, event)) => {
                    let after = match event.kind {
                        EventKind::Deleted => None,
                        _ => Some(stored.clone()),
                    };
                    overlay.insert(key.clone(), after);
                    (Ok(stored), Some(event))
                }
                Err(e) => (Err(e), None),
            };
            pending.push(Pending {
                key,
                result,
                event,
                reply,
            });
        }
    }
    if let Err(e) = tx.commit() {
        let message = e.to_string();
        for p in pending {
            let _ = p.reply.send(Err(StoreError::Database(format!(
                "commit failed: {message}"
            ))));
        }
        return;
    }
    let mut head = None;
    {
        let mut state = inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in &pending {
            let Some(event) = &p.event else { continue };
            let old = state.objects.get(&p.key).map(|s| s.value.clone());
            match event.kind {
                EventKind::Deleted => {
                    state.objects.remove(&p.key);
                    state.index_owners(&p.key, old.as_deref(), None);
                }
                _ => {
                    if let Ok(stored) = &p.result {
                        state.objects.insert(p.key.clone(), stored.clone());
                        state.index_owners(&p.key, old.as_deref(), Some(&stored.value));
                    }
                }
            }
            state.head = event.rev;
            head = Some(event.rev);
            state.events.push_back(event.clone());
            if state.events.len() > EVENT_WINDOW {
                state.events.pop_front();
            }
        }
    }
    if let Some(head) = head {
        inner.head.send_replace(head);
    }
    for p in pending {
        let _ = p.reply.send(p.result);
    }
}

/// Writes one change in the group's transaction. The mutation is taken: the stored object is
/// the written one, not a copy (a write whose transaction fails is answered with the failure,
/// never retried).
fn apply_one(
    tx: &rusqlite::Transaction<'_>,
    key: &str,
    precondition: Precondition,
    mutation: Mutation,
    current: Option<&Arc<Stored>>,
    ts: i64,
) -> Result<(Arc<Stored>, Arc<Event>), StoreError> {
    match (precondition, current) {
        (Precondition::Absent, Some(_)) => return Err(StoreError::AlreadyExists),
        (Precondition::Exists | Precondition::Revision(_), None) => {
            return Err(StoreError::NotFound);
        }
        (Precondition::Revision(r), Some(c)) if c.rev != r => return Err(StoreError::Conflict),
        _ => {}
    }
    if matches!(mutation, Mutation::Delete) && current.is_none() {
        return Err(StoreError::NotFound);
    }
    // A create after a delete replaces the tombstone: each row names the row it follows, so
    // the unique index refuses a second writer racing for the same predecessor.
    let prev_rev = match current {
        Some(c) => c.rev,
        None => tx
            .prepare_cached("SELECT MAX(id) FROM log WHERE name = ?1")?
            .query_row(params![key], |r| r.get::<_, Option<i64>>(0))?
            .unwrap_or(0) as u64,
    };
    let (deleted, created, bytes) = match &mutation {
        Mutation::Put(value) => (
            false,
            current.is_none(),
            serde_json::to_vec(value).map_err(|source| StoreError::Corrupt { rev: 0, source })?,
        ),
        Mutation::Delete => {
            let value = current
                .map(|c| c.value.as_ref().clone())
                .unwrap_or_default();
            (
                true,
                false,
                serde_json::to_vec(&value)
                    .map_err(|source| StoreError::Corrupt { rev: 0, source })?,
            )
        }
    };
    let inserted = tx
        .prepare_cached(
            "INSERT INTO log (name, created, deleted, prev_revision, ts, value)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            key,
            created as i64,
            deleted as i64,
            prev_rev as i64,
            ts,
            bytes
        ]);
    match inserted {
        Ok(_) => {}
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            return Err(StoreError::Conflict);
        }
        Err(e) => return Err(e.into()),
    }
    let rev = tx.last_insert_rowid() as u64;
    let value = match mutation {
        Mutation::Put(v) => Arc::new(with_rev(v, rev)),
        Mutation::Delete => Arc::new(with_rev(
            current
                .map(|c| c.value.as_ref().clone())
                .unwrap_or_default(),
            rev,
        )),
    };
    let kind = if deleted {
        EventKind::Deleted
    } else if created {
        EventKind::Added
    } else {
        EventKind::Modified
    };
    let stored = Arc::new(Stored {
        rev,
        value: value.clone(),
    });
    let event = Arc::new(Event {
        rev,
        key: key.to_owned(),
        kind,
        object: value,
        prev: current.map(|c| c.value.clone()),
        json: OnceLock::new(),
    });
    Ok((stored, event))
}

fn compact_log(conn: &mut Connection, inner: &Inner, at: u64) -> Result<u64, StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // Rows superseded by a newer row at or below the compaction point.
    tx.execute(
        "DELETE FROM log WHERE id <= ?1 AND id NOT IN
           (SELECT MAX(id) FROM log WHERE id <= ?1 GROUP BY name)",
        params![at as i64],
    )?;
    // Tombstones at or below it: nothing can read them any more.
    tx.execute(
        "DELETE FROM log WHERE id <= ?1 AND deleted = 1",
        params![at as i64],
    )?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('compacted', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![at as i64],
    )?;
    tx.commit()?;
    let mut state = inner
        .state
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    state.compacted = state.compacted.max(at);
    let compacted = state.compacted;
    while state.events.front().is_some_and(|e| e.rev <= compacted) {
        state.events.pop_front();
    }
    Ok(compacted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn open(dir: &Path) -> Store {
        Store::open(&dir.join("state.db"), StoreOptions::default()).unwrap()
    }

    fn obj(name: &str, v: i64) -> Value {
        json!({ "metadata": { "name": name }, "spec": { "v": v } })
    }

    #[tokio::test]
    async fn revisions_increase_and_are_set_on_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = store
            .write(
                "k/a".into(),
                Precondition::Absent,
                Mutation::Put(obj("a", 1)),
            )
            .await
            .unwrap();
        let b = store
            .write(
                "k/b".into(),
                Precondition::Absent,
                Mutation::Put(obj("b", 1)),
            )
            .await
            .unwrap();
        assert!(b.rev > a.rev);
        assert_eq!(b.value["metadata"]["resourceVersion"], b.rev.to_string());
        assert_eq!(store.head(), b.rev);
        assert_eq!(store.get("k/a").unwrap().rev, a.rev);
    }

    #[tokio::test]
    async fn a_stale_revision_conflicts_and_create_of_an_existing_key_fails() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a = store
            .write(
                "k/a".into(),
                Precondition::Absent,
                Mutation::Put(obj("a", 1)),
            )
            .await
            .unwrap();
        store
            .write(
                "k/a".into(),
                Precondition::Revision(a.rev),
                Mutation::Put(obj("a", 2)),
            )
            .await
            .unwrap();
        let stale = store
            .write(
                "k/a".into(),
                Precondition::Revision(a.rev),
                Mutation::Put(obj("a", 3)),
            )
            .await;
        assert!(matches!(stale, Err(StoreError::Conflict)));
        let again = store
            .write(
                "k/a".into(),
                Precondition::Absent,
                Mutation::Put(obj("a", 1)),
            )
            .await;
        assert!(matches!(again, Err(StoreError::AlreadyExists)));
        assert_eq!(store.get("k/a").unwrap().value["spec"]["v"], 2);
    }

    #[tokio::test]
    async fn concurrent_compare_and_swap_lets_exactly_one_writer_win() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let rev = store
            .write(
                "k/a".into(),
                Precondition::Absent,
                Mutation::Put(obj("a", 0)),
            )
            .await
            .unwrap()
            .rev;
        let tasks: Vec<_> = (1..=20)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .write(
                            "k/a".into(),
                            Precondition::Revision(rev),
                            Mutation::Put(obj("a", i)),
                        )
                        .await
                })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => wins += 1,
                Err(StoreError::Conflict) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(wins, 1);
    }

    #[test]
    fn the_database_refuses_two_rows_replacing_the_same_revision() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_connection(&dir.path().join("x.db"), &StoreOptions::default()).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let insert = "INSERT INTO log (name, created, deleted, prev_revision, ts, value)
                      VALUES ('k', 0, 0, 7, 0, x'7b7d')";
        conn.execute(insert, []).unwrap();
        assert!(conn.execute(insert, []).is_err());
    }

    #[tokio::test]
    async fn deletes_leave_a_tombstone_event_and_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .write(
                "k/a".into(),
                Precondition::Absent,
                Mutation::Put(obj("a", 1)),
            )
            .await
            .unwrap();
        store
            .write(
                "k/b".into(),
                Precondition::Absent,
                Mutation::Put(obj("b", 1)),
            )
            .await
            .unwrap();
        let d = store
            .write("k/a".into(), Precondition::Exists, Mutation::Delete)
            .await
            .unwrap();
        let events = store.events_since(0, "k/", 100).unwrap();
        let kinds: Vec<_> = events.iter().map(|e| (e.key.as_str(), e.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("k/a", EventKind::Added),
                ("k/b", EventKind::Added),
                ("k/a", EventKind::Deleted)
            ]
        );
        assert_eq!(
            events[2].object["metadata"]["resourceVersion"],
            d.rev.to_string()
        );
        let head = store.head();
        store.close();
        drop(store);

        let store = open(dir.path());
        assert_eq!(store.head(), head);
        assert!(store.get("k/a").is_none());
        assert_eq!(store.get("k/b").unwrap().value["spec"]["v"], 1);
        // After a restart the window is empty: events come from the log, identically.
        let replay = store.events_since(0, "k/", 100).unwrap();
        let kinds2: Vec<_> = replay.iter().map(|e| (e.key.as_str(), e.kind)).collect();
        assert_eq!(kinds, kinds2);
        let next = store
            .write(
                "k/c".into(),
                Precondition::Absent,
                Mutation::Put(obj("c", 1)),
            )
            .await
            .unwrap();
        assert!(next.rev > head, "revisions are never reused");
    }

    #[tokio::test]
    async fn list_at_an_old_revision_sees_the_past_and_compaction_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let a1 = store
            .write(
                "k/a".into(),
                Precondition::Absent,
                Mutation::Put(obj("a", 1)),
            )
            .await
            .unwrap();
        store
            .write(
                "k/a".into(),
                Precondition::Exists,
                Mutation::Put(obj("a", 2)),
            )
            .await
            .unwrap();
        store
            .write(
                "k/b".into(),
                Precondition::Absent,
                Mutation::Put(obj("b", 1)),
            )
            .await
            .unwrap();
        let past = store.list_at("k/", a1.rev).unwrap();
        assert_eq!(past.len(), 1);
        assert_eq!(past[0].value["spec"]["v"], 1);

        let point = store.compact_at(a1.rev + 1).await.unwrap();
        assert_eq!(point, a1.rev + 1);
        assert!(matches!(
            store.list_at("k/", a1.rev),
            Err(StoreError::Compacted { .. })
        ));
        assert!(matches!(
            store.events_since(a1.rev, "k/", 10),
            Err(StoreError::Compacted { .. })
        ));
        let now = store.list_at("k/", store.head()).unwrap();
        assert_eq!(now.len(), 2);
        let after = store.events_since(point, "k/", 10).unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].key, "k/b");
    }

    #[tokio::test]
    async fn compaction_keeps_the_configured_window() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            keep_revisions: 5,
            keep_duration: Duration::ZERO,
            durability: Durability::Process,
            cache_kib: 256,
        };
        let store = Store::open(&dir.path().join("s.db"), options).unwrap();
        for i in 0..20 {
            store
                .write(
                    "k/a".into(),
                    Precondition::Exists,
                    Mutation::Put(obj("a", i)),
                )
                .await
                .ok();
            store
                .write(
                    format!("k/x{i}"),
                    Precondition::Absent,
                    Mutation::Put(obj("x", i)),
                )
                .await
                .unwrap();
        }
        let head = store.head();
        let point = store.compact().await.unwrap();
        assert_eq!(point, head - 5);
        assert_eq!(store.events_since(point, "k/", 100).unwrap().len(), 5);
        assert_eq!(store.list("k/").0.len(), 20);
    }

    #[tokio::test]
    async fn watchers_read_events_from_the_window_and_the_log_alike() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for i in 0..30 {
            store
                .write(
                    format!("k/{i:02}"),
                    Precondition::Absent,
                    Mutation::Put(obj("x", i)),
                )
                .await
                .unwrap();
        }
        let from_window = store.events_since(10, "k/", 5).unwrap();
        let from_log = store.events_from_log(10, "k/", 5).unwrap();
        let revs = |es: &[Arc<Event>]| es.iter().map(|e| e.rev).collect::<Vec<_>>();
        assert_eq!(revs(&from_window), revs(&from_log));
        assert_eq!(revs(&from_window), [11, 12, 13, 14, 15]);
    }

    #[tokio::test]
    async fn a_deleted_key_can_be_created_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for round in 0..3 {
            store
                .write(
                    "k/a".into(),
                    Precondition::Absent,
                    Mutation::Put(obj("a", round)),
                )
                .await
                .unwrap();
            store
                .write("k/a".into(), Precondition::Exists, Mutation::Delete)
                .await
                .unwrap();
        }
        assert!(store.get("k/a").is_none());
    }

    #[tokio::test]
    async fn owners_are_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let child = json!({ "metadata": { "name": "c", "ownerReferences": [{ "uid": "u1" }] } });
        store
            .write("k/c".into(), Precondition::Absent, Mutation::Put(child))
            .await
            .unwrap();
        assert_eq!(store.dependents("u1"), ["k/c"]);
        store
            .write("k/c".into(), Precondition::Exists, Mutation::Delete)
            .await
            .unwrap();
        assert!(store.dependents("u1").is_empty());
    }

    #[test]
    fn a_second_process_cannot_open_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path());
        let second = Store::open(&dir.path().join("state.db"), StoreOptions::default());
        assert!(matches!(second, Err(StoreError::Locked(_))));
    }
}
