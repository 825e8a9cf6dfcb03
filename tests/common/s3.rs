//! A real S3 protocol server in-process: `s3s` over `s3s-fs` on 127.0.0.1
//! (ephemeral port), with SigV4 auth and injectable faults.
//!
//! Faults are applied by a thin wrapper around the s3s service, so the client
//! sees genuine HTTP responses (503/500 with S3 XML error bodies), genuine
//! latency, or a genuinely closed port after [`S3Server::stop`].
//!
//! Conditional writes: `s3s-fs` 0.14 itself answers PutObject with 412
//! PreconditionFailed when `If-None-Match: *` meets an existing object or
//! `If-Match` names another ETag (or a missing object), like S3. But its
//! check and its write are separate steps (the ETag is even saved after the
//! data is renamed into place), so two concurrent conditional PUTs could both
//! pass. Real S3 decides them atomically; so the wrapper below runs PUTs that
//! carry `If-Match` or `If-None-Match` one at a time. Its GET is not atomic
//! either: it opens the data, then reads the ETag from a side file, so a GET
//! overlapping a conditional PUT could return the old content with the new
//! ETag, and a compare-and-swap on that ETag would then wrongly succeed (two
//! lease winners, once in ~40 races). So GETs and HEADs wait while a
//! conditional PUT is served (they run concurrently with each other). The
//! wrapper adds no check of its own: every 412 comes from `s3s-fs`.
//!
//! Listings: `s3s-fs` walks the directories and stats each file, so a LIST
//! overlapping a DELETE of a listed object fails with 500 InternalError
//! (the file vanished between the directory read and the stat). Real S3
//! lists consistently whatever is deleted meanwhile; so DELETEs (single and
//! bulk, `POST ?delete`) are served like conditional PUTs: alone, while
//! GETs (listings included) wait.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tempfile::TempDir;
use tokio::net::TcpSocket;
use tokio::task::JoinSet;

pub const ACCESS_KEY: &str = "litefleet-test-key";
pub const SECRET_KEY: &str = "litefleet-test-secret-DO-NOT-LOG";
pub const BUCKET: &str = "litefleet-test";

/// What the server does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Every request: 503 ServiceUnavailable.
    Unavailable,
    /// Every request: 500 InternalError.
    InternalError,
    /// The next `n` requests pass, every later one gets 503.
    FailAfter(u64),
    /// Every request is served after this delay.
    Delay(Duration),
    /// The next `n` LIST responses are cut short: headers and half the
    /// body, then the connection ends (a dropped connection mid-response).
    CutListBodies(u64),
    /// The same for the next `n` ranged GET responses (a `Range` header).
    CutRangeBodies(u64),
    /// Every ListObjectsV2 request is served as if it asked for at most
    /// `n` keys (its `max-keys` rewritten after the signature was checked):
    /// small pages, continuation tokens intact.
    ListPages(i32),
    /// The same, and every truncated page loses its
    /// `<NextContinuationToken>` (still `<IsTruncated>true</IsTruncated>`):
    /// a store that says the listing goes on without saying where.
    ListPagesWithoutTokens(i32),
    /// Every ListObjectsV2 page lists its first object twice (as s3rver's
    /// listings, paged over a directory walk, can: black-box probe Q23).
    ListRepeatingAKey,
    /// Every ListObjectsV2 page lists, after its last object, that object
    /// again under a key outside the prefix asked for (its first path
    /// segment `fleet` becomes `fleet~`, which sorts after every key of
    /// `fleet/`): a broken store or proxy answering with another root's
    /// objects (black-box probe N29).
    ListOutsidePrefix,
    /// PutObject ignores `If-None-Match` and `If-Match` (both dropped after
    /// the signature was checked) and writes anyway, as some S3-compatible
    /// stores do.
    IgnoreConditions,
    /// PutObject ignores `If-Match` only (`If-None-Match` still answers 412).
    IgnoreIfMatch,
    /// Multi-object delete (`POST ?delete`) answers 501 NotImplemented, as
    /// LocalBucket's does (black-box probe K28); `DELETE` of one object works.
    NoBulkDelete,
    /// PutObject with `If-Match` always answers 412, its own ETag too, as a
    /// store that compares ETags wrongly (black-box probe K28).
    RefuseIfMatch,
    /// Every GET of an object (not a listing) sends its body in
    /// [`TRICKLE_PIECES`] pieces, one per this interval: a slow link that
    /// keeps sending.
    Trickle(Duration),
}

/// Pieces of a body under [`Fault::Trickle`].
pub const TRICKLE_PIECES: u32 = 8;

