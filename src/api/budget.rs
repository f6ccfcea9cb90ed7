//! The daemon's one budget of requests in flight, `max_concurrent_requests`.
//!
//! A unary request takes a permit in [`BudgetLayer`] before its handler runs and gives it
//! back when its response is ready; a Pipeline stream takes one for each operation it
//! carries, for as long as the operation runs (its durability wait included), from the same
//! semaphore. With no permit left a request or an operation is answered `RESOURCE_EXHAUSTED`
//! at once and counted as shed: queueing would only add latency to an overloaded daemon.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::Status;
use tower::{Layer, Service};

use crate::observe::grpc::EdgeMetrics;

/// `max_concurrent_requests` permits, shared by every request and pipelined operation.
#[derive(Clone)]
pub(crate) struct Budget {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Budget {
    /// A budget of `max` requests in flight.
    pub(crate) fn new(max: usize) -> Self {
        Budget {
            permits: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
        }
    }

    /// A permit, or `None` when `max_concurrent_requests` are in flight.
    pub(crate) fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// The answer to a request or operation that found no permit.
    pub(crate) fn exhausted(&self) -> Status {
        Status::resource_exhausted(format!(
            "max_concurrent_requests ({}) requests are in flight; retry later",
            self.max
        ))
    }

    /// The tower layer that makes every request take a permit, counting the ones shed.
    pub(crate) fn layer(&self, metrics: Arc<EdgeMetrics>) -> BudgetLayer {
        BudgetLayer {
            budget: self.clone(),
            metrics,
        }
    }
}

/// Makes each request take a permit of the [`Budget`] before it reaches the router.
#[derive(Clone)]
pub(crate) struct BudgetLayer {
    budget: Budget,
    metrics: Arc<EdgeMetrics>,
}

impl<S> Layer<S> for BudgetLayer {
    type Service = BudgetService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BudgetService {
            inner,
            budget: self.budget.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`BudgetLayer`] wraps around the router.
#[derive(Clone)]
pub(crate) struct BudgetService<S> {
    inner: S,
    budget: Budget,
    metrics: Arc<EdgeMetrics>,
}

impl<S, B> Service<http::Request<B>> for BudgetService<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BudgetFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.budget.try_take() {
            Some(permit) => BudgetFuture::Admitted {
                inner: self.inner.call(req),
                permit: Some(permit),
            },
            None => {
                self.metrics.shed_request(req.uri().path());
                BudgetFuture::Shed {
                    response: Some(self.budget.exhausted().into_http()),
                }
            }
        }
    }
}

pin_project! {
    /// The handler's response future holding its permit, or the refusal of a shed request.
    // pin_project_lite takes no docs on variant fields; the variants' docs say what they hold.
    #[allow(missing_docs)]
    #[project = BudgetProj]
    pub(crate) enum BudgetFuture<F> {
        /// Admitted: the permit is given back when the response (its headers) is ready. A
        /// stream's body runs on without it; its operations take their own.
        Admitted { #[pin] inner: F, permit: Option<OwnedSemaphorePermit> },
        /// Shed.
        Shed { response: Option<http::Response<Body>> },
    }
}

impl<F, E> Future for BudgetFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BudgetProj::Admitted { inner, permit } => {
                let out = std::task::ready!(inner.poll(cx));
                permit.take();
                Poll::Ready(out)
            }
            BudgetProj::Shed { response } => {
                Poll::Ready(Ok(response.take().expect("a shed response is polled once")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permit_is_taken_until_dropped_and_none_is_left_past_max() {
        let budget = Budget::new(2);
        let a = budget.try_take().unwrap();
        let _b = budget.try_take().unwrap();
        assert!(budget.try_take().is_none());
        drop(a);
        assert!(budget.try_take().is_some());
        let e = budget.exhausted();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("max_concurrent_requests (2)"));
    }
}
