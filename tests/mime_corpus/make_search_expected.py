"""Regenerate search.expected.json from a throwaway Dovecot (not run by tests).

All corpus messages go into one Maildir in file-name order (UID = sequence = position, fixed by a
pre-written dovecot-uidlist); message i gets the internal date (mtime) BASE + i weeks and no
flags.  Each query of QUERIES is sent as "SEARCH <query>" and Dovecot's answer is recorded.
Usage (as root): python tests/mime_corpus/make_search_expected.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

from make_expected import CONF, HERE

BASE = 1700000000
WEEK = 7 * 86400

QUERIES = [
    'CHARSET UTF-8 SUBJECT "grüße"', 'CHARSET UTF-8 BODY "März"', 'CHARSET UTF-8 BODY "München"',
    'CHARSET UTF-8 SUBJECT "München"', 'CHARSET UTF-8 BODY "café"', 'CHARSET UTF-8 FROM "jürgen"',
    'BODY "Köln"', 'BODY softbreak', 'BODY boldword', 'BODY bold', 'BODY iVBORw0', 'BODY signature',
    'TEXT example.org', 'BODY deepest', 'TEXT deepest', 'BODY "Subject: inner"', 'FROM "J=C3=BCrgen"',
    'TO undisclosed', 'CC Team', 'TO "user 17"', 'HEADER X-Long yyyy', 'HEADER Received late.example',
    'SENTON 31-Dec-2023', 'SENTBEFORE 1-Jan-2024', 'SENTSINCE 1-Jan-2024', 'SENTON 1-Jan-1970',
    'SINCE 1-Jan-2024', 'BEFORE 1-Feb-2024', 'ON 8-Jan-2024', 'LARGER 1000', 'SMALLER 300', 'BODY ""',
    'HEADER Content-Type ""', 'TEXT "no subtype"', 'BODY "no subtype"', 'BODY "garbage type"',
    'BODY RnJvbTog', 'BODY "body without trailing"',
    'SUBJECT "very long subject line that has been folded several"', 'SUBJECT "folded  several"',
    'BODY a;b;c', 'HEADER To "quoted local"', 'FROM "last, first"', 'TEXT "Q2hlY2sg"',
    'TEXT "Return-Path"', 'TEXT "Message-ID: <2003"', 'TEXT "message-id:"',
    'TEXT "content-type: text/plain"', 'TEXT "Subject: Lunch"', 'TEXT "subject:lunch"',
    'CHARSET UTF-8 TEXT "Grüße aus Köln"', 'TEXT "=?UTF-8?Q?Gr"', 'CHARSET UTF-8 HEADER Subject "aus köln – 日本語"',
    'CHARSET UTF-8 BODY "SCHÖNE"', 'CHARSET UTF-8 BODY "Schöne Grüße!"', 'BODY "anbei die"',
    'TEXT "headers only"', 'BODY "headers only"', 'BODY "Not a message inside"', 'TEXT "inner text"',
    'OR SUBJECT digest FROM shop', 'NOT BODY the', 'HEADER MESSAGE-ID example.com', 'HEADER In-Reply-To plan-6',
    'BCC joerg', 'CC "Weird"', 'FROM MISSING_DOMAIN', 'TO noat', 'UID 3:5,20:*', '2,4:6', 'SUBJECT ""',
]


def main() -> None:
    names = sorted(n for n in os.listdir(HERE) if n.endswith(".eml"))
    d = tempfile.mkdtemp(prefix="dvs")
    try:
        os.chmod(d, 0o755)
        for sub in ("Maildir/cur", "Maildir/new", "Maildir/tmp", "state", "run"):
            os.makedirs(os.path.join(d, sub))
        lines = ["3 V1 N%d" % (len(names) + 1)]
        for i, name in enumerate(names, 1):
            dest = os.path.join(d, "Maildir/cur/%d.corpus:2," % i)
            shutil.copy(os.path.join(HERE, name), dest)
            os.utime(dest, (BASE + i * WEEK, BASE + i * WEEK))
            lines.append("%d :%d.corpus" % (i, i))
        with open(os.path.join(d, "Maildir/dovecot-uidlist"), "w") as f:
            f.write("\n".join(lines) + "\n")
        subprocess.run(["chown", "-R", "65534:65534", os.path.join(d, "Maildir"), os.path.join(d, "state")],
                       check=True)
        with open(os.path.join(d, "dovecot.conf"), "w") as f:
            f.write(CONF.format(d=d))
        cmds = b"s EXAMINE INBOX\r\n" + b"".join(
            b"t%d SEARCH %s\r\n" % (k, q.encode()) for k, q in enumerate(QUERIES)) + b"z LOGOUT\r\n"
        p = subprocess.run(["/usr/lib/dovecot/imap", "-c", os.path.join(d, "dovecot.conf")], input=cmds,
                           capture_output=True, timeout=60,
                           env={"USER": "nobody", "HOME": d, "PATH": "/usr/bin:/bin", "TZ": "UTC"})
        res = [ln for ln in p.stdout.split(b"\r\n") if ln.startswith(b"* SEARCH")]
        assert len(res) == len(QUERIES), p.stdout[-500:]
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out = {"base": BASE, "step": WEEK, "messages": names,
           "queries": {q: [int(x) for x in r.split()[2:]] for q, r in zip(QUERIES, res)}}
    with open(os.path.join(HERE, "search.expected.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(len(QUERIES), "queries")


if __name__ == "__main__":
    main()
