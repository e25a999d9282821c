"""Maildir++ on disk: durable delivery into ``new/`` and the folder layout.

Pure file-system logic (blocking calls: run delivery in a thread, never on the reactor).
Messages are stored with LF line endings, as Dovecot does; ``,S=`` is the file size and
``,W=`` the size with CRLF line endings (what IMAP reports as RFC822.SIZE).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import re
import socket
import time
from typing import Callable, Iterable

SPECIAL_FOLDERS = ("Sent", "Drafts", "Trash", "Junk", "Archive")

#: Maildir info flag letters (cr.yp.to/proto/maildir.html) <-> IMAP system flags (RFC 3501 §2.3.2).
#: ``P`` (passed) has no IMAP flag; it is kept in the name but not shown.
LETTER_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}
FLAG_LETTERS = {v.lower(): k for k, v in LETTER_FLAGS.items()}
KEYWORD_LETTERS = "abcdefghijklmnopqrstuvwxyz"
KEYWORDS_FILE = "dovecot-keywords"
UIDVALIDITY_FILE = "dovecot-uidvalidity"

#: in-process change hooks: folder directory (realpath) -> callbacks(folder_dir)
_watchers: dict[str, list[Callable[[str], None]]] = {}

_counter = itertools.count(1)
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"


def fsync_dir(path: str) -> None:
    """Make a rename or create in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create(maildir: str, folders: tuple[str, ...] = SPECIAL_FOLDERS) -> None:
    """Create a Maildir++ root with ``cur new tmp`` and the special-use folders (idempotent)."""
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    for folder in folders:
        fdir = os.path.join(maildir, "." + folder)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(fdir, sub), exist_ok=True)
        marker = os.path.join(fdir, "maildirfolder")
        if not os.path.exists(marker):
            open(marker, "wb").close()
    subs = os.path.join(maildir, "subscriptions")
    if not os.path.exists(subs):
        # Dovecot 2.3 format: "V<TAB>2", an empty line, then one name a line, levels TAB-separated
        with open(subs, "w") as f:
            f.write("V\t2\n\n" + "".join(name + "\n" for name in folders))


def unique_base(marker: str = "") -> str:
    """A Maildir unique name in Dovecot's style: ``sec.M<usec>P<pid>Q<n>[R<marker>].<host>``."""
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}{marker}.{_HOST}"


