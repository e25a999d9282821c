"""tmmail.logformat: the same log lines as Twisted's text formatter, faster."""

from __future__ import annotations

import io
import re
import time

import pytest
from twisted.logger import Logger, LogLevel, LogPublisher, textFileLogObserver
from twisted.python.failure import Failure

from tmmail import logformat


def _lines(emit) -> tuple[str, str]:
    """What Twisted's observer writes, and what it writes with the fast formatter installed."""
    out = []
    for fast in (False, True):
        buf = io.StringIO()
        pub = LogPublisher(textFileLogObserver(buf))
        if fast:
            assert logformat.install(pub) == 1
        emit(Logger(namespace="tmmail.test", observer=pub))
        out.append(buf.getvalue())
    return out[0], out[1]


@pytest.mark.parametrize("emit", [
    lambda log: log.info("queued {queue_id} from=<{sender}> size={size}", queue_id="Q1", sender="a@b", size=12),
    lambda log: log.warn("{n:5d}|{x!r}|{{literal}}", n=3, x="é"),
    lambda log: log.error("two\nlines {a}", a=1),
    lambda log: log.info("call {f()}", f=lambda: "syntax"),
    lambda log: log.info("missing {nothere}"),
    lambda log: log.failure("it broke {what}", Failure(ValueError("boom")), what="x"),
    lambda log: log.emit(LogLevel.debug, "system {a}", a=1, log_system="custom"),
    lambda log: log.info(""),
], ids=["plain", "specs", "newline", "call", "missing", "failure", "system", "empty"])
def test_same_text_as_twisted(emit) -> None:
    twisted_text, fast_text = _lines(emit)
    # an unformattable event's text includes its own log_time; the two runs differ there
    assert re.sub(r"'log_time': [0-9.]+", "T", fast_text) == re.sub(r"'log_time': [0-9.]+", "T", twisted_text)
    assert fast_text.count("\n") == twisted_text.count("\n")


def test_timestamp_follows_the_clock() -> None:
    fmt = logformat.FastClassicFormat(lambda e: None)
    now = time.time()
    a = fmt({"log_format": "x", "log_time": now, "log_namespace": "n", "log_level": LogLevel.info})
    b = fmt({"log_format": "x", "log_time": now + 3600, "log_namespace": "n", "log_level": LogLevel.info})
    assert a != b and a.split(" ", 1)[1] == b.split(" ", 1)[1] == "[n#info] x\n"