struct Shared {
    fault: Mutex<Fault>,
    /// Written while a conditional PUT or a DELETE is served, read while a
    /// GET (a listing too) or HEAD is (see the module docs).
    exclusive: tokio::sync::RwLock<()>,
    /// Requests that passed under `FailAfter` so far.
    passed: AtomicU64,
    requests: AtomicU64,
    faults: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// Woken whenever a request ends.
    ended: tokio::sync::Notify,
}

/// Counts a request as in flight until dropped.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: Arc<Shared>) -> InFlight {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

pub struct S3Server {
    root: TempDir,
    addr: SocketAddr,
    shared: Arc<Shared>,
    service: S3Service,
    tasks: Option<JoinSet<()>>,
}

enum Action {
    Serve,
    Delay(Duration),
    Fail(u16, &'static str),
    CutBody,
    Trickle(Duration),
    /// A listing page: its `NextContinuationToken` is dropped.
    DropToken,
    /// A listing page: its first object is listed twice.
    RepeatKey,
    /// A listing page: its last object is listed again outside the prefix.
    OutsidePrefix,
}

impl Shared {
    fn decide(&self, is_list: bool, is_range: bool, is_get: bool, bulk_delete: bool) -> Action {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let fault = *self.fault.lock().unwrap();
        let action = match fault {
            Fault::None => Action::Serve,
            Fault::Delay(d) => Action::Delay(d),
            Fault::Unavailable => Action::Fail(503, "ServiceUnavailable"),
            Fault::InternalError => Action::Fail(500, "InternalError"),
            Fault::CutListBodies(n) => {
                if is_list && self.passed.fetch_add(1, Ordering::SeqCst) < n {
                    Action::CutBody
                } else {
                    Action::Serve
                }
            }
            Fault::CutRangeBodies(n) => {
                if is_range && self.passed.fetch_add(1, Ordering::SeqCst) < n {
                    Action::CutBody
                } else {
                    Action::Serve
                }
            }
            Fault::ListPages(_)
            | Fault::IgnoreConditions
            | Fault::IgnoreIfMatch
            | Fault::RefuseIfMatch => Action::Serve,
            Fault::ListPagesWithoutTokens(_) if is_list => Action::DropToken,
            Fault::ListPagesWithoutTokens(_) => Action::Serve,
            Fault::ListRepeatingAKey if is_list => Action::RepeatKey,
            Fault::ListRepeatingAKey => Action::Serve,
            Fault::ListOutsidePrefix if is_list => Action::OutsidePrefix,
            Fault::ListOutsidePrefix => Action::Serve,
            Fault::Trickle(d) if is_get && !is_list => Action::Trickle(d),
            Fault::Trickle(_) => Action::Serve,
            Fault::NoBulkDelete if bulk_delete => Action::Fail(501, "NotImplemented"),
            Fault::NoBulkDelete => Action::Serve,
            Fault::FailAfter(n) => {
                if self.passed.fetch_add(1, Ordering::SeqCst) < n {
                    Action::Serve
                } else {
                    Action::Fail(503, "ServiceUnavailable")
                }
            }
        };
        if let Action::Fail(..) | Action::CutBody = action {
            self.faults.fetch_add(1, Ordering::SeqCst);
        }
        action
    }
}

impl S3Server {
    pub async fn start() -> S3Server {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::None),
            exclusive: tokio::sync::RwLock::new(()),
            passed: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            ended: tokio::sync::Notify::new(),
        });
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        b.set_access(Rewrite(shared.clone()));
        let service = b.build();
        let mut s = S3Server {
            root,
            addr: "127.0.0.1:0".parse().unwrap(),
            shared,
            service,
            tasks: None,
        };
        s.listen().await;
        s
    }

    async fn listen(&mut self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).unwrap();
        let listener = socket.listen(128).unwrap();
        self.addr = listener.local_addr().unwrap();
        assert!(self.addr.ip().is_loopback());
        let mut tasks = JoinSet::new();
        let (service, shared) = (self.service.clone(), self.shared.clone());
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let conns_for_accept = conns.clone();
        tasks.spawn(async move {
            // Connection tasks live in a set owned by the accept task, so
            // aborting the accept task drops (and aborts) every connection.
            let _keep = conns;
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (service, shared) = (service.clone(), shared.clone());
                let handler = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (service, shared) = (service.clone(), shared.clone());
                    async move {
                        let _counted = InFlight::new(shared.clone());
                        let is_list = req.method() == hyper::Method::GET
                            && req.uri().query().is_some_and(|q| q.contains("list-type="));
                        let mut cut = false;
                        // A listing page's body rewritten.
                        let mut rewrite: Option<fn(&str) -> String> = None;
                        let is_range = req.method() == hyper::Method::GET
                            && req.headers().contains_key(hyper::header::RANGE);
                        let is_get = req.method() == hyper::Method::GET;
                        let bulk_delete = req.method() == hyper::Method::POST
                            && req
                                .uri()
                                .query()
                                .is_some_and(|q| q.split('&').any(|p| p == "delete" || p.starts_with("delete=")));
                        let mut trickle = None;
                        match shared.decide(is_list, is_range, is_get, bulk_delete) {
                            Action::Serve => {}
                            Action::CutBody => cut = true,
                            Action::Trickle(d) => trickle = Some(d),
                            Action::DropToken => rewrite = Some(without_token),
                            Action::RepeatKey => rewrite = Some(repeating_a_key),
                            Action::OutsidePrefix => rewrite = Some(outside_the_prefix),
                            Action::Delay(d) => tokio::time::sleep(d).await,
                            Action::Fail(status, code) => {
                                let body = format!(
                                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected fault</Message></Error>"
                                );
                                return Ok(hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/xml")
                                    .body(s3s::Body::from(body))
                                    .unwrap());
                            }
                        }
                        let conditional = req.method() == hyper::Method::PUT
                            && (req.headers().contains_key(hyper::header::IF_MATCH)
                                || req.headers().contains_key(hyper::header::IF_NONE_MATCH));
                        let deletes = req.method() == hyper::Method::DELETE || bulk_delete;
                        let reads = matches!(
                            *req.method(),
                            hyper::Method::GET | hyper::Method::HEAD
                        );
                        let _write = if conditional || deletes {
                            Some(shared.exclusive.write().await)
                        } else {
                            None
                        };
                        let _read = if reads {
                            Some(shared.exclusive.read().await)
                        } else {
                            None
                        };
                        let res = hyper::service::Service::call(&service, req).await;
                        match res {
                            Ok(r) if cut => {
                                // The full length announced, half of it sent.
                                let (mut parts, mut body) = r.into_parts();
                                let bytes = body.store_all_limited(64 << 20).await.unwrap();
                                parts.headers.insert(
                                    hyper::header::CONTENT_LENGTH,
                                    bytes.len().into(),
                                );
                                let half = bytes.slice(..bytes.len() / 2);
                                Ok(hyper::Response::from_parts(parts, cut_short(half)))
                            }
                            Ok(r) if trickle.is_some() && r.status().is_success() => {
                                let (parts, mut body) = r.into_parts();
                                let bytes = body.store_all_limited(64 << 20).await.unwrap();
                                Ok(hyper::Response::from_parts(
                                    parts,
                                    trickled(bytes, trickle.unwrap()),
                                ))
                            }
                            Ok(r) if rewrite.is_some() && r.status().is_success() => {
                                let (mut parts, mut body) = r.into_parts();
                                let bytes = body.store_all_limited(64 << 20).await.unwrap();
                                let text = String::from_utf8(bytes.to_vec()).unwrap();
                                let text = rewrite.unwrap()(&text);
                                if text.len() != bytes.len() {
                                    shared.faults.fetch_add(1, Ordering::SeqCst);
                                }
                                parts.headers.insert(
                                    hyper::header::CONTENT_LENGTH,
                                    text.len().into(),
                                );
                                Ok(hyper::Response::from_parts(parts, s3s::Body::from(text)))
                            }
                            other => other,
                        }
                    }
                });
                conns_for_accept.lock().unwrap().spawn(async move {
                    let _ = ConnBuilder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), handler)
                        .await;
                });
            }
        });
        self.tasks = Some(tasks);
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn bucket(&self) -> &str {
        BUCKET
    }
    pub fn access_key(&self) -> &str {
        ACCESS_KEY
    }
    pub fn secret_key(&self) -> &str {
        SECRET_KEY
    }
    /// The s3s-fs data root; objects are files under `root()/bucket()/`.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap() = fault;
        self.shared.passed.store(0, Ordering::SeqCst);
    }
    pub fn request_count(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }
    /// The most requests the server was handling at once (since the last
    /// [`S3Server::reset_max_in_flight`]).
    pub fn max_in_flight(&self) -> u64 {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
    /// Waits until no request is in flight (those a client gave up on
    /// included), then starts [`S3Server::max_in_flight`] again from 0.
    pub async fn reset_max_in_flight(&self) {
        loop {
            let ended = self.shared.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.shared.in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
            ended.await;
        }
        self.shared.max_in_flight.store(0, Ordering::SeqCst);
    }
    pub fn fault_count(&self) -> u64 {
        self.shared.faults.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every open connection.
    pub async fn stop(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.shutdown().await;
        }
    }

    /// Listens again on the same port, with the same data.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.listen().await;
    }
}

