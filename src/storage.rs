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
use object_store::buffered::BufWriter;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt, RetryConfig,
};
use tokio::io::AsyncWriteExt;

use crate::config::{ReplicaConfig, ReplicaUrl};
use crate::error::IoContext;
use crate::{Error, Result};

/// Multipart part size: S3's minimum is 5 MiB; 10 MiB keeps a 1 GiB database
/// at ~100 parts while bounding per-upload memory (two parts in flight).
pub const UPLOAD_PART: usize = 10 * 1024 * 1024;
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
                if let Some(ep) = cfg.endpoint.as_deref().filter(|e| !e.is_empty()) {
                    b = b
                        .with_endpoint(ep)
                        .with_allow_http(ep.starts_with("http://"));
                }
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

    /// Uploads a local file to `location`, streaming (multipart when large).
    pub async fn upload_file(&self, location: &ObjPath, file: &Path) -> Result<u64> {
        let mut src = tokio::fs::File::open(file).await.at(file)?;
        let mut w = BufWriter::with_capacity(self.store.clone(), location.clone(), UPLOAD_PART);
        let copied = tokio::io::copy(&mut src, &mut w).await;
        let result = match copied {
            Ok(n) => w.shutdown().await.map(|_| n),
            Err(e) => Err(e),
        };
        match result {
            Ok(n) => Ok(n),
            Err(e) => {
                let _ = w.abort().await;
                Err(Error::invalid(
                    format!("replica {location}"),
                    format!("upload failed: {e}"),
                ))
            }
        }
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
