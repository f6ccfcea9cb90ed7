"""The report of benches/profile.sh: sessiond's CPU per operation, split three ways.

    python3 benches/profile_report.py DIR [SYMBOLS] [server|client]

DIR holds what profile.sh leaves there (KEEP=DIR): profile.json and mallocs.json
(sessiond-bench's reports), symbols.txt and threads.txt (perf report), stacks.txt (perf
script with call stacks) and mallocs.csv (perf stat's malloc count).

1. What the CPU executes: each sample's own function (self time), by kind.
2. Who asked for it: each sample charged to the nearest sessiond component on its call
   stack, so a malloc or a memcpy inside prost's decoding counts as protobuf, and a
   sendmsg in the kernel as whoever wrote to the socket.
3. By thread, and the hottest functions.

With `client`, the samples are the load generator's (profile.sh's SIDE=client), and the CPU
per operation is the generator's.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

# What a function is, by its name; first match wins. Kernel functions are marked [k] by
# perf report.
KINDS = [
    ("allocation (malloc, free)", r"malloc|free|realloc|calloc|_int_|tcache|arena|sysmalloc|unlink_chunk|__rust_(de|re)?alloc"),
    ("memcpy, memset", r"mem(cpy|move|set|cmp)"),
    ("kernel: network (TCP, sockets)", r"^\[k\] .*(tcp|sock|skb|ip_|__ip|net_|netif|napi|loopback|__dev_queue|dev_hard|inet|sendmsg|recvmsg|sys_sendto|sys_recvfrom|copy_user|_copy_to_iter|_copy_from_iter|csum)"),
    ("kernel: epoll, futex, scheduling", r"^\[k\] .*(epoll|futex|schedule|switch_to|finish_task|try_to_wake|wake_up|select_task|enqueue|dequeue|update_curr|pick_next|ttwu|hrtimer|_raw_spin)"),
    ("kernel: file writes, fsync", r"^\[k\] .*(ext4|jbd2|vfs_write|fsync|filemap|iomap|blk_|bio)"),
    ("kernel: other", r"^\[k\] "),
    ("HTTP/2 (h2, hyper)", r"\bh2::|\bhyper::|hyper_util::|httparse"),
    ("protobuf (prost)", r"prost::"),
    ("tonic, tower, http", r"tonic::|tower::|\bhttp::|http_body"),
    ("the log", r"sessiond::persist::log|crc32"),
    ("snapshots", r"sessiond::persist::snapshot"),
    ("the store (sessiond::store, dashmap)", r"sessiond::store|dashmap|sessiond::session"),
    ("the API layer (sessiond::api)", r"sessiond::api"),
    ("metrics", r"metrics::|metrics_exporter|sessiond::telemetry"),
    ("tokio (scheduler, channels, timers, I/O driver)", r"tokio::|mio::|parking_lot"),
    ("hash maps and hashing", r"hashbrown|hash_one|::hash::|sip::"),
    ("bytes (reference counts)", r"bytes::"),
    ("sessiond (other)", r"sessiond::"),
    ("the client (sessiond_client)", r"sessiond_client::"),
    ("the load generator (sessiond_bench)", r"sessiond_bench::"),
    ("other (iterators, UTF-8 checks, std)", r"."),
]

# The components a sample is charged to, nearest on its stack first.
OWNERS = [
    ("snapshots (copying the store, writing)", r"sessiond::persist::snapshot"),
    ("the log (encoding, CRC, writes, fsync)", r"sessiond::persist"),
    ("metrics", r"metrics::|metrics_exporter|sessiond::telemetry"),
    ("the store (evaluate, apply, expiry)", r"sessiond::store|sessiond::session|dashmap"),
    ("protobuf encode and decode (prost)", r"prost::|tonic_prost|tonic::codec::prost"),
    ("gRPC framing and codecs (tonic)", r"tonic::codec|tonic::"),
    ("tower layers and http types", r"tower::|tower_http::|\bhttp::|http_body"),
    ("the API layer (sessiond::api: calls, Pipeline dispatch)", r"sessiond::api|sessiond::server"),
    ("the group's adapters (sessiond::cluster: Raft log, peers, state machine)", r"sessiond::cluster"),
    ("the Raft engine (openraft)", r"openraft::"),
    ("HTTP/2 (h2, hyper: frames, flow control, socket I/O)", r"\bh2::|\bhyper::|hyper_util::"),
    ("the client (sessiond_client: calls, Pipeline plumbing, replies)", r"sessiond_client::"),
    ("the load generator's bookkeeping (pool, histograms, mix)", r"sessiond_bench::"),
    ("tokio: channels and sync", r"tokio::sync"),
    ("tokio: scheduler, timers, I/O driver", r"tokio::|mio::"),
]

# Threads that are one component whatever they call (perf keeps 15 bytes of a name).
THREADS = {
    "sessiond-snapsh": "snapshots (copying the store, writing)",
    "sessiond-log": "the log (encoding, CRC, writes, fsync)",
    "sessiond-raft-l": "the Raft log (encoding, CRC, writes, fsync)",
}


def table(title: str, shares: Counter, cpu_us: float) -> None:
    total = sum(shares.values()) or 1
    print(f"\n{title:<58}{'share':>8}{'us/op':>8}")
    for name, n in shares.most_common():
        print(f"{name:<58}{n / total:>8.1%}{cpu_us * n / total:>8.2f}")


def stacks(path: Path):
    """Each sample's thread name and frames, leaf first."""
    comm, frames = "", []
    for line in path.open(errors="replace"):
        if line.startswith(("\t", " " * 8)) and line.strip():
            parts = line.strip().split(" ", 1)
            frames.append(parts[1] if len(parts) > 1 else "")
        elif line.strip():
            if frames:
                yield comm, frames
            comm, frames = line.strip(), []
    if frames:
        yield comm, frames


