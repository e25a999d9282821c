"""Maildir++ on disk: durable delivery into ``new/`` and the folder layout.

Pure file-system logic (blocking calls: run delivery in a thread, never on the reactor).
Messages are stored with LF line endings, as Dovecot does; ``,S=`` is the file size and
``,W=`` the size with CRLF line endings (what IMAP reports as RFC822.SIZE).
"""

from __future__ import annotations

import itertools
import os
import socket
import time

SPECIAL_FOLDERS = ("Sent", "Drafts", "Trash", "Junk", "Archive")

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
        with open(subs, "w") as f:
            f.write("".join(name + "\n" for name in folders))


def unique_base() -> str:
    """A Maildir unique name in Dovecot's style: ``sec.M<usec>P<pid>Q<n>.<host>``."""
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{os.getpid()}Q{next(_counter)}.{_HOST}"


def deliver(maildir: str, src_path: str, prefix: bytes = b"", folder: str | None = None) -> str:
    """Copy ``prefix`` + the file at ``src_path`` into ``maildir`` durably; return the new name.

    The file is written to ``tmp/``, fsynced, renamed into ``new/`` and the directory is fsynced,
    so once this returns the message survives a crash.  ``src_path`` holds LF-terminated lines.
    """
    root = os.path.join(maildir, "." + folder) if folder else maildir
    base = unique_base()
    tmp = os.path.join(root, "tmp", base)
    size = 0
    lines = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            if prefix:
                out.write(prefix)
                size += len(prefix)
                lines += prefix.count(b"\n")
            with open(src_path, "rb") as src:
                while True:
                    chunk = src.read(1 << 16)
                    if not chunk:
                        break
                    out.write(chunk)
                    size += len(chunk)
                    lines += chunk.count(b"\n")
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
    name = f"{base},S={size},W={size + lines}"
    os.rename(tmp, os.path.join(root, "new", name))
    fsync_dir(os.path.join(root, "new"))
    return name


def mailbox_path(postoffices_dir: str, postoffice: str, mailbox: str) -> str:
    """The Maildir of a mailbox, named as the provider tables spell it (never from client input)."""
    for part in (postoffice, mailbox):
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise ValueError(f"bad post office or mailbox name: {part!r}")
    return os.path.join(postoffices_dir, postoffice, mailbox, "Maildir")
