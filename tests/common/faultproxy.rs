//! A fault-injecting TCP proxy for one directed peer link, and partitions over a mesh of them.
//!
//! This kernel has no netem and no iptables (REPLICATION.md, "Testing on one machine"), so the
//! chaos suite puts a [`FaultProxy`] on every directed link: node *i* dials node *j* at the
//! address of proxy (i, j), and the test turns faults on and off through the proxy's
//! [`Mode`]. A change reaches existing connections as well as new ones.
//!
//! Held bytes are never discarded. [`Mode::Blackhole`] and [`Mode::CutOneWay`] stop
//! delivering: the bytes wait in the proxy and then in kernel buffers, and the sender's writes
//! block once those fill. That is what a TCP peer sees behind lost packets. When the link heals,
//! the held bytes flow, as retransmissions would. Throwing bytes away would leave a hole in a
//! byte stream, and TCP never delivers one: h2 would parse frames from the middle of a payload,
//! which no real network can cause. A connection that must die is what [`Mode::Reset`] is for.
//!
//! Timing guarantee: a mode takes effect before [`ProxyHandle::set`] returns, as far as
//! delivery goes. Every chunk checks the mode just before it is written, so no byte is
//! delivered in a mode that holds it once `set` has returned. The one exception is a chunk
//! whose write had already started. Resets are asynchronous: the connection's task acts on
//! them, and a test waits for the `ECONNRESET` it can observe.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// The most bytes one read takes from a socket: one chunk.
const CHUNK_BYTES: usize = 16 * 1024;

/// Chunks read and not yet written, per direction of a connection. This is room for a delayed
/// link's bytes in flight: at most 1 MiB, beyond which the reader waits, like a full window.
const CHUNKS_IN_FLIGHT: usize = 64;

/// One direction of a proxied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the connecting side (node *i*, which dials) to the upstream (node *j*): requests.
    ToUpstream,
    /// From the upstream back to the connecting side: responses.
    ToClient,
}

/// What a link does to the bytes and connections crossing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Deliver nothing in either direction, and send no RST. Existing connections stall. New
    /// ones are accepted (the kernel completes the handshake) but never reach the upstream.
    Blackhole,
    /// Reset existing connections on both sides, and reset new ones as they arrive: the peers
    /// see `ECONNRESET`.
    Reset,
    /// Forward each chunk this long after it was read, in order.
    Delay(Duration),
    /// Hold the bytes going this way, as a blackhole does; the other direction passes.
    CutOneWay(Direction),
}

impl Mode {
    /// Whether bytes going `dir` are delivered in this mode.
    fn passes(self, dir: Direction) -> bool {
        match self {
            Mode::Pass | Mode::Delay(_) => true,
            Mode::Blackhole | Mode::Reset => false,
            Mode::CutOneWay(cut) => cut != dir,
        }
    }

    /// How long a chunk read now waits before it is written.
    fn delay(self) -> Duration {
        match self {
            Mode::Delay(d) => d,
            _ => Duration::ZERO,
        }
    }
}

/// What a proxy and its connections share: the mode, and where new connections go.
struct Link {
    mode: watch::Sender<Mode>,
    upstream: Mutex<SocketAddr>,
}

/// Switches one proxy's faults. Cheap to clone, and harmless once the proxy is gone.
#[derive(Clone)]
pub struct ProxyHandle {
    link: Arc<Link>,
}

impl ProxyHandle {
    /// Puts the link in `mode`, for existing connections and new ones.
    pub fn set(&self, mode: Mode) {
        self.link.mode.send_replace(mode);
    }

    /// The link's current mode.
    pub fn mode(&self) -> Mode {
        *self.link.mode.borrow()
    }

    /// Points new connections at `upstream`, for a node restarted on another port. Existing
    /// connections keep the one they have.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.link.upstream.lock().unwrap() = upstream;
    }

    fn upstream(&self) -> SocketAddr {
        *self.link.upstream.lock().unwrap()
    }
}

