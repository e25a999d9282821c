"""RFC 8058 one-click unsubscribe: the HTTPS endpoint named in ``List-Unsubscribe``.

With ``[lists] unsubscribe_url = "https://lists.example.com/unsubscribe"`` every distributed
copy carries ``List-Unsubscribe: <URL?list=..&member=..&token=..>, <mailto:...>`` and
``List-Unsubscribe-Post: List-Unsubscribe=One-Click``.  A mail client (or the mailbox
provider's "unsubscribe" button) then sends ``POST URL`` with the body
``List-Unsubscribe=One-Click``; that removes the member at once, no further questions
(RFC 8058 §3.1).  A ``GET`` never unsubscribes (link scanners follow links): it shows a page
with a button that makes the POST.

``UnsubscribeResource(connector)`` is a twisted.web resource; the service serves it behind
TLS (``twisted.web.server.Site``).  The member table is written in a thread.
"""

from __future__ import annotations

import hmac
from html import escape
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.web import resource, server

from tmmail.connectors.listserver_tables import lists

log = Logger(namespace="tmmail.connectors.listserver_web")

ONE_CLICK_BODY = b"List-Unsubscribe=One-Click"


class UnsubscribeResource(resource.Resource):
    isLeaf = True

    def __init__(self, connector: Any) -> None:
        super().__init__()
        self.connector = connector

    def _target(self, request: Any) -> tuple[Any, str] | None:
        def arg(name: str) -> str:
            values = request.args.get(name.encode()) or [b""]
            return values[0].decode("utf-8", "replace")

        found = lists(self.connector.store.current()).find(arg("list").lower())
        member = arg("member")
        if found is None or found[1] != "post" or not member:
            return None
        ml = found[0]
        if not hmac.compare_digest(self.connector.one_click_token(ml, member), arg("token")):
            return None
        return ml, member

    def _page(self, request: Any, code: int, text: str, form: bool = False) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        button = ""
        if form:
            button = ('<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
                      '<button type="submit">Unsubscribe</button></form>')
        return f"<!doctype html><title>Unsubscribe</title><p>{escape(text)}</p>{button}\n".encode()

    def render_GET(self, request: Any) -> bytes:
        target = self._target(request)
        if target is None:
            return self._page(request, 404, "This unsubscribe link is not valid.")
        ml, member = target
        return self._page(request, 200, f"Unsubscribe {member} from {ml.address}?", form=True)

    def render_POST(self, request: Any) -> Any:
        target = self._target(request)
        if target is None:
            return self._page(request, 404, "This unsubscribe link is not valid.")
        body = request.content.read(4096) if request.content is not None else b""
        one_click = ONE_CLICK_BODY in body or (request.args.get(b"List-Unsubscribe") or [b""])[0] == b"One-Click"
        if not one_click:
            return self._page(request, 400, "Missing List-Unsubscribe=One-Click.")
        ml, member = target
        d = deferToThread(self.connector.set_member, ml, member, False)

        def done(_: Any) -> None:
            log.info("{list}: {member} unsubscribed (one-click)", list=ml.address, member=member)
            request.write(self._page(request, 200, f"{member} has been unsubscribed from {ml.address}."))
            request.finish()

        def failed(f: Any) -> None:
            log.failure("one-click unsubscribe failed", f)
            request.write(self._page(request, 503, "Please try again later."))
            request.finish()

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET
