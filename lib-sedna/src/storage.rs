//! Models and datasets in object storage (`s3://bucket/key`, `file:///path` or a plain
//! absolute path), through `object_store`, with a local cache keyed by content hash.
//!
//! [`Storage::fetch`] asks the store for the object's size and ETag; if the cache already
//! holds that version it answers from disk without downloading. Otherwise it streams the
//! object into the cache while hashing it (SHA-256) and stores it as `blobs/<sha256>`, so the
//! same bytes under several URLs are kept once. Objects larger than
//! [`StorageOptions::max_object_bytes`] are refused before download.
//!
//! S3 credentials come from files mounted from a Secret ([`crate::config::Credentials`]),
//! never from the environment; the endpoint (MinIO, Ceph, any S3-compatible server) from
//! `S3_ENDPOINT_URL`. Plain `http://` endpoints must be allowed explicitly.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sedna::storage::StorageError> {
//! use sedna::storage::{Storage, StorageOptions};
//! let storage = Storage::new(StorageOptions::new("/var/lib/sedna/cache"))?;
//! let model = storage.fetch("s3://models/helmet/edge.onnx").await?;
//! println!("{} ({} bytes, sha256 {})", model.path.display(), model.size, model.sha256);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::Credentials;

/// The default largest object fetched: 4 GiB.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 4 << 30;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The URL cannot be used. Not retryable.
    #[error("storage URL {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// No object at that URL. Not retryable (until it is uploaded).
    #[error("{url}: no such object")]
    NotFound {
        /// The URL.
        url: String,
    },
    /// The object is larger than allowed. Not retryable.
    #[error("{url}: {size} bytes is more than the {limit}-byte limit")]
    TooLarge {
        /// The URL.
        url: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The store failed (network, permissions, server). Retryable.
    #[error("{url}: {source}")]
    Store {
        /// The URL.
        url: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// The mounted credentials could not be read. Not retryable until they are fixed.
    #[error(transparent)]
    Credentials(#[from] crate::config::ConfigError),
    /// The local cache failed. Retryable after freeing space or fixing permissions.
    #[error("local cache {path}: {source}")]
    Cache {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl StorageError {
    /// Whether trying again unchanged can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Store { source, .. } => !matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::InvalidPath { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            StorageError::Cache { .. } => true,
            _ => false,
        }
    }
}

type Result<T, E = StorageError> = std::result::Result<T, E>;

/// How [`Storage`] reaches object stores and where it caches.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Cache directory (created if missing).
    pub cache_dir: PathBuf,
    /// S3 endpoint (`S3_ENDPOINT_URL`); AWS when `None`.
    pub s3_endpoint: Option<String>,
    /// S3 region (default `us-east-1`).
    pub s3_region: String,
    /// Credentials; anonymous (unsigned) requests when `None`.
    pub credentials: Option<Credentials>,
    /// Allow `http://` endpoints (off by default).
    pub allow_http: bool,
    /// Largest object fetched.
    pub max_object_bytes: u64,
}

impl StorageOptions {
    /// Options caching in `cache_dir`, AWS S3, no credentials, HTTPS only.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        StorageOptions {
            cache_dir: cache_dir.into(),
            s3_endpoint: None,
            s3_region: "us-east-1".into(),
            credentials: None,
            allow_http: false,
            max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
        }
    }
}

/// A fetched object, in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The cached file (read-only content; do not modify).
    pub path: PathBuf,
    /// SHA-256 of the content, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether it came from the cache without a download.
    pub cached: bool,
}

/// An object's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Size in bytes.
    pub size: u64,
    /// ETag, when the store gives one.
    pub e_tag: Option<String>,
    /// Last change, RFC 3339.
    pub last_modified: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct IndexEntry {
    size: u64,
    e_tag: Option<String>,
    last_modified: String,
    sha256: String,
}

/// Object storage with a content-addressed local cache.
#[derive(Debug, Clone)]
pub struct Storage {
    options: Arc<StorageOptions>,
    index_lock: Arc<tokio::sync::Mutex<()>>,
}

/// Where an URL points.
enum Location {
    Local(PathBuf),
    S3 { bucket: String, key: String },
}

