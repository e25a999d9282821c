"""mbsync (isync) against the IMAP server: a mailbox with folders synced both ways, twice, with
no duplicates, new messages, flag changes and deletions carried in both directions."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import require_tool
from tests.imap_fixtures import PASSWORD, start_imap, stop_imap
from tests.test_imap_server import client, deliver, message


@pytest.fixture
def env(reactor_thread, tmp_path):
    e = start_imap(reactor_thread, tmp_path)
    yield e
    stop_imap(reactor_thread, e)


def write_config(env, local: str) -> str:
    conf = os.path.join(env.root, "mbsyncrc")
    pwfile = os.path.join(env.root, "pw")
    with open(pwfile, "w") as f:
        f.write(PASSWORD)
    with open(conf, "w") as f:
        f.write(f"""IMAPAccount tm
Host 127.0.0.1
Port {env.port}
User alice@example.com
PassCmd "cat {pwfile}"
SSLType None
AuthMechs PLAIN LOGIN
Timeout 20

IMAPStore tm-remote
Account tm

MaildirStore tm-local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel tm
Far :tm-remote:
Near :tm-local:
Patterns *
Create Both
Remove Both
Expunge Both
SyncState *
""")
    return conf


def run_mbsync(conf: str) -> str:
    exe = require_tool("mbsync")
    r = subprocess.run([exe, "-c", conf, "-a", "-D" if os.environ.get("MBSYNC_DEBUG") else "-q"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HOME": os.path.dirname(conf)})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def local_messages(path: str) -> dict[str, str]:
    """Subject -> flag letters of a local Maildir folder."""
    out = {}
    for sub in ("cur", "new"):
        d = os.path.join(path, sub)
        for name in os.listdir(d):
            with open(os.path.join(d, name), "rb") as f:
                head = f.read().split(b"\n\n", 1)[0]
            subject = [ln for ln in head.split(b"\n") if ln.startswith(b"Subject: ")][0][9:].decode()
            assert subject not in out, f"duplicate {subject} in {path}"
            out[subject] = name.split(":2,")[1] if ":2," in name else ""
    return out


def server_messages(c, folder: str) -> dict[str, set]:
    c.select_folder(folder)
    uids = c.search(["ALL"])
    data = c.fetch(uids, ["FLAGS", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"]) if uids else {}
    out: dict[str, set] = {}
    for item in data.values():
        subject = item[b"BODY[HEADER.FIELDS (SUBJECT)]"].strip().decode()[9:]
        assert subject not in out, f"duplicate {subject} on the server in {folder}"
        out[subject] = {f.decode() for f in item[b"FLAGS"]} - {"\\Recent"}
    return out


def test_mbsync_two_way_sync_twice(env):
    for n in range(1, 4):
        deliver(env, message(n), tmp_name=f"m{n}")
    c = client(env)
    c.create_folder("Work/Projects")
    c.append("Work/Projects", message(10, subject="project plan"), flags=[b"\\Flagged"])
    c.select_folder("INBOX")
    c.add_flags([1], [b"\\Seen"])
    c.logout()

    local = os.path.join(env.root, "local")
    os.makedirs(local)
    conf = write_config(env, local)
    run_mbsync(conf)
    inbox = local_messages(os.path.join(local, "INBOX"))
    assert set(inbox) == {"message 1", "message 2", "message 3"}
    assert "S" in inbox["message 1"] and "S" not in inbox["message 2"]
    projects = local_messages(os.path.join(local, "Work", "Projects"))
    assert projects == {"project plan": "F"}

    # local changes: a new message in a new local folder, a flag change, a deletion
    newdir = os.path.join(local, "Local-Notes")
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(newdir, sub))
    with open(os.path.join(newdir, "cur", "1700000000.local1.host:2,S"), "wb") as f:
        f.write(message(20, subject="local note"))
    for sub in ("cur", "new"):
        folder = os.path.join(local, "INBOX", sub)
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            base, _, letters = name.partition(":2,")
            extra = "F" if b"Subject: message 2" in data else "T" if b"Subject: message 3" in data else ""
            if extra:
                os.rename(os.path.join(folder, name), os.path.join(
                    local, "INBOX", "cur", base + ":2," + "".join(sorted(letters + extra))))
    # server changes at the same time: a new message and a flag change
    deliver(env, message(4), tmp_name="m4")
    c = client(env)
    c.select_folder("Work/Projects")
    c.add_flags([1], [b"\\Answered"])
    c.logout()

    run_mbsync(conf)
    c = client(env)
    folders = {name for _f, _d, name in c.list_folders()}
    assert "Local-Notes" in folders
    assert server_messages(c, "Local-Notes") == {"local note": {"\\Seen"}}
    inbox_srv = server_messages(c, "INBOX")
    assert set(inbox_srv) == {"message 1", "message 2", "message 4"}  # 3 was deleted locally
    assert "\\Flagged" in inbox_srv["message 2"]
    assert server_messages(c, "Work/Projects")["project plan"] == {"\\Flagged", "\\Answered"}
    c.logout()
    inbox = local_messages(os.path.join(local, "INBOX"))
    assert set(inbox) == {"message 1", "message 2", "message 4"}
    assert local_messages(os.path.join(local, "Work", "Projects")) == {"project plan": "FR"}

    # a third run changes nothing and duplicates nothing
    run_mbsync(conf)
    c = client(env)
    assert set(server_messages(c, "INBOX")) == {"message 1", "message 2", "message 4"}
    assert len(server_messages(c, "Local-Notes")) == 1
    c.logout()
    assert set(local_messages(os.path.join(local, "INBOX"))) == {"message 1", "message 2", "message 4"}
    assert len(local_messages(os.path.join(local, "Local-Notes"))) == 1
