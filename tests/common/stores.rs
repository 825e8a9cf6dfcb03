//! `ObjectStore` wrappers that make a real store (the in-process S3 server
//! or `file://`) behave like other stores or like a bad network, for tests
//! of what restore may trust.
//!
//! * [`CoarseTimes`]: listing and HEAD times truncated to whole seconds, as
//!   AWS S3 (and moto) report them; the in-process server and `file://`
//!   report milliseconds, which hides any use of listing times as commit
//!   times.
//! * [`CutGets`]: the next `n` GET bodies break halfway through their first
//!   chunk with a transport error, as after a connection reset mid-download.
//! * [`WalkedPrefixes`]: a delimiter listing names a "directory" only if
//!   it holds an object directly, as s3rver's does (black-box probe Q23).
//! * [`LostPuts`]: the next `n` conditional PUTs are applied, but answered
//!   with 412 Precondition Failed, as when the response to the first attempt
//!   is lost and the client's retry finds its own write; or applied and
//!   answered with a timeout; and the next `n` GETs can fail, as a store
//!   answering 503 does.
//! * [`HeldPuts`]: the next `n` PUTs of some objects are held back and
//!   answered with a timeout, to be applied later (a late write).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DurationRound, TimeDelta};
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

/// What a wrapper changes; everything else goes to the inner store.
pub trait Rewrite: Send + Sync + fmt::Debug + 'static {
    fn meta(&self, m: ObjectMeta) -> ObjectMeta {
        m
    }
    fn get(&self, r: GetResult) -> GetResult {
        r
    }
    /// An error in place of the answer to a GET of `location`, if any.
    fn fail_get(&self, _location: &ObjPath) -> Option<object_store::Error> {
        None
    }
    /// Whether a delimiter listing leaves out the common prefixes that
    /// hold no object directly.
    fn prefixes_with_objects_only(&self) -> bool {
        false
    }
    /// An error in place of sending a conditional PUT of `location`, if any.
    fn fail_put(&self, _location: &ObjPath, _opts: &PutOptions) -> Option<object_store::Error> {
        None
    }
    /// Whether to hold this PUT back rather than send it (see [`HeldPut`]).
    fn hold(&self, _location: &ObjPath, _payload: &PutPayload, _opts: &PutOptions) -> bool {
        false
    }
    /// The answer to a conditional PUT that the inner store answered `r`.
    fn conditional_put(
        &self,
        _location: &ObjPath,
        r: object_store::Result<PutResult>,
    ) -> object_store::Result<PutResult> {
        r
    }
}

/// Answers the next `left` successful conditional PUTs with 412, the next
/// `timed_out` ones with a timeout (both applied), fails the next
/// `failing_gets` GETs as a store answering 503 would, and the next
/// `failing_puts` conditional PUTs the same way (not applied), or only
/// those with `If-Match` (`failing_updates`).
#[derive(Debug, Default)]
pub struct LostPut {
    pub left: AtomicU64,
    pub timed_out: AtomicU64,
    pub failing_gets: AtomicU64,
    pub failing_puts: AtomicU64,
    pub failing_updates: AtomicU64,
}

/// Takes one from `n` if it is above zero.
fn take_one(n: &AtomicU64) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl Rewrite for LostPut {
    fn fail_put(&self, location: &ObjPath, opts: &PutOptions) -> Option<object_store::Error> {
        let update = matches!(opts.mode, object_store::PutMode::Update(_));
        let fail = take_one(&self.failing_puts) || (update && take_one(&self.failing_updates));
        fail.then(|| object_store::Error::Generic {
            store: "test",
            source: format!(
                "{location}: Server returned non-2xx status code: 503 Slow Down (injected)"
            )
            .into(),
        })
    }

    fn fail_get(&self, location: &ObjPath) -> Option<object_store::Error> {
        take_one(&self.failing_gets).then(|| object_store::Error::Generic {
            store: "test",
            source: format!(
                "{location}: Server returned non-2xx status code: 503 Slow Down (injected)"
            )
            .into(),
        })
    }

    fn conditional_put(
        &self,
        location: &ObjPath,
        r: object_store::Result<PutResult>,
    ) -> object_store::Result<PutResult> {
        if r.is_ok() && take_one(&self.left) {
            return Err(object_store::Error::Precondition {
                path: location.to_string(),
                source: "applied, but the response was lost (injected)".into(),
            });
        }
        if r.is_ok() && take_one(&self.timed_out) {
            return Err(object_store::Error::Generic {
                store: "test",
                source: "applied, but the request timed out before its answer (injected)".into(),
            });
        }
        r
    }
}

/// Holds back the next `left` PUTs of objects whose name ends in `suffix`,
/// answering each with a timeout, as a store (or a proxy) that keeps a
/// request past the client's timeout; [`Wrapped::apply_held`] applies them
/// later, with the conditions they were sent with, as that store does
/// (black-box probe D26).
#[derive(Debug)]
pub struct HeldPut {
    suffix: &'static str,
    left: AtomicU64,
    held: std::sync::Mutex<Vec<(ObjPath, PutPayload, PutOptions)>>,
}

impl HeldPut {
    pub fn new(suffix: &'static str, left: u64) -> HeldPut {
        HeldPut {
            suffix,
            left: AtomicU64::new(left),
            held: std::sync::Mutex::default(),
        }
    }
}