/// A TCP proxy on an ephemeral loopback port that forwards to one upstream and injects the
/// faults of its [`Mode`]. Dropping it stops its accept loop and closes all its connections.
pub struct FaultProxy {
    addr: SocketAddr,
    handle: ProxyHandle,
    accept_loop: JoinHandle<()>,
}

impl FaultProxy {
    /// Binds 127.0.0.1:0 and forwards each connection to `upstream`, in [`Mode::Pass`]. The
    /// upstream is dialled per connection, so it need not be listening yet: a connection that
    /// finds nothing there is reset, as a refused one would be. Call this inside a tokio
    /// runtime.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = ProxyHandle {
            link: Arc::new(Link {
                mode: watch::Sender::new(Mode::Pass),
                upstream: Mutex::new(upstream),
            }),
        };
        let accept_loop = tokio::spawn(accept_loop(listener, handle.clone()));
        FaultProxy {
            addr,
            handle,
            accept_loop,
        }
    }

    /// Where to connect: give this to the node that dials through the link.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that switches this proxy's faults from anywhere.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }

    /// Puts the link in `mode` (see [`ProxyHandle::set`]).
    pub fn set(&self, mode: Mode) {
        self.handle.set(mode);
    }

    /// The link's current mode.
    pub fn mode(&self) -> Mode {
        self.handle.mode()
    }
}

impl Drop for FaultProxy {
    /// Aborting the accept loop drops its `JoinSet`, which aborts every connection task. Their
    /// sockets close as the tasks are dropped.
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// Accepts connections and relays each in a task it owns, so that they all end with it.
async fn accept_loop(listener: TcpListener, handle: ProxyHandle) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    connections.spawn(relay(client, handle.clone()));
                }
                // Such as EMFILE: the listener itself is fine, so let the others run and retry.
                Err(_) => tokio::task::yield_now().await,
            },
            // Reap finished connections, so that the set does not grow for the whole test.
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Carries one connection until it ends or the link resets it.
async fn relay(mut client: TcpStream, handle: ProxyHandle) {
    let mut mode = handle.link.mode.subscribe();
    // Behind a blackhole, not even the connection attempt reaches the upstream.
    let Ok(now) = mode.wait_for(|m| *m != Mode::Blackhole).await.map(|m| *m) else {
        return;
    };
    if now == Mode::Reset {
        reset(&client);
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(handle.upstream()).await else {
        reset(&client);
        return;
    };
    // Raft's small messages should not wait for Nagle. A failure here changes nothing else.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let (to_upstream, to_client) = (mode.clone(), mode.clone());
    let abort = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let both_ways = async {
            tokio::try_join!(
                pump(
                    client_read,
                    upstream_write,
                    Direction::ToUpstream,
                    to_upstream
                ),
                pump(upstream_read, client_write, Direction::ToClient, to_client),
            )
        };
        tokio::select! {
            // An error on one side (say, the peer reset it) is passed on as a reset.
            ended = both_ways => ended.is_err(),
            _ = mode.wait_for(|m| *m == Mode::Reset) => true,
        }
    };
    if abort {
        reset(&client);
        reset(&upstream);
    }
    // Both sockets close here: gracefully after EOF both ways, or with RST after `reset`.
}

/// Makes the socket's close send RST instead of FIN. The close itself happens when it drops.
fn reset(socket: &TcpStream) {
    // A socket that cannot take the option is already broken, and closing it is all we want.
    let _ = socket.set_zero_linger();
}

