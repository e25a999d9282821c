"""Differential fuzzing against Dovecot (a tool, not a test): mutate corpus messages, FETCH the
same items from Dovecot and from tmmail.imap.fetch, print the first differences.

Usage (as root, Dovecot installed): python tests/mime_corpus/dovecot_difffuzz.py [count] [seed]
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from make_expected import CONF, HERE  # noqa: E402

from tmmail.imap.encoding import tokenize  # noqa: E402
from tmmail.imap.fetch import fetch_data, parse_fetch_items  # noqa: E402

ITEMS = ["BODYSTRUCTURE", "ENVELOPE", "BODY.PEEK[1]", "BODY.PEEK[1.MIME]", "BODY.PEEK[2]",
         "BODY.PEEK[2.MIME]", "BODY.PEEK[2.1]", "BODY.PEEK[2.HEADER]", "BODY.PEEK[TEXT]",
         "BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)]", "BODY.PEEK[3]", "BODY.PEEK[1.1]"]

SNIPPETS = [b"\n--", b"\n\n", b"\"", b";", b"(", b")", b"\n--=-=-=--\n", b"\n--outer\n", b"\n--b1\n",
            b"Content-Type: message/rfc822\n", b"\xe9", b"<", b">", b"@", b",", b":", b"\n ", b"=?utf-8?q?x?=",
            b"Content-Type: multipart/mixed; boundary=x\n\n--x\n", b"\t", b"\\"]


def mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randint(0, len(data))
        op = rng.random()
        if op < 0.35:
            del data[pos : pos + rng.randint(1, 20)]
        elif op < 0.9:
            data[pos:pos] = rng.choice(SNIPPETS)
        else:
            data = data[:pos]
    return bytes(data).replace(b"\r", b"").replace(b"\x00", b"")


def split_fetches(out: bytes) -> dict[tuple[int, int], bytes]:
    """(command index, seq) -> "NAME value" from pipelined "tK FETCH 1:* (ITEM)" commands."""
    res: dict[tuple[int, int], bytes] = {}
    i = 0
    k = 0
    last = 0
    lit = re.compile(rb"\{(\d+)\}\r\n$")
    while i < len(out):
        j = out.find(b"\r\n", i)
        if j < 0:
            break
        line = out[i : j + 2]
        i = j + 2
        while True:
            m = lit.search(line)
            if not m:
                break
            n = int(m.group(1))
            line += out[i : i + n]
            i += n
            j = out.find(b"\r\n", i)
            if j < 0:                   # truncated output: stop, never loop back
                return res
            line += out[i : j + 2]
            i = j + 2
        m = re.match(rb"\* (\d+) FETCH \(", line)
        if m:
            seq = int(m.group(1))
            if seq <= last:          # tagged replies come late when pipelined: a new command
                k += 1
            last = seq
            res[(k, seq)] = line[m.end() : -3]
    return res


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    base = [open(os.path.join(HERE, n), "rb").read() for n in sorted(os.listdir(HERE)) if n.endswith(".eml")]
    msgs = [mutate(rng, rng.choice(base)) for _ in range(count)]
    d = tempfile.mkdtemp(prefix="dvf")
    try:
        os.chmod(d, 0o755)
        for sub in ("Maildir/cur", "Maildir/new", "Maildir/tmp", "state", "run"):
            os.makedirs(os.path.join(d, sub))
        lines = ["3 V1 N%d" % (count + 1)]
        for i, raw in enumerate(msgs, 1):
            with open(os.path.join(d, "Maildir/cur/%d.f:2,S" % i), "wb") as f:
                f.write(raw)
            lines.append("%d :%d.f" % (i, i))
        with open(os.path.join(d, "Maildir/dovecot-uidlist"), "w") as f:
            f.write("\n".join(lines) + "\n")
        subprocess.run(["chown", "-R", "65534:65534", d + "/Maildir", d + "/state"], check=True)
        with open(os.path.join(d, "dovecot.conf"), "w") as f:
            f.write(CONF.format(d=d))
        got: dict[tuple[int, int], bytes] = {}
        for k, it in enumerate(ITEMS):          # one process per item keeps answers aligned
            cmds = b"s EXAMINE INBOX\r\nt FETCH 1:* (%s)\r\nz LOGOUT\r\n" % it.encode()
            p = subprocess.run(["/usr/lib/dovecot/imap", "-c", d + "/dovecot.conf"], input=cmds,
                               capture_output=True, timeout=120,
                               env={"USER": "nobody", "HOME": d, "PATH": "/bin"})
            got.update({(k, seq): v for (_k, seq), v in split_fetches(p.stdout).items()})
    finally:
        shutil.rmtree(d, ignore_errors=True)

    class M:
        def __init__(self, raw: bytes) -> None:
            self.raw, self.uid, self.seq, self.flags, self.internal_date, self.size = raw, 1, 1, set(), 0.0, 0

        def load(self) -> bytes:
            return self.raw

    bad = 0
    per_item: dict[str, int] = {}
    for k, it in enumerate(ITEMS):
        items = parse_fetch_items(tokenize(it.encode())[0])
        for i, raw in enumerate(msgs, 1):
            want = got.get((k, i))
            mine = fetch_data(items, M(raw))
            if want is not None and mine != want:
                bad += 1
                per_item[it] = per_item.get(it, 0) + 1
                if per_item[it] <= int(os.environ.get('SHOW', '2')):
                    print("=== message %d item %s\n--- message\n%r\n--- dovecot\n%r\n--- tmmail\n%r"
                          % (i, it, raw[:1500], want[:800], mine[:800]))
    print("differences per item:", per_item)
    print("differences:", bad, "of", len(ITEMS) * count)


if __name__ == "__main__":
    main()
