//! API requests: decodes a `sessiond.v1` request message and runs it through the real gRPC
//! handler (`SessionStoreService`, so the same operations, `convert` and `Store` code a server
//! runs) as one tenant, whose in-process Store has a manual clock and no log.
//!
//! Input: the first byte picks the message (low 4 bits) and the Store setup (bit 4: tight
//! limits, bit 5: evict-oldest per-user policy); the rest is the protobuf encoding. For
//! `Pipeline` the rest is a sequence of length-delimited `PipelineRequest`s, applied in order,
//! each moving the clock forward by its `id` (mod 4 h) in milliseconds, with a reaper step
//! after each.
//!
//! The tenant's Store shares its memory pool with a neighbour tenant's Store holding two
//! sessions. Every run starts with three sessions (two for user "alice", one anonymous). An ID field
//! of the form `@N` stands for the N-th (mod count) session ID handed out so far in the run,
//! so inputs can reach live sessions.
//!
//! Checked: no panic; every error is one of the codes the API promises; every session handed
//! out is live and self-consistent; each call did what it says (Update's attribute algebra and
//! compare-and-set, Regenerate kills the old ID, failed calls change nothing, the user index
//! lists exactly the user's live sessions); and once everything has expired and been reaped,
//! the Store's session, byte and user counts and its expiry wheel are back to zero, and the
//! shared pool holds exactly the neighbour's bytes (whose sessions nothing here may touch).
#![no_main]

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sessiond::api::pb::pipeline_request::Op;
use sessiond::api::serve::session_store_server::SessionStore;
use sessiond::api::{pb, serve, SessionStoreService};
use sessiond::clock::Clock;
use sessiond::observe::GuessMetrics;
use sessiond::session::{ClientInfo, Millis, SessionKey};
use sessiond::store::events::Discard;
use sessiond::store::{Limits, MemoryPool, NewSession, PerUserPolicy, Stats, Store};
use sessiond::tenant::guessing::GuessWatch;
use sessiond::tenant::Tenant;
use tonic::{Code, Request, Response, Status};

/// Where the manual clock starts: a plausible wall-clock time.
const START: Millis = 1_700_000_000_000;
/// `max_batch_ids` of the service: small, so GetMany's limit is reachable.
const MAX_BATCH_IDS: usize = 16;
/// Pipeline requests applied per input.
const MAX_PIPELINE_OPS: usize = 64;
/// The most one pipeline request moves the clock.
const MAX_STEP_MS: u64 = 4 * 3600 * 1000;
/// Past every deadline a run can set (the longest absolute timeout is 90 days).
const FOREVER: Duration = Duration::from_secs(100 * 24 * 3600);

const TIGHT_LIMITS: u8 = 1;
const EVICT_OLDEST: u8 = 2;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let mut h = Harness::new(selector >> 4);
    match selector & 0x0f {
        0 => h.run_decoded(body, Op::Create),
        1 => h.run_decoded(body, Op::Get),
        2 => h.run_decoded(body, Op::Touch),
        3 => h.run_decoded(body, Op::Update),
        4 => h.run_decoded(body, Op::Regenerate),
        5 => h.run_decoded(body, Op::Destroy),
        6 => h.run_decoded(body, Op::ListUserSessions),
        7 => h.run_decoded(body, Op::DestroyUserSessions),
        8 => {
            if let Ok(r) = pb::GetManyRequest::decode(body) {
                h.get_many(r);
            }
        }
        9 => h.pipeline(body),
        _ => return,
    }
    h.finish();
});

struct Harness {
    store: Store,
    /// Another tenant's store in the same memory pool.
    neighbour: Store,
    pool: Arc<MemoryPool>,
    clock: Clock,
    service: SessionStoreService,
    /// Who every request is (the transport's auth layer puts it in the request).
    tenant: Arc<Tenant>,
    /// Every session ID handed out in this run, oldest first: the targets of `@N`.
    ids: Vec<String>,
}

