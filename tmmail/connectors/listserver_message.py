"""What the list server does to a message's bytes: pure functions, LF line endings in and out.

* list headers (RFC 2369 List-Help/-Unsubscribe/-Subscribe/-Post, RFC 2919 List-Id, RFC 8058
  List-Unsubscribe-Post when a one-click URL is given), ``Precedence: list``, ``X-Loop``;
  the poster's own List-* headers are replaced;
* subject prefix (once, also on replies);
* header and footer text, MIME-correct: appended to a plain 7bit/8bit text body, added as
  new text parts to a multipart/mixed, and otherwise (base64/QP text, alternative, signed,
  anything else) the original becomes the middle part of a new multipart/mixed, so a
  signature or an encoded body is never broken;
* the DMARC From rewrite (RFC 7489 §6.6.1 is why: a list changes the message, so the
  poster's DKIM signature fails, and a p=quarantine/reject domain would lose its mail):
  ``From: "Poster via List" <list@domain>`` and the poster in ``Reply-To``;
* reading bounce reports (RFC 3464 Final-Recipient of failed recipients) and mail commands.

Only the top-level header block is rewritten; the body bytes of the original are kept.
"""

from __future__ import annotations

import email.utils
import quopri
import re
import secrets
from email.header import Header, decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Iterable

__all__ = [
    "split_message", "header_values", "replace_headers", "add_list_headers", "prefix_subject",
    "add_header_footer", "dmarc_rewrite", "failed_recipients", "parse_command", "from_address",
    "is_auto", "list_id",
]

_FIELD = re.compile(rb"^([!-9;-~]+):")


def split_message(raw: bytes) -> tuple[list[bytes], bytes]:
    """(header fields, each with its folded continuation lines, LF-terminated; body)."""
    if raw.startswith(b"\n"):
        return [], raw[1:]
    head, sep, body = raw.partition(b"\n\n")
    if not sep:
        head, body = raw.rstrip(b"\n"), b""
    fields: list[bytes] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\n"
        else:
            fields.append(line + b"\n")
    return fields, body


def join_message(fields: Iterable[bytes], body: bytes) -> bytes:
    return b"".join(fields) + b"\n" + body


def _name(field: bytes) -> str:
    m = _FIELD.match(field)
    return m.group(1).decode("ascii").lower() if m else ""


def header_values(fields: list[bytes], name: str) -> list[str]:
    """Unfolded values of every field called ``name`` (raw text, not RFC 2047-decoded)."""
    name = name.lower()
    out = []
    for f in fields:
        if _name(f) == name:
            value = f.split(b":", 1)[1].decode("utf-8", "replace")
            out.append(" ".join(value.split()))
    return out


def replace_headers(fields: list[bytes], drop: Iterable[str], add: Iterable[tuple[str, str]] = (),
                    at_top: bool = True) -> list[bytes]:
    """Remove fields named in ``drop`` (case-insensitive; a name ending in ``*`` is a prefix)."""
    names = [d.lower() for d in drop]

    def dropped(n: str) -> bool:
        return any(n.startswith(d[:-1]) if d.endswith("*") else n == d for d in names)

    kept = [f for f in fields if not dropped(_name(f))]
    new = [_field(n, v) for n, v in add]
    return new + kept if at_top else kept + new


def _field(name: str, value: str) -> bytes:
    if value.isascii():
        return f"{name}: {value}\n".encode("ascii")
    return f"{name}: {Header(value, 'utf-8', header_name=name).encode()}\n".encode("ascii")


def list_id(local: str, domain: str) -> str:
    """RFC 2919 list-id: the list's local part (dots kept) and domain, e.g. ``news.example.com``."""
    label = re.sub(r"[^A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]", "-", local).strip(".") or "list"
    return f"{label}.{domain}"


