//! `switchyard.v1.ProxyControl`: the WatchSwitches stream that feeds the proxies' caches, and
//! server-ID leases.
//!
//! Each WatchSwitches call gets one task that sends the starting point (a snapshot, or the
//! changes since the client's revision) and then every change batch, in revision order. The
//! task ends, and with it the stream, when the client goes away or the service shuts down.
//!
//! Bounds: at most [`ProxyControlService::with_watch_limits`]' `max_streams` streams at once
//! (one more answers RESOURCE_EXHAUSTED at once); the starting point is read from the index a
//! page of [`RECORDS_PER_MESSAGE`] records at a time, each page under its own short read lock
//! (writers never wait for a whole snapshot, and a watcher holds one page, not the user
//! table); and the messages waiting for a client that does not read are bounded in bytes
//! (`buffer_bytes`, and [`WATCH_BUFFER`] messages), so a stalled watcher costs a bounded amount
//! of memory and its task simply waits.
//!
//! LookupUser is the proxies' read-through at login: a store read per call, so the service
//! bounds how many run at once ([`LOOKUPS_IN_FLIGHT`]); a call that waits longer than
//! [`LOOKUP_PERMIT_WAIT`] for its turn answers RESOURCE_EXHAUSTED, and the proxy answers its
//! miner as for an unknown user. A flood of junk names costs the store at most that many
//! reads at a time, whatever the number of proxies.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prost::Message as _;
use switchyard_proto::v1::{
    AcquireServerIdRequest, AcquireServerIdResponse, CaseIndexEntry, LookupUserRequest,
    LookupUserResponse, ReleaseServerIdRequest, ReleaseServerIdResponse, RenewServerIdRequest,
    RenewServerIdResponse, RequestUserRegistrationRequest, RequestUserRegistrationResponse,
    UserCoinEntry, WatchSwitchesRequest, WatchSwitchesResponse, proxy_control_server::ProxyControl,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::{
    autoreg::UserRegistrations,
    core::SwitchCore,
    index::{ChangeBatch, ChangeCursor, UserCoinIndex, WatchStart},
    leases::{ProxyDescription, ServerIdLeases},
    metrics::{ControlMetrics, SentPosition},
    store::{Record, RecordKey, Revision},
};

/// Records per stream message: small enough to stay far below gRPC's 4 MiB message limit with
/// 128-byte names, large enough that a million-user snapshot is a thousand messages.
pub const RECORDS_PER_MESSAGE: usize = 1_000;

/// Messages buffered per watcher before the sender waits for the client to read (the byte
/// budget usually binds first).
pub const WATCH_BUFFER: usize = 16;

/// WatchSwitches streams open at once, at most, by default (`MaxWatchStreams`).
pub const DEFAULT_MAX_WATCH_STREAMS: usize = 256;

/// Bytes of encoded messages buffered per watcher, at most, by default (`WatchBufferBytes`).
pub const DEFAULT_WATCH_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// LookupUser calls reading the store at once, at most (for all proxies together).
pub const LOOKUPS_IN_FLIGHT: usize = 64;

/// How long a LookupUser call waits for its turn before it answers RESOURCE_EXHAUSTED.
pub const LOOKUP_PERMIT_WAIT: Duration = Duration::from_secs(1);

/// Reads users straight from the store for LookupUser, a bounded number at a time.
#[derive(Debug, Clone)]
pub struct UserLookups {
    core: Arc<SwitchCore>,
    permits: Arc<Semaphore>,
}

impl UserLookups {
    /// Lookups through `core`, at most [`LOOKUPS_IN_FLIGHT`] at once.
    pub fn new(core: Arc<SwitchCore>) -> Self {
        Self {
            core,
            permits: Arc::new(Semaphore::new(LOOKUPS_IN_FLIGHT)),
        }
    }
}

/// The `ProxyControl` service.
#[derive(Debug, Clone)]
pub struct ProxyControlService {
    index: Arc<UserCoinIndex>,
    /// LookupUser's reads (`None`: it answers UNIMPLEMENTED).
    lookups: Option<UserLookups>,
    leases: Arc<dyn ServerIdLeases>,
    /// Auto-registration, when enabled (`EnableUserAutoReg`).
    registrations: Option<Arc<dyn UserRegistrations>>,
    shutdown: CancellationToken,
    /// One permit per open WatchSwitches stream.
    streams: Arc<Semaphore>,
    max_streams: usize,
    /// The byte budget of each watcher's buffer.
    buffer_bytes: u32,
    /// Where open streams and their progress are recorded.
    metrics: ControlMetrics,
}

impl ProxyControlService {
    /// The service over `index` and `leases`; its streams end when `shutdown` is cancelled.
    pub fn new(
        index: Arc<UserCoinIndex>,
        leases: Arc<dyn ServerIdLeases>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            index,
            leases,
            lookups: None,
            registrations: None,
            shutdown,
            streams: Arc::new(Semaphore::new(DEFAULT_MAX_WATCH_STREAMS)),
            max_streams: DEFAULT_MAX_WATCH_STREAMS,
            buffer_bytes: budget(DEFAULT_WATCH_BUFFER_BYTES),
            metrics: ControlMetrics::new(),
        }
    }

    /// The service recording its WatchSwitches streams (how many, how far each is behind) in
    /// `metrics`.
    pub fn with_metrics(mut self, metrics: ControlMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The service with at most `max_streams` WatchSwitches streams at once, each buffering
    /// at most `buffer_bytes` of messages its client has not read (both at least 1).
    pub fn with_watch_limits(mut self, max_streams: usize, buffer_bytes: usize) -> Self {
        let max_streams = max_streams.clamp(1, Semaphore::MAX_PERMITS);
        self.streams = Arc::new(Semaphore::new(max_streams));
        self.max_streams = max_streams;
        self.buffer_bytes = budget(buffer_bytes);
        self
    }

    /// The service with LookupUser reading through `lookups`.
    pub fn with_lookups(mut self, lookups: UserLookups) -> Self {
        self.lookups = Some(lookups);
        self
    }

    /// The service with auto-registration (`None`: RequestUserRegistration answers
    /// FAILED_PRECONDITION).
    pub fn with_registrations(mut self, registrations: Option<Arc<dyn UserRegistrations>>) -> Self {
        self.registrations = registrations;
        self
    }
}

/// A byte budget as semaphore permits: at least 1, at most what one acquire may take.
fn budget(bytes: usize) -> u32 {
    u32::try_from(bytes.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX)
}

/// A message on its way to the client, with the share of its watcher's byte budget it holds
/// until the stream hands it to the transport.
type Queued = (Result<WatchSwitchesResponse, Status>, OwnedSemaphorePermit);

/// The sending side of a watcher's buffer: at most [`WATCH_BUFFER`] messages and `budget`
/// bytes of them.
struct Outbox {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
    budget: u32,
}

impl Outbox {
    /// A buffer of `budget` bytes, and the stream the client reads it from; `position` records
    /// the resume point of each message as it leaves the buffer.
    fn new(budget: u32, position: Option<SentPosition>) -> (Self, WatchStream) {
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let bytes = Arc::new(Semaphore::new(budget as usize));
        // The permit is dropped, and its bytes given back, as the message leaves the buffer.
        let stream = ReceiverStream::new(rx).map(move |(msg, _permit): Queued| {
            if let (Some(position), Ok(msg)) = (&position, &msg) {
                // 0: a snapshot page, not a resume point.
                if msg.revision > 0 {
                    position.reached(msg.revision);
                }
            }
            msg
        });
        (Self { tx, bytes, budget }, Box::pin(stream))
    }
}

/// The stream of a WatchSwitches call.
pub type WatchStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<WatchSwitchesResponse, Status>> + Send>>;

/// Builds one stream message from records.
fn message(
    records: &[Record],
    reset: bool,
    revision: Revision,
    snapshot_complete: bool,
    store_id: &str,
) -> WatchSwitchesResponse {
    let mut msg = WatchSwitchesResponse {
        reset,
        revision,
        snapshot_complete,
        store_id: store_id.to_owned(),
        ..Default::default()
    };
    for record in records {
        match &record.key {
            RecordKey::User(user) => msg.users.push(UserCoinEntry {
                user: user.clone(),
                coin: record.value.clone().unwrap_or_default(),
                revision: record.revision,
                removed: record.value.is_none(),
            }),
            RecordKey::CaseIndex(lowercase_name) => msg.case_index.push(CaseIndexEntry {
                lowercase_name: lowercase_name.clone(),
                name: record.value.clone().unwrap_or_default(),
                revision: record.revision,
                removed: record.value.is_none(),
            }),
        }
    }
    msg
}

/// Why a watch task stopped sending.
#[derive(Debug)]
enum Stop {
    ClientGone,
    Shutdown,
}

/// One watcher: sends the start, then every batch; see the module doc.
struct Watcher {
    index: Arc<UserCoinIndex>,
    out: Outbox,
    /// The revision the client reaches once it has applied everything sent so far.
    sent: Revision,
    shutdown: CancellationToken,
}

impl Watcher {
    fn new(index: Arc<UserCoinIndex>, out: Outbox, shutdown: CancellationToken) -> Self {
        Self {
            index,
            out,
            sent: 0,
            shutdown,
        }
    }

    /// Queues `msg` once its bytes fit in the budget (a message larger than the whole budget
    /// waits for an empty buffer).
    async fn send(&self, msg: WatchSwitchesResponse) -> Result<(), Stop> {
        let cost = u32::try_from(msg.encoded_len())
            .unwrap_or(u32::MAX)
            .clamp(1, self.out.budget);
        let permit = tokio::select! {
            permit = Arc::clone(&self.out.bytes).acquire_many_owned(cost) => {
                permit.map_err(|_| Stop::ClientGone)?
            }
            _ = self.out.tx.closed() => return Err(Stop::ClientGone),
            _ = self.shutdown.cancelled() => return Err(Stop::Shutdown),
        };
        tokio::select! {
            sent = self.out.tx.send((Ok(msg), permit)) => sent.map_err(|_| Stop::ClientGone),
            _ = self.shutdown.cancelled() => Err(Stop::Shutdown),
        }
    }

    /// Sends a snapshot read from the index page by page: every live record in key order,
    /// then the changes after `revision` (made while the pages were read), `reset` on the
    /// first message, the revision and `snapshot_complete` on the last (an empty store is one
    /// message carrying both). Returns the `seq` of the last batch the snapshot includes.
    async fn send_snapshot(&mut self, revision: Revision) -> Result<u64, Stop> {
        let store_id = self.index.store_id().to_owned();
        let mut first = true;
        // The last page read, held back so that a small snapshot stays one message.
        let mut held: Vec<Record> = Vec::new();
        let mut after: Option<RecordKey> = None;
        loop {
            let (records, next) = self
                .index
                .live_records_after(after.as_ref(), RECORDS_PER_MESSAGE);
            if !records.is_empty() {
                if !held.is_empty() {
                    self.send(message(&held, first, 0, false, &store_id))
                        .await?;
                    first = false;
                }
                held = records;
            }
            match next {
                Some(key) => after = Some(key),
                None => break,
            }
        }
        let mut cursor = ChangeCursor::AfterRevision(revision);
        loop {
            let page = self.index.changes_after(&cursor, RECORDS_PER_MESSAGE);
            if page.done {
                held.extend(page.records);
                self.send(message(&held, first, page.revision, true, &store_id))
                    .await?;
                self.sent = page.revision;
                return Ok(page.seq);
            }
            if let Some(last) = page.records.last() {
                cursor = ChangeCursor::After(last.revision, last.key.clone());
            }
            if !held.is_empty() {
                self.send(message(&held, first, 0, false, &store_id))
                    .await?;
                first = false;
            }
            held = page.records;
        }
    }

    /// Sends the changes after `from`, read from the index page by page; each message's
    /// revision is a resume point, the last one's the index revision. With `initial_sync`
    /// the last message carries `snapshot_complete` (and is sent even when empty). Returns the
    /// `seq` of the last batch the pages include.
    async fn send_changes_from(&mut self, from: Revision, initial_sync: bool) -> Result<u64, Stop> {
        let store_id = self.index.store_id().to_owned();
        self.sent = self.sent.max(from);
        let mut cursor = ChangeCursor::AfterRevision(from);
        loop {
            let page = self.index.changes_after(&cursor, RECORDS_PER_MESSAGE);
            if page.done {
                if !page.records.is_empty() || initial_sync {
                    self.send(message(
                        &page.records,
                        false,
                        page.revision,
                        initial_sync,
                        &store_id,
                    ))
                    .await?;
                }
                self.sent = self.sent.max(page.revision);
                return Ok(page.seq);
            }
            if let Some(last) = page.records.last() {
                cursor = ChangeCursor::After(last.revision, last.key.clone());
            }
            // More records may share the page's last revision: resume below that group.
            let point = page
                .records
                .last()
                .and_then(|last| {
                    page.records
                        .iter()
                        .rev()
                        .find(|r| r.revision < last.revision)
                })
                .map_or(self.sent, |below| self.sent.max(below.revision));
            self.send(message(&page.records, false, point, false, &store_id))
                .await?;
            self.sent = point;
        }
    }

    /// Sends changes in chunks; each chunk's revision is a resume point (see
    /// [`resume_points`]), the last one's is `revision`.
    async fn send_changes(&mut self, records: &[Record], revision: Revision) -> Result<(), Stop> {
        let store_id = self.index.store_id().to_owned();
        if records.is_empty() {
            return Ok(());
        }
        let chunks = records.chunks(RECORDS_PER_MESSAGE);
        let revs = resume_points(records, RECORDS_PER_MESSAGE, self.sent, revision);
        for (chunk, rev) in chunks.zip(revs) {
            self.send(message(chunk, false, rev, false, &store_id))
                .await?;
        }
        self.sent = self.sent.max(revision);
        Ok(())
    }

    async fn run(
        mut self,
        start: WatchStart,
        mut changes: broadcast::Receiver<ChangeBatch>,
    ) -> Result<(), Stop> {
        // The batches up to this one are already in what was read from the index.
        let mut skip_through_seq = match start {
            WatchStart::Snapshot { revision } => self.send_snapshot(revision).await?,
            WatchStart::Resume { revision } => self.send_changes_from(revision, true).await?,
        };
        loop {
            let batch = tokio::select! {
                _ = self.shutdown.cancelled() => return Err(Stop::Shutdown),
                _ = self.out.tx.closed() => return Err(Stop::ClientGone),
                batch = changes.recv() => batch,
            };
            match batch {
                Ok(batch) => {
                    if batch.seq > skip_through_seq {
                        self.send_changes(&batch.records, batch.revision).await?;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    // Fell behind the channel: re-read what was missed from the index.
                    debug!(
                        skipped,
                        from = self.sent,
                        "watcher lagged; re-reading from the index"
                    );
                    skip_through_seq = self.send_changes_from(self.sent, false).await?;
                }
                Err(broadcast::error::RecvError::Closed) => return Err(Stop::Shutdown),
            }
        }
    }
}

#[tonic::async_trait]
impl ProxyControl for ProxyControlService {
    type WatchSwitchesStream = WatchStream;

    async fn watch_switches(
        &self,
        request: Request<WatchSwitchesRequest>,
    ) -> Result<Response<Self::WatchSwitchesStream>, Status> {
        let peer = request.remote_addr();
        let Ok(stream_permit) = Arc::clone(&self.streams).try_acquire_owned() else {
            warn!(
                ?peer,
                max = self.max_streams,
                "WatchSwitches refused: MaxWatchStreams streams are open"
            );
            return Err(Status::resource_exhausted(format!(
                "{} WatchSwitches streams are open (MaxWatchStreams); try again later",
                self.max_streams
            )));
        };
        let WatchSwitchesRequest {
            resume_revision,
            store_id,
        } = request.into_inner();
        let resume = (resume_revision > 0 && !store_id.is_empty())
            .then_some((store_id.as_str(), resume_revision));
        let (start, changes) = self.index.watch(resume);
        let kind = match &start {
            WatchStart::Snapshot { .. } => "snapshot",
            WatchStart::Resume { .. } => "resume",
        };
        info!(?peer, resume_revision, start = kind, "watcher connected");
        let subscriber = self.metrics.watch_subscriber();
        let (out, stream) = Outbox::new(self.buffer_bytes, Some(subscriber.position()));
        let watcher = Watcher::new(Arc::clone(&self.index), out, self.shutdown.clone());
        tokio::spawn(async move {
            match watcher.run(start, changes).await {
                Ok(()) | Err(Stop::Shutdown) => info!(?peer, "watch stream ended by shutdown"),
                Err(Stop::ClientGone) => info!(?peer, "watcher disconnected"),
            }
            drop(subscriber);
            drop(stream_permit);
        });
        Ok(Response::new(stream))
    }

    async fn acquire_server_id(
        &self,
        request: Request<AcquireServerIdRequest>,
    ) -> Result<Response<AcquireServerIdResponse>, Status> {
        let r = request.into_inner();
        let lease = self
            .leases
            .acquire(
                ProxyDescription {
                    chain_type: r.chain_type,
                    instance_id: r.instance_id,
                    coins: r.coins,
                    ips: r.ips,
                    host_name: r.host_name,
                    listen_addr: r.listen_addr,
                },
                r.preferred_server_id,
            )
            .await?;
        info!(
            server_id = lease.server_id,
            chain_type = %lease.proxy.chain_type,
            instance_id = %lease.proxy.instance_id,
            listen_addr = %lease.proxy.listen_addr,
            "server ID leased"
        );
        Ok(Response::new(AcquireServerIdResponse {
            server_id: u32::from(lease.server_id),
            ttl_seconds: ttl_seconds(self.leases.ttl()),
        }))
    }

    async fn renew_server_id(
        &self,
        request: Request<RenewServerIdRequest>,
    ) -> Result<Response<RenewServerIdResponse>, Status> {
        let r = request.into_inner();
        let sessions: BTreeMap<String, u64> = r.sessions_by_coin.into_iter().collect();
        self.leases
            .renew(&r.chain_type, r.server_id, &r.instance_id, sessions)
            .await
            .inspect_err(|e| warn!(error = %e, "lease renewal refused"))?;
        Ok(Response::new(RenewServerIdResponse {
            ttl_seconds: ttl_seconds(self.leases.ttl()),
        }))
    }

    async fn release_server_id(
        &self,
        request: Request<ReleaseServerIdRequest>,
    ) -> Result<Response<ReleaseServerIdResponse>, Status> {
        let r = request.into_inner();
        self.leases
            .release(&r.chain_type, r.server_id, &r.instance_id)
            .await;
        info!(server_id = r.server_id, chain_type = %r.chain_type, "server ID released");
        Ok(Response::new(ReleaseServerIdResponse {}))
    }

    async fn lookup_user(
        &self,
        request: Request<LookupUserRequest>,
    ) -> Result<Response<LookupUserResponse>, Status> {
        let Some(lookups) = &self.lookups else {
            return Err(Status::unimplemented(
                "this control service does not read users for proxies",
            ));
        };
        let r = request.into_inner();
        let Ok(Ok(_permit)) =
            tokio::time::timeout(LOOKUP_PERMIT_WAIT, lookups.permits.acquire()).await
        else {
            debug!("user lookup refused: too many in flight");
            return Err(Status::resource_exhausted(format!(
                "{LOOKUPS_IN_FLIGHT} user lookups are in flight; try again"
            )));
        };
        let answer = match lookups.core.read_user_fresh(&r.user).await? {
            Some(record) => LookupUserResponse {
                found: true,
                user: record.user,
                coin: record.coin,
                revision: record.revision,
            },
            None => LookupUserResponse::default(),
        };
        Ok(Response::new(answer))
    }

    async fn request_user_registration(
        &self,
        request: Request<RequestUserRegistrationRequest>,
    ) -> Result<Response<RequestUserRegistrationResponse>, Status> {
        let Some(registrations) = &self.registrations else {
            return Err(Status::failed_precondition(
                "auto-registration is not enabled on this control service (EnableUserAutoReg)",
            ));
        };
        let r = request.into_inner();
        let created = registrations
            .request(&r.user, &r.worker, r.session_id)
            .await
            .inspect_err(
                |e| debug!(error = %e, session_id = r.session_id, "registration request refused"),
            )?;
        Ok(Response::new(RequestUserRegistrationResponse { created }))
    }
}

fn ttl_seconds(ttl: Duration) -> u32 {
    u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX)
}

/// The revision to send with each chunk of `per_message` revision-ordered `records`: a resume
/// point, so that every record at or below it is in that chunk or an earlier one. Records may
/// share a revision (the nodes of one ZooKeeper `multi`, removals dated by one directory
/// change), so a chunk that ends inside such a group gets the revision below the group (or
/// the previous resume point); resuming there sends the group again whole. The last chunk's
/// is `revision`; `sent` is the resume point before the first chunk. At least one revision
/// for no records.
fn resume_points(
    records: &[Record],
    per_message: usize,
    sent: Revision,
    revision: Revision,
) -> Vec<Revision> {
    let per_message = per_message.max(1);
    let chunks = records.len().div_ceil(per_message).max(1);
    let mut points = Vec::with_capacity(chunks);
    let mut point = sent;
    for i in 1..chunks {
        let end = i * per_message;
        if let Some(next) = records.get(end) {
            let done = records.get(..end).unwrap_or_default();
            if let Some(below) = done.iter().rev().find(|r| r.revision < next.revision) {
                point = point.max(below.revision);
            }
        }
        points.push(point);
    }
    points.push(revision);
    points
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreContents;

    fn user(name: &str, coin: &str, revision: Revision) -> Record {
        Record {
            key: RecordKey::User(name.into()),
            value: Some(coin.into()),
            revision,
        }
    }

    /// A watcher whose client stops reading falls behind the broadcast channel; once the client
    /// reads again it still receives every change, in revision order, none twice.
    #[tokio::test]
    async fn a_watcher_that_fell_behind_misses_nothing() {
        let index = Arc::new(UserCoinIndex::new(StoreContents {
            store_id: "s".into(),
            ..Default::default()
        }));
        let (start, changes) = index.watch(None);
        let (out, mut rx) = Outbox::new(budget(DEFAULT_WATCH_BUFFER_BYTES), None);
        let shutdown = CancellationToken::new();
        let watcher = Watcher::new(Arc::clone(&index), out, shutdown.clone());
        let task = tokio::spawn(watcher.run(start, changes));
        // The snapshot is read when the task runs: take it (empty) before the changes come.
        let first = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .expect("the snapshot comes")
            .expect("stream open")
            .expect("no error");
        assert!(first.reset && first.snapshot_complete && first.users.is_empty());

        // Far more batches than the channel holds, while nobody reads.
        let total: u64 = 3 * BROADCAST_TEST_BATCHES;
        for rev in 1..=total {
            index.apply(vec![user(&format!("u{rev}"), "btc", rev)], rev);
        }
        let mut seen = Vec::new();
        while seen.last().copied() != Some(total) {
            let msg = tokio::time::timeout(Duration::from_secs(10), rx.next())
                .await
                .expect("messages keep coming")
                .expect("stream open")
                .expect("no error");
            seen.extend(msg.users.iter().map(|u| u.revision));
        }
        assert_eq!(seen, (1..=total).collect::<Vec<_>>());
        shutdown.cancel();
        assert!(
            matches!(task.await.expect("task"), Err(Stop::Shutdown)),
            "ends on shutdown"
        );
    }

    /// A chunk's revision never cuts a group of records that share a revision: resuming from
    /// it misses none of them.
    #[test]
    fn resume_points_keep_groups_of_one_revision_whole() {
        // Revisions 1, 5 x4, 6, 9 x3, in chunks of 2: [1 5] [5 5] [5 6] [9 9] [9].
        let revisions = [1, 5, 5, 5, 5, 6, 9, 9, 9];
        let records: Vec<Record> = revisions
            .iter()
            .enumerate()
            .map(|(i, r)| user(&format!("u{i}"), "btc", *r))
            .collect();
        let points = resume_points(&records, 2, 0, 12);
        assert_eq!(points, vec![1, 1, 6, 6, 12]);
        for (i, point) in points.iter().enumerate() {
            let sent_so_far = ((i + 1) * 2).min(records.len());
            assert!(
                records[sent_so_far..].iter().all(|r| r.revision > *point),
                "chunk {i}: every record at or below {point} was sent"
            );
        }
        // Distinct revisions: each chunk's last record's, as before.
        let distinct: Vec<Record> = (1..=5).map(|r| user(&format!("d{r}"), "btc", r)).collect();
        assert_eq!(resume_points(&distinct, 2, 0, 7), vec![2, 4, 7]);
        // A group larger than a chunk right at the start keeps the previous resume point.
        let group: Vec<Record> = (0..5).map(|i| user(&format!("g{i}"), "btc", 3)).collect();
        assert_eq!(resume_points(&group, 2, 2, 3), vec![2, 2, 3]);
        assert_eq!(resume_points(&[], 2, 4, 4), vec![4]);
    }

    /// The broadcast capacity of the index, which the test must overflow.
    const BROADCAST_TEST_BATCHES: u64 = 1024;
}
