"""Folder names of the store: validation and the mapping to Maildir++ directories.

Pure logic.  Clients see ``/`` as the hierarchy separator (names are ``str``, decoded from modified
UTF-7 by the IMAP layer); on disk folder ``A/B`` is the directory ``.A.B`` with every level in
modified UTF-7 (RFC 3501 §5.1.3), as Dovecot's Maildir++ layout stores it.  ``.`` is the on-disk
separator, so it cannot appear inside a level.  The ``subscriptions`` file uses Dovecot 2.3's
format: ``V<TAB>2``, an empty line, then one name a line with TAB between levels (modified UTF-7).
"""

from __future__ import annotations

import base64
import os
import threading

SEP = "/"
MAX_DEPTH = 16
#: one directory entry holds the whole ``.A.B.C`` name
MAX_DIR_BYTES = 240


class InvalidName(ValueError):
    """A folder name the store refuses; ``str(e)`` is a short reason for the client."""


def utf7_encode(text: str) -> str:
    """Modified UTF-7 (RFC 3501 §5.1.3): printable ASCII as is, ``&`` as ``&-``, the rest base64."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in text:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def utf7_decode(text: str) -> str:
    """Decode modified UTF-7 strictly; raises InvalidName on malformed input."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if not 0x20 <= ord(ch) <= 0x7E:
            raise InvalidName("invalid character in mailbox name")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise InvalidName("unterminated modified UTF-7 in mailbox name")
        chunk = text[i + 1:end]
        if not chunk:
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            try:
                raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
                decoded = raw.decode("utf-16-be")
            except (ValueError, UnicodeDecodeError):
                raise InvalidName("malformed modified UTF-7 in mailbox name") from None
            if any(0x20 <= ord(c) <= 0x7E for c in decoded):
                raise InvalidName("modified UTF-7 must not encode printable ASCII")
            out.append(decoded)
        i = end + 1
    return "".join(out)


def normalize(name: str) -> str:
    """``INBOX`` is case-insensitive (RFC 3501 §5.1), also as the first level."""
    if name.upper() == "INBOX":
        return "INBOX"
    if name[:6].upper() == "INBOX" + SEP:
        return "INBOX" + name[5:]
    return name


def validate(name: str) -> str:
    """The normalised name, or InvalidName with a reason.

    Refused: empty levels (``a//b``, leading or trailing ``/``), ``.`` anywhere in a level (the
    on-disk separator, and ``..`` path escapes), control characters, the LIST wildcards ``*``
    and ``%``, ``\\``, and names too long or too deep for one directory entry.
    """
    if not isinstance(name, str) or not name:
        raise InvalidName("empty mailbox name")
    name = normalize(name)
    levels = name.split(SEP)
    if len(levels) > MAX_DEPTH:
        raise InvalidName("mailbox name has too many levels")
    for level in levels:
        if not level:
            raise InvalidName("empty level in mailbox name")
        if "." in level:
            raise InvalidName("'.' is not allowed in mailbox names")
        for ch in level:
            if ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or ch in "*%\\\ufffd" or 0xD800 <= ord(ch) <= 0xDFFF:
                raise InvalidName("invalid character in mailbox name")
    if name != "INBOX" and len(folder_to_dir(name).encode("utf-8")) > MAX_DIR_BYTES:
        raise InvalidName("mailbox name too long")
    return name


def folder_to_dir(name: str) -> str:
    """``Work/Projects`` -> ``.Work.Projects`` (no validation: call validate() first)."""
    return "." + ".".join(utf7_encode(level) for level in name.split(SEP))


def dir_to_folder(dirname: str) -> str | None:
    """``.Work.Projects`` -> ``Work/Projects``; None for entries that are not folders."""
    if len(dirname) < 2 or dirname[0] != "." or dirname[1] == "." or dirname.endswith("."):
        return None
    levels = dirname[1:].split(".")
    try:
        decoded = [utf7_decode(level) for level in levels]
    except InvalidName:
        return None
    if any(not level for level in decoded):
        return None
    name = SEP.join(decoded)
    try:
        return validate(name)
    except InvalidName:
        return None


# -- subscriptions ------------------------------------------------------------------------------


def read_subscriptions(maildir: str) -> list[str]:
    """Subscribed names, in file order (Dovecot 2.3 "V 2" format, or the older one name a line)."""
    try:
        with open(os.path.join(maildir, "subscriptions"), "rb") as f:
            lines = f.read().decode("utf-8", "replace").split("\n")
    except FileNotFoundError:
        return []
    names: list[str] = []
    if lines and lines[0].startswith("V\t"):
        body = lines[1:]
        if body and body[0] == "":
            body = body[1:]
        raw = [line.split("\t") for line in body if line]
    else:
        raw = [line.split(SEP) if SEP in line else line.split(".") for line in lines if line]
    for levels in raw:
        try:
            name = validate(SEP.join(utf7_decode(level) for level in levels))
        except InvalidName:
            continue
        if name not in names:
            names.append(name)
    return names


def write_subscriptions(maildir: str, names: list[str]) -> None:
    """Replace the subscriptions file atomically (tmp + rename)."""
    data = "V\t2\n\n" + "".join("\t".join(utf7_encode(lv) for lv in n.split(SEP)) + "\n" for n in names)
    path = os.path.join(maildir, "subscriptions")
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
