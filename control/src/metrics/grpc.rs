//! gRPC requests by method and code, and their duration: a tower layer in front of the tonic
//! server's services ([`GrpcMetricsLayer`]).
//!
//! - The method label is the method's name (`SwitchCoins`) for the services this server offers;
//!   any other path is `unknown`, so a client cannot grow the label set.
//! - The code is the gRPC status name (`OK`, `InvalidArgument`, ...): from the response headers
//!   when the answer is trailers-only (every error tonic produces), else from the trailers when
//!   the body ends. A call that ends without a status (the client went away, the request
//!   deadline cut it) counts as `Cancelled`, as tonic answers it; a call the load shedder
//!   refused as `ResourceExhausted`.
//! - The duration runs from the request to its answer's headers: the whole call for a unary
//!   call (tonic runs the handler before it answers), the time to the first answer for a
//!   stream.
//!
//! Series are resolved once per method and (method, code), then incremented without a lookup.

use std::{
    future::Future,
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll},
    time::Instant,
};

use axum::{body::Bytes, http};
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use tonic::Code;
use tower::{Layer, Service};

use super::{ControlMetrics, latency_histogram};

/// The methods this server offers, by path, and their label.
const METHODS: [(&str, &str); 16] = [
    ("/switchyard.v1.SwitcherAdmin/SwitchCoin", "SwitchCoin"),
    ("/switchyard.v1.SwitcherAdmin/SwitchCoins", "SwitchCoins"),
    ("/switchyard.v1.SwitcherAdmin/GetUserCoin", "GetUserCoin"),
    (
        "/switchyard.v1.SwitcherAdmin/ListUserCoins",
        "ListUserCoins",
    ),
    ("/switchyard.v1.SwitcherAdmin/ListProxies", "ListProxies"),
    (
        "/switchyard.v1.SwitcherAdmin/IngestUserList",
        "IngestUserList",
    ),
    ("/switchyard.v1.ProxyControl/WatchSwitches", "WatchSwitches"),
    (
        "/switchyard.v1.ProxyControl/AcquireServerId",
        "AcquireServerId",
    ),
    ("/switchyard.v1.ProxyControl/RenewServerId", "RenewServerId"),
    (
        "/switchyard.v1.ProxyControl/ReleaseServerId",
        "ReleaseServerId",
    ),
    ("/switchyard.v1.ProxyControl/LookupUser", "LookupUser"),
    (
        "/switchyard.v1.ProxyControl/RequestUserRegistration",
        "RequestUserRegistration",
    ),
    ("/grpc.health.v1.Health/Check", "Check"),
    ("/grpc.health.v1.Health/Watch", "Watch"),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "ServerReflectionInfo",
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "ServerReflectionInfo",
    ),
];

/// The label of a path not in [`METHODS`].
const UNKNOWN_METHOD: &str = "unknown";

/// Label slots: one per entry of [`METHODS`], then `unknown`.
const METHOD_SLOTS: usize = METHODS.len() + 1;

/// The gRPC status codes' names, by code number (the label values).
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The label value of a status code.
pub fn code_name(code: Code) -> &'static str {
    CODE_NAMES.get(code as usize).copied().unwrap_or("Unknown")
}

fn method_slot(path: &str) -> usize {
    METHODS
        .iter()
        .position(|(p, _)| *p == path)
        .unwrap_or(METHODS.len())
}

fn method_label(slot: usize) -> &'static str {
    METHODS.get(slot).map_or(UNKNOWN_METHOD, |(_, label)| label)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

/// The gRPC families and their resolved series.
#[derive(Debug)]
pub(super) struct GrpcFamilies {
    requests: Family<RequestLabels, Counter>,
    durations: Family<MethodLabels, Histogram, fn() -> Histogram>,
    /// `[method slot][code]`, resolved on first use.
    request_series: Vec<[OnceLock<Counter>; 17]>,
    /// By method slot, resolved on first use.
    duration_series: Vec<OnceLock<Histogram>>,
}

impl GrpcFamilies {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "switchyard_control_grpc_requests",
            "gRPC requests by method and status code",
            requests.clone(),
        );
        let durations = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "switchyard_control_grpc_request_duration_seconds",
            "gRPC request duration by method: the whole call for unary calls, the time to the first answer for streams",
            durations.clone(),
        );
        Self {
            requests,
            durations,
            request_series: (0..METHOD_SLOTS)
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect(),
            duration_series: (0..METHOD_SLOTS).map(|_| OnceLock::new()).collect(),
        }
    }

    fn count(&self, slot: usize, code: Code) {
        let code_index = (code as usize).min(CODE_NAMES.len() - 1);
        let Some(series) = self
            .request_series
            .get(slot)
            .and_then(|codes| codes.get(code_index))
        else {
            return;
        };
        series
            .get_or_init(|| {
                self.requests.get_or_create_owned(&RequestLabels {
                    method: method_label(slot),
                    code: code_name(code),
                })
            })
            .inc();
    }

    fn observe(&self, slot: usize, seconds: f64) {
        let Some(series) = self.duration_series.get(slot) else {
            return;
        };
        series
            .get_or_init(|| {
                self.durations.get_or_create_owned(&MethodLabels {
                    method: method_label(slot),
                })
            })
            .observe(seconds);
    }
}

