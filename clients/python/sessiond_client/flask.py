"""A Flask SessionInterface that keeps the session in sessiond.

    from flask import Flask, session
    from sessiond_client import SessionClient
    from sessiond_client.flask import SessiondSessionInterface

    app = Flask(__name__)
    app.session_interface = SessiondSessionInterface(SessionClient("127.0.0.1:7420"))

The browser's cookie holds only the session ID. It follows the app's SESSION_COOKIE_*
settings as Flask's own session does (NAME, DOMAIN, PATH, SECURE, HTTPONLY, SAMESITE,
PARTITIONED), with safer defaults where the app leaves Flask's: the name `__Host-sid`
instead of `session` (Secure, Path=/ and no Domain, as that prefix requires) and
SameSite=Lax instead of none. `session.permanent = True` makes it a persistent cookie that
lasts PERMANENT_SESSION_LIFETIME. Per request:

- nothing is read until the session is first used (lazy `Get`);
- the keys the request set or deleted, and only those, are written back in one `Update`
  (`set` + `remove`), never the whole session: two requests that change different keys of
  one session never undo each other;
- a request without a live session that stores data creates one (`Create`, with the
  client's IP and User-Agent) and sets the cookie; so do writes whose session ended while
  the request ran: they are never dropped;
- `session.regenerate(user_id)` on login moves the session to a fresh ID (the old one is
  dead at once) and replaces the cookie; `session.destroy()` and
  `session.destroy_all_for_user()` end sessions and clear the cookie, if it named a session
  that was still live;
- a cookie whose session is gone (expired, destroyed, unknown) is left alone: the request
  sees an empty session and `session.expired` is True. Such a request is often a late one
  from before a login in another tab, and the browser may already hold the login's new
  cookie; clearing "the" cookie would delete that one and log the user out.

Values are anything Flask's own session can hold: each is stored as one attribute in Flask's
tagged JSON (`flask.json.tag.TaggedJSONSerializer`, with the app's JSON provider), so
`flash()`, Flask-Login, tuples, bytes, datetimes and UUIDs work, and plain values (str,
numbers, lists, dicts) are plain JSON any other client can read. A list or dict read from the
session and changed in place is written back too. Values stored raw by earlier versions
(UTF-8 text, bytes) still read as `str` or `bytes`, unless the text happens to be valid JSON:
then it reads as that JSON (`"2"` stored raw reads as `2`).
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any, Callable, Dict, Iterator, Mapping, NamedTuple, Optional, Set, Union

from flask import Flask, Request, Response
from flask import session as _current_session
from flask.json.provider import DefaultJSONProvider
from flask.json.tag import TaggedJSONSerializer
from flask.sessions import SessionInterface, SessionMixin, session_json_serializer

from .client import Session, SessionClient, _encode
from .errors import Conflict, NotFound

__all__ = ["SessiondSession", "SessiondSessionInterface", "COOKIE_NAME", "regenerate_on_login"]

COOKIE_NAME = "__Host-sid"
"""The cookie's name while the app's SESSION_COOKIE_NAME is Flask's default ("session")."""
_FLASK_DEFAULT_COOKIE_NAME = "session"
# sessiond refuses client info over max_client_info_bytes (1024 by default); a User-Agent
# header is cut to this many bytes so an absurd one cannot make Create fail.
MAX_USER_AGENT_BYTES = 512

# A session ID as sessiond issues them: 43 chars of URL-safe base64 without padding.
_ID_RE = re.compile(r"[A-Za-z0-9_-]{43}")


Changes = Mapping[str, Union[bytes, str, None]]