def main() -> None:
    out = Path(sys.argv[1])
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    side = sys.argv[3] if len(sys.argv) > 3 else "server"
    profile = json.loads((out / "profile.json").read_text())
    ops = profile["overall"]["ops_per_second"]
    who = "load_generator" if side == "client" else "server"
    cpu_us = profile[who]["cpu_per_second"] * 1e6 / ops
    name = "the client side (sessiond-bench)" if side == "client" else "sessiond"
    print(f"\n== {name}: {ops:,.0f} ops/s, {cpu_us:.1f} us of {side} CPU per operation ==")

    kinds: Counter = Counter()
    symbols = []
    for line in (out / "symbols.txt").open():
        m = re.match(r"\s*([\d.]+)%\s+(\[[k.]\]\s+.*)$", line)
        if m:
            pct, sym = float(m[1]), m[2].strip()
            symbols.append((pct, sym))
            kinds[next(name for name, p in KINDS if re.search(p, sym))] += pct
    table("what the CPU executes (self time)", kinds, cpu_us)

    owners: Counter = Counter()
    compiled = [(name, re.compile(p)) for name, p in OWNERS]
    for comm, frames in stacks(out / "stacks.txt"):
        owner = THREADS.get(comm[:15], "other (threads outside these components)")
        for frame in frames if comm[:15] not in THREADS else ():
            hit = next((name for name, p in compiled if p.search(frame)), None)
            if hit:
                owner = hit
                break
        owners[owner] += 1
    table("who asked for it (nearest component on the call stack)", owners, cpu_us)

    threads: Counter = Counter()
    for line in (out / "threads.txt").open():
        m = re.match(r"\s*([\d.]+)%\s+(.+)$", line)
        if m:
            threads[m[2].strip()] += float(m[1])
    table("by thread", threads, cpu_us)

    total = sum(kinds.values()) or 1
    print(f"\nthe {top} hottest functions (self time)")
    for pct, sym in symbols[:top]:
        print(f"{pct / total:>7.1%}  {sym[:110]}")

    mallocs = None
    for line in (out / "mallocs.csv").open():
        fields = line.strip().split(",")
        if len(fields) > 2 and "malloc" in fields[2] and fields[0].replace(".", "").isdigit():
            mallocs = float(fields[0])
    if mallocs is not None:
        # perf counted over the bench's measured window: both last DURATION from its start.
        r2 = json.loads((out / "mallocs.json").read_text())
        done = r2["overall"]["ops"]
        print(f"\nmalloc calls: {mallocs / done:.1f} per operation ({mallocs:,.0f} over {done:,}"
              f" operations at {r2['overall']['ops_per_second']:,.0f} ops/s, the probe slowing each call)")


if __name__ == "__main__":
    main()
