//! One Pipeline stream, shared by every call on its connection: each request goes out with
//! an id of its own, and a reader task hands each response to the call waiting on that id.
//!
//! At most `max_in_flight` requests are in flight on a stream at once: a call past that
//! waits for a place (within its deadline). The server stops reading requests while the
//! client is not reading responses, so this bound is what keeps a slow server from making
//! the client queue without limit.
//!
//! A call whose deadline passes unregisters its id, so its late response is dropped. When
//! the stream ends, every call still waiting learns it with [`Ended`], which says whether
//! the server promised that none of them was applied (its drain on shutdown).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::LEADER_HEADER;
use crate::{wire, WireStub};
use wire::pipeline_request::Op;
use wire::pipeline_response::Result as Outcome;

/// How a stream ended for the calls still waiting on it.
#[derive(Debug, Clone)]
pub(crate) struct Ended {
    /// The server said none of them was applied (it ended the stream on shutdown).
    pub(crate) unapplied: bool,
    /// Why, for the error message.
    pub(crate) why: String,
}

/// Why a pipelined call has no result.
pub(crate) enum Failed {
    /// The request never left: the stream had ended. It comes back, to be sent elsewhere.
    NotSent(Op),
    /// The stream ended with the request in flight.
    InFlight(Ended),
}

/// The calls waiting on a stream, and whether it has ended.
struct Waiting {
    calls: HashMap<u64, oneshot::Sender<Result<Outcome, Ended>>>,
    ended: Option<Ended>,
    /// The request side, dropped when the stream ends: a server that drains on shutdown
    /// reads the request side until the client closes it, so closing it at once lets that
    /// server finish without waiting out its linger.
    requests: Option<mpsc::Sender<wire::PipelineRequest>>,
}

/// A Pipeline stream: requests go in with fresh ids; a reader task hands each response to
/// the call waiting on that id.
pub(crate) struct Pipe {
    waiting: Arc<Mutex<Waiting>>,
    open: Arc<AtomicBool>,
    places: Semaphore,
    next_id: AtomicU64,
}

impl Pipe {
    /// Opens a stream on `stub`'s connection; with the leader its response headers name.
    pub(crate) async fn open(
        mut stub: WireStub,
        max_in_flight: usize,
    ) -> Result<(Pipe, Option<String>), Status> {
        let (requests, rx) = mpsc::channel(max_in_flight);
        let response = stub.pipeline(ReceiverStream::new(rx)).await?;
        let leader = response
            .metadata()
            .get(LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut responses = response.into_inner();
        let waiting = Arc::new(Mutex::new(Waiting {
            calls: HashMap::new(),
            ended: None,
            requests: Some(requests),
        }));
        let open = Arc::new(AtomicBool::new(true));
        let (w, o) = (waiting.clone(), open.clone());
        tokio::spawn(async move {
            let ended = loop {
                match responses.message().await {
                    Ok(Some(r)) => {
                        // No waiter: its deadline passed, and the late response is dropped.
                        let waiter = w.lock().unwrap().calls.remove(&r.id);
                        if let Some(waiter) = waiter {
                            let outcome = r.result.unwrap_or_else(|| {
                                Outcome::Error(wire::Error {
                                    code: Code::Internal as i32,
                                    message: "a Pipeline response without a result".into(),
                                    current_version: None,
                                })
                            });
                            let _ = waiter.send(Ok(outcome));
                        }
                    }
                    Ok(None) => {
                        break Ended {
                            unapplied: false,
                            why: "the Pipeline stream ended".into(),
                        }
                    }
                    Err(status) => {
                        break Ended {
                            // The server's drain: "requests without a response were not
                            // applied" (the Pipeline contract in session_store.proto).
                            unapplied: status.code() == Code::Unavailable
                                && status.message() == "shutting down",
                            why: format!("{:?}: {}", status.code(), status.message()),
                        };
                    }
                }
            };
            o.store(false, Ordering::Release);
            let calls = {
                let mut w = w.lock().unwrap();
                w.ended = Some(ended.clone());
                w.requests = None;
                std::mem::take(&mut w.calls)
            };
            for (_, waiter) in calls {
                let _ = waiter.send(Err(ended.clone()));
            }
        });
        let pipe = Pipe {
            waiting,
            open,
            places: Semaphore::new(max_in_flight),
            next_id: AtomicU64::new(0),
        };
        Ok((pipe, leader))
    }

    /// Whether the stream still takes calls.
    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Sends `op` and waits for its response.
    pub(crate) async fn call(&self, op: Op) -> Result<Outcome, Failed> {
        // Never closed: the semaphore lives as long as the stream.
        let _place = self.places.acquire().await;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let requests = {
            let mut waiting = self.waiting.lock().unwrap();
            let Some(requests) = waiting.requests.clone() else {
                return Err(Failed::NotSent(op));
            };
            waiting.calls.insert(id, tx);
            requests
        };
        // Unregisters the id however the call ends (its deadline passing drops it).
        let _registered = Registered {
            waiting: &self.waiting,
            id,
        };
        let request = wire::PipelineRequest { id, op: Some(op) };
        let sent = requests.send(request).await;
        // Only the waiting map holds the request side between calls (see `Waiting`).
        drop(requests);
        if let Err(mpsc::error::SendError(request)) = sent {
            let op = request.op.expect("the op was set above");
            return Err(Failed::NotSent(op));
        }
        match rx.await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(ended)) => Err(Failed::InFlight(ended)),
            Err(_) => Err(Failed::InFlight(Ended {
                unapplied: false,
                why: "the Pipeline stream's reader stopped".into(),
            })),
        }
    }
}

/// A call's id in the waiting map, removed when the call ends.
struct Registered<'a> {
    waiting: &'a Mutex<Waiting>,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.waiting.lock().unwrap().calls.remove(&self.id);
    }
}
