//! The QUIC endpoint: accept loop, connection limits, per-connection and per-stream tasks,
//! and graceful shutdown.
//!
//! One bidirectional stream carries one RPC: the server reads a request header, checks it
//! against the frame cap before reading the payload, dispatches, writes one response frame
//! and finishes the stream. Pushes go out on server-opened unidirectional streams.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use opaque_ke::ServerSetup;
use qpq_core::opaque::Suite;
use qpq_proto::frame::{FrameError, REQUEST_HEADER_LEN, RequestHeader, ResponseHeader};
use qpq_proto::{CloseCode, Message, Status, method, v1};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::budget::{self, Priority, Reservation};
use crate::config::Config;
use crate::handler::{self, Conn, RpcError};
use crate::hub::{PUSH_QUEUE, Queued};
pub use crate::shared::Shared;
use crate::store::Store;
use crate::tls;

/// QUIC stream error code sent with `stop` when a request is refused before it is read.
pub const STREAM_REFUSED: u32 = 1;
/// Connections answered with Unavailable at once while the memory budget is spent; beyond
/// this, new connections are refused at the QUIC level without a handshake.
const BUSY_CONNECTIONS: usize = 16;
/// How long a connection refused for lack of memory is kept open to say so.
const BUSY_LINGER: Duration = Duration::from_secs(2);
/// Time a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a push may take to be written before the connection's push task gives up on it.
const PUSH_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound, ready-to-run server.
pub struct Server {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    fingerprint: String,
    generated_cert: bool,
}

impl Server {
    /// Opens the database, loads or generates the certificate and binds the UDP socket.
    pub async fn bind(config: Config) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let store = Store::open(
            &config.db_path(),
            &config.data_dir.join("blobs"),
            config.limits.db_cache_bytes,
        )
        .with_context(|| format!("opening database {}", config.db_path().display()))?;
        let opaque = load_opaque_setup(&store).await?;
        let identity = tls::load_or_generate(
            config.tls_cert.as_deref(),
            config.tls_key.as_deref(),
            &config.data_dir,
        )?;
        let fingerprint = identity.fingerprint();
        let generated_cert = identity.generated;
        let mut server_config =
            quinn::ServerConfig::with_crypto(Arc::new(tls::server_crypto(identity)?));
        server_config.transport_config(Arc::new(transport(&config)));
        server_config.migration(true);
        let endpoint = bind_endpoint(config.listen, server_config)?;
        let shared = Arc::new(Shared::new(config, store, opaque));
        Ok(Self { shared, endpoint, fingerprint, generated_cert })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// SHA-256 of the server certificate, hex.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Whether this start generated the certificate.
    pub fn generated_cert(&self) -> bool {
        self.generated_cert
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight RPCs finish within
    /// the drain timeout, closes every connection. Every acknowledged write is already committed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self { shared, endpoint, .. } = self;
        let sweeper = tokio::spawn(sweep_loop(shared.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    admit(&shared, incoming);
                }
            }
        }
        info!("shutdown: no longer accepting connections or calls");
        endpoint.set_server_config(None);
        shared.draining.store(true, Ordering::Release);
        shared.drain_started.notify_waiters();
        let drain = Duration::from_secs(shared.config.limits.drain_timeout_secs);
        let deadline = tokio::time::Instant::now() + drain;
        loop {
            let idle = shared.idle.notified();
            if shared.inflight.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                warn!(
                    inflight = shared.inflight.load(Ordering::Acquire),
                    "drain timeout; closing anyway"
                );
                break;
            }
        }
        sweeper.abort();
        endpoint
            .close(quinn::VarInt::from_u32(CloseCode::Shutdown.as_u32()), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        info!("shutdown complete");
        Ok(())
    }
}

