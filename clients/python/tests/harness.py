"""Real processes for the tests: sessiond daemons and storefronts (any adapter's) on ephemeral
loopback ports, and a cookie-keeping HTTP client to drive a storefront. Shared by this
directory's tests (through conftest.py) and by the storefront conformance suite in
tests/conformance/.

SESSIOND_BIN names the sessiond binary (default: <repo>/target/debug/sessiond).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from sessiond_client import NotFound, SessionClient

REPO = Path(__file__).resolve().parent.parent.parent.parent
START_TIMEOUT = 60.0


def sessiond_bin() -> Path:
    path = Path(os.environ.get("SESSIOND_BIN", REPO / "target" / "debug" / "sessiond"))
    if not path.is_file():
        pytest.exit(f"sessiond binary not found at {path}: build it or set SESSIOND_BIN", 2)
    return path


class Process:
    """A child process whose output is collected by reader threads, started on a line that
    says where it listens (found by `marker`)."""

    def __init__(self, args: Sequence[str], cwd: Path, env: Dict[str, str], marker: str):
        self.args = list(args)
        self.output: List[str] = []
        self.proc = subprocess.Popen(
            self.args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        found = threading.Event()
        self.value: Optional[str] = None
        lock = threading.Lock()

        def read(stream):
            for line in stream:
                with lock:
                    self.output.append(line)
                    if self.value is None and marker in line:
                        self.value = line.split(marker, 1)[1].split()[0]
                        found.set()
            found.set()  # EOF: wake the waiter (it checks self.value)

        self._threads = [
            threading.Thread(target=read, args=(s,), daemon=True)
            for s in (self.proc.stdout, self.proc.stderr)
        ]
        for t in self._threads:
            t.start()
        if not found.wait(START_TIMEOUT) or self.value is None:
            # Give the other stream a moment to hit EOF too before reporting.
            self.stop()
            raise RuntimeError(f"{self.args[0]} did not start:\n{self.text()}")

    def text(self) -> str:
        return "".join(self.output)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for t in self._threads:
            t.join(timeout=5)


@dataclass
class Daemon:
    process: Process
    addr: str  # host:port of the gRPC listener
    token: Optional[str] = None
    clients: List[SessionClient] = field(default_factory=list)

    def client(self, token: Optional[str] = "default", **kw) -> SessionClient:
        c = SessionClient(self.addr, token=self.token if token == "default" else token, **kw)
        self.clients.append(c)
        return c

    def stop(self) -> None:
        """Closes the clients made here and stops the daemon."""
        for c in self.clients:
            c.close()
        self.process.stop()


def start_sessiond(workdir: Path, *extra: str) -> Daemon:
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        str(sessiond_bin()),
        "--listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0",
        "--no-persist",
        *extra,
    ]
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    proc = Process(args, cwd=workdir, env=env, marker="grpc=")
    return Daemon(process=proc, addr=proc.value)


def start_tenant_sessiond(workdir: Path, token: str, max_sessions_per_user: int) -> Daemon:
    """A multi-tenant sessiond with one tenant "t" (bearer `token`), allowing at most
    `max_sessions_per_user` sessions per user; its clients send the token."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "sessiond-test.toml"
    config.write_text(
        "[[tenants]]\n"
        'name = "t"\n'
        f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
        f"max_sessions_per_user = {max_sessions_per_user}\n"
    )
    d = start_sessiond(workdir, "--config", str(config))
    d.token = token
    return d


def wait_until_expired(client: SessionClient, sid: str, within: float = 30.0) -> None:
    """Polls sessiond until the session has expired, with peek (which does not slide the
    idle deadline); fails if it is still there after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            client.get(sid, peek=True)
        except NotFound:
            return
        assert time.monotonic() < deadline, f"the session outlived its idle timeout by {within} s"
        time.sleep(0.05)


# --- storefronts as real servers ---------------------------------------------------------


def start_storefront_process(
    args: Sequence[str], workdir: Path, sessiond_addr: str, **env_extra: str
) -> "Storefront":
    """Starts a storefront (any adapter's) by the contract's environment, PORT=0, against
    `sessiond_addr`, and waits for its `listening on http://127.0.0.1:PORT` line."""
    env = dict(os.environ)
    env.update({"SESSIOND_ADDR": sessiond_addr, "PORT": "0", "PYTHONUNBUFFERED": "1"})
    env.pop("SESSIOND_TOKEN", None)
    env.pop("STOREFRONT_IDLE_TIMEOUT_SECONDS", None)
    env.update(env_extra)
    proc = Process(args, cwd=workdir, env=env, marker="listening on ")
    first_stdout = proc.value
    assert first_stdout.startswith("http://127.0.0.1:"), proc.text()
    return Storefront(proc, int(first_stdout.rsplit(":", 1)[1]))


@dataclass
class Storefront:
    process: Process
    port: int

    def browser(self, user_agent: str = "pytest-browser/1.0") -> "Browser":
        return Browser(self.port, user_agent)


@dataclass
class Reply:
    status: int
    json: object
    set_cookies: List[str]
    headers: http.client.HTTPMessage


class Browser:
    """A minimal cookie-keeping HTTP client for the storefront: it remembers `__Host-sid`
    (as a browser would, even over plain HTTP on loopback in these tests)."""

    COOKIE = "__Host-sid"

    def __init__(self, port: int, user_agent: str):
        self.port = port
        self.user_agent = user_agent
        self.sid: Optional[str] = None

    def request(self, method: str, path: str, body: object = None, sid: Optional[str] = "keep") -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"User-Agent": self.user_agent}
        cookie = self.sid if sid == "keep" else sid
        if cookie:
            headers["Cookie"] = f"{self.COOKIE}={cookie}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        set_cookies = resp.headers.get_all("Set-Cookie") or []
        for header in set_cookies:
            name, _, rest = header.strip().partition("=")
            if name == self.COOKIE:
                value, _, attributes = rest.partition(";")
                # A deletion may carry a placeholder value (Django sends `""`): Max-Age=0
                # removes the cookie whatever its value.
                deleted = "max-age=0" in attributes.lower().replace(" ", "")
                self.sid = None if deleted or not value else value
        ctype = resp.headers.get("Content-Type", "")
        payload = json.loads(raw) if "json" in ctype else raw
        return Reply(resp.status, payload, set_cookies, resp.headers)

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: object = None, **kw) -> Reply:
        return self.request("POST", path, body, **kw)
