//! The Redis backend: each logical operation as the commands a Redis-backed session library
//! sends for it (see the crate doc), and Redis's own CPU and memory accounting.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use clap::ValueEnum;
use rand::rngs::SmallRng;
use rand::Rng;
use redis::aio::MultiplexedConnection;

use crate::workload::{Op, OpResult, Slot};

/// Session lifetime used for Redis keys, as a session library would set it.
const TTL_SECS: u64 = 1800;

/// How Redis stores a session, and so how it updates one attribute.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
pub(crate) enum RedisUpdate {
    /// Read-modify-write of the whole serialised session (GET + SET EX).
    Blob,
    /// One hash field (HSET + EXPIRE).
    Hset,
}

/// Redis's multiplexed connections, shared by the workers.
#[derive(Clone)]
pub(crate) struct Redis {
    conns: Vec<MultiplexedConnection>,
    mode: RedisUpdate,
}

impl Redis {
    /// `connections` connections to Redis at `addr`.
    pub(crate) async fn connect(
        addr: &str,
        connections: usize,
        mode: RedisUpdate,
    ) -> Result<Redis, String> {
        let client = redis::Client::open(format!("redis://{addr}/")).map_err(|e| e.to_string())?;
        let mut conns = Vec::new();
        for _ in 0..connections.max(1) {
            conns.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| format!("cannot connect to Redis at {addr}: {e}"))?,
            );
        }
        Ok(Redis { conns, mode })
    }

    fn conn(&self, conn: usize) -> MultiplexedConnection {
        self.conns[conn % self.conns.len()].clone()
    }

    /// Creates a session for `user` under a fresh ID; returns the ID.
    pub(crate) async fn create(
        &self,
        conn: usize,
        user: usize,
        attrs: Vec<(String, Bytes)>,
        rng: &mut SmallRng,
    ) -> Result<String, String> {
        let mut con = self.conn(conn);
        let id = new_redis_id(rng);
        let key = format!("sess:{id}");
        if self.mode == RedisUpdate::Hset {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(&key);
            for (k, v) in &attrs {
                cmd.arg(k).arg(v.as_ref());
            }
            cmd.arg("_user").arg(user);
            cmd.query_async::<()>(&mut con).await.map_err(redis_err)?;
            exec(&mut con, redis::cmd("EXPIRE").arg(&key).arg(TTL_SECS)).await?;
        } else {
            exec(
                &mut con,
                redis::cmd("SET")
                    .arg(&key)
                    .arg(blob(&attrs))
                    .arg("EX")
                    .arg(TTL_SECS)
                    .arg("NX"),
            )
            .await?;
        }
        exec(
            &mut con,
            redis::cmd("SADD").arg(format!("user:{user}")).arg(&id),
        )
        .await?;
        Ok(id)
    }

    /// Runs a Get, Update, Destroy or Regenerate on session `id` of `user`.
    pub(crate) async fn apply(
        &self,
        op: Op,
        conn: usize,
        id: String,
        user: usize,
        value_bytes: usize,
        rng: &mut SmallRng,
    ) -> Result<Slot, String> {
        let mut con = self.conn(conn);
        let key = format!("sess:{id}");
        let hset = self.mode == RedisUpdate::Hset;
        match op {
            Op::Get => {
                if hset {
                    redis::cmd("HGETALL")
                        .arg(&key)
                        .query_async::<Vec<Vec<u8>>>(&mut con)
                        .await
                        .map_err(redis_err)?;
                } else {
                    let body: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut con)
                        .await
                        .map_err(redis_err)?;
                    // What the app reads: the session's attributes, as Update decodes them
                    // (sessiond's client decodes its reply's attributes likewise).
                    std::hint::black_box(body.as_deref().map(decode));
                }
                exec(&mut con, redis::cmd("EXPIRE").arg(&key).arg(TTL_SECS)).await?;
                Ok(Slot::Kept)
            }
            Op::Update if hset => {
                exec(
                    &mut con,
                    redis::cmd("HSET")
                        .arg(&key)
                        .arg("attr3")
                        .arg(vec![b'u'; value_bytes]),
                )
                .await?;
                exec(&mut con, redis::cmd("EXPIRE").arg(&key).arg(TTL_SECS)).await?;
                Ok(Slot::Kept)
            }
            Op::Update => {
                let current: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut con)
                    .await
                    .map_err(redis_err)?;
                let mut map = current.as_deref().map(decode).unwrap_or_default();
                map.insert("attr3".into(), "u".repeat(value_bytes));
                let body = serde_json::to_vec(&map).expect("serialisable");
                exec(
                    &mut con,
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(body)
                        .arg("EX")
                        .arg(TTL_SECS),
                )
                .await?;
                Ok(Slot::Kept)
            }
            Op::Destroy => {
                exec(&mut con, redis::cmd("DEL").arg(&key)).await?;
                exec(
                    &mut con,
                    redis::cmd("SREM").arg(format!("user:{user}")).arg(&id),
                )
                .await?;
                Ok(Slot::Ended)
            }
            Op::Regenerate => {
                let fresh = new_redis_id(rng);
                let new_key = format!("sess:{fresh}");
                if hset {
                    // RENAME moves a hash in one step; EXPIRE keeps the TTL.
                    exec(&mut con, redis::cmd("RENAME").arg(&key).arg(&new_key)).await?;
                } else {
                    let body: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(&key)
                        .query_async(&mut con)
                        .await
                        .map_err(redis_err)?;
                    let body = body.ok_or("missing")?;
                    exec(
                        &mut con,
                        redis::cmd("SET")
                            .arg(&new_key)
                            .arg(body)
                            .arg("EX")
                            .arg(TTL_SECS)
                            .arg("NX"),
                    )
                    .await?;
                    exec(&mut con, redis::cmd("DEL").arg(&key)).await?;
                }
                let set = format!("user:{user}");
                exec(&mut con, redis::cmd("SADD").arg(&set).arg(&fresh)).await?;
                exec(&mut con, redis::cmd("SREM").arg(&set).arg(&id)).await?;
                Ok(Slot::Moved(fresh))
            }
            Op::Create | Op::List => unreachable!("not an operation on one session"),
        }
    }

    /// Reads `user`'s sessions: SMEMBERS, then MGET (HGETALL each, for hashes).
    pub(crate) async fn list(&self, conn: usize, user: usize) -> OpResult {
        let mut con = self.conn(conn);
        let ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("user:{user}"))
            .query_async(&mut con)
            .await
            .map_err(redis_err)?;
        if ids.is_empty() {
            return Ok(());
        }
        if self.mode == RedisUpdate::Hset {
            for id in ids {
                redis::cmd("HGETALL")
                    .arg(format!("sess:{id}"))
                    .query_async::<Vec<Vec<u8>>>(&mut con)
                    .await
                    .map_err(redis_err)?;
            }
            Ok(())
        } else {
            let mut cmd = redis::cmd("MGET");
            for id in &ids {
                cmd.arg(format!("sess:{id}"));
            }
            cmd.query_async::<Vec<Option<Vec<u8>>>>(&mut con)
                .await
                .map(drop)
                .map_err(redis_err)
        }
    }

    /// Server CPU seconds and RSS bytes, from INFO.
    pub(crate) async fn server_stats(&self) -> Option<(f64, f64)> {
        let mut con = self.conn(0);
        let info: String = redis::cmd("INFO")
            .arg("all")
            .query_async(&mut con)
            .await
            .ok()?;
        let field = |name: &str| {
            info.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(':')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        };
        Some((
            // The children are the AOF-rewrite and RDB forks: their work is the server's.
            field("used_cpu_sys")?
                + field("used_cpu_user")?
                + field("used_cpu_sys_children")?
                + field("used_cpu_user_children")?,
            field("used_memory_rss")?,
        ))
    }

    /// Redis's own accounting: used_memory and the number of keys.
    pub(crate) async fn memory(&self) -> Option<(f64, f64)> {
        let mut con = self.conn(0);
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut con)
            .await
            .ok()?;
        let used = info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse::<f64>().ok())?;
        let keys: u64 = redis::cmd("DBSIZE").query_async(&mut con).await.ok()?;
        Some((used, keys as f64))
    }
}