/// Serves listings in pages of the size a `ListPages` fault names, and
/// drops PutObject's conditions under `IgnoreConditions`: s3s calls this
/// after the request's signature was checked, so the request is rewritten
/// here (not in the URL or headers the client signed). Every signed request
/// is allowed, as without it.
struct Rewrite(Arc<Shared>);

#[async_trait::async_trait]
impl s3s::access::S3Access for Rewrite {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> s3s::S3Result<()> {
        match cx.credentials() {
            Some(_) => Ok(()),
            None => Err(s3s::s3_error!(AccessDenied, "Signature is required")),
        }
    }

    async fn list_objects_v2(
        &self,
        req: &mut s3s::S3Request<s3s::dto::ListObjectsV2Input>,
    ) -> s3s::S3Result<()> {
        let fault = *self.0.fault.lock().unwrap();
        if let Fault::ListPages(n) | Fault::ListPagesWithoutTokens(n) = fault {
            req.input.max_keys = Some(n);
        }
        Ok(())
    }

    async fn put_object(
        &self,
        req: &mut s3s::S3Request<s3s::dto::PutObjectInput>,
    ) -> s3s::S3Result<()> {
        let ignored = match *self.0.fault.lock().unwrap() {
            Fault::IgnoreConditions => {
                req.input.if_match.take().is_some() | req.input.if_none_match.take().is_some()
            }
            Fault::IgnoreIfMatch => req.input.if_match.take().is_some(),
            Fault::RefuseIfMatch if req.input.if_match.is_some() => {
                self.0.faults.fetch_add(1, Ordering::SeqCst);
                return Err(s3s::s3_error!(PreconditionFailed, "refused (injected)"));
            }
            _ => false,
        };
        if ignored {
            self.0.faults.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A ListObjectsV2 response body whose first object is listed twice.
fn repeating_a_key(xml: &str) -> String {
    let (open, close) = ("<Contents>", "</Contents>");
    match (xml.find(open), xml.find(close)) {
        (Some(i), Some(j)) if i < j => {
            let end = j + close.len();
            format!("{}{}{}", &xml[..end], &xml[i..end], &xml[end..])
        }
        _ => xml.to_string(),
    }
}

/// A ListObjectsV2 response body whose last object is listed once more,
/// its key's first `/` made `~/` (outside the prefix, after it in order).
fn outside_the_prefix(xml: &str) -> String {
    let (open, close) = ("<Contents>", "</Contents>");
    match (xml.rfind(open), xml.rfind(close)) {
        (Some(i), Some(j)) if i < j => {
            let end = j + close.len();
            let moved = xml[i..end].replacen("<Key>fleet/", "<Key>fleet~/", 1);
            format!("{}{}{}", &xml[..end], moved, &xml[end..])
        }
        _ => xml.to_string(),
    }
}

/// A ListObjectsV2 response body without its `NextContinuationToken`.
fn without_token(xml: &str) -> String {
    let (open, close) = ("<NextContinuationToken>", "</NextContinuationToken>");
    match (xml.find(open), xml.find(close)) {
        (Some(i), Some(j)) if i < j => format!("{}{}", &xml[..i], &xml[j + close.len()..]),
        _ => xml.to_string(),
    }
}

/// A body of `half`, then (once that had time to reach the client) a
/// transport error: the server drops the connection mid-body, short of the
/// length it announced.
fn cut_short(half: bytes::Bytes) -> s3s::Body {
    let chunks = futures::stream::unfold(Some(half), |first| async move {
        match first {
            Some(b) => Some((Ok(b), None)),
            None => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Err("connection dropped (injected fault)".into()), None))
            }
        }
    });
    streamed(Box::pin(chunks))
}

/// `bytes` in [`TRICKLE_PIECES`] pieces, each sent `every` after the last
/// (the first too).
fn trickled(bytes: bytes::Bytes, every: Duration) -> s3s::Body {
    let piece = bytes.len().div_ceil(TRICKLE_PIECES as usize).max(1);
    let chunks = futures::stream::unfold(bytes, move |mut rest| async move {
        if rest.is_empty() {
            return None;
        }
        tokio::time::sleep(every).await;
        let next = rest.split_to(piece.min(rest.len()));
        Some((Ok(next), rest))
    });
    streamed(Box::pin(chunks))
}

type Chunks = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<bytes::Bytes, s3s::StdError>> + Send + Sync>,
>;

/// A response body sent as `chunks` yields them.
fn streamed(chunks: Chunks) -> s3s::Body {
    struct Streamed(Chunks);
    impl futures::Stream for Streamed {
        type Item = Result<bytes::Bytes, s3s::StdError>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            self.0.as_mut().poll_next(cx)
        }
    }
    impl s3s::stream::ByteStream for Streamed {}
    s3s::Body::from(Box::pin(Streamed(chunks)) as s3s::stream::DynByteStream)
}
