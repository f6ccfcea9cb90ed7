"""A SessionClient made before a fork (gunicorn --preload) works in the child and, afterwards,
in the parent: each process makes its own channel on first use."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sessiond_client import NotFound, SessionClient

CHILD_DEADLINE = 30.0  # seconds; a child stuck on a channel from before the fork hangs


def wait_child(pid: int) -> int:
    """The child's exit status, polled up to CHILD_DEADLINE; a hung child is killed."""
    deadline = time.monotonic() + CHILD_DEADLINE
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the forked child did not finish within {CHILD_DEADLINE} s")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_client_used_before_fork_works_in_the_child_and_the_parent(sessiond):
    client = SessionClient(sessiond.addr)
    before = client.create(attributes={"from": "parent"})
    assert client.get(before.id).attributes == {"from": b"parent"}
    parent_channel = client._channel
    parent_gets = client._coalescer()  # its state (a get in flight, say) stays the parent's

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        code = 1
        try:
            os.close(read_end)
            seen = client.get(before.id, peek=True).attributes["from"].decode()
            made = client.create(attributes={"from": "child"})
            own = client._channel is not parent_channel
            own_gets = client._coalescer() is not parent_gets
            report = {
                "seen": seen,
                "made": made.id,
                "pid": os.getpid(),
                "own_channel": own,
                "own_gets": own_gets,
            }
            os.write(write_end, json.dumps(report).encode())
            client.close()
            code = 0
        except BaseException as err:  # reported to the parent through the exit code
            print(f"child failed: {err!r}", file=sys.stderr)
        finally:
            os._exit(code)

    os.close(write_end)
    exit_code = wait_child(pid)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read() or b"{}")
    assert exit_code == 0, report
    assert report["seen"] == "parent" and report["pid"] != os.getpid()
    assert report["own_channel"] is True  # the child did not talk over the parent's connection
    assert report["own_gets"] is True  # nor wait behind a get the parent had in flight

    # The parent's channel is untouched by the child's: it goes on working.
    assert client.get(report["made"], peek=True).attributes == {"from": b"child"}
    client.update(before.id, set={"after": "fork"})
    assert client.get(before.id).attributes == {"from": b"parent", "after": b"fork"}
    client.destroy(report["made"])
    with pytest.raises(NotFound):
        client.get(report["made"])
    client.close()


# Made before the fork, first used after it: with gRPC's own fork support off, a child can
# use gRPC only if no channel existed at the fork (a channel made in __init__ hangs it).
PRELOAD = textwrap.dedent(
    """
    import os, sys, time
    from sessiond_client import SessionClient

    client = SessionClient(sys.argv[1], timeout=10)  # as a --preload app does at import
    pid = os.fork()
    if pid == 0:
        try:
            client.create(attributes={"from": "worker"})
            os._exit(0)
        except BaseException as err:
            print("worker failed:", repr(err), file=sys.stderr)
            os._exit(1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, 9)
        sys.exit("the worker hung")
    assert os.waitstatus_to_exitcode(status) == 0, "the worker failed"
    client.create(attributes={"from": "master"})
    print("ok")
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_client_made_before_fork_connects_only_in_the_process_using_it(sessiond):
    env = dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="false")
    done = subprocess.run(
        [sys.executable, "-c", PRELOAD, sessiond.addr],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
