//! Storage backends: one `object_store` client for the whole fleet.
//!
//! `s3://bucket/prefix` becomes an [`object_store::aws::AmazonS3`] (AWS or any
//! S3-compatible store through `endpoint` and `force-path-style`);
//! `file:///dir` becomes an [`object_store::local::LocalFileSystem`], the
//! embedded default that needs no cloud account. Both go through the same
//! [`ObjectStore`] trait, so everything above this module has one code path.
//!
//! Credentials come from the config or the usual `AWS_*` environment
//! variables (read by `AmazonS3Builder::from_env`). They are handed to the
//! client and never stored or printed anywhere else; [`Replica`]'s `Display`
//! shows only the bucket and prefix.
//!
//! Uploads stream from a file through [`object_store::buffered::BufWriter`]:
//! a single PUT for small snapshots, a multipart upload for large ones, never
//! the whole file in memory. An object becomes visible only when complete
//! (S3 PUT and multipart completion are atomic; the local store writes a
//! temporary file and renames it), so restore never sees a partial snapshot.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use tokio::io::AsyncReadExt;

use crate::config::{ReplicaConfig, ReplicaUrl};
use crate::error::IoContext;
use crate::{Error, Result};

/// Multipart part size, and the largest snapshot sent as a single PUT.
/// S3's minimum part is 5 MiB; 10 MiB keeps a 1 GiB database at ~100 parts.
/// An upload buffers at most one part (or the whole small file) plus the
/// parts in flight, so memory is bounded by `max-concurrent` x 50 MiB even
/// in the worst case where every database is large.
pub const UPLOAD_PART: usize = 10 * 1024 * 1024;
/// Parts of one multipart upload in flight at once: enough to keep a link
/// busy for one large database without letting it hog memory.
const MULTIPART_PARALLEL: usize = 4;
/// Region used when neither the config nor `AWS_REGION` names one; S3-compatible
/// stores ignore it, and AWS redirects are not needed for path-style requests.
pub const DEFAULT_REGION: &str = "us-east-1";
/// Connect timeout: a dead endpoint should fail a cycle fast, not hang it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The replica: an object store and the key prefix everything lives under.
#[derive(Debug, Clone)]
pub struct Replica {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: ObjPath,
    description: String,
}