/// Moves bytes one way: a reader stamps each chunk with when it is due, and a writer delivers
/// the chunks in order, each once it is due and the link lets it pass. After EOF, the writer
/// passes the half-close on.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    dir: Direction,
    mut mode: watch::Receiver<Mode>,
) -> io::Result<()> {
    let (chunks, mut due_chunks) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let delay_at_read = mode.clone();
    let read = async move {
        loop {
            let mut chunk = vec![0; CHUNK_BYTES];
            let n = from.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            chunk.truncate(n);
            let due = Instant::now() + delay_at_read.borrow().delay();
            if chunks.send((due, chunk)).await.is_err() {
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = due_chunks.recv().await {
            tokio::time::sleep_until(due).await;
            until_passes(&mut mode, dir).await?;
            to.write_all(&chunk).await?;
        }
        until_passes(&mut mode, dir).await?;
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}

/// Waits until the link delivers bytes going `dir`. It returns at once if it already does.
async fn until_passes(mode: &mut watch::Receiver<Mode>, dir: Direction) -> io::Result<()> {
    match mode.wait_for(|m| m.passes(dir)).await {
        Ok(_) => Ok(()),
        Err(_) => Err(io::Error::other("the proxy is gone")),
    }
}

/// Which directed links between nodes are cut. Nodes are numbered from 0. Links from a node to
/// itself are never cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    shape: Shape,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Shape {
    /// The nodes in the set and the rest cannot reach each other.
    Split(BTreeSet<usize>),
    /// Only links to or from this node work.
    Bridge(usize),
}

impl Partition {
    /// `node` can reach no one, and no one can reach it.
    pub fn isolate(node: usize) -> Partition {
        Partition::split(&[node])
    }

    /// The nodes in `side` and all the others cannot reach each other.
    pub fn split(side: &[usize]) -> Partition {
        Partition {
            shape: Shape::Split(side.iter().copied().collect()),
        }
    }

    /// Every node reaches `bridge` and is reached by it, but the others cannot reach each
    /// other. Each node sees a majority, and no two non-bridge nodes see the same one. With
    /// three nodes this is Jepsen's "majorities ring" as well as its "bridge".
    pub fn bridge(bridge: usize) -> Partition {
        Partition {
            shape: Shape::Bridge(bridge),
        }
    }

    /// Whether the link from `from` to `to` is cut.
    pub fn cuts(&self, from: usize, to: usize) -> bool {
        if from == to {
            return false;
        }
        match &self.shape {
            Shape::Split(side) => side.contains(&from) != side.contains(&to),
            Shape::Bridge(bridge) => from != *bridge && to != *bridge,
        }
    }
}

/// A fault proxy on every directed link among `n` nodes: node `from` reaches node `to` at
/// [`Mesh::addr`]`(from, to)`. Dropping it stops them all.
pub struct Mesh {
    links: BTreeMap<(usize, usize), FaultProxy>,
}

impl Mesh {
    /// Starts a proxy for every ordered pair of distinct nodes. The link (from, to) forwards to
    /// `upstreams[to]`.
    pub async fn start(upstreams: &[SocketAddr]) -> Mesh {
        let mut links = BTreeMap::new();
        for from in 0..upstreams.len() {
            for (to, upstream) in upstreams.iter().enumerate() {
                if from != to {
                    links.insert((from, to), FaultProxy::start(*upstream).await);
                }
            }
        }
        Mesh { links }
    }

    /// The proxy on the link from `from` to `to`.
    pub fn link(&self, from: usize, to: usize) -> &FaultProxy {
        &self.links[&(from, to)]
    }

    /// The address at which `from` reaches `to`: put it in `from`'s peer list.
    pub fn addr(&self, from: usize, to: usize) -> SocketAddr {
        self.link(from, to).addr()
    }

    /// Points every link into `node` at `upstream`, for a node restarted on another port.
    pub fn set_upstream(&self, node: usize, upstream: SocketAddr) {
        for ((_, to), proxy) in &self.links {
            if *to == node {
                proxy.handle().set_upstream(upstream);
            }
        }
    }

    /// Blackholes the links that `partition` cuts and lets all the others pass.
    pub fn partition(&self, partition: &Partition) {
        self.partition_with(partition, Mode::Blackhole);
    }

    /// Puts the links that `partition` cuts in `fault` (say, [`Mode::Reset`]) and lets all
    /// the others pass.
    pub fn partition_with(&self, partition: &Partition, fault: Mode) {
        for (&(from, to), proxy) in &self.links {
            proxy.set(if partition.cuts(from, to) {
                fault
            } else {
                Mode::Pass
            });
        }
    }

    /// Lets every link pass.
    pub fn heal(&self) {
        for proxy in self.links.values() {
            proxy.set(Mode::Pass);
        }
    }
}