def add_list_headers(raw: bytes, *, address: str, description: str = "", post_allowed: bool = True,
                     one_click_url: str = "") -> bytes:
    """Replace the poster's List-* fields with ours (RFC 2369, RFC 2919, RFC 8058)."""
    fields, body = split_message(raw)
    local, _, domain = address.rpartition("@")
    request = f"{local}-request@{domain}"
    lid = f"<{list_id(local, domain)}>"
    if description:
        lid = f'"{description}" {lid}' if not re.fullmatch(r"[A-Za-z0-9 ]+", description) else f"{description} {lid}"
    unsubscribe = f"<mailto:{request}?subject=unsubscribe>"
    add = [
        ("List-Id", lid),
        ("List-Post", f"<mailto:{address}>" if post_allowed else "NO"),
        ("List-Help", f"<mailto:{request}?subject=help>"),
        ("List-Subscribe", f"<mailto:{request}?subject=subscribe>"),
    ]
    if one_click_url:
        add.append(("List-Unsubscribe", f"<{one_click_url}>, {unsubscribe}"))
        add.append(("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))
    else:
        add.append(("List-Unsubscribe", unsubscribe))
    add += [("Precedence", "list"), ("X-Loop", address)]
    fields = replace_headers(fields, ["list-*", "precedence", "x-loop", "return-path", "delivered-to"], add)
    return join_message(fields, body)


def _decoded(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except Exception:  # noqa: BLE001 - broken encoded words: keep the raw text
        return value


def prefix_subject(raw: bytes, prefix: str) -> bytes:
    """Put ``prefix`` in front of the Subject unless it is already there (``Re: [x] ...``)."""
    if not prefix:
        return raw
    fields, body = split_message(raw)
    subjects = header_values(fields, "subject")
    subject = subjects[0] if subjects else ""
    if prefix.lower() in _decoded(subject).lower():
        return raw
    new = f"{prefix} {subject}".strip() if subject else prefix
    out = []
    done = False
    for f in fields:
        if _name(f) == "subject" and not done:
            out.append(f"Subject: {new}\n".encode("utf-8") if not prefix.isascii() else
                       b"Subject: " + prefix.encode("ascii") + b" " + f.split(b":", 1)[1].lstrip(b" \t"))
            done = True
        else:
            out.append(f)
    if not done:
        out.append(_field("Subject", new))
    return join_message(out, body)


def _ctype(fields: list[bytes]) -> tuple[str, dict[str, str], str]:
    parsed = BytesHeaderParser(policy=compat32).parsebytes(b"".join(fields) + b"\n")
    ctype = (parsed.get_content_type() if parsed.get("Content-Type") else "text/plain").lower()
    params = {k.lower(): v for k, v in (parsed.get_params() or [])[1:]} if parsed.get("Content-Type") else {}
    cte = str(parsed.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    return ctype, params, cte


def _text_part(text: str) -> bytes:
    data = text if text.endswith("\n") else text + "\n"
    if data.isascii():
        return b"Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n\n" + data.encode()
    qp = quopri.encodestring(data.encode("utf-8")).replace(b"\r\n", b"\n")
    return b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n" + qp


def add_header_footer(raw: bytes, header: str = "", footer: str = "") -> bytes:
    """Add list header/footer texts without breaking the MIME structure (see module doc)."""
    if not header and not footer:
        return raw
    fields, body = split_message(raw)
    ctype, params, cte = _ctype(fields)
    mime = bool(header_values(fields, "mime-version")) or bool(header_values(fields, "content-type"))
    charset = params.get("charset", "us-ascii").lower()
    texts_ascii = (header + footer).isascii()
    if ctype == "text/plain" and cte in ("7bit", "8bit", "") and (
        charset in ("utf-8", "utf8") or (texts_ascii and charset in ("us-ascii", "ascii", "iso-8859-1", "latin1")
                                         or texts_ascii and not mime)
    ):
        out = body
        if header:
            out = header.rstrip("\n").encode("utf-8") + b"\n\n" + out
        if footer:
            if out and not out.endswith(b"\n"):
                out += b"\n"
            out += b"\n" + footer.rstrip("\n").encode("utf-8") + b"\n"
        return join_message(fields, out)
    boundary = params.get("boundary", "")
    if ctype == "multipart/mixed" and boundary:
        delim = b"--" + boundary.encode("utf-8", "replace")
        lines = body.split(b"\n")
        first = next((i for i, ln in enumerate(lines) if ln.rstrip(b" \t") == delim), None)
        last = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].rstrip(b" \t") == delim + b"--"), None)
        if first is not None and last is not None and first < last:
            if footer:
                lines[last:last] = [delim] + _text_part(footer).rstrip(b"\n").split(b"\n")
            if header:
                lines[first:first] = [delim] + _text_part(header).rstrip(b"\n").split(b"\n")
            return join_message(fields, b"\n".join(lines))
    # wrap the original as the middle part of a new multipart/mixed
    new_boundary = "=_tmmail_list_" + secrets.token_hex(12)
    inner = [f for f in fields if _name(f).startswith("content-")]
    outer = [f for f in fields if not _name(f).startswith("content-") and _name(f) != "mime-version"]
    if not inner:
        inner = [b"Content-Type: text/plain; charset=us-ascii\n"]
    nb = new_boundary.encode()
    parts = []
    if header:
        parts.append(_text_part(header))
    parts.append(b"".join(inner) + b"\n" + body)
    if footer:
        parts.append(_text_part(footer))
    out = b""
    for part in parts:
        out += b"--" + nb + b"\n" + part
        if not out.endswith(b"\n"):
            out += b"\n"
    out += b"--" + nb + b"--\n"
    outer += [b"MIME-Version: 1.0\n", f'Content-Type: multipart/mixed; boundary="{new_boundary}"\n'.encode()]
    return join_message(outer, b"This is a multi-part message in MIME format.\n\n" + out)


def from_address(raw: bytes) -> tuple[str, str]:
    """(display name, address) of the From field; ("", "") if there is none."""
    fields, _ = split_message(raw)
    values = header_values(fields, "from")
    if not values:
        return "", ""
    name, addr = email.utils.parseaddr(values[0])
    return _decoded(name), addr


def dmarc_rewrite(raw: bytes, list_address: str, list_name: str) -> bytes:
    """From becomes the list (display name "Poster via List"), the poster goes to Reply-To
    (added to an existing Reply-To), as Mailman's dmarc_moderation_action = munge_from."""
    fields, body = split_message(raw)
    name, addr = from_address(raw)
    original = header_values(fields, "from")
    who = name or addr
    display = f"{who} via {list_name}"
    new_from = email.utils.formataddr((display, list_address)) if display.isascii() else \
        f"{Header(display, 'utf-8').encode()} <{list_address}>"
    reply = header_values(fields, "reply-to")
    reply_to = ", ".join(reply + [original[0]]) if reply else (original[0] if original else "")
    add = [("From", new_from)]
    if reply_to:
        add.append(("Reply-To", reply_to))
    fields = replace_headers(fields, ["from", "reply-to"], add, at_top=False)
    return join_message(fields, body)


def is_auto(raw: bytes) -> bool:
    """Auto-generated mail that a list must not distribute or answer (RFC 3834 §2, §5)."""
    fields, _ = split_message(raw)
    auto = [v.lower() for v in header_values(fields, "auto-submitted")]
    if any(v and not v.startswith("no") for v in auto):
        return True
    prec = [v.lower() for v in header_values(fields, "precedence")]
    return any(p in ("bulk", "junk", "list") for p in prec)


def failed_recipients(raw: bytes) -> list[str]:
    """Final-Recipient addresses with Action: failed from an RFC 3464 report (lower-case)."""
    out: list[str] = []
    text = raw.decode("utf-8", "replace")
    # message/delivery-status: blocks of fields separated by blank lines
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
            if m:
                fields[m.group(1).lower()] = m.group(2).strip()
        if fields.get("action", "").lower() == "failed" and "final-recipient" in fields:
            value = fields["final-recipient"]
            addr = value.split(";", 1)[1].strip() if ";" in value else value
            addr = addr.strip("<> ").lower()
            if "@" in addr and addr not in out:
                out.append(addr)
    return out


def parse_command(raw: bytes) -> tuple[str, str]:
    """(command, argument) of a -request message: from the Subject, else the first body line.

    Commands: subscribe, unsubscribe, help, confirm TOKEN (found anywhere in the text, so a
    reply's "Re: confirm ..." works).
    """
    fields, body = split_message(raw)
    candidates = [_decoded(v) for v in header_values(fields, "subject")]
    for line in body.decode("utf-8", "replace").splitlines()[:5]:
        if line.strip():
            candidates.append(line.strip())
            break
    for text in candidates:
        m = re.search(r"\bconfirm\s+([A-Za-z0-9.\-_]+)", text, re.IGNORECASE)
        if m:
            return "confirm", m.group(1)
    for text in candidates:
        words = re.sub(r"^(re|aw|fwd?)\s*:\s*", "", text.strip(), flags=re.IGNORECASE).lower().split()
        if words and words[0] in ("subscribe", "unsubscribe", "help", "join", "leave", "signoff"):
            cmd = {"join": "subscribe", "leave": "unsubscribe", "signoff": "unsubscribe"}.get(words[0], words[0])
            return cmd, ""
    return "help", ""
