"""The whole MIME corpus through the real IMAP server (Maildir store, sockets): every FETCH item
answers byte for byte what Dovecot 2.3 answered for the same message, and SEARCH agrees too."""

from __future__ import annotations

import json
import os

import pytest

from tests.imap_fixtures import PASSWORD, raw_session, read_until_tag, start_imap, stop_imap
from tmmail import maildir

CORPUS = os.path.join(os.path.dirname(__file__), "mime_corpus")
NAMES = sorted(n for n in os.listdir(CORPUS) if n.endswith(".eml"))


@pytest.fixture(scope="module")
def server(reactor_thread, tmp_path_factory):
    from tmmail.store import Store

    env = start_imap(reactor_thread, tmp_path_factory.mktemp("imap"))
    for i, name in enumerate(NAMES):
        src = os.path.join(env.root, f"in{i}.eml")
        with open(os.path.join(CORPUS, name), "rb") as f, open(src, "wb") as g:
            g.write(f.read().replace(b"\r\n", b"\n"))    # on disk as SMTP/APPEND store it: LF
        maildir.deliver(env.maildir(), src)
        Store(env.maildir()).status("INBOX")     # UIDs in delivery order
    s, f = raw_session(env)
    s.sendall(b'L LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
    assert read_until_tag(f, b"L")[-1].startswith(b"L OK")
    s.sendall(b"S EXAMINE INBOX\r\n")
    assert read_until_tag(f, b"S")[-1].startswith(b"S OK")
    yield s, f
    s.close()
    stop_imap(reactor_thread, env)


def fetch(server, seq: int, item: str) -> bytes:
    s, f = server
    s.sendall(b"F FETCH %d (%s)\r\n" % (seq, item.encode()))
    lines = read_until_tag(f, b"F")
    assert lines[-1].startswith(b"F OK"), lines[-1]
    return b"".join(lines[:-1])


ITEMS = ["RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "BODY.PEEK[]", "BODY.PEEK[HEADER]",
         "BODY.PEEK[1]", "BODY.PEEK[2.MIME]", "BODY.PEEK[2.1]", "BODY.PEEK[2.HEADER]", "BODY.PEEK[TEXT]<5.7>",
         "BODY.PEEK[HEADER.FIELDS (From To Subject Received X-Missing)]"]


@pytest.mark.parametrize("seq,name", list(enumerate(NAMES, 1)))
def test_server_answers_like_dovecot(server, seq, name):
    with open(os.path.join(CORPUS, name[:-4] + ".expected.json")) as f:
        want = json.load(f)
    for item in ITEMS:
        got = fetch(server, seq, item)
        assert got == b"* %d FETCH (%s)\r\n" % (seq, want[item].encode("latin-1")), item


def test_server_search_agrees_with_dovecot_on_text_keys(server):
    with open(os.path.join(CORPUS, "search.expected.json"), encoding="utf-8") as f:
        dovecot = json.load(f)
    assert dovecot["messages"] == NAMES
    s, f = server
    for query, want in dovecot["queries"].items():
        if any(k in query for k in ("SINCE", "BEFORE", "ON ", "UID")) and "SENT" not in query:
            continue    # internal dates and UIDs differ from the Dovecot run
        data = query.encode("utf-8")
        s.sendall(b"Q SEARCH " + data + b"\r\n")
        lines = read_until_tag(f, b"Q")
        assert lines[-1].startswith(b"Q OK"), (query, lines[-1])
        got = [int(x) for x in lines[0].split()[2:]]
        assert got == want, query