/// Counts and times every gRPC request of the services it wraps; see the module doc.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    metrics: ControlMetrics,
}

impl GrpcMetricsLayer {
    pub(super) fn new(metrics: ControlMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: ControlMetrics,
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The code of a call that failed as a service error (what tonic answers for it).
fn error_code(e: &BoxError) -> Code {
    if e.is::<tower::load_shed::error::Overloaded>() {
        Code::ResourceExhausted
    } else if let Some(status) = e.downcast_ref::<tonic::Status>() {
        status.code()
    } else {
        Code::Unknown
    }
}

fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

/// One call on its way: counted exactly once, as `Cancelled` when dropped before its status
/// is known.
#[derive(Debug)]
struct Call {
    metrics: ControlMetrics,
    slot: usize,
    start: Instant,
    answered: bool,
    counted: bool,
}

impl Call {
    fn answered(&mut self) {
        if !self.answered {
            self.answered = true;
            self.metrics
                .grpc()
                .observe(self.slot, self.start.elapsed().as_secs_f64());
        }
    }

    fn finish(&mut self, code: Code) {
        self.answered();
        if !self.counted {
            self.counted = true;
            self.metrics.grpc().count(self.slot, code);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResBody: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let mut call = Call {
            metrics: self.metrics.clone(),
            slot: method_slot(request.uri().path()),
            start: Instant::now(),
            answered: false,
            counted: false,
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            match answer.await {
                Ok(response) => {
                    call.answered();
                    if let Some(code) = status_in(response.headers()) {
                        // Trailers-only: the status is in the headers.
                        call.finish(code);
                        return Ok(response.map(tonic::body::Body::new));
                    }
                    Ok(response.map(|body| tonic::body::Body::new(Watched { body, call })))
                }
                Err(e) => {
                    let e = e.into();
                    call.finish(error_code(&e));
                    Err(e)
                }
            }
        })
    }
}

/// A response body that counts its call when the trailers carry the status.
struct Watched<B> {
    body: B,
    call: Call,
}

impl<B> HttpBody for Watched<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_in) {
                    this.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.call.finish(Code::Internal),
            // Ended without a status: counted as cancelled when dropped.
            Poll::Ready(None) | Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_their_grpc_names() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::InvalidArgument), "InvalidArgument");
        assert_eq!(code_name(Code::ResourceExhausted), "ResourceExhausted");
        assert_eq!(code_name(Code::Unauthenticated), "Unauthenticated");
        for (i, name) in CODE_NAMES.iter().enumerate() {
            let code = Code::from_i32(i32::try_from(i).expect("small"));
            assert_eq!(format!("{code:?}").to_lowercase(), name.to_lowercase());
        }
    }

    #[test]
    fn only_known_paths_name_their_method() {
        assert_eq!(
            method_label(method_slot("/switchyard.v1.SwitcherAdmin/SwitchCoins")),
            "SwitchCoins"
        );
        assert_eq!(
            method_label(method_slot("/switchyard.v1.SwitcherAdmin/Whatever")),
            UNKNOWN_METHOD
        );
        assert_eq!(method_label(method_slot("/x")), UNKNOWN_METHOD);
    }

    /// Every method of the services in the proto's descriptor set has its own label.
    #[test]
    fn every_proto_method_is_known() {
        use prost::Message;

        #[derive(Clone, PartialEq, Message)]
        struct FileDescriptorSet {
            #[prost(message, repeated, tag = "1")]
            file: Vec<FileDescriptorProto>,
        }
        #[derive(Clone, PartialEq, Message)]
        struct FileDescriptorProto {
            #[prost(string, tag = "2")]
            package: String,
            #[prost(message, repeated, tag = "6")]
            service: Vec<ServiceDescriptorProto>,
        }
        #[derive(Clone, PartialEq, Message)]
        struct ServiceDescriptorProto {
            #[prost(string, tag = "1")]
            name: String,
            #[prost(message, repeated, tag = "2")]
            method: Vec<MethodDescriptorProto>,
        }
        #[derive(Clone, PartialEq, Message)]
        struct MethodDescriptorProto {
            #[prost(string, tag = "1")]
            name: String,
        }

        let set = FileDescriptorSet::decode(switchyard_proto::FILE_DESCRIPTOR_SET)
            .expect("the descriptor set decodes");
        let mut seen = 0;
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{}.{}/{}", file.package, service.name, method.name);
                    assert_eq!(method_label(method_slot(&path)), method.name, "{path}");
                    seen += 1;
                }
            }
        }
        assert_eq!(seen, 12, "SwitcherAdmin and ProxyControl");
    }
}