/// Binds `addr`; an unspecified IPv6 address falls back to IPv4 on hosts without IPv6.
fn bind_endpoint(addr: SocketAddr, config: quinn::ServerConfig) -> anyhow::Result<quinn::Endpoint> {
    match quinn::Endpoint::server(config.clone(), addr) {
        Ok(e) => Ok(e),
        Err(err) if addr.ip() == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) => {
            let v4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, addr.port()));
            warn!(%err, "IPv6 unavailable; listening on {v4}");
            quinn::Endpoint::server(config, v4).with_context(|| format!("binding UDP {v4}"))
        }
        Err(err) => Err(err).with_context(|| format!("binding UDP {addr}")),
    }
}

/// Transport settings sized for a router: small windows, few streams, no datagrams.
fn transport(config: &Config) -> quinn::TransportConfig {
    let l = &config.limits;
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(l.max_streams_per_connection));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.stream_receive_window(quinn::VarInt::from_u32(1 << 20));
    t.receive_window(quinn::VarInt::from_u32(2 << 20));
    t.send_window(2 << 20);
    t.datagram_receive_buffer_size(None);
    let idle = Duration::from_secs(l.idle_timeout_secs);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t
}

async fn load_opaque_setup(store: &Store) -> anyhow::Result<ServerSetup<Suite>> {
    let bytes = store
        .meta_or_insert("opaque_setup", || {
            ServerSetup::<Suite>::new(&mut rand::rngs::OsRng).serialize().to_vec()
        })
        .await?;
    ServerSetup::<Suite>::deserialize(&bytes)
        .map_err(|_| anyhow::anyhow!("stored OPAQUE setup is corrupt"))
}

/// Applies the handshake, connection and memory limits to a new connection attempt.
fn admit(shared: &Arc<Shared>, incoming: quinn::Incoming) {
    let ip = incoming.remote_address().ip().to_canonical();
    let l = &shared.config.limits;
    // Handshake floods: a hard cap on handshakes in progress, and once a quarter of it is in
    // use a client must first echo a Retry token, which a spoofed source address cannot do.
    let handshakes = shared.handshakes.load(Ordering::Acquire);
    if handshakes >= l.max_handshakes as usize {
        debug!(%ip, handshakes, "connection refused: too many handshakes in progress");
        incoming.refuse();
        return;
    }
    if handshakes >= (l.max_handshakes as usize).div_ceil(4)
        && !incoming.remote_address_validated()
        && incoming.may_retry()
    {
        debug!(%ip, handshakes, "address validation required: many handshakes in progress");
        if let Err(e) = incoming.retry() {
            e.into_incoming().refuse();
        }
        return;
    }
    {
        let mut c = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= l.max_connections || from_ip >= l.max_connections_per_ip {
            debug!(%ip, total = c.total, from_ip, "connection refused: limit");
            incoming.refuse();
            return;
        }
        c.total += 1;
        *c.per_ip.entry(ip).or_default() += 1;
    }
    let slot = ConnSlot { shared: shared.clone(), ip };
    // Out of memory budget: a few connections are completed to be told so (Unavailable with a
    // retry hint); the rest are refused before the handshake costs anything.
    let memory = match shared.budget.reserve(budget::CONNECTION_COST, Priority::NewConnection) {
        Ok(r) => Ok(r),
        Err(e) => match Counted::try_new(shared, |s| &s.busy, BUSY_CONNECTIONS) {
            Some(busy) => Err((e, busy)),
            None => {
                debug!(%ip, used = e.used, "connection refused: memory budget spent");
                incoming.refuse();
                return;
            }
        },
    };
    let handshake = Counted::new(shared, |s| &s.handshakes);
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("conn", id = conn_id, peer = %incoming.remote_address());
    tokio::spawn(
        async move {
            let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return debug!(error = %e, "handshake failed"),
                Err(_) => return debug!("handshake timed out"),
            };
            drop(handshake);
            match memory {
                Ok(reservation) => {
                    serve_connection(slot.shared.clone(), conn, conn_id, ip, reservation).await
                }
                Err((e, _busy)) => serve_busy(conn, e).await,
            }
            drop(slot);
        }
        .instrument(span),
    );
}

