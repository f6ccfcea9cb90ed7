"""The storefront's session middleware: Django's, with the contract's rules for a cookie
whose session is gone and for sessiond's errors."""

from __future__ import annotations

from typing import Optional

from django.conf import settings
from django.contrib.sessions.middleware import SessionMiddleware
from django.http import HttpRequest, HttpResponse, JsonResponse

from sessiond_client import InvalidArgument, NotFound, ResourceExhausted, SessiondError
from sessiond_client.django import client


def error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def failure(err: SessiondError) -> JsonResponse:
    """sessiond's refusal as the contract's answer: a limit is 429, anything else 503."""
    if isinstance(err, ResourceExhausted):
        return error(429, err.message)
    return error(503, f"session store error: {err}")


class StorefrontSessionMiddleware(SessionMiddleware):
    """Django's SessionMiddleware, plus the contract's rules:

    - The session behind the cookie is read once, up front, into `request.sessiond` (None
      without a cookie).
    - A cookie whose session is gone gets 401 {"error": "session expired"} on every route,
      and no Set-Cookie: it may be a late request from before a login in another tab, and
      clearing the cookie would delete the newer one. (Django's own middleware would clear
      it.)
    - sessiond's errors, here or while the session is saved, are 429 or 503."""

    def process_request(self, request: HttpRequest) -> Optional[HttpResponse]:
        super().process_request(request)
        request.sessiond = None
        request.answered_early = False  # refused here: Django's session is left alone
        sid = request.COOKIES.get(settings.SESSION_COOKIE_NAME)
        if sid is None:
            return None
        try:
            request.sessiond = client().get(sid)
        except (NotFound, InvalidArgument):  # gone, or never an ID sessiond issued
            request.answered_early = True
            return error(401, "session expired")
        except SessiondError as err:
            request.answered_early = True
            return failure(err)
        return None

    def process_exception(self, request: HttpRequest, exception: Exception) -> Optional[HttpResponse]:
        if isinstance(exception, NotFound):  # ended while this request ran
            return error(401, "session expired")
        if isinstance(exception, SessiondError):
            return failure(exception)
        return None

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if getattr(request, "answered_early", False):
            return response  # no cookie to send, and none to clear
        try:
            return super().process_response(request, response)
        except SessiondError as err:
            return failure(err)