def _truncate_utf8(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", errors="ignore")


def _tagged_json_loads(text: str) -> Any:
    """Flask's session_json_serializer.loads under DefaultJSONProvider, at a third of the
    cost for the usual value: text with no object in it has no tag to undo, so json.loads
    alone reads it. Text with a "{" goes through the serializer."""
    if "{" in text:
        return session_json_serializer.loads(text)
    return json.loads(text)


class SessiondSession(SessionMixin):
    """One request's view of a sessiond session. Created by SessiondSessionInterface."""

    # `permanent` is SessionMixin's: the key "_permanent", stored like any other.

    def __init__(
        self,
        interface: "SessiondSessionInterface",
        sid: Optional[str],
        ip: str = "",
        user_agent: str = "",
        loads: Optional[Callable[[str], Any]] = None,
    ):
        self._interface = interface
        self._loads = loads or interface.serializer.loads  # a stored value's text -> value
        self._client: SessionClient = interface.client
        self._cookie_sid = sid  # the ID the request's cookie named
        self._sid = sid  # the live ID now (None: no session)
        self._ip = ip
        self._user_agent = user_agent
        self._loaded = sid is None
        self._remote: Optional[Session] = None  # the server's state as last seen
        self._data: Dict[str, bytes] = {}  # _remote's attributes with the pending changes applied
        # Mutable values handed out (lists, dicts), to write back those changed in place.
        self._handed: Dict[str, Any] = {}
        self._set: Dict[str, bytes] = {}  # pending: keys to set
        self._remove: Set[str] = set()  # pending: keys to remove
        self._expired = False  # the cookie named a session that is gone
        # The live session is the one the cookie named, or a regeneration of it: the one
        # the browser's cookie stands for.
        self._from_cookie = sid is not None
        self._clear_cookie = False  # the handler ended that session: clear the cookie
        self.new = sid is None
        self.modified = False
        self.accessed = False
        if sid is not None and not _ID_RE.fullmatch(sid):
            # Not an ID sessiond could have issued: as gone as an unknown one.
            self._mark_gone()

    # --- state ----------------------------------------------------------------------

    def _load(self) -> None:
        if self._loaded or self._sid is None:  # unloaded means a cookie's ID to read
            return
        try:
            self._adopt(self._client.get(self._sid))
        except NotFound:
            self._mark_gone()

    def _adopt(self, remote: Session) -> None:
        """Takes the server's state, keeping this request's pending changes on top."""
        self._sid = remote.id
        self._remote = remote
        data = dict(remote.attributes)
        data.update(self._set)
        for key in self._remove:
            data.pop(key, None)
        self._data = data
        self._loaded = True

    def _mark_gone(self) -> None:
        if self._sid is not None and self._sid == self._cookie_sid:
            self._expired = True
        self._sid = None
        self._from_cookie = False
        self._remote = None
        self._data = dict(self._set)
        self._remove.clear()
        self._loaded = True

    def _reset(self) -> None:
        self._handed.clear()
        self._sid = None
        self._from_cookie = False
        self._remote = None
        self._data = {}
        self._set.clear()
        self._remove.clear()
        self._loaded = True

    def _decode(self, value: bytes) -> Any:
        if not self._interface.decode_values:
            return value
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return value  # raw bytes, as stored by earlier versions
        try:
            return self._loads(text)
        except ValueError:
            return text  # raw UTF-8 text, as stored by earlier versions

    def _encode_value(self, key: str, value: Any) -> bytes:
        try:
            return self._interface.serializer.dumps(value).encode("utf-8")
        except TypeError as err:
            raise TypeError(
                f"session[{key!r}]: {type(value).__name__} is not serializable to JSON: {err}"
            ) from None

    def _changed_in_place(self) -> None:
        """Queues the mutable values set or handed out this request whose JSON changed
        since (as Flask's own session, which serializes at the end of the request)."""
        for key, value in self._handed.items():
            if key not in self._data:
                continue
            encoded = self._encode_value(key, value)
            if encoded != self._data[key]:
                self._set[key] = encoded
                self._remove.discard(key)
                self._data[key] = encoded
        self._handed.clear()

    # --- what the app can ask --------------------------------------------------------

    @property
    def sid(self) -> Optional[str]:
        """The live session ID, or None if there is no session (loads it)."""
        self._load()
        return self._sid

    @property
    def exists(self) -> bool:
        """Whether there is a live session behind this request (loads it)."""
        return self.sid is not None

    @property
    def expired(self) -> bool:
        """True if the request's cookie named a session that is gone (expired, destroyed,
        unknown or malformed). Loads the session."""
        self._load()
        return self._expired

    @property
    def had_cookie(self) -> bool:
        return self._cookie_sid is not None

    @property
    def user_id(self) -> Optional[str]:
        """The user bound to the session, or None (anonymous or no session)."""
        self._load()
        return (self._remote.user_id or None) if self._remote else None

    @property
    def version(self) -> Optional[int]:
        """The session's version as last seen from sessiond (loads it)."""
        self._load()
        return self._remote.version if self._remote else None

    @property
    def remote(self) -> Optional[Session]:
        """The session as sessiond last returned it (without this request's pending changes)."""
        self._load()
        return self._remote

    def raw(self) -> Dict[str, bytes]:
        """All attributes as stored (each value's JSON, or raw bytes from earlier versions),
        with the pending changes set or deleted so far."""
        self._load()
        return dict(self._data)

    # --- the mapping ---------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._load()
        if key in self._handed:
            return self._handed[key]
        value = self._decode(self._data[key])
        if isinstance(value, (list, dict)):
            self._handed[key] = value
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError("session keys must be str")
        encoded = self._encode_value(key, value)
        if isinstance(value, (list, dict)):
            self._handed[key] = value  # changed after this, it is written as it ends up
        else:
            self._handed.pop(key, None)
        self._set[key] = encoded
        self._remove.discard(key)
        if self._loaded:
            self._data[key] = encoded
        self.modified = True

    def __delitem__(self, key: str) -> None:
        self._load()
        if key not in self._data:
            raise KeyError(key)
        del self._data[key]
        self._handed.pop(key, None)
        self._set.pop(key, None)
        if self._sid is not None:
            self._remove.add(key)
        self.modified = True

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._data))

    def __len__(self) -> int:
        self._load()
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        self._load()
        return key in self._data

    def __repr__(self) -> str:
        state = "unloaded" if not self._loaded else f"{len(self._data)} keys"
        return f"<SessiondSession {'live' if self._sid else 'none'} {state}>"

    # --- session lifecycle -----------------------------------------------------------

    def _create(self, user_id: str, attributes: Mapping[str, bytes]) -> Session:
        created = self._client.create(
            user_id=user_id,
            attributes=attributes,
            idle_timeout=self._interface.idle_timeout,
            absolute_timeout=self._interface.absolute_timeout,
            ip=self._ip,
            user_agent=self._user_agent,
        )
        self._from_cookie = False
        return created

    def regenerate(self, user_id: Optional[str] = None, *, drop_attributes: bool = False) -> Session:
        """Moves the session to a fresh ID, binding `user_id` if given (call it on login and
        on every privilege change). The old ID is dead when this returns and the response
        carries the new cookie. Without a live session, creates one bound to `user_id`.

        drop_attributes: start the new session empty (this request's pending changes are
        dropped too)."""
        if drop_attributes:
            self._set.clear()
            self._remove.clear()
        remote = None
        if self._sid is not None:
            try:
                remote = self._client.regenerate(
                    self._sid, user_id=user_id, drop_attributes=drop_attributes
                )
            except NotFound:
                self._mark_gone()
        if remote is None:
            remote = self._create(user_id or "", dict(self._set))
            self._set.clear()
        self._adopt(remote)
        self.modified = True
        return remote

    def destroy(self) -> bool:
        """Ends this session (logout). True if a live one ended; the cookie is then cleared
        if it named that session (a cookie that named a dead one is left alone)."""
        existed = False
        if self._sid is not None:
            try:
                existed = self._client.destroy(self._sid)
            except NotFound:
                existed = False
        if existed and self._from_cookie:
            self._clear_cookie = True
        self._reset()
        self.modified = True
        return existed

    def destroy_all_for_user(self, *, except_current: bool = False) -> int:
        """Ends every session of this session's user ("log out everywhere"); this one too
        unless except_current. Returns how many ended; 0 if the session is anonymous."""
        user = self.user_id
        if user is None:
            return 0
        n = self._client.destroy_user_sessions(
            user, except_id=(self._sid or "") if except_current else ""
        )
        if not except_current:
            if self._from_cookie:
                self._clear_cookie = True
            self._reset()
            self.modified = True
        return n

    def compare_and_set(
        self, change: Callable[[Dict[str, bytes]], Changes], *, attempts: int = 64
    ) -> Session:
        """Read-modify-write without lost updates: calls `change(attributes)` on the current
        attributes (bytes values) and writes what it returns (key -> value, None = remove)
        with Update's expected_version, re-reading and retrying on a conflict. It works on
        the raw stored bytes, not through the JSON encoding of `session[key]`: a str or bytes
        it returns is stored as is (so text that is valid JSON reads back through
        `session[key]` as that JSON). Without a
        live session, creates one with the changes. Returns the session as written.

        Raises NotFound if the session disappears midway (the cookie is then cleared),
        Conflict if it still loses after `attempts` tries."""
        self._load()
        if self._sid is None:
            changes = change({})
            remote = self._create("", {k: _encode(v) for k, v in changes.items() if v is not None})
            self._adopt(remote)
            self.modified = True
            return remote
        snapshot = self._remote
        assert snapshot is not None
        last: Optional[Conflict] = None
        for _ in range(attempts):
            changes = change(dict(snapshot.attributes))
            sets = {k: _encode(v) for k, v in changes.items() if v is not None}
            removes = [k for k, v in changes.items() if v is None]
            try:
                remote = self._client.update(
                    snapshot.id, set=sets, remove=removes, expected_version=snapshot.version
                )
            except NotFound:
                self._mark_gone()
                raise
            except Conflict as err:
                last = err
                try:
                    snapshot = self._client.get(snapshot.id)
                except NotFound:
                    self._mark_gone()
                    raise
                continue
            self._adopt(remote)
            return remote
        assert last is not None
        raise last


