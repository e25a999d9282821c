"""QUOTA (RFC 2087 / RFC 9208, read-only) over real sockets: the mailbox's QUOTA_BYTES from the
provider tables, its usage over all folders, what clients such as Thunderbird ask."""

from __future__ import annotations

import imaplib
import re

import pytest

from tests.imap_fixtures import PASSWORD, start_imap, stop_imap

USERS = {"alice@example.com": ("EXAMPLE", "alice"), "bob@example.com": ("EXAMPLE", "bob")}


@pytest.fixture
def env(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path, users=USERS, quotas={"alice@example.com": 100 * 1024})
    yield e
    stop_imap(reactor_thread, e)


def login(env, user: str) -> imaplib.IMAP4:
    m = imaplib.IMAP4("127.0.0.1", env.port, timeout=20)
    m.login(user, PASSWORD)
    return m


def storage(m: imaplib.IMAP4, mailbox: str) -> tuple[list[bytes], tuple[int, int] | None]:
    typ, data = m.getquotaroot(mailbox)
    assert typ == "OK"
    roots, quotas = data
    found = None
    for q in (q for q in quotas if q is not None):
        mt = re.fullmatch(rb'"" \(STORAGE (\d+) (\d+)\)', q)
        if mt:
            found = (int(mt.group(1)), int(mt.group(2)))
    return roots, found


def test_capability_and_usage_grow_with_mail_in_any_folder(env):
    m = login(env, "alice@example.com")
    assert "QUOTA" in m.capabilities
    roots, st = storage(m, "INBOX")
    assert roots == [b'INBOX ""'] and st == (0, 100)
    m.append("INBOX", None, None, b"Subject: a\r\n\r\n" + b"x" * 3000 + b"\r\n")
    m.append("Archive", None, None, b"Subject: b\r\n\r\n" + b"y" * 5000 + b"\r\n")
    roots, st = storage(m, "Archive")
    assert roots == [b'Archive ""']
    used, limit = st
    assert limit == 100 and used == -(-(3000 + 5000 + 2 * 16) // 1024)  # stored sizes, KiB rounded up
    typ, data = m.getquota('""')
    assert typ == "OK" and data == [b'"" (STORAGE %d 100)' % used]
    m.logout()


def test_no_quota_means_no_root_and_errors_are_protocol_errors(env):
    m = login(env, "bob@example.com")
    roots, st = storage(m, "INBOX")
    assert roots == [b"INBOX"] and st is None  # a mailbox without a limit has no quota root
    typ, data = m.getquota('""')
    assert typ == "NO" and b"NONEXISTENT" in data[0]
    typ, data = m._simple_command("GETQUOTAROOT", "NoSuchFolder")
    assert typ == "NO" and data[0].startswith(b"[NONEXISTENT]")
    typ, data = m.setquota('""', "(STORAGE 999999)")
    assert typ == "NO"
    with pytest.raises(imaplib.IMAP4.error):  # BAD: malformed
        m._simple_command("SETQUOTA", '""')
    with pytest.raises(imaplib.IMAP4.error):
        m._simple_command("GETQUOTAROOT")
    assert m.noop()[0] == "OK"
    m.logout()


def test_quota_commands_need_a_login(env):
    m = imaplib.IMAP4("127.0.0.1", env.port, timeout=20)
    with pytest.raises(imaplib.IMAP4.error):
        m._simple_command("GETQUOTAROOT", "INBOX")
    m.logout()
