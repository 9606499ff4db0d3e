"""The Django admin of a running server, driven over HTTP as a browser would (a session cookie,
the CSRF token of each form), for end-to-end tests that must go through a real instance."""

from __future__ import annotations

import http.cookiejar
import re
import urllib.parse
import urllib.request

_CSRF_INPUT = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


class AdminSession:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

    def get(self, path: str) -> str:
        with self._opener.open(f"{self.base_url}{path}", timeout=10) as response:
            return response.read().decode()

    def post_form(self, path: str, fields: dict[str, str] | list[tuple[str, str]]) -> str:
        """GET the form at `path` for its CSRF token, then POST `fields` to it; the page after."""
        token = _CSRF_INPUT.search(self.get(path))
        if token is None:
            raise AssertionError(f"no form with a CSRF token at {path}")
        pairs = list(fields.items()) if isinstance(fields, dict) else list(fields)
        body = urllib.parse.urlencode([("csrfmiddlewaretoken", token.group(1)), *pairs]).encode()
        request = urllib.request.Request(
            f"{self.base_url}{path}",
            data=body,
            headers={"Referer": f"{self.base_url}{path}"},
        )
        with self._opener.open(request, timeout=10) as response:
            return response.read().decode()

    def login(self, username: str, password: str) -> AdminSession:
        page = self.post_form(
            "/admin/login/?next=/admin/",
            {"username": username, "password": password, "next": "/admin/"},
        )
        if "Log out" not in page and "logout" not in page:
            raise AssertionError("admin login failed")
        return self
