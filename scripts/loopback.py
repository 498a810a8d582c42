"""What a server on loopback answers: its own names, and its own pages' writes.

Any web page can make the browser send requests to 127.0.0.1; two checks tell them apart from
the user's own (as Jupyter and Vite do):

- Host. A DNS-rebinding page reaches the server under its own name (attacker.example, made to
  resolve to 127.0.0.1), and the browser then lets it read the answers. Only the loopback
  names are answered: 127.0.0.1 and localhost ([::1] where bound there), any port (the port
  is the listener's already). Starlette's TrustedHostMiddleware decides; a refusal is JSON.
- Origin and Sec-Fetch-Site, with `check_origin`. A cross-site page keeps its own origin, so a
  state-changing request (POST, PUT, ...) from any origin but the server's own is refused.
  Without an Origin (curl, the CLI, boto3) a request is not a browser's cross-site one.

    Middleware(LoopbackGuard, bind_address="127.0.0.1", check_origin=True)
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sec-Fetch-Site values of a request the server's own page (or the user, typing the address)
# made; "same-site" is another port on the same machine, which is another origin.
OWN_FETCH_SITES = frozenset({"same-origin", "none"})
# A refused value is quoted back, cut short: it is the sender's, of any length.
QUOTED_CHARS = 100

Refusal = Callable[[int, str, str], Response]  # (status, error code, message) -> response


def json_refusal(status: int, error: str, message: str) -> Response:
    return JSONResponse({"error": error, "message": message}, status_code=status)


def allowed_hosts(bind_address: str = "127.0.0.1") -> list[str]:
    """The Host names a server bound to `bind_address` answers (as TrustedHostMiddleware
    spells them: IPv6 literals in brackets)."""
    if bind_address == "::1":
        return ["[::1]", "localhost"]
    if bind_address in ("127.0.0.1", "localhost"):
        return ["127.0.0.1", "localhost"]
    raise ValueError(f"{bind_address!r} is not a loopback address: this guard is for loopback")


def quoted(value: str | None) -> str:
    if value is None:
        return "none"
    return repr(value if len(value) <= QUOTED_CHARS else value[:QUOTED_CHARS] + "...")


class LoopbackGuard:
    """ASGI middleware: Host (always) and, with `check_origin`, the Origin of unsafe methods
    and websocket handshakes. A refusal is `refusal(status, error, message)`."""

    def __init__(
        self,
        app: ASGIApp,
        bind_address: str = "127.0.0.1",
        check_origin: bool = False,
        refusal: Refusal = json_refusal,
    ) -> None:
        self.app = app
        self.hosts = allowed_hosts(bind_address)
        self.names = {host.strip("[]") for host in self.hosts}  # as urlsplit gives them
        self.check_origin = check_origin
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        admitted = False

        async def admit(scope: Scope, receive: Receive, _send: Send) -> None:
            nonlocal admitted
            admitted = True

        async def discard(message: dict) -> None:
            pass  # TrustedHostMiddleware's plain-text refusal: ours is JSON

        await TrustedHostMiddleware(admit, allowed_hosts=self.hosts, www_redirect=False)(
            scope, receive, discard
        )
        headers = Headers(scope=scope)
        if not admitted:
            refused = self.refusal(
                400,
                "bad_host",
                f"Host {quoted(headers.get('host'))} is not this server's: it answers "
                f"{' or '.join(self.hosts)} only (DNS-rebinding protection); open it as "
                f"http://{self.hosts[0]}:<port>/",
            )
        elif self.check_origin and scope.get("method", "WEBSOCKET") not in SAFE_METHODS:
            # a websocket has no CORS at all: its handshake is checked like a write
            refused = self.foreign_origin(headers)
        else:
            refused = None
        if refused is None:
            await self.app(scope, receive, send)
        else:
            await refused(scope, receive, send)

    def foreign_origin(self, headers: Headers) -> Response | None:
        """A refusal when the request came from a page of another origin, else None."""
        site = headers.get("sec-fetch-site")
        if site is not None and site.lower() not in OWN_FETCH_SITES:
            return self.refusal(
                403,
                "cross_origin",
                f"requests from other sites are refused (Sec-Fetch-Site: {quoted(site)}): "
                "use this server's own page, or send no Origin (curl, the CLI)",
            )
        origin = headers.get("origin")
        if origin is None or self.own_origin(origin, headers["host"]):
            return None
        return self.refusal(
            403,
            "cross_origin",
            f"Origin {quoted(origin)} is not this server's own (http://{self.hosts[0]}:<port>): "
            "requests from other pages are refused; send no Origin (curl, the CLI) or use this "
            "server's own page",
        )

    def own_origin(self, origin: str, host: str) -> bool:
        """http, a loopback name, and the port the browser addressed (the Host header's)."""
        origin = origin.lower()
        try:
            sent, addressed = urlsplit(origin), urlsplit(f"//{host}")
            return (
                origin == f"http://{sent.netloc}"  # no path, no user: an origin is just that
                and "@" not in sent.netloc
                and sent.hostname in self.names
                and (sent.port or 80) == (addressed.port or 80)
            )
        except ValueError:  # a port that is not a number, a stray bracket
            return False
