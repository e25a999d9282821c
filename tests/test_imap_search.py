"""SEARCH programs: parsing, every RFC 3501 key, lazy loading, sequence sets."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone

import pytest

from tmmail.imap.encoding import ParseError, tokenize
from tmmail.imap.search import BadCharset, SequenceSet, parse_date, parse_search, search

UTC = timezone.utc


class Stored:
    def __init__(self, seq, uid, flags, size, internal_date, raw):
        self.seq = seq
        self.uid = uid
        self.flags = set(flags)
        self.size = size
        self.internal_date = internal_date
        self.raw = raw
        self.loads = 0

    def load(self):
        self.loads += 1
        return self.raw


M1 = b"""From: Alice Example <alice@example.org>
To: Bob <bob@example.com>
Subject: Lunch tomorrow
Date: Tue, 1 Jul 2003 10:52:37 +0200
Message-ID: <m1@example.org>

Are you free for LUNCH tomorrow?
"""
M2 = (b"""From: =?UTF-8?Q?J=C3=BCrgen?= <j@example.de>
To: team@example.com
Cc: Carol <carol@example.com>
Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe_aus_K=C3=B6ln?=
Date: Wed, 31 Jan 2024 23:30:00 -0800
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: base64

""" + base64.encodebytes("Schöne Grüße vom Rhein".encode()) )
M3 = b"""From: shop@example.net
To: customer@example.com
Bcc: dave@example.com
Subject: Weekly deals
Content-Type: multipart/alternative; boundary=b

--b
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Caf=C3=A9 deals: espresso=20machines
--b
Content-Type: text/html

<p>html only words</p>
--b
Content-Type: application/octet-stream
Content-Transfer-Encoding: base64

""" + base64.encodebytes(b"binary needle in attachment") + b"--b--\n"
M4 = b"""From: reports@example.com
To: boss@example.com
Subject: Report
X-Mailer: TestMailer 1.0
Date: garbage
Content-Type: multipart/mixed; boundary=m

--m
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: 8bit

\xdcbersicht attached
--m
Content-Type: message/rfc822

Subject: inner secret
From: deep@example.com