impl Rewrite for HeldPut {
    fn hold(&self, location: &ObjPath, payload: &PutPayload, opts: &PutOptions) -> bool {
        if !location.as_ref().ends_with(self.suffix) || !take_one(&self.left) {
            return false;
        }
        self.held
            .lock()
            .unwrap()
            .push((location.clone(), payload.clone(), opts.clone()));
        true
    }
}

impl Wrapped<HeldPut> {
    /// Applies the PUTs held back, in order; the store's answers.
    pub async fn apply_held(&self) -> Vec<object_store::Result<PutResult>> {
        let held = std::mem::take(&mut *self.rewrite.held.lock().unwrap());
        let mut answers = Vec::new();
        for (location, payload, opts) in held {
            answers.push(self.inner.put_opts(&location, payload, opts).await);
        }
        answers
    }
}

/// Listing times in whole seconds.
#[derive(Debug, Default)]
pub struct Coarse;

impl Rewrite for Coarse {
    fn meta(&self, mut m: ObjectMeta) -> ObjectMeta {
        m.last_modified = m
            .last_modified
            .duration_trunc(TimeDelta::seconds(1))
            .expect("in range");
        m
    }
    fn get(&self, mut r: GetResult) -> GetResult {
        r.meta = self.meta(r.meta);
        r
    }
}

/// Breaks the next `left` GET bodies halfway through their first chunk.
#[derive(Debug, Default)]
pub struct Cut {
    pub left: AtomicU64,
    pub cut: AtomicU64,
}

impl Rewrite for Cut {
    fn get(&self, r: GetResult) -> GetResult {
        let take = self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !take {
            return r;
        }
        self.cut.fetch_add(1, Ordering::SeqCst);
        let (meta, range, attributes, extensions) = (
            r.meta.clone(),
            r.range.clone(),
            r.attributes.clone(),
            r.extensions.clone(),
        );
        let reset = futures::stream::once(async {
            Err(object_store::Error::Generic {
                store: "test",
                source: "connection reset by peer (injected)".into(),
            })
        });
        // Half of the first chunk, then the reset: always inside the body.
        let stream = r
            .into_stream()
            .take(1)
            .map(|chunk| chunk.map(|b| b.slice(..b.len() / 2)))
            .chain(reset)
            .boxed();
        GetResult {
            payload: GetResultPayload::Stream(stream),
            meta,
            range,
            attributes,
            extensions,
        }
    }
}

/// An `ObjectStore` passing everything to `inner` but what `rewrite` changes.
#[derive(Debug)]
pub struct Wrapped<R> {
    inner: Arc<dyn ObjectStore>,
    pub rewrite: Arc<R>,
}

/// See [`WalkedPrefixes`].
#[derive(Debug)]
pub struct Walked;

impl Rewrite for Walked {
    fn prefixes_with_objects_only(&self) -> bool {
        true
    }
}

pub type CoarseTimes = Wrapped<Coarse>;
pub type WalkedPrefixes = Wrapped<Walked>;
pub type CutGets = Wrapped<Cut>;
pub type LostPuts = Wrapped<LostPut>;
pub type HeldPuts = Wrapped<HeldPut>;

impl<R: Rewrite> Wrapped<R> {
    pub fn new(inner: Arc<dyn ObjectStore>, rewrite: R) -> Wrapped<R> {
        Wrapped {
            inner,
            rewrite: Arc::new(rewrite),
        }
    }
}

impl<R: Rewrite> fmt::Display for Wrapped<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}({})", self.rewrite, self.inner)
    }
}

#[async_trait::async_trait]
impl<R: Rewrite> ObjectStore for Wrapped<R> {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if self.rewrite.hold(location, &payload, &opts) {
            return Err(object_store::Error::Generic {
                store: "test",
                source: "held past the request timeout (injected): the store applies it later"
                    .into(),
            });
        }
        let conditional = !matches!(opts.mode, object_store::PutMode::Overwrite);
        if let Some(e) = conditional
            .then(|| self.rewrite.fail_put(location, &opts))
            .flatten()
        {
            return Err(e);
        }
        let r = self.inner.put_opts(location, payload, opts).await;
        if conditional {
            self.rewrite.conditional_put(location, r)
        } else {
            r
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if let Some(e) = self.rewrite.fail_get(location) {
            return Err(e);
        }
        let head = options.head;
        let r = self.inner.get_opts(location, options).await?;
        Ok(if head {
            let mut r = r;
            r.meta = self.rewrite.meta(r.meta);
            r
        } else {
            self.rewrite.get(r)
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let rw = self.rewrite.clone();
        self.inner
            .list(prefix)
            .map(move |m| m.map(|m| rw.meta(m)))
            .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&ObjPath>,
        offset: &ObjPath,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let rw = self.rewrite.clone();
        self.inner
            .list_with_offset(prefix, offset)
            .map(move |m| m.map(|m| rw.meta(m)))
            .boxed()
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjPath>,
    ) -> object_store::Result<ListResult> {
        let mut r = self.inner.list_with_delimiter(prefix).await?;
        if self.rewrite.prefixes_with_objects_only() {
            let mut kept = Vec::new();
            for p in r.common_prefixes {
                if !self
                    .inner
                    .list_with_delimiter(Some(&p))
                    .await?
                    .objects
                    .is_empty()
                {
                    kept.push(p);
                }
            }
            r.common_prefixes = kept;
        }
        r.objects = r
            .objects
            .into_iter()
            .map(|m| self.rewrite.meta(m))
            .collect();
        Ok(r)
    }

    async fn copy_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}
