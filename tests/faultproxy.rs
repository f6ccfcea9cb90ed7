//! The chaos suite's fault proxy, against tiny servers on loopback: each mode does to live
//! and new connections what it says.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use common::faultproxy::{Direction, FaultProxy, Mesh, Mode, Partition};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};

/// How long a check of absence waits for bytes that must not come. A slow machine can only
/// make such a check pass wrongly, never fail wrongly.
const ABSENCE: Duration = Duration::from_millis(200);

/// How long a check of presence waits before it calls the test hung.
const PRESENCE: Duration = Duration::from_secs(10);

/// An echo server on an ephemeral loopback port.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut from, mut to) = socket.split();
                let _ = tokio::io::copy(&mut from, &mut to).await;
            });
        }
    });
    addr
}

/// A server that greets each connection with the one byte `name`, then echoes.
async fn named_server(name: u8) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                socket.write_all(&[name]).await.unwrap();
                let (mut from, mut to) = socket.split();
                let _ = tokio::io::copy(&mut from, &mut to).await;
            });
        }
    });
    addr
}

/// A listener whose connections the test accepts itself, to drive the upstream end by hand.
async fn upstream_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

async fn accept(listener: &TcpListener) -> TcpStream {
    timeout(PRESENCE, listener.accept())
        .await
        .unwrap()
        .unwrap()
        .0
}

/// Reads exactly `n` bytes, or fails the test.
async fn receive(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    timeout(PRESENCE, stream.read_exact(&mut buf))
        .await
        .expect("bytes should arrive")
        .unwrap();
    buf
}

/// Fails the test if any byte arrives within [`ABSENCE`], or if the connection ends.
async fn nothing_arrives(stream: &mut TcpStream) {
    let mut buf = [0; 1];
    if let Ok(read) = timeout(ABSENCE, stream.read(&mut buf)).await {
        panic!("expected silence, read {read:?} ({:?})", &buf);
    }
}

/// Waits for the reset of `stream`, which must come as `ECONNRESET`.
async fn is_reset(stream: &mut TcpStream) {
    let mut buf = [0; 1];
    let read = timeout(PRESENCE, stream.read(&mut buf)).await.unwrap();
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "expected a reset"
    );
}

async fn send(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).await.unwrap();
}

/// A connection through `proxy` to an echo server, shown to carry bytes both ways.
async fn echoing(proxy: &FaultProxy) -> TcpStream {
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    send(&mut client, b"hi").await;
    assert_eq!(receive(&mut client, 2).await, b"hi");
    client
}

#[tokio::test]
async fn pass_echoes() {
    let proxy = FaultProxy::start(echo_server().await).await;
    assert_ne!(proxy.addr().port(), 0);
    let mut client = echoing(&proxy).await;
    send(&mut client, b"hello").await;
    assert_eq!(receive(&mut client, 5).await, b"hello");
}

#[tokio::test]
async fn blackhole_stalls_a_live_connection_which_resumes_on_heal() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut client = echoing(&proxy).await;

    proxy.set(Mode::Blackhole);
    send(&mut client, b"lost?").await;
    nothing_arrives(&mut client).await;

    // Still open, and nothing was thrown away: the held bytes arrive after the heal.
    proxy.set(Mode::Pass);
    assert_eq!(receive(&mut client, 5).await, b"lost?");
}

#[tokio::test]
async fn blackhole_keeps_new_connections_from_the_upstream() {
    let (listener, upstream) = upstream_listener().await;
    let proxy = FaultProxy::start(upstream).await;
    proxy.set(Mode::Blackhole);

    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    send(&mut client, b"syn?").await;
    assert!(
        timeout(ABSENCE, listener.accept()).await.is_err(),
        "the upstream saw a connection through a blackhole"
    );
    nothing_arrives(&mut client).await;

    proxy.set(Mode::Pass);
    let mut server = accept(&listener).await;
    assert_eq!(receive(&mut server, 4).await, b"syn?");
}

#[tokio::test]
async fn reset_resets_both_ends_of_live_connections_and_new_ones() {
    let (listener, upstream) = upstream_listener().await;
    let proxy = FaultProxy::start(upstream).await;
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut server = accept(&listener).await;
    send(&mut client, b"x").await;
    assert_eq!(receive(&mut server, 1).await, b"x");

    proxy.set(Mode::Reset);
    is_reset(&mut client).await;
    is_reset(&mut server).await;

    let mut late = TcpStream::connect(proxy.addr()).await.unwrap();
    is_reset(&mut late).await;
}