class _Cookie(NamedTuple):
    """The session cookie's attributes for one app, resolved from its config."""

    name: str
    domain: Optional[str]
    path: str
    secure: bool
    httponly: bool
    samesite: Optional[str]
    partitioned: bool


_UNSET: Any = object()


class SessiondSessionInterface(SessionInterface):
    """Keeps Flask's `session` in sessiond; the cookie holds only the session ID.

    client: a SessionClient (share one per process).
    idle_timeout / absolute_timeout: asked for at Create (seconds or timedelta); None =
    the server's defaults. They bound the session; the cookie of a permanent session lasts
    PERMANENT_SESSION_LIFETIME, but names a dead session once sessiond's timeouts end it.
    cookie_name / secure / samesite: override SESSION_COOKIE_NAME / _SECURE / _SAMESITE.
    Otherwise the cookie follows the app's SESSION_COOKIE_* settings, except that Flask's
    default name ("session") becomes "__Host-sid" and its default SameSite (none) "Lax";
    a "__Host-" or "__Secure-" name is always Secure. A "__Host-" cookie with a Domain or a
    Path other than "/" is refused with a ValueError naming the setting (browsers drop it).
    decode_values: False hands out the stored bytes as they are, undecoded.
    serializer: how each value is encoded (Flask's session serializer by default: tagged
    JSON through the app's JSON provider); any object with dumps(value) -> str and
    loads(str) -> value raising ValueError on what it cannot read.
    """

    serializer: TaggedJSONSerializer = session_json_serializer

    def __init__(
        self,
        client: SessionClient,
        *,
        idle_timeout: Union[None, int, float, timedelta] = None,
        absolute_timeout: Union[None, int, float, timedelta] = None,
        cookie_name: Optional[str] = None,
        secure: Optional[bool] = None,
        samesite: Optional[str] = _UNSET,
        decode_values: bool = True,
        serializer: Any = None,
    ):
        self.client = client
        self.idle_timeout = idle_timeout
        self.absolute_timeout = absolute_timeout
        self.cookie_name = cookie_name
        self.secure = secure
        self.samesite = samesite
        self.decode_values = decode_values
        if serializer is not None:
            self.serializer = serializer

    # --- the cookie, from the app's config ---------------------------------------------

    def get_cookie_name(self, app: Flask) -> str:
        if self.cookie_name is not None:
            return self.cookie_name
        name = app.config["SESSION_COOKIE_NAME"]
        return COOKIE_NAME if name == _FLASK_DEFAULT_COOKIE_NAME else name

    def get_cookie_secure(self, app: Flask) -> bool:
        if self.secure is not None:
            return self.secure
        name = self.get_cookie_name(app)
        return bool(app.config["SESSION_COOKIE_SECURE"]) or name.startswith(("__Host-", "__Secure-"))

    def get_cookie_samesite(self, app: Flask) -> Optional[str]:
        if self.samesite is not _UNSET:
            return self.samesite
        return app.config["SESSION_COOKIE_SAMESITE"] or "Lax"

    def get_cookie_partitioned(self, app: Flask) -> bool:
        return bool(app.config.get("SESSION_COOKIE_PARTITIONED", False))

    def cookie(self, app: Flask) -> _Cookie:
        """The cookie's attributes as this app's config and the interface's arguments say."""
        c = _Cookie(
            name=self.get_cookie_name(app),
            domain=self.get_cookie_domain(app),
            path=self.get_cookie_path(app),
            secure=self.get_cookie_secure(app),
            httponly=self.get_cookie_httponly(app),
            samesite=self.get_cookie_samesite(app),
            partitioned=self.get_cookie_partitioned(app),
        )
        if c.name.startswith("__Host-"):
            if c.domain:
                raise ValueError(
                    f"SESSION_COOKIE_DOMAIN is set, but the cookie name {c.name!r} has the "
                    "__Host- prefix, which forbids a Domain: set SESSION_COOKIE_NAME too"
                )
            if c.path != "/":
                raise ValueError(
                    f"the session cookie's path is {c.path!r} (SESSION_COOKIE_PATH or "
                    f"APPLICATION_ROOT), but the name {c.name!r} has the __Host- prefix, "
                    "which needs Path=/: set SESSION_COOKIE_NAME too"
                )
            if not c.secure:
                raise ValueError(
                    f"the cookie name {c.name!r} has the __Host- prefix, which needs Secure "
                    "(secure=False was given): pass another cookie_name"
                )
        return c

    def open_session(self, app: Flask, request: Request) -> SessiondSession:
        sid = request.cookies.get(self.cookie(app).name) or None
        ua = _truncate_utf8(request.headers.get("User-Agent", ""), MAX_USER_AGENT_BYTES)
        return SessiondSession(
            self, sid, ip=request.remote_addr or "", user_agent=ua, loads=self._value_loads(app)
        )

    def _value_loads(self, app: Flask) -> Callable[[str], Any]:
        """How this app's stored values are read: the serializer's loads, or, with Flask's
        defaults (tagged JSON through DefaultJSONProvider), _tagged_json_loads."""
        if self.serializer is session_json_serializer and (
            type(app.json).loads is DefaultJSONProvider.loads
        ):
            return _tagged_json_loads
        return self.serializer.loads

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not isinstance(session, SessiondSession):  # pragma: no cover - a foreign session
            return
        s = session
        cookie = self.cookie(app)
        s._changed_in_place()
        permanence_changed = "_permanent" in s._set or "_permanent" in s._remove
        if s._set or s._remove:
            s.accessed = True
            if s._sid is not None:
                try:
                    s._adopt(s._client.update(s._sid, set=s._set, remove=sorted(s._remove)))
                except NotFound:
                    s._mark_gone()
            if s._sid is None and s._set:
                # No live session (none, gone or destroyed) and the request stored data.
                s._adopt(s._create("", dict(s._set)))
            s._set.clear()
            s._remove.clear()

        if s.accessed:
            response.vary.add("Cookie")
        # The cookie changes only when this response knows better than the browser: a new ID
        # to learn, the session made permanent or not, or the cookie's own session ended by
        # this request. A cookie that named a dead session is not cleared (see the module
        # docs); nor is an unchanged one sent again to slide a permanent cookie's expiry: a
        # request that started before a login elsewhere would overwrite the login's cookie.
        if s._sid is not None and (s._sid != s._cookie_sid or permanence_changed):
            response.set_cookie(
                cookie.name,
                s._sid,
                expires=self.get_expiration_time(app, s),
                domain=cookie.domain,
                path=cookie.path,
                secure=cookie.secure,
                httponly=cookie.httponly,
                samesite=cookie.samesite,
                partitioned=cookie.partitioned,
            )
        elif s._sid is None and s._clear_cookie:
            response.delete_cookie(
                cookie.name,
                domain=cookie.domain,
                path=cookie.path,
                secure=cookie.secure,
                httponly=cookie.httponly,
                samesite=cookie.samesite,
                partitioned=cookie.partitioned,
            )

    # Conveniences on the current request's session (flask.session).
    @staticmethod
    def current() -> SessiondSession:
        sess = _current_session._get_current_object()  # type: ignore[attr-defined]
        if not isinstance(sess, SessiondSession):
            raise RuntimeError("the app's session_interface is not SessiondSessionInterface")
        return sess

    def regenerate(self, user_id: Optional[str] = None, *, drop_attributes: bool = False) -> Session:
        """session.regenerate() on the current request's session."""
        return self.current().regenerate(user_id, drop_attributes=drop_attributes)

    def destroy(self) -> bool:
        """session.destroy() on the current request's session."""
        return self.current().destroy()

    def destroy_all_for_user(self, *, except_current: bool = False) -> int:
        """session.destroy_all_for_user() on the current request's session."""
        return self.current().destroy_all_for_user(except_current=except_current)