/// A place in one of the server's counters (handshakes, busy connections), given back when
/// dropped.
struct Counted {
    shared: Arc<Shared>,
    counter: fn(&Shared) -> &AtomicUsize,
}

impl Counted {
    fn new(shared: &Arc<Shared>, counter: fn(&Shared) -> &AtomicUsize) -> Self {
        counter(shared).fetch_add(1, Ordering::AcqRel);
        Self { shared: shared.clone(), counter }
    }

    /// A place if fewer than `max` are taken.
    fn try_new(
        shared: &Arc<Shared>,
        counter: fn(&Shared) -> &AtomicUsize,
        max: usize,
    ) -> Option<Self> {
        counter(shared)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()?;
        Some(Self { shared: shared.clone(), counter })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.counter)(&self.shared).fetch_sub(1, Ordering::AcqRel);
    }
}

/// Releases a connection's place in the limits when dropped.
struct ConnSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Serves a connection that was admitted only to be told the server is out of memory budget:
/// its first request is answered with Unavailable and a retry hint, then it is closed.
async fn serve_busy(conn: quinn::Connection, e: budget::Exhausted) {
    debug!(used = e.used, limit = e.limit, "connection turned away: memory budget spent");
    let answer = async {
        let (mut send, mut recv) = conn.accept_bi().await.ok()?;
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        recv.read_exact(&mut raw).await.ok()?;
        let _ = recv.stop(quinn::VarInt::from_u32(STREAM_REFUSED));
        let request_id = u32::from_be_bytes([raw[2], raw[3], raw[4], raw[5]]);
        let err = RpcError::retry(
            Status::Unavailable,
            "server is at its memory limit; try again later",
            budget::RETRY_CONNECTION,
        );
        respond(&mut send, request_id, Err(err), BUSY_LINGER).await;
        // Closing discards unsent data: wait until the client has the answer.
        send.stopped().await.ok()?;
        Some(())
    };
    let _ = tokio::time::timeout(BUSY_LINGER, answer).await;
    let reason = format!("server busy; retry in {} s", budget::RETRY_CONNECTION.as_secs());
    conn.close(quinn::VarInt::from_u32(CloseCode::Busy.as_u32()), reason.as_bytes());
}

async fn serve_connection(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    conn_id: u64,
    ip: IpAddr,
    _memory: Reservation,
) {
    debug!("connected");
    let (push_tx, push_rx) = mpsc::channel::<Queued>(PUSH_QUEUE);
    let pusher = tokio::spawn(push_loop(conn.clone(), push_rx));
    let ctx = Arc::new(Conn::new(shared.clone(), conn.clone(), conn_id, ip, push_tx));
    let large_requests = Arc::new(tokio::sync::Semaphore::new(LARGE_REQUESTS_PER_CONNECTION));
    loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                let ctx = ctx.clone();
                let large = large_requests.clone();
                tokio::spawn(serve_stream(ctx, large, send, recv).in_current_span());
            }
            Err(e) => {
                debug!(reason = %e, "connection closed");
                break;
            }
        }
    }
    ctx.unbind();
    pusher.abort();
}

/// Writes queued pushes. A client that has not taken a push within [`PUSH_WRITE_TIMEOUT`]
/// (QUIC flow control stops us when it does not read) is disconnected: its messages wait on
/// disk, and a stuck peer holds no buffers or task for longer than that.
async fn push_loop(conn: quinn::Connection, mut rx: mpsc::Receiver<Queued>) {
    while let Some(Queued { frame, .. }) = rx.recv().await {
        let sent = tokio::time::timeout(PUSH_WRITE_TIMEOUT, async {
            let mut s = conn.open_uni().await.ok()?;
            s.write_all(&frame).await.ok()?;
            s.finish().ok()
        })
        .await;
        match sent {
            Ok(Some(())) => {}
            Ok(None) => debug!("push not delivered; client will fetch"),
            Err(_) => {
                debug!("client does not read its pushes; closing");
                conn.close(
                    quinn::VarInt::from_u32(CloseCode::SlowConsumer.as_u32()),
                    b"pushes not read",
                );
                return;
            }
        }
    }
}

