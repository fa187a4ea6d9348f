//! The bounds of the control service's servers (issue 13, "bounded servers"): what one client,
//! or all of them together, may hold of the gRPC server and the HTTP listener. Read from the
//! configuration ([`crate::config::ControlConfig::server_limits`]); the defaults are argued on
//! each constant.

use std::time::Duration;

use switchyard_initializer::http_server::HttpLimits;

use crate::grpc::proxy_control::{DEFAULT_MAX_WATCH_STREAMS, DEFAULT_WATCH_BUFFER_BYTES};

/// Every bound of the control service's listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// gRPC calls being handled at once over all connections (`GrpcMaxConcurrentRequests`); one
    /// more is refused at once with RESOURCE_EXHAUSTED. A call counts until its answer starts,
    /// so a WatchSwitches stream counts only while it is being set up.
    pub grpc_max_concurrent_requests: usize,
    /// gRPC calls handled at once per connection (`GrpcMaxConcurrentRequestsPerConnection`);
    /// more wait for their turn.
    pub grpc_max_concurrent_requests_per_connection: usize,
    /// How long a unary gRPC call may take, reading its request included
    /// (`GrpcRequestTimeoutSeconds`); it then fails with CANCELLED. A shorter `grpc-timeout`
    /// sent by the client wins. Streams are not cut: it bounds only their setup.
    pub grpc_request_timeout: Duration,
    /// WatchSwitches streams open at once (`MaxWatchStreams`).
    pub max_watch_streams: usize,
    /// Bytes of messages buffered for one watcher that does not read (`WatchBufferBytes`).
    pub watch_buffer_bytes: usize,
    /// The HTTP listener's (`ListenAddr`) timeouts and connection limit.
    pub http: HttpLimits,
    /// Users per answer of the user-list API (`UserListAPIPageSize`).
    pub user_list_page_size: usize,
}

impl ServerLimits {
    /// Default of `GrpcMaxConcurrentRequests`: each SwitcherAdmin call may carry up to 32 MiB,
    /// so 256 bounds the memory of requests in flight to a few GiB in the worst case, while a
    /// fleet's legitimate load (lease renewals every few seconds per proxy, at most 64 user
    /// lookups in flight, a few admin calls) stays far below it.
    pub const DEFAULT_GRPC_MAX_CONCURRENT_REQUESTS: usize = 256;
    /// Default of `GrpcMaxConcurrentRequestsPerConnection`: one proxy or admin client cannot
    /// take more than a quarter of the global limit.
    pub const DEFAULT_GRPC_MAX_CONCURRENT_REQUESTS_PER_CONNECTION: usize = 64;
    /// Default of `GrpcRequestTimeoutSeconds`: the slowest legitimate unary call is a
    /// 10,000-user SwitchCoins on ZooKeeper (several requests of up to ZKRequestTimeoutSeconds,
    /// 10 s each); 60 s leaves room for it and still frees a stuck call's slot.
    pub const DEFAULT_GRPC_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default of `UserListAPIPageSize`: [`switchyard_initializer::api::DEFAULT_PAGE_SIZE`].
    pub const DEFAULT_USER_LIST_PAGE_SIZE: usize = switchyard_initializer::api::DEFAULT_PAGE_SIZE;
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            grpc_max_concurrent_requests: Self::DEFAULT_GRPC_MAX_CONCURRENT_REQUESTS,
            grpc_max_concurrent_requests_per_connection:
                Self::DEFAULT_GRPC_MAX_CONCURRENT_REQUESTS_PER_CONNECTION,
            grpc_request_timeout: Self::DEFAULT_GRPC_REQUEST_TIMEOUT,
            max_watch_streams: DEFAULT_MAX_WATCH_STREAMS,
            watch_buffer_bytes: DEFAULT_WATCH_BUFFER_BYTES,
            http: HttpLimits::default(),
            user_list_page_size: Self::DEFAULT_USER_LIST_PAGE_SIZE,
        }
    }
}
