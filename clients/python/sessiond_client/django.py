"""A Django session engine that keeps sessions in sessiond.

    # settings.py
    SESSION_ENGINE = "sessiond_client.django"
    SESSIOND_ADDRESS = "127.0.0.1:7420"  # the default
    SESSIOND_TOKEN = None  # the tenant's bearer token, if any

The browser's cookie holds only the session ID, and only sessiond issues IDs: `create()`
is sessiond's `Create`, and a cookie naming an ID that sessiond does not know (expired,
destroyed, made up) is no session at all; data stored under it starts a new session under a
new server-generated ID, never one under the browser's key.

- `cycle_key()`, which `django.contrib.auth.login()` calls, is `Regenerate`: the data is
  carried over and the old ID is dead at once. `flush()` (logout) is `Destroy`, leaving a
  fresh empty session.
- `save()` writes only the keys the request changed, set or removed, as one partial `Update`:
  two requests changing different keys of one session never undo each other. A session
  ended while the request ran is not brought back: `save()` raises Django's `UpdateError`
  (a 400 `SessionInterrupted` from SessionMiddleware), as Django's own engines do.
- The user is bound at `save()`: when the request changed the `_auth_user_id` that
  `django.contrib.auth` stores (a login, or a logout without `flush()`) and it differs from
  the user sessiond has the session bound to, `save()` first regenerates the session bound
  to that user. A session bound by another adapter (which stores no `_auth_user_id`) keeps
  its user when Django writes to it. So `login()` moves the session twice (its
  `cycle_key()`, then the binding save), and it works for `alogin()`, custom auth code and anything else that sets
  `_auth_user_id`, with no signal to connect. `other_devices()` and
  `logout_other_devices()` list and end the user's other sessions.
- Each key is one sessiond attribute holding its value's compact JSON, as Django's
  JSONSerializer writes it (SESSION_SERIALIZER is not used), the layout the Flask
  interface (`sessiond_client.flask`) uses for plain values: the two can share sessions.
- SESSION_COOKIE_AGE (or `set_expiry()` before the session is created) is the session's
  idle timeout, capped at SESSIOND_MAX_IDLE_TIMEOUT (seconds; default 7 days, the daemon's
  default `max_idle_timeout`, which a longer Create would be refused for); every request
  that reads the session slides it. The absolute lifetime is the daemon's. With
  SESSION_EXPIRE_AT_BROWSER_CLOSE, SessionMiddleware sends a browser-session cookie as
  usual. `clear_expired()` does nothing: the daemon expires sessions itself.
- The async methods (`aload`, `asave`, `acreate`, `aexists`, `adelete`, `acycle_key`,
  and `aflush` through `adelete`) use the asyncio client, `sessiond_client.aio`.

One client of each kind is made per process (and settings), on first use.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

from django.conf import settings
from django.contrib.auth import SESSION_KEY as USER_KEY
from django.contrib.sessions.backends.base import SessionBase, UpdateError
from django.http import HttpRequest

from . import aio
from .client import Session, SessionClient
from .errors import InvalidArgument, NotFound

__all__ = ["SessionStore", "client", "async_client", "other_devices", "logout_other_devices"]

DEFAULT_ADDRESS = "127.0.0.1:7420"
DEFAULT_MAX_IDLE_TIMEOUT = 7 * 24 * 3600

# A session ID as sessiond issues them: 43 chars of URL-safe base64 without padding.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{43}")
# What a read of a browser's key may raise that means "no such session": unknown, or not an
# ID sessiond could have issued (such as base64 with stray bits).
_NO_SESSION = (NotFound, InvalidArgument)


def _target() -> Tuple[str, Optional[str]]:
    return (
        getattr(settings, "SESSIOND_ADDRESS", DEFAULT_ADDRESS),
        getattr(settings, "SESSIOND_TOKEN", None),
    )


@lru_cache(maxsize=None)
def _sync_client(address: str, token: Optional[str]) -> SessionClient:
    return SessionClient(address, token)


@lru_cache(maxsize=None)
def _async_client(address: str, token: Optional[str]) -> aio.SessionClient:
    return aio.SessionClient(address, token)


def client() -> SessionClient:
    """The process's sync client for SESSIOND_ADDRESS and SESSIOND_TOKEN."""
    return _sync_client(*_target())


