"""The Django session engine (sessiond_client.django) against a real sessiond, through
Django's test client, auth, messages and SessionMiddleware (Django is configured in
conftest.py; pytest-django runs it)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from datetime import timedelta

import pytest
from django.contrib import messages
from django.contrib.auth import authenticate, get_user_model, login, logout
from django.contrib.sessions.backends.base import UpdateError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.test import Client
from django.urls import path

from harness import wait_until_expired
from sessiond_client import NotFound, SessionClient
from sessiond_client.django import SessionStore, logout_other_devices, other_devices

COOKIE = "sessionid"
_user_ids = itertools.count(1000)  # one daemon for the whole run: never reuse a user ID


# --- the app ----------------------------------------------------------------------------


def set_view(request: HttpRequest) -> HttpResponse:
    request.session[request.GET["k"]] = request.GET["v"]
    return HttpResponse("ok")


def whoami(request: HttpRequest) -> JsonResponse:
    user = request.user.pk if request.user.is_authenticated else None
    return JsonResponse({"user": user, "data": dict(request.session.items())})


def login_view(request: HttpRequest) -> HttpResponse:
    user = authenticate(request, username=request.POST["username"], password=request.POST["password"])
    if user is None:
        return HttpResponse(status=403)
    login(request, user)
    return HttpResponse("ok")


def logout_view(request: HttpRequest) -> HttpResponse:
    logout(request)
    return HttpResponse("bye")


def flash_view(request: HttpRequest) -> HttpResponse:
    messages.success(request, "saved")
    return redirect("/show/")


def show_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"messages": [str(m) for m in messages.get_messages(request)]})


def devices_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"others": [s.created_at.isoformat() for s in other_devices(request)]})


def logout_others_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ended": logout_other_devices(request)})


urlpatterns = [
    path("set/", set_view),
    path("whoami/", whoami),
    path("login/", login_view),
    path("logout/", logout_view),
    path("flash/", flash_view),
    path("show/", show_view),
    path("devices/", devices_view),
    path("logout-others/", logout_others_view),
]


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def django_app(settings, sessiond):
    settings.ROOT_URLCONF = __name__
    settings.SESSIOND_ADDRESS = sessiond.addr


@pytest.fixture
def user(db):
    """A fresh user with the password "pw"."""
    n = next(_user_ids)
    return get_user_model().objects.create_user(f"user{n}", password="pw", id=n)


def sid(browser: Client) -> str:
    return browser.cookies[COOKIE].value


def stored(browser: Client, query: dict) -> str:
    """Sets a session key through the app; returns the session's ID from the cookie."""
    assert browser.get("/set/", query).status_code == 200
    return sid(browser)


def logged_in(user) -> Client:
    browser = Client()
    assert browser.post("/login/", {"username": user.username, "password": "pw"}).status_code == 200
    return browser


# --- the tests --------------------------------------------------------------------------


def test_session_values_are_json_attributes(client: SessionClient):
    browser = Client()
    key = stored(browser, {"k": "cart", "v": "apple"})
    assert sid(browser) == key
    assert client.get(key).attributes == {"cart": b'"apple"'}
    assert browser.get("/whoami/").json() == {"user": None, "data": {"cart": "apple"}}


def test_login_cycles_the_key_and_binds_the_user(client: SessionClient, user):
    browser = Client()
    browser.get("/set/", {"k": "cart", "v": "apple"})
    before = sid(browser)

    assert browser.post("/login/", {"username": user.username, "password": "pw"}).status_code == 200
    after = sid(browser)
    assert after != before
    with pytest.raises(NotFound):
        client.get(before)
    remote = client.get(after)
    assert remote.user_id == str(user.pk)
    assert remote.attributes["cart"] == b'"apple"'  # carried over the login
    assert [s.id for s in client.list_user_sessions(str(user.pk))] == [after]
    assert browser.get("/whoami/").json()["user"] == user.pk