/// A session as a blob: its attributes as one JSON object.
fn blob(attrs: &[(String, Bytes)]) -> Vec<u8> {
    let map: BTreeMap<&str, String> = attrs
        .iter()
        .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v).into_owned()))
        .collect();
    serde_json::to_vec(&map).expect("serialisable")
}

/// A blob's attributes, as a session library loads them (an unreadable blob: none).
fn decode(blob: &[u8]) -> BTreeMap<String, String> {
    serde_json::from_slice(blob).unwrap_or_default()
}

/// A session ID as a session library makes one: 32 random bytes, URL-safe base64.
fn new_redis_id(rng: &mut SmallRng) -> String {
    let mut b = [0u8; 32];
    rng.fill(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Runs a Redis command whose reply is not needed.
async fn exec(con: &mut MultiplexedConnection, cmd: &redis::Cmd) -> OpResult {
    cmd.query_async::<()>(con).await.map_err(redis_err)
}

fn redis_err(e: redis::RedisError) -> String {
    format!("redis {:?}", e.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_blobs_are_json_of_the_attributes() {
        let a = vec![("k".to_string(), Bytes::from_static(b"v"))];
        assert_eq!(blob(&a), br#"{"k":"v"}"#);
        assert_eq!(decode(&blob(&a))["k"], "v");
        assert!(decode(b"not json").is_empty());
    }
}