forwarded body words
--m--
"""


def mailbox():
    return [
        Stored(1, 10, {"\\Seen"}, 400, datetime(2024, 1, 10, 12, 0, tzinfo=UTC), M1),
        Stored(2, 20, {"\\Recent"}, 1200, datetime(2024, 2, 1, 0, 30, tzinfo=timezone(timedelta(hours=2))), M2),
        Stored(3, 30, {"\\Answered", "\\Flagged", "$Work"}, 5000, datetime(2024, 2, 15, 23, 59, tzinfo=UTC), M3),
        Stored(4, 4000000000, {"\\Deleted", "\\Draft", "\\Recent", "\\Seen"}, 100,
               datetime(2024, 3, 1, 8, 0, tzinfo=UTC), M4),
    ]


def run(query: bytes, msgs=None):
    msgs = msgs if msgs is not None else mailbox()
    prog = parse_search(tokenize(query))
    return [m.seq for m in search(prog, msgs, max_seq=len(msgs), max_uid=max(m.uid for m in msgs))]


@pytest.mark.parametrize("query,want", [
    (b"ALL", [1, 2, 3, 4]),
    (b"ANSWERED", [3]), (b"UNANSWERED", [1, 2, 4]),
    (b"DELETED", [4]), (b"UNDELETED", [1, 2, 3]),
    (b"DRAFT", [4]), (b"UNDRAFT", [1, 2, 3]),
    (b"FLAGGED", [3]), (b"UNFLAGGED", [1, 2, 4]),
    (b"SEEN", [1, 4]), (b"UNSEEN", [2, 3]),
    (b"RECENT", [2, 4]), (b"OLD", [1, 3]), (b"NEW", [2]),
    (b"KEYWORD $Work", [3]), (b"keyword $work", [3]), (b"UNKEYWORD $Work", [1, 2, 4]),
    (b"KEYWORD $Nope", []),
    (b"LARGER 1200", [3]), (b"SMALLER 400", [4]), (b"LARGER 99 SMALLER 401", [1, 4]),
    (b"BEFORE 1-Feb-2024", [1]), (b"ON 1-Feb-2024", [2]), (b"SINCE 15-Feb-2024", [3, 4]),
    (b'ON "10-jan-2024"', [1]),
    (b"SENTBEFORE 1-Jan-2024", [1, 3, 4]), (b"SENTON 31-Jan-2024", [2]), (b"SENTSINCE 1-Jan-2004", [2]),
    (b"FROM alice", [1]), (b"FROM EXAMPLE.ORG", [1]), (b'FROM "j\xc3\xbcrgen"', [2]),
    (b"TO team", [2]), (b"CC carol", [2]), (b"BCC dave", [3]),
    (b"SUBJECT lunch", [1]), (b'SUBJECT "gr\xc3\xbc\xc3\x9fe aus"', [2]), (b"SUBJECT secret", []),
    (b'HEADER X-Mailer testmailer', [4]), (b'HEADER x-mailer ""', [4]), (b'HEADER Message-ID "<m1@"', [1]),
    (b"BODY lunch", [1]), (b'BODY "sch\xc3\xb6ne gr\xc3\xbc\xc3\x9fe"', [2]), (b'BODY "caf\xc3\xa9 deals"', [3]),
    (b"BODY espresso", [3]), (b"BODY html", [3]), (b"BODY needle", []),
    (b'BODY "\xc3\xbcbersicht"', [4]), (b'BODY "inner secret"', []), (b'TEXT "inner secret"', [4]), (b'BODY "forwarded body"', [4]),
    (b"BODY Report", []), (b"TEXT Report", [4]), (b"TEXT lunch", [1]), (b"TEXT x-mailer", [4]),
    (b"UID 10:20", [1, 2]), (b"UID 25:*", [3, 4]), (b"UID *", [4]), (b"UID 4000000000", [4]),
    (b"UID 1:4294967295", [1, 2, 3, 4]), (b"UID 21:29", []),
    (b"2:3", [2, 3]), (b"*", [4]), (b"3:1", [1, 2, 3]), (b"1,4", [1, 4]), (b"4:*", [4]),
    (b"NOT SEEN", [2, 3]), (b"NOT NOT SEEN", [1, 4]),
    (b"OR SEEN FLAGGED", [1, 3, 4]), (b"OR (SEEN DELETED) ANSWERED", [3, 4]),
    (b"OR OR DRAFT ANSWERED NEW", [2, 3, 4]),
    (b"(SEEN)", [1, 4]), (b"(SEEN (NOT DELETED))", [1]), (b"SEEN NOT DELETED", [1]),
    (b"CHARSET UTF-8 SUBJECT deals", [3]), (b"charset us-ascii ALL", [1, 2, 3, 4]),
    (b"UNSEEN SINCE 1-Feb-2024 LARGER 1000 SUBJECT deals", [3]),
])
def test_search_keys(query, want):
    assert run(query) == want


def test_address_keys_match_the_parsed_addresses_as_well_as_the_header_text():
    """RFC 3501 §6.4.4: FROM/TO/CC/BCC match the envelope's address fields, so comments,
    quoting and folding in the header do not hide an address (imaptest search-addresses)."""
    msgs = [
        Stored(1, 1, set(), 100, datetime(2024, 1, 1, tzinfo=UTC),
               b"From: <user-from (comment)@ (comment) domain.org>\nTo: \"Smith, J.\" <js@x.org>\n\nb\n"),
        Stored(2, 2, set(), 100, datetime(2024, 1, 1, tzinfo=UTC),
               b"From: user-from@domain.org (Real Name)\nCc: a@b.c,\n  =?UTF-8?Q?J=C3=B6rg?= <j@k.de>\n\nb\n"),
        Stored(3, 3, set(), 100, datetime(2024, 1, 1, tzinfo=UTC),
               b"From: other@domain.org\nSubject: user-from@domain.org\n\nb\n"),
    ]
    assert run(b"FROM user-from@domain.org", msgs) == [1, 2]
    assert run(b"FROM comment", msgs) == [1]          # the header text still counts
    assert run(b'TO "smith, j. <js@x.org>"', msgs) == [1]
    assert run(b'CC "j\xc3\xb6rg <j@k.de>"', msgs) == [2]
    assert run(b"SUBJECT user-from@domain.org", msgs) == [3]
    assert run(b"TO user-from", msgs) == []


def test_flag_size_date_uid_keys_never_load_messages():
    msgs = mailbox()
    q = (b"OR (UNSEEN LARGER 10 SINCE 1-Jan-2000 UID 1:*) (NOT KEYWORD $x BEFORE 1-Jan-2030 1:* NEW OLD"
         b" SMALLER 99999 ON 1-Feb-2024 RECENT DRAFT DELETED FLAGGED ANSWERED SEEN ALL)")
    prog = parse_search(tokenize(q))
    assert not prog.needs_content
    assert [m.seq for m in search(prog, msgs, 4, 4000000000)] == [2, 3]
    assert all(m.loads == 0 for m in msgs)


@pytest.mark.parametrize("query,flags_only", [
    (b"UNSEEN", True), (b"NOT (DELETED OR KEYWORD $a NEW)", True), (b"ALL", True), (b"OLD RECENT", True),
    (b"UNSEEN LARGER 5", False), (b"OR SEEN 1:3", False), (b"UID 5", False), (b"SINCE 1-Jan-2020", False),
    (b"NOT SUBJECT x", False),
])
def test_flags_only_property(query, flags_only):
    assert parse_search(tokenize(query)).flags_only is flags_only


def test_content_key_loads_only_when_cheap_keys_pass_and_once_per_message():
    msgs = mailbox()
    prog = parse_search(tokenize(b"SUBJECT deals FROM shop BODY espresso SEEN"))
    assert prog.needs_content
    # cheap SEEN is evaluated first: unseen messages are never loaded
    assert search(prog, msgs, 4, 4000000000) == []
    assert [m.loads for m in msgs] == [1, 0, 0, 1]
    msgs = mailbox()
    prog = parse_search(tokenize(b"SUBJECT deals FROM shop BODY espresso TEXT caf"))
    assert [m.seq for m in search(prog, msgs, 4, 4000000000)] == [3]
    assert all(m.loads <= 1 for m in msgs)


@pytest.mark.parametrize("query", [
    b"", b"FOO", b"SUBJECT", b"LARGER x", b"LARGER", b"BEFORE 32-Jan-2024", b"BEFORE 1-Foo-2024",
    b"SINCE 2024-01-01", b"UID", b"UID 0", b"UID 1:x", b"OR SEEN", b"NOT", b"()", b"0", b"1:0",
    b'"ALL"', b"ALL CHARSET UTF-8", b"CHARSET", b"KEYWORD (a)", b"SUBJECT (a)", b"LARGER 99999999999",
])
def test_parse_errors(query):
    with pytest.raises(ParseError) as exc:
        parse_search(tokenize(query))
    assert str(exc.value)


def test_bad_charset():
    with pytest.raises(BadCharset) as exc:
        parse_search(tokenize(b"CHARSET ISO-8859-1 SUBJECT x"))
    assert exc.value.charset == "ISO-8859-1"


def test_missing_or_bad_date_header_counts_as_1970_like_dovecot():
    assert run(b"SENTSINCE 2-Jan-1970") == [1, 2]
    assert run(b"SENTON 1-Jan-1970") == [3, 4]


def test_internal_date_as_epoch_uses_local_day():
    ts = datetime(2024, 5, 5, 12, 0, tzinfo=UTC).timestamp()
    msgs = [Stored(1, 1, set(), 1, ts, b"")]
    day = datetime.fromtimestamp(ts).strftime("%d-%b-%Y").encode()
    assert run(b"ON " + day, msgs) == [1]
    assert msgs[0].loads == 0


def test_parse_date():
    assert parse_date(b"1-Feb-1994").isoformat() == "1994-02-01"
    assert parse_date(b"01-feb-1994").isoformat() == "1994-02-01"


# --- sequence sets -------------------------------------------------------------------------


def test_sequence_set_parse_and_membership():
    s = SequenceSet.parse(b"1:5,7,9:*")
    assert s.resolve(12) == [(1, 5), (7, 7), (9, 12)]
    assert [n for n in range(1, 14) if s.contains(n, 12)] == [1, 2, 3, 4, 5, 7, 9, 10, 11, 12]
    assert SequenceSet.parse("5:2").resolve(10) == [(2, 5)]
    assert SequenceSet.parse(b"*:3").resolve(2) == [(2, 3)]
    assert SequenceSet.parse(b"3,1:2,2:4").resolve(9) == [(1, 4)]
    assert SequenceSet.parse(b"*").contains(7, 7) and not SequenceSet.parse(b"*").contains(6, 7)


def test_sequence_set_filter_huge_uid_range_without_iterating():
    uids = [3, 8, 100, 4000000000, 4294967295]
    s = SequenceSet.parse(b"1:4294967295")
    assert s.filter(uids, 4294967295) == uids
    assert SequenceSet.parse(b"5:99,4294967295").filter(uids, 4294967295) == [8, 4294967295]
    assert SequenceSet.parse(b"9:*").filter(uids, uids[-1]) == [100, 4000000000, 4294967295]
    # "n:*" with n above the largest UID still contains the largest (RFC 3501 §6.4.8)
    assert SequenceSet.parse(b"500:*").filter([3, 8], 8) == [8]


def test_search_with_a_32000_item_set_over_20000_messages_bisects():
    # "SEARCH 1,1,1,..." (64 KB of command) checked every range for every message: 6.4e8 steps
    # held the reactor for seconds; membership now bisects the merged ranges
    text = b",".join([b"1"] * 16000 + [b"%d" % n for n in range(2, 32000, 2)])
    msgs = [Stored(n, n, set(), 10, datetime(2024, 1, 1, tzinfo=UTC), b"") for n in range(1, 20001)]
    prog = parse_search(tokenize(b"SEARCH " + text)[1:])
    found = [m.seq for m in search(prog, msgs, max_seq=20000, max_uid=20000)]
    assert found == [1] + list(range(2, 20001, 2))
    assert SequenceSet.parse(b"5:3,9:*,1").contains(4, 20) and not SequenceSet.parse(b"5:3").contains(6, 20)


@pytest.mark.parametrize("bad", [b"", b"0", b"1:0", b"a", b"1:", b":1", b"1,,2", b"1:2:3", b"4294967296", b"$",
                                 b"1:" + b"9" * 5000])
def test_sequence_set_invalid(bad):
    with pytest.raises(ParseError):
        SequenceSet.parse(bad)


# --- agreement with Dovecot 2.3 on the MIME corpus -------------------------------------------

import json  # noqa: E402
import os  # noqa: E402

from tmmail.imap.mime import Message  # noqa: E402

CORPUS = os.path.join(os.path.dirname(__file__), "mime_corpus")
with open(os.path.join(CORPUS, "search.expected.json"), encoding="utf-8") as _f:
    DOVECOT = json.load(_f)


def corpus_mailbox():
    msgs = []
    for i, name in enumerate(DOVECOT["messages"], 1):
        with open(os.path.join(CORPUS, name), "rb") as f:
            raw = f.read()
        when = datetime.fromtimestamp(DOVECOT["base"] + i * DOVECOT["step"], UTC)
        msgs.append(Stored(i, i, set(), len(Message(raw).data), when, raw))
    return msgs


@pytest.mark.parametrize("query", sorted(DOVECOT["queries"]))
def test_same_result_as_dovecot(query):
    msgs = corpus_mailbox()
    assert run(query.encode("utf-8"), msgs) == DOVECOT["queries"][query]


def test_expunged_message_does_not_match_and_is_reported():
    """A message whose content is gone (load() raises MessageGone) simply does not match, also
    under NOT; the others are still searched; flag-only programs never load and still see it."""
    from tmmail.imap.search import MessageGone

    class Gone(Stored):
        def load(self):
            raise MessageGone("expunged")

    now = datetime(2026, 1, 1, tzinfo=UTC)
    msgs = [Stored(1, 1, [], 100, now, M1), Gone(2, 2, ["\\Seen"], 100, now, M1),
            Stored(3, 3, ["\\Seen"], 100, now, M1)]
    for text in (b"BODY lunch", b"NOT BODY nomatch", b"SUBJECT lunch", b"SENTBEFORE 1-Jan-2030"):
        gone: list = []
        found = search(parse_search(tokenize(text)), msgs, 3, 3, gone)
        assert [m.seq for m in found] == [1, 3], text
        assert [m.seq for m in gone] == [2]
    assert [m.seq for m in search(parse_search(tokenize(b"SEEN")), msgs, 3, 3)] == [2, 3]