def test_logout_destroys_the_session(client: SessionClient, user):
    browser = logged_in(user)
    key = sid(browser)
    browser.post("/logout/")
    with pytest.raises(NotFound):
        client.get(key)
    assert sid(browser) == ""  # the cookie is cleared
    assert client.list_user_sessions(str(user.pk)) == []
    assert browser.get("/whoami/").json() == {"user": None, "data": {}}


def test_an_unknown_key_is_no_session(client: SessionClient):
    made_up = "A" * 43
    browser = Client()
    browser.cookies[COOKIE] = made_up
    assert browser.get("/whoami/").json()["data"] == {}
    key = stored(browser, {"k": "a", "v": "1"})
    assert key != made_up
    with pytest.raises(NotFound):
        client.get(made_up)
    assert not SessionStore().exists(made_up)
    assert SessionStore().exists(key)


def test_messages_survive_a_redirect(client: SessionClient):
    browser = Client()
    r = browser.get("/flash/", follow=True)
    assert r.redirect_chain == [("/show/", 302)]
    assert r.json() == {"messages": ["saved"]}
    assert "messages" not in browser.cookies  # in the session, not a cookie
    assert browser.get("/show/").json() == {"messages": []}  # shown once


def test_save_sends_only_the_changed_keys(client: SessionClient):
    store = SessionStore()
    store.update({"a": 1, "b": [1, 2]})
    store.create()
    key = store.session_key
    client.update(key, set={"other": b'"theirs"'})  # another writer, unseen by `later`
    version = client.get(key).version

    later = SessionStore(key)
    del later["a"]
    later["b"].append(3)  # changed in place
    later["c"] = {"x": None}
    later.save()
    remote = client.get(key)
    assert remote.version == version + 1  # one Update
    assert remote.attributes == {"b": b"[1,2,3]", "c": b'{"x":null}', "other": b'"theirs"'}


def test_a_session_another_adapter_logged_in_keeps_its_user(client: SessionClient):
    """A session bound by another adapter has no `_auth_user_id`; a Django write to it is
    a plain Update, with no move and no unbinding."""
    anonymous = client.create(attributes={"cart:apple": b"1"})
    bound = client.regenerate(anonymous.id, user_id="ann")  # the axum storefront's login
    store = SessionStore(bound.id)
    store["theme"] = "dark"
    store.save()
    assert store.session_key == bound.id
    remote = client.get(bound.id)
    assert (remote.user_id, remote.version) == ("ann", bound.version + 1)
    assert remote.attributes == {"cart:apple": b"1", "theme": b'"dark"'}


def test_a_session_ended_meanwhile_is_not_brought_back(client: SessionClient):
    store = SessionStore()
    store["a"] = 1
    store.create()
    key = store.session_key
    loaded = SessionStore(key)
    assert loaded["a"] == 1
    client.destroy(key)  # a logout in another tab
    loaded["b"] = 2
    with pytest.raises(UpdateError):
        loaded.save()
    assert not loaded.exists(key)


def test_create_never_takes_the_callers_key(client: SessionClient):
    for chosen in ("A" * 43, "B" * 43):  # the second is not even canonical base64
        store = SessionStore(chosen)
        store["k"] = "v"
        store.save()
        assert store.session_key != chosen
        assert client.get(store.session_key).attributes == {"k": b'"v"'}
        assert not store.exists(chosen)


def test_concurrent_requests_keep_each_others_keys(client: SessionClient):
    first = Client()
    key = stored(first, {"k": "start", "v": "0"})
    n = 8
    barrier = threading.Barrier(n)
    errors = []

    def write(i: int) -> None:
        browser = Client()
        browser.cookies[COOKIE] = key
        barrier.wait()
        try:
            assert browser.get("/set/", {"k": f"k{i}", "v": str(i)}).status_code == 200
            assert sid(browser) == key
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = {"start": b'"0"', **{f"k{i}": f'"{i}"'.encode() for i in range(n)}}
    assert client.get(key).attributes == expected