def delivery_marker(delivery_id: str) -> str:
    """``R<16 hex>``: the part of a file name that identifies one delivery (queue id + recipient)."""
    return "R" + hashlib.sha256(delivery_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def find_delivery(root: str, delivery_id: str) -> str | None:
    """The name of a message already delivered with ``delivery_id`` (in ``new/`` or ``cur/``)."""
    needle = delivery_marker(delivery_id) + "."
    for sub in ("new", "cur"):
        try:
            names = os.listdir(os.path.join(root, sub))
        except FileNotFoundError:
            continue
        for name in names:
            if needle in name:
                return name
    return None


def deliver(maildir: str, src_path: str, prefix: bytes = b"", folder: str | None = None,
            delivery_id: str | None = None) -> str:
    """Copy ``prefix`` + the file at ``src_path`` into ``maildir`` durably; return the new name.

    The file is written to ``tmp/``, fsynced, renamed into ``new/`` and the directory is fsynced,
    so once this returns the message survives a crash.  ``prefix`` and ``src_path`` may use LF or
    CRLF line ends: they are stored with LF (``to_lf``, chunk by chunk) and ``,W=`` is the size
    of exactly what IMAP serves for the stored bytes.

    ``delivery_id`` (e.g. ``"<queue id> <recipient>"``) makes a repeated delivery a no-op: its hash
    is part of the file name, and if a message with it is already in ``new/`` or ``cur/`` (the
    process died after the rename but before the queue recorded the delivery) that name is
    returned instead of storing a duplicate.  It costs a directory listing.
    """
    root = folder_dir(maildir, folder)
    marker = ""
    if delivery_id is not None:
        existing = find_delivery(root, delivery_id)
        if existing is not None:
            return existing
        marker = delivery_marker(delivery_id)
    base = unique_base(marker)
    tmp = os.path.join(root, "tmp", base)
    size = 0
    wire = WireSizer()
    lf = ToLF()

    def put(out, data: bytes) -> None:
        nonlocal size
        if data:
            out.write(data)
            size += len(data)
            wire.feed(data)

    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            put(out, lf.feed(prefix))
            with open(src_path, "rb") as src:
                while True:
                    chunk = src.read(1 << 16)
                    if not chunk:
                        break
                    put(out, lf.feed(chunk))
            put(out, lf.finish())
            out.flush()
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    name = f"{base},S={size},W={wire.size}"
    os.rename(tmp, os.path.join(root, "new", name))
    fsync_dir(os.path.join(root, "new"))
    notify(root)
    return name


def folder_dir(maildir: str, folder: str | None) -> str:
    """The directory of a folder given by its store name (``"Work/Projects"``; None = INBOX)."""
    if not folder or folder.upper() == "INBOX":
        return maildir
    from tmmail.store_names import folder_to_dir

    return os.path.join(maildir, folder_to_dir(folder))


# -- file names: base, sizes, flags ------------------------------------------------------------


def split_name(filename: str) -> tuple[str, str]:
    """(base, flag letters) of ``base:2,FLAGS``; letters empty if there is no ``:2,`` info."""
    base, sep, info = filename.partition(":")
    if sep and info.startswith("2,"):
        return base, info[2:]
    return base, ""


def make_name(base: str, letters: str) -> str:
    """The ``cur/`` file name for ``base`` with these flag letters (sorted: upper case, then a-z)."""
    return f"{base}:2,{sort_letters(letters)}"


def sort_letters(letters: str) -> str:
    return "".join(sorted(set(letters)))


def sizes_from_base(base: str) -> tuple[int | None, int | None]:
    """(``S=`` file size, ``W=`` CRLF size) from a name's ``,S=``/``,W=`` fields."""
    s = w = None
    for part in base.split(",")[1:]:
        if part.startswith("S=") and part[2:].isdigit():
            s = int(part[2:])
        elif part.startswith("W=") and part[2:].isdigit():
            w = int(part[2:])
    return s, w


def name_time(base: str) -> float | None:
    """The delivery time encoded at the start of a Maildir unique name (``sec.``, plus ``M<usec>``)."""
    key = delivery_order(base)
    return key[0] + key[1] / 1e6 if key[0] >= 0 else None


_USEC_RE = re.compile(r"M(\d+)")
_COUNTER_RE = re.compile(r"Q(\d+)")
#: ``sec.M<usec>P<pid>Q<n>.`` (our names, and Dovecot's when it has a counter): decoded as the
#: general path below would (first M and first Q field of the part before the host)
_FAST_ORDER_RE = re.compile(r"(\d+)\.M(\d+)P\d+Q(\d+)\.")


def delivery_order(base: str) -> tuple[int, int, int, str]:
    """Sort key putting Maildir names in delivery order: (seconds, microseconds, Q counter, name).

    ``sec.M<usec>P<pid>Q<n>.host`` (Dovecot's and our names): the microseconds and the per-process
    counter compare as numbers (``M999`` before ``M1000``, ``Q9`` before ``Q10``), which plain
    string order gets wrong for messages delivered within one second.  Names without these
    fields (other delivery agents) sort by their seconds, then by name; names without a leading
    time sort first (seconds -1).
    """
    m = _FAST_ORDER_RE.match(base)
    if m is not None:  # the common shape, one regex match instead of five string operations
        sec, usec, counter = m.groups()
        return (int(sec), int(usec), int(counter), base)
    sec, _, rest = base.partition(".")
    if not sec.isdigit():
        return (-1, 0, 0, base)
    middle = rest.partition(".")[0]  # "M<usec>P<pid>Q<n>" (fields in any order), before the host
    usec = _USEC_RE.search(middle)
    counter = _COUNTER_RE.search(middle)
    return (int(sec), int(usec.group(1)) if usec else 0, int(counter.group(1)) if counter else 0, base)


def sort_delivery_order(bases: list[str]) -> list[str]:
    """``bases`` sorted by ``delivery_order`` (keys built inline: a cold folder sorts 20,000)."""
    match = _FAST_ORDER_RE.match
    keyed: list[tuple[int, int, int, str]] = []
    append = keyed.append
    for base in bases:
        m = match(base)
        if m is None:
            append(delivery_order(base))
        else:
            sec, usec, counter = m.groups()
            append((int(sec), int(usec), int(counter), base))
    keyed.sort()  # the base ends every key and is unique: same order as sorting by the key
    return [key[3] for key in keyed]


class WireSizer:
    """The size of data in the form IMAP and POP3 serve it (every LF not preceded by CR becomes CRLF,
    as ``tmmail.imap.mime.to_crlf`` does), counted chunk by chunk.

    A CR at the end of one chunk and the LF starting the next are one CRLF: the last byte is
    carried over, so the result does not depend on where the chunks are cut.
    """

    __slots__ = ("size", "_last_cr")

    def __init__(self) -> None:
        self.size = 0
        self._last_cr = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        bare = chunk.count(b"\n") - chunk.count(b"\r\n")
        if self._last_cr and chunk[0] == 0x0A:
            bare -= 1  # CR of the previous chunk + LF of this one
        self.size += len(chunk) + bare
        self._last_cr = chunk[-1] == 0x0D


def wire_size(data: bytes) -> int:
    """``,W=``/RFC822.SIZE of stored bytes: their size with every bare LF counted as CRLF."""
    sizer = WireSizer()
    sizer.feed(data)
    return sizer.size


def to_lf(data: bytes) -> bytes:
    """The stored (LF) form of CRLF message data: ``CRLF`` -> ``LF``, except a CRLF that follows
    another CR (``CR CR LF`` stays as it is).

    Whatever this returns, served again with LF -> CRLF (``to_crlf``: ``CR? LF`` -> ``CRLF``),
    gives back exactly the CRLF data that came in: turning ``CR CR LF`` into ``CR LF`` would
    lose the stray CR (what the client stored is not what FETCH BODY[] returns) and make
    ``,W=`` one octet too large.
    """
    if b"\r\r\n" not in data:
        return data.replace(b"\r\n", b"\n")
    return _CRLF_NOT_AFTER_CR.sub(b"\n", data)


_CRLF_NOT_AFTER_CR = re.compile(rb"(?<!\r)\r\n")


class ToLF:
    """``to_lf`` chunk by chunk: the result does not depend on where the chunks are cut.

    A trailing CR is held back until the next chunk shows whether an LF follows; the last byte
    written is put in front of the next chunk so a ``CR CR LF`` split anywhere is recognised.
    """

    __slots__ = ("_held", "_prev")

    def __init__(self) -> None:
        self._held = b""
        self._prev = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk
        self._held = b""
        if data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        if not data:
            return b""
        # the previous byte can never be changed itself: it is CR only when ``data`` starts with
        # the CR held back after it, so no CRLF match can begin there
        out = to_lf(self._prev + data)[len(self._prev):]
        self._prev = data[-1:]
        return out

    def finish(self) -> bytes:
        held, self._held = self._held, b""
        return held


def crlf_size(path: str) -> int:
    """Size of the file with LF turned into CRLF (RFC822.SIZE) by reading it once."""
    sizer = WireSizer()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            sizer.feed(chunk)
    return sizer.size


# -- dovecot-keywords ---------------------------------------------------------------------------


def read_keywords(folder: str) -> list[str]:
    """Keyword names by letter index (``dovecot-keywords``: ``<index> <name>`` lines)."""
    names: list[str] = []
    try:
        with open(os.path.join(folder, KEYWORDS_FILE), "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return names
    for line in data.splitlines():
        idx, _, name = line.partition(" ")
        if not idx.isdigit() or not name:
            continue
        i = int(idx)
        if i >= len(KEYWORD_LETTERS):
            continue
        while len(names) <= i:
            names.append("")
        names[i] = name
    return names


def add_keywords(folder: str, wanted: Iterable[str]) -> list[str]:
    """Make sure every keyword in ``wanted`` has a letter; returns the new index list.

    Locked with ``dovecot-keywords.lock`` and replaced by rename, as Dovecot's maildir-keywords.c
    does.  Raises OverflowError when the 26 letters are used up.  Matching is case-insensitive
    (RFC 3501 §2.3.2: keywords are atoms compared without case).
    """
    from tmmail.uidlist import DotLock

    with DotLock(os.path.join(folder, KEYWORDS_FILE)) as lock:
        names = read_keywords(folder)
        known = {n.lower() for n in names if n}
        changed = False
        for kw in wanted:
            if kw.lower() in known:
                continue
            try:
                slot = names.index("")
            except ValueError:
                slot = len(names)
            if slot >= len(KEYWORD_LETTERS):
                raise OverflowError("no more keyword letters (26 per folder)")
            if slot == len(names):
                names.append(kw)
            else:
                names[slot] = kw
            known.add(kw.lower())
            changed = True
        if changed:
            data = "".join(f"{i} {n}\n" for i, n in enumerate(names) if n)
            lock.commit(data.encode("utf-8"), durable=False)
        return names


# -- UIDVALIDITY --------------------------------------------------------------------------------


def allocate_uidvalidity(maildir: str) -> int:
    """A UIDVALIDITY never used before in this Maildir (RFC 3501 §2.3.1.1).

    Dovecot keeps the next value in hex in ``dovecot-uidvalidity``; we follow it (under flock) and
    use the current time when it is lower, so deleting and re-creating a folder changes it.
    """
    path = os.path.join(maildir, UIDVALIDITY_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.read(fd, 64).decode("ascii", "replace").strip()
        try:
            stored = int(raw, 16)
        except ValueError:
            stored = 0
        value = max(int(time.time()), stored)
        value = min(value, 0xFFFFFFFF)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, b"%08x" % min(value + 1, 0xFFFFFFFF))
        return value
    finally:
        os.close(fd)


# -- in-process change notification --------------------------------------------------------------


def watch(folder: str, callback: Callable[[str], None]) -> Callable[[], None]:
    """Call ``callback(folder)`` whenever this process changes ``folder``; returns a cancel function."""
    key = os.path.realpath(folder)
    _watchers.setdefault(key, []).append(callback)

    def cancel() -> None:
        lst = _watchers.get(key, [])
        if callback in lst:
            lst.remove(callback)
        if not lst:
            _watchers.pop(key, None)

    return cancel


def notify(folder: str) -> None:
    """Tell this process's watchers of ``folder`` that it changed (never raises)."""
    if not _watchers:
        return
    for callback in list(_watchers.get(os.path.realpath(folder), ())):
        try:
            callback(folder)
        except Exception:  # a broken watcher must not break delivery
            from twisted.logger import Logger

            Logger().failure("store watcher failed for {folder}", folder=folder)


def mailbox_path(postoffices_dir: str, postoffice: str, mailbox: str) -> str:
    """The Maildir of a mailbox, named as the provider tables spell it (never from client input)."""
    for part in (postoffice, mailbox):
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise ValueError(f"bad post office or mailbox name: {part!r}")
    return os.path.join(postoffices_dir, postoffice, mailbox, "Maildir")


def stage(maildir: str, src_path: str, prefix: bytes = b"", folder: str | None = None) -> tuple[str, str, str]:
    """Write ``prefix`` + ``src_path`` to ``tmp/`` WITHOUT fsync; return (tmp path, folder root, name).

    For batched delivery: the caller makes all staged files durable with one shared sync,
    then :func:`publish` renames each, then syncs once more (data durable before a rename
    makes it visible).  Same bytes and name rules as :func:`deliver`.
    """
    root = folder_dir(maildir, folder)
    base = unique_base()
    tmp = os.path.join(root, "tmp", base)
    size = 0
    wire = WireSizer()
    lf = ToLF()
    try:
        with open(tmp, "xb") as out:
            for data in _lf_chunks(lf, prefix, src_path):
                if data:
                    out.write(data)
                    size += len(data)
                    wire.feed(data)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return tmp, root, f"{base},S={size},W={wire.size}"


def _lf_chunks(lf: "ToLF", prefix: bytes, src_path: str) -> Iterable[bytes]:
    yield lf.feed(prefix)
    with open(src_path, "rb") as src:
        while True:
            chunk = src.read(1 << 16)
            if not chunk:
                break
            yield lf.feed(chunk)
    yield lf.finish()


def publish(tmp: str, root: str, name: str) -> None:
    """Rename a staged (already synced) file into ``new/``; the caller syncs the directory."""
    os.rename(tmp, os.path.join(root, "new", name))
