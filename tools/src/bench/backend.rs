//! One interface over the two backends. What an operation does to the pool of live sessions
//! is decided here, once; `grpc` and `redis` only send it.

use std::sync::atomic::Ordering;

use rand::rngs::SmallRng;

use crate::grpc::Grpc;
use crate::redis::Redis;
use crate::workload::{attributes, Op, OpResult, Pool, Slot};
use crate::Args;

/// One backend's connections.
#[derive(Clone)]
pub(crate) enum Backend {
    Grpc(Grpc),
    Redis(Redis),
}

impl Backend {
    /// Connects to `--target`: redis://HOST:PORT, else sessiond (grpc://HOST:PORT).
    pub(crate) async fn connect(args: &Args) -> Result<Backend, String> {
        if let Some(addr) = args.target.strip_prefix("redis://") {
            let redis = Redis::connect(addr, args.connections, args.redis_update).await?;
            return Ok(Backend::Redis(redis));
        }
        let addr = args.target.strip_prefix("grpc://").unwrap_or(&args.target);
        let grpc = Grpc::connect(
            addr,
            args.connections,
            args.pipeline,
            !args.no_follow_leader,
        )
        .await?;
        Ok(Backend::Grpc(grpc))
    }

    /// Creates a session for `user`; returns its ID.
    pub(crate) async fn create(
        &self,
        conn: usize,
        args: &Args,
        user: usize,
        rng: &mut SmallRng,
    ) -> Result<String, String> {
        let attrs = attributes(args, user as u64);
        match self {
            Backend::Grpc(g) => g.create(user, attrs).await,
            Backend::Redis(r) => r.create(conn, user, attrs, rng).await,
        }
    }

    /// Runs `op` on the session in pool slot `slot`; `conn` picks Redis's connection
    /// (sessiond's client spreads its calls over its connections itself).
    pub(crate) async fn run(
        &self,
        op: Op,
        conn: usize,
        pool: &Pool,
        slot: usize,
        args: &Args,
        rng: &mut SmallRng,
    ) -> OpResult {
        match op {
            Op::Create => {
                let user = pool.next_user.fetch_add(1, Ordering::Relaxed) / 4;
                let id = self.create(conn, args, user, rng).await?;
                pool.set(slot, Some((id, user)));
                return Ok(());
            }
            Op::List => {
                let user = pool.get(slot).map_or(0, |(_, u)| u);
                return match self {
                    Backend::Grpc(g) => g.list(user).await,
                    Backend::Redis(r) => r.list(conn, user).await,
                };
            }
            _ => {}
        }
        let Some((id, user)) = pool.get(slot) else {
            // An emptied slot: refill it, as a new visitor would.
            let user = pool.next_user.fetch_add(1, Ordering::Relaxed) / 4;
            let id = self.create(conn, args, user, rng).await?;
            pool.set(slot, Some((id, user)));
            return Ok(());
        };
        let outcome = match self {
            Backend::Grpc(g) => g.apply(op, &id, args.value_bytes).await?,
            Backend::Redis(r) => r.apply(op, conn, id, user, args.value_bytes, rng).await?,
        };
        match outcome {
            Slot::Kept => {}
            Slot::Ended => pool.set(slot, None),
            Slot::Moved(id) => pool.set(slot, Some((id, user))),
        }
        Ok(())
    }

    /// Server CPU seconds and RSS bytes, if the server tells.
    pub(crate) async fn server_stats(&self, args: &Args) -> Option<(f64, f64)> {
        match self {
            Backend::Grpc(g) => g.server_stats(&args.admin_addr).await,
            Backend::Redis(r) => r.server_stats().await,
        }
    }

    /// Redis's own accounting: used_memory and the number of keys (`None` for sessiond).
    pub(crate) async fn redis_memory(&self) -> Option<(f64, f64)> {
        match self {
            Backend::Grpc(_) => None,
            Backend::Redis(r) => r.memory().await,
        }
    }
}
