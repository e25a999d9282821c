"""Regenerate addresses.expected.json: Dovecot's ENVELOPE for one-line To: headers (not run by tests).

Usage (as root, Dovecot installed): python tests/mime_corpus/make_address_expected.py
"""

from __future__ import annotations

import json
import os
import tempfile

import make_expected
from make_expected import HERE

CASES = [
    "john doe@example.com", '"John Doe" <john@example.com>, jane@example.com (Jane)', "John <john@example.com>,",
    "<john@example.com> John", "john@example.com <jane@example.com>", "=?utf-8?q?J=C3=B6rg?= <j@x.de>",
    '"=?utf-8?q?J=C3=B6rg?=" <j@x.de>', "J\u00f6rg <j@x.de>", '"a\\\\b" <x@y>', "<x@y>>", "x@y.", "x@[1.2.3.4]",
    '"x y"@z', "x.y.@z", "a@b, c@d; e@f", "undisclosed-recipients:", "list: a@b, c@d", "Mr. Smith <s@x>",
    "Smith, John <s@x>", "x@y (a) (b)", "<x@y> (c)", '"" <x@y>', 'x@y, "q, r" <q@r>', "   ", "<>", "@", "a@", "@b",
    "cr@lf@example.com", "a@b.example, no Content-Type", "Dave <dave@examp", "<@r1,@r2:x@y>", "a@b,,c@d",
    "g: a@b;, h: ;", '"Weird \\"Quotes\\" Inside" <w@example.com>', "x@y (nested (c) comment)",
]


def main() -> None:
    out = {}
    for case in CASES:
        raw = b"To: " + case.encode("utf-8") + b"\n\nbody\n"
        fd, path = tempfile.mkstemp()
        os.write(fd, raw)
        os.close(fd)
        try:
            make_expected.ITEMS = ["ENVELOPE"]
            out[case] = make_expected.run(path)["ENVELOPE"]
        finally:
            os.unlink(path)
    with open(os.path.join(HERE, "addresses.expected.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(len(out), "cases")


if __name__ == "__main__":
    main()