/// Counts an RPC as in flight for the shutdown drain.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.inflight.fetch_add(1, Ordering::AcqRel);
        Self(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Requests over [`budget::LARGE_REQUEST`] bytes one connection may be receiving at once; a
/// further one is refused at once rather than left waiting, since what the client sends for a
/// waiting request would sit in quinn's buffers (up to the stream window) outside the budget.
const LARGE_REQUESTS_PER_CONNECTION: usize = 2;

async fn serve_stream(
    ctx: Arc<Conn>,
    large_requests: Arc<tokio::sync::Semaphore>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let _inflight = InFlight::new(&ctx.shared);
    let timeout = Duration::from_secs(ctx.shared.config.limits.request_timeout_secs);
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    let read = tokio::time::timeout(timeout, recv.read_exact(&mut raw)).await;
    let request_id = u32::from_be_bytes([raw[2], raw[3], raw[4], raw[5]]);
    match read {
        Ok(Ok(())) => {}
        Ok(Err(quinn::ReadExactError::FinishedEarly(n))) => {
            let e = RpcError::new(
                Status::BadRequest,
                format!("truncated request header ({n} of 10 bytes)"),
            );
            return respond(&mut send, request_id, Err(e), timeout).await;
        }
        Ok(Err(quinn::ReadExactError::ReadError(_))) => return,
        Err(_) => {
            let _ = recv.stop(quinn::VarInt::from_u32(STREAM_REFUSED));
            let e = RpcError::new(Status::DeadlineExceeded, "request header not received in time");
            return respond(&mut send, request_id, Err(e), timeout).await;
        }
    }
    let header = match RequestHeader::decode(&raw) {
        Ok(h) => h,
        Err(FrameError::TooLarge { len, max }) => {
            let _ = recv.stop(quinn::VarInt::from_u32(STREAM_REFUSED));
            let e = RpcError::new(
                Status::PayloadTooLarge,
                format!("payload of {len} bytes exceeds {max}"),
            );
            return respond(&mut send, request_id, Err(e), timeout).await;
        }
        Err(e) => {
            return respond(
                &mut send,
                request_id,
                Err(RpcError::new(Status::BadRequest, e.to_string())),
                timeout,
            )
            .await;
        }
    };
    // The body is held against the memory budget as it arrives; large ones (uploads) also
    // need one of the connection's large-request places, so one peer cannot take it all.
    let large = u64::from(header.len) > budget::LARGE_REQUEST;
    let _large_place = if large {
        match large_requests.try_acquire() {
            Ok(p) => Some(p),
            Err(_) => {
                // Refusing at once (STOP_SENDING discards what quinn buffered for it) rather
                // than waiting keeps a waiting request's bytes from sitting outside the budget.
                let _ = recv.stop(quinn::VarInt::from_u32(STREAM_REFUSED));
                let e = RpcError::retry(
                    Status::RateLimited,
                    "too many large requests on this connection",
                    budget::RETRY_REQUEST,
                );
                return respond(&mut send, header.request_id, Err(e), timeout).await;
            }
        }
    } else {
        None
    };
    let priority = if large { Priority::LargeRequest } else { Priority::Request };
    let mut memory = match ctx.shared.budget.reserve(0, priority) {
        Ok(r) => r,
        Err(e) => {
            return refuse_for_memory(&mut send, &mut recv, header.request_id, e, timeout).await;
        }
    };
    let read = read_body(&mut recv, header.len as usize, &mut memory, priority);
    let body = match tokio::time::timeout(timeout, read).await {
        Ok(Ok(body)) => body,
        Ok(Err(BodyError::Budget(e))) => {
            return refuse_for_memory(&mut send, &mut recv, header.request_id, e, timeout).await;
        }
        Ok(Err(BodyError::Read(quinn::ReadExactError::FinishedEarly(n)))) => {
            let e = RpcError::new(
                Status::BadRequest,
                format!("truncated payload ({n} of {} bytes)", header.len),
            );
            return respond(&mut send, header.request_id, Err(e), timeout).await;
        }
        Ok(Err(BodyError::Read(quinn::ReadExactError::ReadError(_)))) => return,
        Err(_) => {
            let _ = recv.stop(quinn::VarInt::from_u32(STREAM_REFUSED));
            let e = RpcError::new(Status::DeadlineExceeded, "request payload not received in time");
            return respond(&mut send, header.request_id, Err(e), timeout).await;
        }
    };
    // Anything the client sends after the announced payload is ignored.
    let _ = recv.stop(quinn::VarInt::from_u32(0));
    if ctx.shared.is_draining() {
        let e =
            RpcError::retry(Status::Unavailable, "server is shutting down", Duration::from_secs(1));
        return respond(&mut send, header.request_id, Err(e), timeout).await;
    }
    let name = method::name(header.method).unwrap_or("unknown");
    // Held until the response is written (or the stream reset), so unread large responses
    // cannot pile up: further large calls wait for a slot.
    let _slot = if handler::large_response(header.method) {
        match ctx.large_responses.clone().acquire_owned().await {
            Ok(p) => Some(p),
            Err(_) => return,
        }
    } else {
        None
    };
    // Decoding copies a large body's bytes field (an upload's chunk, a message's payload) once
    // more for as long as the handler runs: that is held too, at the large-request ceiling, so
    // uploads never eat into the room kept for small messages.
    if large && let Err(e) = memory.grow(body.len() as u64, Priority::LargeRequest) {
        drop(body);
        return refuse_for_memory(&mut send, &mut recv, header.request_id, e, timeout).await;
    }
    // A long poll the client gave up on (it dropped the call: its stream is stopped) ends at
    // once and frees its stream; left to its deadline, a handful of abandoned polls would hold
    // every stream the connection may open. Only the long poll, a read, is cut short.
    let dispatch = handler::dispatch(&ctx, header.method, &body);
    let (result, _wait_slot) = if header.method == method::FETCH_WAIT {
        tokio::select! {
            r = dispatch => r,
            _ = send.stopped() => {
                debug!(method = name, "the client gave up on its long poll");
                return;
            }
        }
    } else {
        dispatch.await
    };
    drop(body);
    drop(memory);
    if let Err(e) = &result {
        debug!(method = name, status = %e.status, message = %e.message, "rpc failed");
    }
    // A large response (Fetch, Peek, DownloadBlob, a long poll's answer: all reads) holds its
    // size while it is written; past the budget it is dropped and the call refused instead.
    let size = result.as_ref().map_or(0, |b| b.len() as u64);
    let _response_memory = if size > budget::LARGE_REQUEST {
        match ctx.shared.budget.reserve(size, Priority::Request) {
            Ok(r) => Some(r),
            Err(e) => {
                drop(result);
                return refuse_for_memory(&mut send, &mut recv, header.request_id, e, timeout)
                    .await;
            }
        }
    } else {
        None
    };
    respond(&mut send, header.request_id, result, timeout).await;
}

enum BodyError {
    Read(quinn::ReadExactError),
    Budget(budget::Exhausted),
}

/// Reads exactly `len` payload bytes. Each chunk is reserved in `memory` as it arrives, so a
/// header that announces 4 MiB and then stalls holds nothing; the chunks are joined once at
/// the end (that copy is reserved too while both exist).
async fn read_body(
    recv: &mut quinn::RecvStream,
    len: usize,
    memory: &mut Reservation,
    priority: Priority,
) -> Result<Vec<u8>, BodyError> {
    let mut chunks = Vec::new();
    let mut got = 0;
    while got < len {
        match recv.read_chunk(len - got, true).await {
            Ok(Some(chunk)) => {
                memory.grow(chunk.bytes.len() as u64, priority).map_err(BodyError::Budget)?;
                got += chunk.bytes.len();
                chunks.push(chunk.bytes);
            }
            Ok(None) => return Err(BodyError::Read(quinn::ReadExactError::FinishedEarly(got))),
            Err(e) => return Err(BodyError::Read(e.into())),
        }
    }
    if chunks.len() == 1 {
        return Ok(chunks.remove(0).into());
    }
    memory.grow(len as u64, priority).map_err(BodyError::Budget)?;
    let mut body = Vec::with_capacity(len);
    for c in chunks {
        body.extend_from_slice(&c);
    }
    memory.shrink_to(len as u64);
    Ok(body)
}

/// Answers a request the memory budget cannot take with RateLimited and a retry hint, without
/// reading the rest of it.
async fn refuse_for_memory(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    request_id: u32,
    e: budget::Exhausted,
    timeout: Duration,
) {
    debug!(used = e.used, limit = e.limit, "request refused: memory budget spent");
    let _ = recv.stop(quinn::VarInt::from_u32(STREAM_REFUSED));
    let err = RpcError::retry(
        Status::RateLimited,
        "server is at its memory limit; try again later",
        budget::RETRY_REQUEST,
    );
    respond(send, request_id, Err(err), timeout).await;
}

/// Writes one response frame (header, then body: no second copy of a large body) and
/// finishes the stream. A client that does not read its response within `timeout` gets the
/// stream reset, which frees the buffers: a peer cannot pin server memory by never reading.
async fn respond(
    send: &mut quinn::SendStream,
    request_id: u32,
    result: Result<Vec<u8>, RpcError>,
    timeout: Duration,
) {
    let (status, body) = match result {
        Ok(body) => (Status::Ok, body),
        Err(e) => {
            let err = v1::Error {
                code: u32::from(e.status.as_u8()),
                message: e.message,
                retry_after_ms: e.retry_after_ms,
            };
            (e.status, err.encode_to_vec())
        }
    };
    let (status, body) = match u32::try_from(body.len()) {
        Ok(len) if len <= qpq_proto::MAX_PAYLOAD => (status, body),
        _ => {
            let err =
                v1::Error { code: 10, message: "response too large".into(), retry_after_ms: 0 };
            (Status::Internal, err.encode_to_vec())
        }
    };
    let header = ResponseHeader { status, request_id, len: body.len() as u32 }.encode();
    let write = async {
        send.write_all(&header).await?;
        send.write_all(&body).await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(Ok(())) => {
            let _ = send.finish();
        }
        Ok(Err(_)) => {}
        Err(_) => {
            debug!("client did not read its response in time; resetting the stream");
            let _ = send.reset(quinn::VarInt::from_u32(STREAM_REFUSED));
        }
    }
}

async fn sweep_loop(shared: Arc<Shared>) {
    let l = &shared.config.limits;
    let mut tick = tokio::time::interval(Duration::from_secs(l.sweep_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let session_idle_ms = l.session_idle_days.saturating_mul(86_400_000);
    let slot_tombstone_ms = l.max_ttl_secs.saturating_mul(1000);
    let mut refused = 0;
    loop {
        tick.tick().await;
        // What the memory budget turned away since the last tick, for the operator's log.
        let b = &shared.budget;
        if b.refusals() != refused {
            warn!(
                refused = b.refusals() - refused,
                in_use_kib = b.used() >> 10,
                budget_kib = b.limit() >> 10,
                "memory budget reached: connections, requests or pushes were turned away"
            );
            refused = b.refusals();
        }
        match shared.store.sweep(crate::store::now_ms(), session_idle_ms, slot_tombstone_ms).await {
            Ok(r) if r != Default::default() => info!(
                messages = r.messages,
                dedup = r.dedup,
                blobs = r.blobs,
                sessions = r.sessions,
                slots = r.slots,
                claims = r.claims,
                slot_tombstones = r.slot_tombstones,
                "expired records removed"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "sweep failed"),
        }
    }
}