def regenerate_on_login(app: Flask, *, bind_user: bool = True) -> None:
    """Regenerates the session whenever Flask-Login logs a user in or out of `app`, so no
    session ID lives across a login (session fixation; OWASP ASVS 7.2.4).

    On `user_logged_in`, and on `user_loaded_from_cookie` (a "remember me" cookie logging
    the user back in), the session moves to a fresh ID bound to `user.get_id()` (with
    bind_user; otherwise it stays anonymous in sessiond), so `session.user_id`,
    `destroy_all_for_user()` and sessiond's per-user listing follow the login. On
    `user_logged_out` it moves to a fresh anonymous ID. Attributes are carried over both
    times, like Flask-Login's own keys that `login_user` just wrote. Call it once, after
    setting the app's session_interface.
    """
    try:
        from flask_login import user_loaded_from_cookie, user_logged_in, user_logged_out
    except ImportError as err:  # pragma: no cover - flask_login is optional
        raise RuntimeError("regenerate_on_login needs Flask-Login (pip install flask-login)") from err

    def logged_in(sender: Flask, user: Any = None, **_: Any) -> None:
        user_id = str(user.get_id()) if bind_user and user is not None else None
        SessiondSessionInterface.current().regenerate(user_id)

    def logged_out(sender: Flask, user: Any = None, **_: Any) -> None:
        SessiondSessionInterface.current().regenerate("" if bind_user else None)

    # Blinker holds receivers weakly: keep them alive as long as the app.
    app.extensions["sessiond_regenerate_on_login"] = (logged_in, logged_out)
    user_logged_in.connect(logged_in, app)
    user_loaded_from_cookie.connect(logged_in, app)
    user_logged_out.connect(logged_out, app)
