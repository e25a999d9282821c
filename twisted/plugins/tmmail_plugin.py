"""``twistd tmmail``: the TMmail service maker (only the plugin glue; see tmmail.tap)."""

from twisted.application.service import ServiceMaker

TMmail = ServiceMaker(
    "TMmail",
    "tmmail.tap",
    "TMmail: SMTP, POP3, IMAP, router and relay queue in one process",
    "tmmail",
)
