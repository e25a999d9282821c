"""Stored bytes, ``,W=`` and what IMAP serves agree (APPEND and delivery, LF and CRLF input).

Messages are stored with LF; IMAP (and POP3) serve them with every ``CR? LF`` as CRLF.  RFC822.SIZE
comes from ``,W=`` in the file name, so it must be the length of exactly those served bytes.
"""

from __future__ import annotations

import os
import re

import pytest
from imapclient import IMAPClient

from tests.imap_fixtures import PASSWORD, raw_session, read_until_tag, start_imap, stop_imap
from tmmail import maildir
from tmmail.imap.mime import to_crlf
from tmmail.store import Store

#: CRLF message data with awkward line ends: a stray CR before CRLF, two of them, a lone CR
AWKWARD = (b"Subject: cr test\r\nX-A: one\r\r\n\r\nbody\r\r\nline two\r\r\r\nlone\rcr\r\n"
           b"end\r\n")


@pytest.fixture
def md(tmp_path):
    root = str(tmp_path / "Maildir")
    maildir.create(root)
    return root


def test_to_lf_round_trips_through_what_imap_serves():
    for data in (AWKWARD, b"a\r\nb\r\n", b"\r\r\n", b"\r\n\r\n", b"x\r", b"", b"plain\nlf\n"):
        stored = maildir.to_lf(data)
        if b"\n" not in data.replace(b"\r\n", b""):  # proper CRLF input comes back unchanged
            assert to_crlf(stored) == data
        assert maildir.wire_size(stored) == len(to_crlf(stored))
    assert maildir.to_lf(b"a\r\nb\r\r\n") == b"a\nb\r\r\n"


def test_append_keeps_cr_before_crlf_and_w_matches_served_bytes(md):
    store = Store(md)
    _, uid = store.append("INBOX", AWKWARD)
    folder = store.open("INBOX")
    info = folder.info(uid)
    assert to_crlf(folder.read(uid)) == AWKWARD
    assert info.size == len(AWKWARD)
    name = maildir.split_name(os.listdir(os.path.join(md, "cur"))[0])[0]
    assert maildir.sizes_from_base(name) == (len(folder.read(uid)), len(AWKWARD))


def test_imap_append_then_fetch_returns_the_same_bytes_and_size(reactor_thread, tmp_path):
    env = start_imap(reactor_thread, tmp_path)
    try:
        # a raw APPEND: imaplib/IMAPClient would rewrite the CRs before sending
        s, f = raw_session(env)
        s.sendall(b'L LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
        assert read_until_tag(f, b"L")[-1].startswith(b"L OK")
        s.sendall(b"A APPEND INBOX {%d+}\r\n%s\r\n" % (len(AWKWARD), AWKWARD))
        reply = read_until_tag(f, b"A")[-1]
        uid = int(re.search(rb"\[APPENDUID \d+ (\d+)\]", reply).group(1))
        s.close()
        c = IMAPClient("127.0.0.1", port=env.port, ssl=False, timeout=20)
        c.login("alice@example.com", PASSWORD)
        c.select_folder("INBOX", readonly=True)
        got = c.fetch([uid], ["RFC822.SIZE", "BODY.PEEK[]"])[uid]
        assert got[b"BODY[]"] == AWKWARD
        assert got[b"RFC822.SIZE"] == len(AWKWARD)
        c.logout()
    finally:
        stop_imap(reactor_thread, env)


def test_to_lf_in_chunks_matches_one_shot():
    data = AWKWARD * 3 + b"\r\r" + b"\n\r\r\r\n\r"
    want = maildir.to_lf(data)
    for size in range(1, 12):
        conv = maildir.ToLF()
        got = b"".join(conv.feed(data[i:i + size]) for i in range(0, len(data), size)) + conv.finish()
        assert got == want, size


def test_deliver_crlf_source_is_stored_lf_with_the_served_size(md, tmp_path):
    # CRLF spool file (as SMTP received it), with a CRLF split across the 64 KiB copy chunks
    body = b"x" * ((1 << 16) - 1 - len(b"Subject: big\r\n\r\n")) + b"\r\n" + b"more\r\n" * 100
    data = b"Subject: big\r\n\r\n" + body + AWKWARD
    src = tmp_path / "spool.eml"
    src.write_bytes(data)
    name = maildir.deliver(md, str(src), prefix=b"Return-Path: <a@example.org>\r\n")
    with open(os.path.join(md, "new", name), "rb") as f:
        stored = f.read()
    served = b"Return-Path: <a@example.org>\r\n" + data
    assert to_crlf(stored) == served
    assert b"\r\n" not in stored.replace(b"\r\r\n", b"")  # LF line ends (only the stray CRs stay)
    assert maildir.sizes_from_base(name) == (len(stored), len(served))
    folder = Store(md).open("INBOX", readonly=True)
    assert folder.messages[0].size == len(served)


def test_deliver_lf_source_unchanged(md, tmp_path):
    src = tmp_path / "m"
    src.write_bytes(b"a\nb\n")
    name = maildir.deliver(md, str(src), prefix=b"X: y\n")
    assert name.endswith(",S=9,W=12")
    with open(os.path.join(md, "new", name), "rb") as f:
        assert f.read() == b"X: y\na\nb\n"