def test_session_cookie_age_is_the_idle_timeout(client: SessionClient, settings):
    browser = Client()
    key = stored(browser, {"k": "a", "v": "1"})
    # Django's default two weeks, capped at the daemon's default max_idle_timeout.
    assert client.get(key, peek=True).idle_timeout == timedelta(days=7)
    assert browser.cookies[COOKIE]["max-age"] == settings.SESSION_COOKIE_AGE

    settings.SESSION_COOKIE_AGE = 600
    key = stored(Client(), {"k": "a", "v": "1"})
    assert client.get(key, peek=True).idle_timeout == timedelta(seconds=600)


def test_expire_at_browser_close_sends_a_browser_session_cookie(client: SessionClient, settings):
    settings.SESSION_EXPIRE_AT_BROWSER_CLOSE = True
    settings.SESSION_COOKIE_AGE = 600
    browser = Client()
    key = stored(browser, {"k": "a", "v": "1"})
    assert browser.cookies[COOKIE]["max-age"] == ""
    assert browser.cookies[COOKIE]["expires"] == ""
    assert client.get(key, peek=True).idle_timeout == timedelta(seconds=600)


def test_a_short_session_cookie_age_expires_the_session(client: SessionClient, settings):
    """SESSION_COOKIE_AGE = 1: the session is gone after a second idle (a bounded poll with
    peek, which does not slide it; sessiond's timeouts are whole seconds at the least)."""
    settings.SESSION_COOKIE_AGE = 1
    browser = Client()
    key = stored(browser, {"k": "a", "v": "1"})
    wait_until_expired(client, key, within=10)
    assert browser.get("/whoami/").json()["data"] == {}


def test_async_methods(client: SessionClient):
    async def scenario() -> None:
        store = SessionStore()
        await store.aset("cart", ["apple"])
        await store.asave()
        key = store.session_key
        assert client.get(key).attributes == {"cart": b'["apple"]'}

        loaded = SessionStore(key)
        assert await loaded.aget("cart") == ["apple"]
        await loaded.aset("n", 2)
        await loaded.asave()
        assert client.get(key).attributes == {"cart": b'["apple"]', "n": b"2"}

        await loaded.acycle_key()
        assert loaded.session_key != key
        assert not await loaded.aexists(key)
        assert await loaded.aexists(loaded.session_key)
        assert client.get(loaded.session_key).attributes["n"] == b"2"

        user = f"async-{next(_user_ids)}"
        await loaded.aset("_auth_user_id", user)  # as alogin() stores it
        await loaded.asave()
        assert [s.id for s in client.list_user_sessions(user)] == [loaded.session_key]

        moved = loaded.session_key
        await loaded.aflush()
        assert loaded.session_key is None
        assert not await loaded.aexists(moved)
        assert list(await loaded.akeys()) == []

    asyncio.run(scenario())


def test_logout_other_devices(client: SessionClient, user):
    phone, laptop, desk = logged_in(user), logged_in(user), logged_in(user)
    started = {s.id: s.created_at.isoformat() for s in client.list_user_sessions(str(user.pk))}
    assert set(started) == {sid(phone), sid(laptop), sid(desk)}

    others = desk.get("/devices/").json()["others"]
    assert sorted(others) == sorted([started[sid(phone)], started[sid(laptop)]])
    assert desk.post("/logout-others/").json() == {"ended": 2}
    assert phone.get("/whoami/").json()["user"] is None
    assert laptop.get("/whoami/").json()["user"] is None
    assert desk.get("/whoami/").json()["user"] == user.pk
    assert [s.id for s in client.list_user_sessions(str(user.pk))] == [sid(desk)]
    assert desk.get("/devices/").json()["others"] == []
    assert Client().post("/logout-others/").json() == {"ended": 0}  # anonymous