impl Harness {
    fn new(flags: u8) -> Self {
        let mut limits = Limits::default();
        if flags & TIGHT_LIMITS != 0 {
            limits = Limits {
                max_attributes: 4,
                max_key_bytes: 16,
                max_value_bytes: 64,
                max_session_bytes: 512,
                max_user_id_bytes: 16,
                max_client_info_bytes: 64,
                max_sessions_per_user: 2,
                max_sessions: 12,
                max_memory_bytes: 1536,
                create_rate: 1,
                create_burst: 6,
                ..limits
            };
        }
        if flags & EVICT_OLDEST != 0 {
            limits.per_user_policy = PerUserPolicy::EvictOldest;
        }
        let clock = Clock::manual(START);
        // Tight: the pool, not only the store's own cap, runs out. Two tenants share it: the
        // store under test and a neighbour holding sessions of its own.
        let pool = MemoryPool::shared(
            if flags & TIGHT_LIMITS != 0 {
                2048
            } else {
                limits.max_memory_bytes
            },
            2,
        );
        let store = Store::in_pool(
            limits.clone(),
            4,
            clock.clone(),
            Box::new(Discard),
            0,
            pool.clone(),
        );
        let neighbour =
            Store::in_pool(limits, 2, clock.clone(), Box::new(Discard), 0, pool.clone());
        for user in ["alice", ""] {
            neighbour
                .create(NewSession {
                    user: Some(user.into()),
                    ..NewSession::default()
                })
                .expect("neighbour session");
        }
        let guesses = GuessWatch::new(u32::MAX, Duration::from_secs(60), GuessMetrics::noop());
        let tenant = Tenant::new("fuzz", store.clone(), guesses, None);
        let mut h = Harness {
            store,
            neighbour,
            pool,
            clock,
            service: SessionStoreService::new(MAX_BATCH_IDS),
            tenant,
            ids: Vec::new(),
        };
        h.seed(Some("alice"), &[("cart", b"apple")]);
        h.seed(Some("alice"), &[]);
        h.seed(None, &[("theme", b"dark")]);
        h
    }

