//! The ADS gRPC service, routed by hand instead of through the generated
//! `AggregatedDiscoveryServiceServer`.
//!
//! Purpose: per-stream memory. Every connected proxy holds one ADS stream
//! for as long as it lives, so what a stream costs at rest is multiplied by
//! the fleet. The generated server uses the default codec buffers (8 KiB
//! to encode and 8 KiB to decode, per stream, allocated up front) and a
//! response channel whose blocks hold 32 whole responses; xDS messages on a
//! scoped stream are a few KiB, so this service starts its buffers small
//! (they grow for a large message) and sends boxed responses.
//!
//! Contract: the same gRPC methods, paths and limits as the generated
//! server: `StreamAggregatedResources` (state of the world) and
//! `DeltaAggregatedResources` (incremental); plus the CA's unary
//! `meshwork.ca.v1.CertificateService/Sign` (docs/identity.md), decided by
//! [`crate::ca::Authority::sign`] with the caller's transport and client
//! certificate from [`super::PeerInfo`]; any other path answers
//! `UNIMPLEMENTED`. Requests larger than `max_request` are refused by the
//! codec (the stream then ends with a clear error, see `stream`).

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use identity::wire::{SignRequest, SignResponse, SIGN_PATH};
use tokio::sync::mpsc;
use tonic::codec::{BufferSettings, Codec};
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Status, Streaming};
use tonic_prost::{ProstDecoder, ProstEncoder};

use super::{stream, Shared};

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Initial size of a stream's encode and decode buffers. A scoped proxy's
/// responses are a few KiB; larger ones grow the buffer as needed.
const BUFFER: usize = 1024;
/// tonic's default: how much is encoded before yielding to the runtime.
const YIELD_THRESHOLD: usize = 32 * 1024;
/// Responses queued per stream before the stream waits for the client.
const QUEUE: usize = 4;
/// Largest Sign request: a CSR is about a kilobyte (RSA 8192: a few).
const MAX_SIGN_REQUEST: usize = 64 * 1024;

/// One queued response (boxed: the channel's blocks hold 32 slots whatever
/// its capacity, and a response with a `Status` is a few hundred bytes).
pub(crate) type Queued<T> = Box<Result<T, Status>>;

/// The ADS service, cheap to clone (clones share the server state).
#[derive(Clone)]
pub(crate) struct Ads {
    shared: Arc<Shared>,
    max_request: usize,
}

impl Ads {
    pub(crate) fn new(shared: Arc<Shared>, max_request: usize) -> Ads {
        Ads {
            shared,
            max_request,
        }
    }

    fn grpc<T, U>(&self) -> Grpc<SmallCodec<T, U>>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        Grpc::new(SmallCodec(PhantomData)).apply_max_message_size_config(
            Some(self.max_request),
            // Responses: no limit beyond what the client accepts.
            None,
        )
    }
}

impl NamedService for Ads {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<B> tower::Service<http::Request<B>> for Ads
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ads = self.clone();
        match req.uri().path() {
            SOTW_PATH => Box::pin(async move {
                let mut grpc = ads.grpc::<DiscoveryResponse, DiscoveryRequest>();
                Ok(grpc.streaming(Sotw(ads.shared), req).await)
            }),
            DELTA_PATH => Box::pin(async move {
                let mut grpc = ads.grpc::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>();
                Ok(grpc.streaming(Delta(ads.shared), req).await)
            }),
            SIGN_PATH => Box::pin(async move {
                let mut grpc = Grpc::new(SmallCodec::<SignResponse, SignRequest>(PhantomData))
                    .apply_max_message_size_config(Some(MAX_SIGN_REQUEST), None);
                Ok(grpc.unary(Sign(ads.shared), req).await)
            }),
            other => {
                let status = Status::unimplemented(format!(
                    "unknown method {other}: this server serves {SOTW_PATH}, {DELTA_PATH} and {SIGN_PATH}"
                ));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The SPIFFE id of the client certificate the stream's connection
/// presented (mTLS xDS), if any.
fn peer_id<T>(request: &tonic::Request<T>) -> Option<identity::SpiffeId> {
    let chain = request
        .extensions()
        .get::<super::PeerInfo>()?
        .chain
        .clone()?;
    identity::tls::peer_identity_of(&chain)
}

/// The state-of-the-world method.
struct Sotw(Arc<Shared>);

impl StreamingService<DiscoveryRequest> for Sotw {
    type Response = DiscoveryResponse;
    type ResponseStream = Responses<DiscoveryResponse>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let (tx, rx) = mpsc::channel(QUEUE);
        let peer = peer_id(&request);
        tokio::spawn(stream::run_sotw(
            self.0.clone(),
            request.into_inner(),
            tx,
            peer,
        ));
        Box::pin(async move { Ok(tonic::Response::new(Responses(rx))) })
    }
}

/// The incremental method.
struct Delta(Arc<Shared>);

impl StreamingService<DeltaDiscoveryRequest> for Delta {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = Responses<DeltaDiscoveryResponse>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let (tx, rx) = mpsc::channel(QUEUE);
        let peer = peer_id(&request);
        tokio::spawn(stream::run_delta(
            self.0.clone(),
            request.into_inner(),
            tx,
            peer,
        ));
        Box::pin(async move { Ok(tonic::Response::new(Responses(rx))) })
    }
}

/// The CA's Sign method.
struct Sign(Arc<Shared>);

impl UnaryService<SignRequest> for Sign {
    type Response = SignResponse;
    type Future = BoxFuture<tonic::Response<SignResponse>, Status>;

    fn call(&mut self, request: tonic::Request<SignRequest>) -> Self::Future {
        let ca = self.0.ca.get().cloned();
        Box::pin(async move {
            let Some(ca) = ca else {
                return Err(Status::unimplemented(
                    "this control plane runs without a CA; start `meshwork control` with its CA enabled",
                ));
            };
            let peer = request.extensions().get::<super::PeerInfo>().cloned();
            // `Bearer <token>`; anything else is passed on whole, to be
            // refused as a malformed token.
            let token = request.metadata().get("authorization").map(|v| {
                let v = v.to_str().unwrap_or("").trim();
                v.strip_prefix("Bearer ").unwrap_or(v).trim().to_string()
            });
            let body = request.into_inner();
            let decided = tokio::task::spawn_blocking(move || {
                let chain = peer.as_ref().and_then(|p| p.chain.clone());
                let creds = crate::ca::Credentials {
                    tls: peer.as_ref().is_some_and(|p| p.tls),
                    token: token.as_deref(),
                    peer_chain: chain.as_deref().map(Vec::as_slice),
                };
                ca.sign(&body, &creds)
            })
            .await;
            match decided {
                Ok(Ok(r)) => Ok(tonic::Response::new(r)),
                Ok(Err(refusal)) => Err(Status::new(refusal.code, refusal.message)),
                Err(e) => Err(Status::internal(format!("signing failed: {e}"))),
            }
        })
    }
}

/// The responses a stream task queues, unboxed for tonic.
pub(crate) struct Responses<T>(mpsc::Receiver<Queued<T>>);

impl<T> tokio_stream::Stream for Responses<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| *b))
    }
}

/// tonic's prost codec with small initial buffers.
struct SmallCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Codec for SmallCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }
}
