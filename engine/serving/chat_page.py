"""The chat page at ``GET /``: ``chat_page.html`` with the headers that keep it self-contained.

The page is one file with its script and style inline. Its Content-Security-Policy
lets the browser run exactly that script and style (named by their SHA-256 hashes,
so no other inline code can run, as injected markup would need) and talk to this
server only: nothing is fetched from another origin. The page holds no secret, so
it is served without the API key; it asks for the key when the API refuses it.
"""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from starlette.responses import Response

PAGE_PATH = "/"
PAGE_FILE = Path(__file__).with_name("chat_page.html")


def _hash_sources(html: str, tag: str) -> str:
    """The CSP sources ('sha256-...') for every inline ``<tag>`` block of ``html``."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    assert blocks, f"the chat page has no <{tag}> block"
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


def content_security_policy(html: str) -> str:
    """Only this page's own script and style run; requests go to this server alone."""
    return "; ".join([
        "default-src 'none'",  # anything not named below is refused
        f"script-src {_hash_sources(html, 'script')}",
        f"style-src {_hash_sources(html, 'style')}",
        "connect-src 'self'",  # fetch() reaches this server and no other
        "img-src data:",  # the empty favicon, so the browser does not ask the server for one
        "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    ])


@dataclass(frozen=True)
class ChatPage:
    html: bytes
    headers: dict[str, str]

    @classmethod
    def load(cls, path: Path = PAGE_FILE) -> ChatPage:
        html = path.read_text(encoding="utf-8")
        return cls(html.encode("utf-8"), {
            "Content-Security-Policy": content_security_policy(html),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",  # a new version of the server brings its page at once
        })

    def response(self) -> Response:
        return Response(self.html, media_type="text/html; charset=utf-8", headers=self.headers)