impl std::fmt::Display for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl Replica {
    /// Builds the client for a parsed replica URL.
    pub fn open(url: &ReplicaUrl, cfg: &ReplicaConfig) -> Result<Replica> {
        match url {
            ReplicaUrl::File { dir } => {
                std::fs::create_dir_all(dir).at(dir)?;
                let store = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| Error::store(dir.display(), e))?
                    .with_automatic_cleanup(true);
                Ok(Replica {
                    store: Arc::new(store),
                    prefix: ObjPath::default(),
                    description: format!("file://{}", dir.display()),
                })
            }
            ReplicaUrl::S3 { bucket, prefix } => {
                let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
                let region = cfg
                    .region
                    .clone()
                    .filter(|r| !r.is_empty())
                    .or_else(|| std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()))
                    .or_else(|| {
                        std::env::var("AWS_DEFAULT_REGION")
                            .ok()
                            .filter(|r| !r.is_empty())
                    })
                    .unwrap_or_else(|| DEFAULT_REGION.to_string());
                b = b.with_region(region);
                let endpoint = cfg.endpoint.as_deref().filter(|e| !e.is_empty());
                if let Some(ep) = endpoint {
                    b = b.with_endpoint(ep);
                }
                // Plain HTTP only when the user named an http:// endpoint
                // (MinIO on a LAN, a test server); AWS itself stays HTTPS.
                // Set on the client options because they replace the
                // builder's own allow-http setting.
                let allow_http = endpoint.is_some_and(|ep| ep.starts_with("http://"));
                // Path-style is object_store's default; virtual-hosted only for AWS itself
                // when the config does not force path style.
                b = b.with_virtual_hosted_style_request(
                    !cfg.force_path_style && cfg.endpoint.is_none(),
                );
                match (&cfg.access_key_id, &cfg.secret_access_key) {
                    (Some(k), Some(s)) => {
                        b = b
                            .with_access_key_id(k.expose())
                            .with_secret_access_key(s.expose());
                    }
                    (None, None) => {}
                    _ => {
                        return Err(Error::invalid(
                            "multi-db.replica",
                            "access-key-id and secret-access-key must be set together",
                        ))
                    }
                }
                b = b
                    .with_retry(RetryConfig {
                        backoff: BackoffConfig {
                            init_backoff: Duration::from_millis(100),
                            max_backoff: Duration::from_secs(2),
                            base: 2.0,
                        },
                        max_retries: cfg.retries,
                        retry_timeout: cfg.timeout,
                    })
                    .with_client_options(
                        ClientOptions::new()
                            .with_allow_http(allow_http)
                            .with_timeout(cfg.timeout)
                            .with_connect_timeout(CONNECT_TIMEOUT),
                    );
                let store = b
                    .build()
                    .map_err(|e| Error::store(format!("s3://{bucket}"), e))?;
                Ok(Replica {
                    store: Arc::new(store),
                    prefix: ObjPath::from(prefix.as_str()),
                    description: format!("s3://{bucket}/{prefix}"),
                })
            }
        }
    }

    /// The same replica (prefix, description) over another store, e.g. a
    /// wrapper that injects faults or counts requests.
    pub fn with_store(self, store: Arc<dyn ObjectStore>) -> Replica {
        Replica { store, ..self }
    }

    /// Uploads a local file to `location`: one PUT when it fits in
    /// [`UPLOAD_PART`], otherwise a multipart upload that is aborted on error
    /// so no parts are left behind. Either way the object appears atomically:
    /// readers see the old version or the whole new one, never a prefix.
    pub async fn upload_file(&self, location: &ObjPath, file: &Path) -> Result<u64> {
        let ctx = || location.to_string();
        let len = tokio::fs::metadata(file).await.at(file)?.len();
        if len <= UPLOAD_PART as u64 {
            let bytes = tokio::fs::read(file).await.at(file)?;
            self.store
                .put(location, PutPayload::from(bytes))
                .await
                .map_err(|e| Error::store(ctx(), e))?;
            return Ok(len);
        }
        let mut src = tokio::fs::File::open(file).await.at(file)?;
        let upload = self
            .store
            .put_multipart(location)
            .await
            .map_err(|e| Error::store(ctx(), e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, UPLOAD_PART);
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        loop {
            let n = match src.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(Error::io(file, e));
                }
            };
            if let Err(e) = w.wait_for_capacity(MULTIPART_PARALLEL).await {
                let _ = w.abort().await;
                return Err(Error::store(ctx(), e));
            }
            w.write(&buf[..n]);
            sent += n as u64;
        }
        // On failure `finish` has already tried to abort the upload.
        w.finish().await.map_err(|e| Error::store(ctx(), e))?;
        Ok(sent)
    }

    /// Objects directly under `dir` (one LIST with delimiter; no recursion).
    pub async fn list_dir(&self, dir: &ObjPath) -> Result<Vec<ObjectMeta>> {
        let r = self
            .store
            .list_with_delimiter(Some(dir))
            .await
            .map_err(|e| Error::store(dir, e))?;
        Ok(r.objects)
    }

    /// The "subdirectories" and objects directly under `dir` (one LIST with
    /// delimiter; no recursion).
    pub async fn list_children(&self, dir: &ObjPath) -> Result<(Vec<ObjPath>, Vec<ObjectMeta>)> {
        let r = self
            .store
            .list_with_delimiter(Some(dir))
            .await
            .map_err(|e| Error::store(dir, e))?;
        Ok((r.common_prefixes, r.objects))
    }

    /// Uploads a small object held in memory with one PUT (atomic, like
    /// [`Replica::upload_file`]).
    pub async fn put_bytes(
        &self,
        location: &ObjPath,
        bytes: impl Into<bytes::Bytes>,
    ) -> Result<()> {
        self.store
            .put(location, PutPayload::from(bytes.into()))
            .await
            .map_err(|e| Error::store(location, e))?;
        Ok(())
    }

    /// Downloads a whole object into memory; `None` if it does not exist.
    pub async fn get_bytes(&self, location: &ObjPath) -> Result<Option<bytes::Bytes>> {
        let got = match self.store.get(location).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Error::store(location, e)),
        };
        got.bytes()
            .await
            .map(Some)
            .map_err(|e| Error::store(location, e))
    }

    /// Every object under `prefix`, streamed.
    pub fn list_all(
        &self,
        prefix: &ObjPath,
    ) -> futures::stream::BoxStream<'static, Result<ObjectMeta>> {
        let p = prefix.clone();
        Box::pin(
            self.store
                .list(Some(prefix))
                .map_err(move |e| Error::store(&p, e)),
        )
    }

    /// Deletes one object.
    pub async fn delete(&self, location: &ObjPath) -> Result<()> {
        self.store
            .delete(location)
            .await
            .map_err(|e| Error::store(location, e))
    }
}