fn parse_location(url: &str) -> Result<Location> {
    let bad = |reason: &str| StorageError::Url {
        url: url.into(),
        reason: reason.into(),
    };
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| bad("expected s3://bucket/key"))?;
        if bucket.is_empty() || key.is_empty() {
            return Err(bad("expected s3://bucket/key"));
        }
        return Ok(Location::S3 {
            bucket: bucket.into(),
            key: key.into(),
        });
    }
    let path = match url.strip_prefix("file://") {
        Some(path) => path,
        None if url.contains("://") => {
            return Err(bad(
                "unsupported scheme (use s3://, file:// or an absolute path)",
            ));
        }
        None => url,
    };
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(bad("a local path must be absolute"));
    }
    if path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(bad("a local path must not contain .."));
    }
    Ok(Location::Local(path))
}

impl Storage {
    /// Storage with these options; creates the cache directory.
    pub fn new(options: StorageOptions) -> Result<Storage> {
        let blobs = options.cache_dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|source| StorageError::Cache {
            path: blobs.clone(),
            source,
        })?;
        install_crypto_provider();
        Ok(Storage {
            options: Arc::new(options),
            index_lock: Arc::default(),
        })
    }

    /// Storage as a worker's configuration asks for: `S3_ENDPOINT_URL`, the credentials
    /// mounted in its credentials directory, a cache in `cache_dir`.
    pub fn for_worker(
        config: &crate::config::Config,
        cache_dir: &Path,
        allow_http: bool,
    ) -> Result<Storage> {
        let mut options = StorageOptions::new(cache_dir);
        options.s3_endpoint = config.s3_endpoint_url.clone();
        options.allow_http = allow_http;
        options.credentials = config.credentials()?;
        Storage::new(options)
    }

    /// The options.
    pub fn options(&self) -> &StorageOptions {
        &self.options
    }

    fn store_for(&self, url: &str) -> Result<(Arc<dyn ObjectStore>, StorePath)> {
        match parse_location(url)? {
            Location::Local(path) => {
                let store = object_store::local::LocalFileSystem::new();
                let location =
                    StorePath::from_absolute_path(&path).map_err(|e| StorageError::Url {
                        url: url.into(),
                        reason: e.to_string(),
                    })?;
                Ok((Arc::new(store), location))
            }
            Location::S3 { bucket, key } => {
                let o = &self.options;
                let mut builder = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(o.s3_region.clone())
                    .with_allow_http(o.allow_http);
                if let Some(endpoint) = &o.s3_endpoint {
                    if endpoint.starts_with("http://") && !o.allow_http {
                        return Err(StorageError::Url {
                            url: url.into(),
                            reason: format!(
                                "endpoint {endpoint} is plain HTTP; allow it explicitly or use https"
                            ),
                        });
                    }
                    builder = builder.with_endpoint(endpoint.clone());
                }
                match &o.credentials {
                    Some(c) => {
                        builder = builder
                            .with_access_key_id(c.access_key_id.clone())
                            .with_secret_access_key(c.secret_access_key.clone());
                        if let Some(token) = &c.session_token {
                            builder = builder.with_token(token.clone());
                        }
                    }
                    None => builder = builder.with_skip_signature(true),
                }
                let store = builder.build().map_err(|source| StorageError::Store {
                    url: url.into(),
                    source,
                })?;
                let location = StorePath::parse(&key).map_err(|e| StorageError::Url {
                    url: url.into(),
                    reason: e.to_string(),
                })?;
                Ok((Arc::new(store), location))
            }
        }
    }

    fn store_error(url: &str, source: object_store::Error) -> StorageError {
        match source {
            object_store::Error::NotFound { .. } => StorageError::NotFound { url: url.into() },
            source => StorageError::Store {
                url: url.into(),
                source,
            },
        }
    }

    /// What the store says of `url` without downloading it: size, ETag, last change.
    pub async fn stat(&self, url: &str) -> Result<ObjectInfo> {
        let (store, location) = self.store_for(url)?;
        let meta = store
            .head(&location)
            .await
            .map_err(|e| Self::store_error(url, e))?;
        Ok(ObjectInfo {
            size: meta.size,
            e_tag: meta.e_tag,
            last_modified: meta.last_modified.to_rfc3339(),
        })
    }

    /// Fetches `url` into the cache (or finds it there) and returns the local file.
    pub async fn fetch(&self, url: &str) -> Result<Fetched> {
        let (store, location) = self.store_for(url)?;
        let meta = store
            .head(&location)
            .await
            .map_err(|e| Self::store_error(url, e))?;
        let limit = self.options.max_object_bytes;
        if meta.size > limit {
            return Err(StorageError::TooLarge {
                url: url.into(),
                size: meta.size,
                limit,
            });
        }
        let wanted = (
            meta.size,
            meta.e_tag.clone(),
            meta.last_modified.to_rfc3339(),
        );
        if let Some(entry) = self.index().await?.get(url)
            && (entry.size, entry.e_tag.clone(), entry.last_modified.clone()) == wanted
        {
            let path = self.blob_path(&entry.sha256);
            if std::fs::metadata(&path).map(|m| m.len()).ok() == Some(entry.size) {
                return Ok(Fetched {
                    path,
                    sha256: entry.sha256.clone(),
                    size: entry.size,
                    cached: true,
                });
            }
        }
        // Download to a temporary file while hashing; rename into place.
        let tmp_dir = self.options.cache_dir.join("tmp");
        tokio::fs::create_dir_all(&tmp_dir)
            .await
            .map_err(|source| StorageError::Cache {
                path: tmp_dir.clone(),
                source,
            })?;
        let tmp = tmp_dir.join(format!("{}.part", uuid_like()));
        let cache_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StorageError::Cache { path, source }
        };
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(cache_error(&tmp))?;
        let result = store
            .get(&location)
            .await
            .map_err(|e| Self::store_error(url, e))?;
        let meta = result.meta.clone();
        let mut stream = result.into_stream();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let download = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| Self::store_error(url, e))?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(StorageError::TooLarge {
                        url: url.into(),
                        size,
                        limit,
                    });
                }
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(cache_error(&tmp))?;
            }
            file.sync_all().await.map_err(cache_error(&tmp))?;
            Ok(())
        };
        if let Err(e) = download.await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        let sha256 = hex::encode(hasher.finalize());
        let path = self.blob_path(&sha256);
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(cache_error(&path))?;
        self.record(
            url,
            IndexEntry {
                size,
                e_tag: meta.e_tag,
                last_modified: meta.last_modified.to_rfc3339(),
                sha256: sha256.clone(),
            },
        )
        .await?;
        Ok(Fetched {
            path,
            sha256,
            size,
            cached: false,
        })
    }

    /// Where to read a dataset from: a local path (`file://` or absolute) as it is, in place —
    /// an index names files beside it, which a copy in the cache would lose — and a remote
    /// object fetched into the cache under its own file name (a cache entry is named by its
    /// content, so a `.csv` or `.idx3-ubyte.gz` would no longer say what it is).
    pub async fn dataset_path(&self, url: &str) -> Result<PathBuf> {
        match parse_location(url)? {
            Location::Local(path) => Ok(path),
            Location::S3 { key, .. } => {
                let fetched = self.fetch(url).await?;
                let name = Path::new(&key)
                    .file_name()
                    .map(|n| n.to_os_string())
                    .unwrap_or_else(|| "dataset".into());
                let dir = self
                    .options
                    .cache_dir
                    .join("datasets")
                    .join(&fetched.sha256);
                let path = dir.join(name);
                if !path.exists() {
                    let cache = |source| StorageError::Cache {
                        path: dir.clone(),
                        source,
                    };
                    std::fs::create_dir_all(&dir).map_err(cache)?;
                    std::fs::hard_link(&fetched.path, &path)
                        .or_else(|_| std::fs::copy(&fetched.path, &path).map(|_| ()))
                        .map_err(cache)?;
                }
                Ok(path)
            }
        }
    }

    /// Reads a whole object into memory (at most `max_bytes`), bypassing the cache.
    pub async fn read(&self, url: &str, max_bytes: u64) -> Result<bytes::Bytes> {
        let (store, location) = self.store_for(url)?;
        let result = store
            .get(&location)
            .await
            .map_err(|e| Self::store_error(url, e))?;
        if result.meta.size > max_bytes {
            return Err(StorageError::TooLarge {
                url: url.into(),
                size: result.meta.size,
                limit: max_bytes,
            });
        }
        result.bytes().await.map_err(|e| Self::store_error(url, e))
    }

    /// Uploads `bytes` to `url` (replacing what is there).
    pub async fn upload(&self, url: &str, bytes: bytes::Bytes) -> Result<()> {
        let (store, location) = self.store_for(url)?;
        if let Location::Local(path) = parse_location(url)?
            && let Some(parent) = path.parent()
        {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| StorageError::Cache {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        store
            .put(&location, bytes.into())
            .await
            .map_err(|e| Self::store_error(url, e))?;
        Ok(())
    }

    fn blob_path(&self, sha256: &str) -> PathBuf {
        self.options.cache_dir.join("blobs").join(sha256)
    }

    fn index_path(&self) -> PathBuf {
        self.options.cache_dir.join("index.json")
    }

    async fn index(&self) -> Result<BTreeMap<String, IndexEntry>> {
        let path = self.index_path();
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "cache index unreadable; starting afresh");
                BTreeMap::new()
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(StorageError::Cache { path, source }),
        }
    }

    async fn record(&self, url: &str, entry: IndexEntry) -> Result<()> {
        let _guard = self.index_lock.lock().await;
        let mut index = self.index().await?;
        index.insert(url.to_string(), entry);
        let path = self.index_path();
        let tmp = path.with_extension(format!("json.{}", uuid_like()));
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| StorageError::Cache {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(|source| StorageError::Cache {
                path: tmp.clone(),
                source,
            })?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|source| StorageError::Cache { path, source })
    }
}