#[tokio::test]
async fn a_one_way_cut_lets_the_other_direction_pass() {
    let (listener, upstream) = upstream_listener().await;
    let proxy = FaultProxy::start(upstream).await;
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut server = accept(&listener).await;

    proxy.set(Mode::CutOneWay(Direction::ToUpstream));
    send(&mut client, b"request").await;
    nothing_arrives(&mut server).await;
    send(&mut server, b"push").await;
    assert_eq!(receive(&mut client, 4).await, b"push");

    // Turn the cut around: the held request goes through, and replies are held instead.
    proxy.set(Mode::CutOneWay(Direction::ToClient));
    assert_eq!(receive(&mut server, 7).await, b"request");
    send(&mut server, b"reply").await;
    nothing_arrives(&mut client).await;

    proxy.set(Mode::Pass);
    assert_eq!(receive(&mut client, 5).await, b"reply");
}

#[tokio::test]
async fn delay_delivers_each_chunk_late_and_in_order() {
    let delay = Duration::from_millis(150);
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut client = echoing(&proxy).await;

    proxy.set(Mode::Delay(delay));
    let sent = Instant::now();
    for chunk in [b"a", b"b", b"c"] {
        send(&mut client, chunk).await;
    }
    assert_eq!(receive(&mut client, 3).await, b"abc");
    // Delayed on the way there and on the way back.
    assert!(
        sent.elapsed() >= 2 * delay,
        "echoed after {:?}",
        sent.elapsed()
    );
}

#[tokio::test]
async fn pass_restores_new_connections_after_faults() {
    let proxy = FaultProxy::start(echo_server().await).await;

    proxy.set(Mode::Reset);
    let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
    is_reset(&mut refused).await;

    proxy.set(Mode::Blackhole);
    let mut stalled = TcpStream::connect(proxy.addr()).await.unwrap();
    send(&mut stalled, b"?").await;
    nothing_arrives(&mut stalled).await;

    proxy.set(Mode::Pass);
    echoing(&proxy).await;
}

#[tokio::test]
async fn a_connection_to_a_dead_upstream_is_reset() {
    let (listener, upstream) = upstream_listener().await;
    drop(listener);
    let proxy = FaultProxy::start(upstream).await;
    let mut client = TcpStream::connect(proxy.addr()).await.unwrap();
    is_reset(&mut client).await;
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_connections() {
    let proxy = FaultProxy::start(echo_server().await).await;
    let mut client = echoing(&proxy).await;
    let handle = proxy.handle();

    drop(proxy);
    let mut buf = [0; 1];
    let read = timeout(PRESENCE, client.read(&mut buf))
        .await
        .expect("the connection should end");
    assert!(matches!(read, Ok(0) | Err(_)), "read {read:?}");
    // A handle that outlived its proxy switches nothing, and does not panic.
    handle.set(Mode::Reset);
}

#[test]
fn partitions_cut_the_links_they_say() {
    let cut = |p: &Partition| {
        let mut links = Vec::new();
        for from in 0..3 {
            for to in 0..3 {
                if p.cuts(from, to) {
                    links.push((from, to));
                }
            }
        }
        links
    };
    assert_eq!(
        cut(&Partition::isolate(1)),
        [(0, 1), (1, 0), (1, 2), (2, 1)]
    );
    assert_eq!(cut(&Partition::split(&[0, 2])), cut(&Partition::isolate(1)));
    assert_eq!(cut(&Partition::bridge(1)), [(0, 2), (2, 0)]);
}

#[tokio::test]
async fn a_mesh_routes_each_link_and_partitions_it() {
    let nodes = [
        named_server(0).await,
        named_server(1).await,
        named_server(2).await,
    ];
    let mesh = Mesh::start(&nodes).await;
    let greeting = |from, to| {
        let addr = mesh.addr(from, to);
        async move {
            let mut client = TcpStream::connect(addr).await.unwrap();
            receive(&mut client, 1).await[0]
        }
    };
    for (from, to) in [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)] {
        assert_eq!(greeting(from, to).await, to as u8);
    }

    mesh.partition(&Partition::bridge(1));
    assert_eq!(mesh.link(0, 2).mode(), Mode::Blackhole);
    assert_eq!(mesh.link(2, 0).mode(), Mode::Blackhole);
    assert_eq!(greeting(0, 1).await, 1);
    assert_eq!(greeting(2, 1).await, 1);
    let mut cut = TcpStream::connect(mesh.addr(0, 2)).await.unwrap();
    nothing_arrives(&mut cut).await;

    mesh.heal();
    assert_eq!(receive(&mut cut, 1).await, [2]);
}

#[tokio::test]
async fn a_restarted_node_is_reached_at_its_new_address() {
    let mesh = Mesh::start(&[named_server(0).await, named_server(1).await]).await;
    let restarted = named_server(7).await;
    mesh.set_upstream(1, restarted);
    let mut client = TcpStream::connect(mesh.addr(0, 1)).await.unwrap();
    assert_eq!(receive(&mut client, 1).await, [7]);
    let mut other_way = TcpStream::connect(mesh.addr(1, 0)).await.unwrap();
    assert_eq!(receive(&mut other_way, 1).await, [0]);
}