    fn seed(&mut self, user: Option<&str>, attributes: &[(&str, &[u8])]) {
        let s = self
            .store
            .create(NewSession {
                user: user.map(str::to_owned),
                attributes: attributes
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), Bytes::copy_from_slice(v)))
                    .collect(),
                client: ClientInfo {
                    ip: "192.0.2.1".into(),
                    user_agent: "fuzz".into(),
                },
                ..NewSession::default()
            })
            .expect("seed session");
        self.ids.push(s.key.encode());
    }

    /// `@N` -> the N-th session ID of the run (mod their count); anything else unchanged.
    fn resolve(&self, id: String) -> String {
        match id.strip_prefix('@') {
            Some(n) if n.is_empty() || n.bytes().all(|b| b.is_ascii_digit()) => {
                let n: usize = n.parse().unwrap_or(0);
                self.ids[n % self.ids.len()].clone()
            }
            _ => id,
        }
    }

    /// A request from the run's tenant.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        req.extensions_mut().insert(self.tenant.clone());
        req
    }

    /// The session under `id` as the wire would show it, read without sliding anything.
    fn peek(&self, id: &str) -> Option<pb::Session> {
        self.store
            .get(id, true)
            .ok()
            .map(|s| wire(&serve::Session::from(s)))
    }

    /// IDs of `user`'s live sessions, from the run's own record of every ID handed out.
    fn live_of(&self, user: &str) -> BTreeSet<String> {
        self.ids
            .iter()
            .filter_map(|id| self.peek(id))
            .filter(|s| s.user_id == user)
            .map(|s| s.id)
            .collect()
    }

    fn run_decoded<M: Message + Default>(&mut self, body: &[u8], op: fn(M) -> Op) {
        if let Ok(r) = M::decode(body) {
            self.run(op(r));
        }
    }

    fn run(&mut self, op: Op) {
        match op {
            Op::Create(r) => self.create(r),
            Op::Get(mut r) => {
                r.id = self.resolve(r.id);
                self.get(r);
            }
            Op::Touch(mut r) => {
                r.id = self.resolve(r.id);
                self.touch(r);
            }
            Op::Update(mut r) => {
                r.id = self.resolve(r.id);
                self.update(r);
            }
            Op::Regenerate(mut r) => {
                r.id = self.resolve(r.id);
                self.regenerate(r);
            }
            Op::Destroy(mut r) => {
                r.id = self.resolve(r.id);
                self.destroy(r);
            }
            Op::ListUserSessions(r) => self.list_user_sessions(r),
            Op::DestroyUserSessions(mut r) => {
                if !r.except_id.is_empty() {
                    r.except_id = self.resolve(r.except_id);
                }
                self.destroy_user_sessions(r);
            }
        }
    }

    fn create(&mut self, r: pb::CreateRequest) {
        let (user, attributes) = (r.user_id.clone(), r.attributes.clone());
        match decoded::<pb::Session>(call(self.service.create(self.request(r)))) {
            Ok(s) => {
                self.check_session(&s);
                assert_eq!(s.version, 1);
                assert_eq!(s.user_id, user);
                assert_eq!(s.attributes, attributes);
                self.ids.push(s.id);
            }
            Err(e) => self.check_status(&e),
        }
    }

    fn get(&mut self, r: pb::GetRequest) {
        let before = self.peek(&r.id);
        match decoded::<pb::Session>(call(self.service.get(self.request(r.clone())))) {
            Ok(s) => {
                self.check_session(&s);
                let b = before.expect("Get found a session a peek did not");
                assert_eq!(s.id, r.id);
                assert_eq!(s.version, b.version);
                assert_eq!(s.attributes, b.attributes);
            }
            Err(e) => {
                self.check_status(&e);
                assert!(before.is_none(), "Get failed on a live session: {e:?}");
            }
        }
    }

    fn touch(&mut self, r: pb::TouchRequest) {
        let before = self.peek(&r.id);
        match call(self.service.touch(self.request(r))) {
            Ok(t) => {
                assert!(before.is_some(), "Touch found a session a peek did not");
                assert!(millis(&t.expires_at) > i128::from(self.clock.now()));
            }
            Err(e) => {
                self.check_status(&e);
                assert!(before.is_none(), "Touch failed on a live session: {e:?}");
            }
        }
    }

    fn update(&mut self, r: pb::UpdateRequest) {
        let before = self.peek(&r.id);
        let (id, set, remove, expected_version) = (
            r.id.clone(),
            r.set.clone(),
            r.remove.clone(),
            r.expected_version,
        );
        match decoded::<pb::Session>(call(self.service.update(self.request(r)))) {
            Ok(s) => {
                self.check_session(&s);
                let b = before.expect("Update found a session a peek did not");
                assert!(expected_version.is_none_or(|v| v == b.version));
                assert_eq!(s.id, id);
                assert_eq!(s.version, b.version + 1);
                let mut attributes = b.attributes;
                for k in &remove {
                    attributes.remove(k);
                }
                attributes.extend(set);
                assert_eq!(s.attributes, attributes, "Update's result");
            }
            Err(e) => {
                self.check_status(&e);
                if e.code() == Code::Aborted {
                    let b = before.as_ref().expect("ABORTED without a session");
                    assert!(expected_version.is_some_and(|v| v != b.version));
                }
                // Atomic: a failed update leaves the session as it was (memory pressure may
                // have evicted it, which is allowed).
                if let (Some(b), Some(a)) = (before, self.peek(&id)) {
                    assert_eq!((a.version, a.attributes), (b.version, b.attributes));
                }
            }
        }
    }

    fn regenerate(&mut self, r: pb::RegenerateRequest) {
        let before = self.peek(&r.id);
        let (old, user, drop_attributes) = (r.id.clone(), r.user_id.clone(), r.drop_attributes);
        match decoded::<pb::Session>(call(self.service.regenerate(self.request(r)))) {
            Ok(s) => {
                self.check_session(&s);
                let b = before.expect("Regenerate found a session a peek did not");
                assert_ne!(s.id, old);
                assert!(self.peek(&old).is_none(), "the old ID survived Regenerate");
                assert_eq!(s.version, b.version + 1);
                let user = user.unwrap_or_else(|| b.user_id.clone());
                assert_eq!(s.user_id, user);
                if s.user_id == b.user_id {
                    assert_eq!(s.absolute_expires_at, b.absolute_expires_at);
                }
                if drop_attributes {
                    assert!(s.attributes.is_empty());
                } else {
                    assert_eq!(s.attributes, b.attributes);
                }
                self.ids.push(s.id);
            }
            Err(e) => {
                self.check_status(&e);
                let after = self.peek(&old);
                assert_eq!(
                    after.map(|s| s.version),
                    before.map(|s| s.version),
                    "a failed Regenerate changed the session"
                );
            }
        }
    }

    fn destroy(&mut self, r: pb::DestroyRequest) {
        let before = self.peek(&r.id);
        let id = r.id.clone();
        match call(self.service.destroy(self.request(r))) {
            Ok(d) => assert_eq!(d.existed, before.is_some()),
            Err(e) => {
                self.check_status(&e);
                assert!(before.is_none());
            }
        }
        assert!(self.peek(&id).is_none(), "a session survived Destroy");
    }

    fn list_user_sessions(&mut self, r: pb::ListUserSessionsRequest) {
        let (user, with_attributes) = (r.user_id.clone(), r.include_attributes);
        match decoded::<pb::ListUserSessionsResponse>(call(
            self.service.list_user_sessions(self.request(r)),
        )) {
            Ok(l) => {
                for s in &l.sessions {
                    self.check_session(s);
                    assert_eq!(s.user_id, user);
                    if !with_attributes {
                        assert!(s.attributes.is_empty());
                    }
                }
                assert!(l
                    .sessions
                    .windows(2)
                    .all(|w| millis(&w[0].created_at) <= millis(&w[1].created_at)));
                let listed: BTreeSet<String> = l.sessions.into_iter().map(|s| s.id).collect();
                assert_eq!(listed, self.live_of(&user), "the user index for {user:?}");
            }
            Err(e) => self.check_status(&e),
        }
    }

    fn destroy_user_sessions(&mut self, r: pb::DestroyUserSessionsRequest) {
        let (user, except) = (r.user_id.clone(), r.except_id.clone());
        let before = self.live_of(&user);
        match call(self.service.destroy_user_sessions(self.request(r))) {
            Ok(d) => {
                let after = self.live_of(&user);
                assert!(after.iter().all(|id| *id == except), "a session survived");
                assert_eq!(d.destroyed as usize, before.len() - after.len());
            }
            Err(e) => {
                self.check_status(&e);
                assert_eq!(self.live_of(&user), before);
            }
        }
    }

    fn get_many(&mut self, mut r: pb::GetManyRequest) {
        r.ids = r.ids.into_iter().map(|id| self.resolve(id)).collect();
        let ids = r.ids.clone();
        match decoded::<pb::GetManyResponse>(call(self.service.get_many(self.request(r)))) {
            Ok(m) => {
                assert!(ids.len() <= MAX_BATCH_IDS);
                assert_eq!(m.results.len(), ids.len());
                for (id, result) in ids.iter().zip(m.results) {
                    match result.result.expect("a GetResult with no result") {
                        pb::get_result::Result::Session(s) => {
                            self.check_session(&s);
                            assert_eq!(s.id, *id);
                        }
                        pb::get_result::Result::Error(e) => {
                            self.check_status(&Status::new(Code::from(e.code), e.message));
                        }
                    }
                }
            }
            Err(e) => {
                assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
                assert!(ids.len() > MAX_BATCH_IDS);
            }
        }
    }

    /// A pipeline stream: the same function per op as the unary calls, plus time passing and
    /// the reaper running between requests.
    fn pipeline(&mut self, mut body: &[u8]) {
        for _ in 0..MAX_PIPELINE_OPS {
            if body.is_empty() {
                break;
            }
            let Ok(req) = pb::PipelineRequest::decode_length_delimited(&mut body) else {
                break;
            };
            self.clock
                .advance(Duration::from_millis(req.id % MAX_STEP_MS));
            if let Some(op) = req.op {
                self.run(op);
            }
            self.store.reap(8);
        }
    }

    /// Every session handed out is live and self-consistent.
    fn check_session(&self, s: &pb::Session) {
        assert!(SessionKey::parse(&s.id).is_ok(), "a malformed session ID");
        assert!(s.version >= 1);
        let now = i128::from(self.clock.now());
        let created = millis(&s.created_at);
        let last = millis(&s.last_access_at);
        let expires = millis(&s.expires_at);
        let absolute = millis(&s.absolute_expires_at);
        let idle = s.idle_timeout.as_ref().expect("no idle_timeout");
        let idle = i128::from(idle.seconds) * 1000 + i128::from(idle.nanos) / 1_000_000;
        assert!(created <= last && last <= now, "{s:?}");
        assert_eq!(expires, (last + idle).min(absolute), "expires_at");
        assert!(
            now < expires,
            "a session handed out is already dead: now {now}, expires_at {expires}, \
             idle_timeout {idle} ms, absolute_expires_at {absolute}"
        );
    }

    /// Errors use only the codes the API documents, and never carry a session ID.
    fn check_status(&self, e: &Status) {
        assert!(
            matches!(
                e.code(),
                Code::InvalidArgument | Code::NotFound | Code::Aborted | Code::ResourceExhausted
            ),
            "a status outside the API's contract: {e:?}"
        );
        for id in &self.ids {
            assert!(!e.message().contains(id.as_str()), "an error echoes an ID");
        }
    }

    /// Lets every deadline pass and reaps: all counters must come back to zero.
    fn finish(self) {
        let users: HashMap<String, BTreeSet<String>> = self
            .ids
            .iter()
            .filter_map(|id| self.peek(id))
            .filter(|s| !s.user_id.is_empty())
            .map(|s| (s.user_id.clone(), self.live_of(&s.user_id)))
            .collect();
        for (user, live) in users {
            let listed: BTreeSet<String> = self
                .store
                .list_user(&user, false)
                .expect("list_user")
                .into_iter()
                .map(|s| s.key.encode())
                .collect();
            assert_eq!(listed, live, "the user index for {user:?}");
        }
        self.clock.advance(FOREVER);
        while self.store.reap(256).more {}
        assert_eq!(
            self.store.stats(),
            Stats {
                sessions: 0,
                bytes: 0,
                users: 0
            },
            "a Store with every session expired and reaped"
        );
        assert_eq!(self.store.wheel_len(), 0, "keys left in the expiry wheel");
        let neighbour = self.neighbour.stats();
        assert_eq!(neighbour.sessions, 2, "the neighbour tenant lost sessions");
        assert_eq!(
            self.pool.used(),
            neighbour.bytes,
            "the shared pool's accounting"
        );
    }
}

/// Runs a handler to completion. Without a durable log nothing in a unary call waits, so one
/// poll finishes it.
fn call<T>(fut: impl Future<Output = Result<Response<T>, Status>>) -> Result<T, Status> {
    let mut fut = std::pin::pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r.map(Response::into_inner),
        Poll::Pending => panic!("a unary call without a durable log waited"),
    }
}

/// A reply as a client reads it: encoded, and decoded as the client's message, so the checks
/// read what the wire carries (the server encodes sessions its own way, `api::serve`).
fn decoded<U: prost::Message + Default>(
    reply: Result<impl prost::Message, Status>,
) -> Result<U, Status> {
    reply.map(|r| wire(&r))
}

/// `reply` encoded, and decoded as `U`.
fn wire<U: prost::Message + Default>(reply: &impl prost::Message) -> U {
    U::decode(reply.encode_to_vec().as_slice()).expect("a reply decodes as the client's message")
}

/// A timestamp in milliseconds, wide enough for any value.
fn millis(t: &Option<prost_types::Timestamp>) -> i128 {
    let t = t.as_ref().expect("a timestamp is missing");
    i128::from(t.seconds) * 1000 + i128::from(t.nanos) / 1_000_000
}