fn uuid_like() -> String {
    format!("{:016x}{:08x}", rand::random::<u64>(), std::process::id())
}

/// rustls needs one process-wide crypto provider; this workspace uses ring.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        for (url, needle) in [
            ("s3://bucket", "expected s3://bucket/key"),
            ("s3:///key", "expected s3://bucket/key"),
            ("gs://b/k", "unsupported scheme"),
            ("relative/model.onnx", "must be absolute"),
            ("/data/../etc/passwd", "must not contain .."),
        ] {
            let err = parse_location(url)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(needle), "{url}: {err}");
        }
        assert!(matches!(
            parse_location("file:///m.onnx").unwrap(),
            Location::Local(_)
        ));
        assert!(matches!(
            parse_location("s3://b/k/x.onnx").unwrap(),
            Location::S3 { .. }
        ));
    }

    #[tokio::test]
    async fn local_objects_are_cached_by_content_and_refetched_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::new(StorageOptions::new(dir.path().join("cache"))).unwrap();
        let a = dir.path().join("models/a.onnx");
        let b = dir.path().join("models/b.onnx");
        let url_a = format!("file://{}", a.display());
        storage
            .upload(&url_a, bytes::Bytes::from_static(b"model v1"))
            .await
            .unwrap();
        std::fs::write(&b, b"model v1").unwrap();
        let first = storage.fetch(&url_a).await.unwrap();
        assert!(!first.cached);
        assert_eq!(first.size, 8);
        assert_eq!(first.sha256, hex::encode(Sha256::digest(b"model v1")));
        assert_eq!(std::fs::read(&first.path).unwrap(), b"model v1");
        let again = storage.fetch(&url_a).await.unwrap();
        assert!(again.cached);
        // Same bytes elsewhere: one blob.
        let other = storage.fetch(b.to_str().unwrap()).await.unwrap();
        assert_eq!(other.path, first.path);
        // Changed content: downloaded again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&a, b"model v2, longer").unwrap();
        let changed = storage.fetch(&url_a).await.unwrap();
        assert!(!changed.cached);
        assert_ne!(changed.sha256, first.sha256);
        assert_eq!(std::fs::read(&changed.path).unwrap(), b"model v2, longer");
        let err = storage
            .fetch(&format!("file://{}/missing.onnx", dir.path().display()))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn objects_over_the_limit_are_refused_before_download() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = StorageOptions::new(dir.path().join("cache"));
        options.max_object_bytes = 4;
        let storage = Storage::new(options).unwrap();
        let file = dir.path().join("big.bin");
        std::fs::write(&file, b"12345").unwrap();
        let err = storage.fetch(file.to_str().unwrap()).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("5 bytes is more than the 4-byte limit"),
            "{err}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("cache/blobs"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn plain_http_endpoints_need_to_be_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = StorageOptions::new(dir.path());
        options.s3_endpoint = Some("http://127.0.0.1:9000".into());
        let storage = Storage::new(options).unwrap();
        let err = storage.store_for("s3://b/k").err().unwrap().to_string();
        assert!(err.contains("plain HTTP"), "{err}");
    }
}
