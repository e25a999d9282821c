"""Regenerate the *.expected.json files of the corpus from a throwaway Dovecot (not run by tests).

Usage (as root, Dovecot installed):  python tests/mime_corpus/make_expected.py
Each message is placed alone in a temporary Maildir owned by `nobody`, and /usr/lib/dovecot/imap
runs in PREAUTH mode on stdin/stdout; each item of ITEMS is fetched with its own command and the
raw response value is stored (latin-1 text) under the item name as the client sent it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

ITEMS = [
    "RFC822.SIZE", "ENVELOPE", "BODY", "BODYSTRUCTURE", "RFC822.HEADER",
    "BODY.PEEK[]", "BODY.PEEK[HEADER]", "BODY.PEEK[TEXT]",
    "BODY.PEEK[HEADER.FIELDS (From To Subject Received X-Missing)]",
    "BODY.PEEK[HEADER.FIELDS.NOT (Received To)]",
    "BODY.PEEK[1]", "BODY.PEEK[1.MIME]", "BODY.PEEK[2]", "BODY.PEEK[2.MIME]",
    "BODY.PEEK[2.HEADER]", "BODY.PEEK[2.TEXT]", "BODY.PEEK[2.1]", "BODY.PEEK[2.2]",
    "BODY.PEEK[2.1.MIME]", "BODY.PEEK[2.HEADER.FIELDS (Subject)]",
    "BODY.PEEK[3]", "BODY.PEEK[3.1]", "BODY.PEEK[3.2]", "BODY.PEEK[3.MIME]", "BODY.PEEK[4]",
    "BODY.PEEK[4.1]", "BODY.PEEK[1.1]", "BODY.PEEK[1.2]", "BODY.PEEK[1.1.1]", "BODY.PEEK[1.1.2]",
    "BODY.PEEK[1.2.1]", "BODY.PEEK[1.2.HEADER]", "BODY.PEEK[1.2.1.1]", "BODY.PEEK[1.2.2.TEXT]",
    "BODY.PEEK[9]",
    "BODY.PEEK[]<0.20>", "BODY.PEEK[TEXT]<5.7>", "BODY.PEEK[1]<100000.5>", "BODY.PEEK[HEADER]<10.1>",
]

CONF = """base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/log
mail_location = maildir:{d}/Maildir
ssl = no
protocols = imap
mail_uid = 65534
mail_gid = 65534
first_valid_uid = 0
first_valid_gid = 0
default_internal_user = root
default_login_user = root
"""


def parse_responses(out: bytes) -> list[bytes]:
    """The "NAME value" inside each "* n FETCH (...)", in order (one per pipelined command)."""
    results: list[bytes] = []
    i = 0
    while i < len(out):
        j = out.index(b"\r\n", i)
        line = out[i : j + 2]
        i = j + 2
        m = re.search(rb"\{(\d+)\}\r\n$", line)
        if m:
            n = int(m.group(1))
            line += out[i : i + n]
            i += n
            # the rest of the line follows the literal
            j = out.index(b"\r\n", i)
            line += out[i : j + 2]
            i = j + 2
            while re.search(rb"\{(\d+)\}\r\n$", line):
                m = re.search(rb"\{(\d+)\}\r\n$", line)
                n = int(m.group(1))
                line += out[i : i + n]
                i += n
                j = out.index(b"\r\n", i)
                line += out[i : j + 2]
                i = j + 2
        if line.startswith(b"* ") and b" FETCH (" in line[:20]:
            results.append(line[line.index(b"FETCH (") + 7 : -3])
    return results


def run(path: str) -> dict[str, str]:
    d = tempfile.mkdtemp(prefix="dvt")
    try:
        os.chmod(d, 0o755)
        for sub in ("Maildir/cur", "Maildir/new", "Maildir/tmp", "state", "run"):
            os.makedirs(os.path.join(d, sub))
        shutil.copy(path, os.path.join(d, "Maildir/cur/1.corpus:2,S"))
        subprocess.run(["chown", "-R", "65534:65534", os.path.join(d, "Maildir"), os.path.join(d, "state")], check=True)
        with open(os.path.join(d, "dovecot.conf"), "w") as f:
            f.write(CONF.format(d=d))
        cmds = b"s SELECT INBOX\r\n" + b"".join(
            b"t%d FETCH 1 (%s)\r\n" % (k, it.encode()) for k, it in enumerate(ITEMS)
        ) + b"z LOGOUT\r\n"
        p = subprocess.run(
            ["/usr/lib/dovecot/imap", "-c", os.path.join(d, "dovecot.conf")],
            input=cmds, capture_output=True, timeout=30,
            env={"USER": "nobody", "HOME": d, "PATH": "/usr/bin:/bin"},
        )
        res = parse_responses(p.stdout)
        assert len(res) == len(ITEMS), (path, len(res))
        return {it: r.decode("latin-1") for it, r in zip(ITEMS, res)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    names = sys.argv[1:] or sorted(n for n in os.listdir(HERE) if n.endswith(".eml"))
    for name in names:
        res = run(os.path.join(HERE, name))
        with open(os.path.join(HERE, name[:-4] + ".expected.json"), "w") as f:
            json.dump(res, f, indent=1, ensure_ascii=True)
            f.write("\n")
        print(name, "ok")


if __name__ == "__main__":
    main()