def async_client() -> aio.SessionClient:
    """The process's asyncio client for SESSIOND_ADDRESS and SESSIOND_TOKEN."""
    return _async_client(*_target())


def _encode(key: str, value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":")).encode("utf-8")
    except TypeError as err:
        raise TypeError(f"session[{key!r}] is not serializable to JSON: {err}") from None


def _decode(raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text  # stored as plain text by another client


class SessionStore(SessionBase):
    """Django's session API over sessiond (see the module docs)."""

    def __init__(self, session_key: Optional[str] = None) -> None:
        super().__init__(session_key)
        # What sessiond holds, as far as this request knows: each key's encoded value (the
        # baseline save() diffs against) and the bound user ("" for none).
        self._stored: Dict[str, bytes] = {}
        self._bound = ""

    def _validate_session_key(self, key: Any) -> bool:
        return isinstance(key, str) and _ID_RE.fullmatch(key) is not None

    # --- state ------------------------------------------------------------------------

    def _adopt(self, remote: Session) -> Dict[str, Any]:
        """Takes sessiond's session as the baseline; returns its data."""
        self._session_key = remote.id
        self._bound = remote.user_id
        data = {key: _decode(raw) for key, raw in remote.attributes.items()}
        self._stored = {key: _encode(key, value) for key, value in data.items()}
        return data

    def _forget(self) -> Dict[str, Any]:
        """No session behind this store any more; returns the (empty) data."""
        self._session_key = None
        self._stored = {}
        self._bound = ""
        return {}

    def _created(self, remote: Session, user: str, stored: Dict[str, bytes]) -> None:
        """After Create: the new ID, holding `stored` and bound to `user`."""
        self._session_key = remote.id
        self._bound = user
        self._stored = stored
        self.modified = True  # the browser needs the new cookie

    def _moved(self, remote: Session) -> None:
        """After Regenerate: the new ID and binding; the data is the same."""
        self._session_key = remote.id
        self._bound = remote.user_id
        self.modified = True  # the browser needs the new cookie

    def _changes(self, data: Dict[str, Any]) -> Tuple[Dict[str, bytes], Dict[str, bytes], List[str]]:
        """The data encoded, and what an Update must set and remove to store it."""
        encoded = {key: _encode(key, value) for key, value in data.items()}
        changed = {k: v for k, v in encoded.items() if self._stored.get(k) != v}
        return encoded, changed, sorted(self._stored.keys() - encoded.keys())

    def _idle_timeout(self) -> int:
        """The session's age (SESSION_COOKIE_AGE or set_expiry()'s), within sessiond's cap."""
        cap = getattr(settings, "SESSIOND_MAX_IDLE_TIMEOUT", DEFAULT_MAX_IDLE_TIMEOUT)
        return max(1, min(self.get_expiry_age(), cap))

    @staticmethod
    def _user_of(data: Dict[str, Any]) -> str:
        user = data.get(USER_KEY)
        return "" if user is None else str(user)

    def _binds(self, user: str, encoded: Dict[str, bytes]) -> bool:
        """Whether save() must move the session to bind `user` (`_auth_user_id`'s): only
        when this request changed that key (a login, or a logout without flush()) and the
        binding differs. A session another adapter logged in has no `_auth_user_id`; writing to it
        here leaves its binding alone."""
        return encoded.get(USER_KEY) != self._stored.get(USER_KEY) and user != self._bound

    # --- SessionBase ------------------------------------------------------------------

    def load(self) -> Dict[str, Any]:
        try:
            return self._adopt(client().get(self.session_key))
        except _NO_SESSION:
            return self._forget()

    def exists(self, session_key: Optional[str]) -> bool:
        if not self._validate_session_key(session_key):
            return False
        try:
            client().get(session_key, peek=True)
        except _NO_SESSION:
            return False
        return True

    def create(self) -> None:
        """Starts a session, holding the current data, under an ID sessiond generates."""
        self.save(must_create=True)

    def save(self, must_create: bool = False) -> None:
        """Creates the session (must_create, or none yet), or writes this request's changes
        as one Update, after binding the user first if `_auth_user_id` changed."""
        data = self._get_session(no_load=must_create)
        user = self._user_of(data)
        encoded, changed, removed = self._changes(data)
        if must_create or self.session_key is None:
            remote = client().create(user, encoded, idle_timeout=self._idle_timeout())
            self._created(remote, user, encoded)
            return
        try:
            if self._binds(user, encoded):
                self._moved(client().regenerate(self.session_key, user_id=user))
            if changed or removed:
                client().update(self.session_key, set=changed, remove=removed)
        except NotFound:
            raise UpdateError("the session ended while the request ran") from None
        self._stored = encoded

    def cycle_key(self) -> None:
        """Moves the session to a fresh ID (Regenerate, carrying the data); the old one is dead."""
        self._get_session()  # the data to carry into a new session if this one is gone
        if self.session_key is not None:
            try:
                self._moved(client().regenerate(self.session_key))
                return
            except NotFound:
                self._forget()
        self.create()

    def delete(self, session_key: Optional[str] = None) -> None:
        key = session_key or self.session_key
        if key is None:
            return
        client().destroy(key)
        if key == self.session_key:
            self._forget()

    @classmethod
    def clear_expired(cls) -> None:
        """Nothing to do: sessiond's reaper expires sessions."""

    # --- the same, async --------------------------------------------------------------

    async def aload(self) -> Dict[str, Any]:
        try:
            return self._adopt(await async_client().get(self.session_key))
        except _NO_SESSION:
            return self._forget()

    async def aexists(self, session_key: Optional[str]) -> bool:
        if not self._validate_session_key(session_key):
            return False
        try:
            await async_client().get(session_key, peek=True)
        except _NO_SESSION:
            return False
        return True

    async def acreate(self) -> None:
        await self.asave(must_create=True)

    async def asave(self, must_create: bool = False) -> None:
        data = await self._aget_session(no_load=must_create)
        user = self._user_of(data)
        encoded, changed, removed = self._changes(data)
        if must_create or self.session_key is None:
            remote = await async_client().create(user, encoded, idle_timeout=self._idle_timeout())
            self._created(remote, user, encoded)
            return
        try:
            if self._binds(user, encoded):
                self._moved(await async_client().regenerate(self.session_key, user_id=user))
            if changed or removed:
                await async_client().update(self.session_key, set=changed, remove=removed)
        except NotFound:
            raise UpdateError("the session ended while the request ran") from None
        self._stored = encoded

    async def acycle_key(self) -> None:
        await self._aget_session()
        if self.session_key is not None:
            try:
                self._moved(await async_client().regenerate(self.session_key))
                return
            except NotFound:
                self._forget()
        await self.acreate()

    async def adelete(self, session_key: Optional[str] = None) -> None:
        key = session_key or self.session_key
        if key is None:
            return
        await async_client().destroy(key)
        if key == self.session_key:
            self._forget()


# --- the user's devices ------------------------------------------------------------------


def other_devices(request: HttpRequest) -> List[Session]:
    """The live sessions of the request's user other than this one (ListUserSessions),
    oldest first; [] if nobody is logged in. Each has its creation and last-access times
    (no IP or User-Agent: a Django session store never sees the request); do not show a
    session's `id`: it is that device's credential."""
    user = request.session.get(USER_KEY)
    if user is None:
        return []
    current = request.session.session_key
    return [s for s in client().list_user_sessions(str(user)) if s.id != current]


def logout_other_devices(request: HttpRequest) -> int:
    """Ends every session of the request's user except this one (DestroyUserSessions);
    returns how many ended, 0 if nobody is logged in."""
    user = request.session.get(USER_KEY)
    if user is None:
        return 0
    return client().destroy_user_sessions(str(user), except_id=request.session.session_key or "")
