"""Every reply the SMTP server sends, as named constants with enhanced status codes.

RFC 5321 §4.2 (reply codes), RFC 3463 / RFC 5248 (enhanced status codes), RFC 2034
(ENHANCEDSTATUSCODES), RFC 3207 (STARTTLS), RFC 4954 (AUTH), RFC 3030 (CHUNKING),
RFC 6531 (SMTPUTF8).  Texts with ``{placeholders}`` are filled with ``str.format``.
"""

from __future__ import annotations

# Greeting / closing
S220_GREETING = "220 {host} ESMTP TMmail"
S221_BYE = "221 2.0.0 Bye"
S554_DENIED_CONNECTION = "554 5.7.1 Access denied"
S421_TOO_MANY_CONNECTIONS = "421 4.7.0 {host} Too many connections, try again later"
S421_TOO_MANY_FROM_IP = "421 4.7.0 {host} Too many connections from your address, try again later"
S421_IDLE_TIMEOUT = "421 4.4.2 {host} Idle timeout, closing connection"
S421_SESSION_TIMEOUT = "421 4.4.2 {host} Session time limit exceeded, closing connection"
S421_TOO_MANY_ERRORS = "421 4.7.0 {host} Too many errors, closing connection"
S421_TOO_MANY_COMMANDS = "421 4.7.0 {host} Too many commands without a transaction, closing connection"
S421_TOO_MANY_MESSAGES = "421 4.7.0 {host} Too many messages in this session, closing connection"
S421_DATA_NEVER_ENDS = "421 4.7.0 {host} Too much data without end of data, closing connection"
S421_LINE_NEVER_ENDS = "421 4.7.0 {host} Line without end, closing connection"
S421_SHUTDOWN = "421 4.3.2 {host} Service shutting down, closing connection"

# Generic
S250_OK = "250 2.0.0 Ok"
S250_SENDER_OK = "250 2.1.0 Ok"
S250_RECIPIENT_OK = "250 2.1.5 Ok"
S250_QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
S250_CHUNK_OK = "250 2.0.0 {size} octets received"
S250_RESET = "250 2.0.0 Reset"
S252_VRFY = "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery"
S214_HELP = "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT STARTTLS AUTH"
S354_DATA = "354 End data with <CR><LF>.<CR><LF>"
S220_TLS_READY = "220 2.0.0 Ready to start TLS"
S235_AUTH_OK = "235 2.7.0 Authentication successful"
S334_EMPTY = "334 "
S334_USERNAME = "334 VXNlcm5hbWU6"
S334_PASSWORD = "334 UGFzc3dvcmQ6"

# Syntax / sequence
S500_UNKNOWN = "500 5.5.2 Error: command not recognized"
S500_LINE_TOO_LONG = "500 5.5.2 Line too long"
S500_BARE_NEWLINE_COMMAND = "500 5.5.2 Bare CR or LF not allowed; commands end with CRLF"
S500_BAD_UTF8 = "500 5.5.2 Invalid UTF-8 in command"
S501_SYNTAX = "501 5.5.4 Syntax: {usage}"
S501_BAD_SENDER = "501 5.1.7 Bad sender address syntax"
S501_BAD_RECIPIENT = "501 5.1.3 Bad recipient address syntax"
S502_NOT_IMPLEMENTED = "502 5.5.1 Command not implemented"
S503_HELO_FIRST = "503 5.5.1 Error: send HELO/EHLO first"
S503_NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
S503_NEED_MAIL = "503 5.5.1 Error: need MAIL command"
S503_NEED_RCPT = "503 5.5.1 Error: need RCPT command"
S503_BDAT_AFTER_DATA = "503 5.5.1 Error: DATA and BDAT cannot be mixed"
S503_NO_VALID_TRANSACTION = "503 5.5.1 Error: no valid transaction, chunk discarded"
S503_ALREADY_AUTHENTICATED = "503 5.5.1 Error: already authenticated"
S503_AUTH_IN_TRANSACTION = "503 5.5.1 Error: AUTH not allowed during a mail transaction"
S503_ALREADY_TLS = "503 5.5.1 Error: TLS already active"
S504_BAD_MECHANISM = "504 5.5.4 Unrecognized authentication mechanism"
#: RFC 5321 §4.1.1.11: a MAIL/RCPT parameter this server does not implement (or did not offer)
S555_UNSUPPORTED_PARAMETER = "555 5.5.4 Unsupported parameter {param}"
#: a syntax error in the parameters (RFC 3463 X.5.4), not in the address (X.1.7 / X.1.3)
S501_BAD_PARAMETER = "501 5.5.4 Syntax error in parameter {param}"
S501_DUPLICATE_PARAMETER = "501 5.5.4 Duplicate parameter {param}"
S454_TLS_UNAVAILABLE = "454 4.7.0 TLS not available"

# Transaction limits
S552_TOO_BIG = "552 5.3.4 Message size exceeds fixed limit of {limit} bytes"
S452_TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
S500_DATA_LINE_TOO_LONG = "500 5.5.2 Line too long"
S550_BARE_NEWLINE = "550 5.6.2 Bare CR or LF not allowed"
S553_UTF8_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires SMTPUTF8"
S555_SMTPUTF8_UNEXPECTED = "555 5.5.4 SMTPUTF8 only with MAIL"

# Recipient / sender policy (filled by tmmail.policy)
S550_UNKNOWN_USER = "550 5.1.1 <{address}>: Recipient address rejected: User unknown"
#: RFC 3463 X.4.6 "routing loop detected": an alias that only loops (or a chain too deep)
S550_ROUTING_LOOP = "550 5.4.6 <{address}>: Recipient address rejected: routing loop in the address map"
S554_RELAY_DENIED = "554 5.7.1 <{address}>: Relay access denied"
S553_ROUTING_NOT_SUPPORTED = "553 5.1.3 <{address}>: Sender-specified routing is not supported"
S553_SENDER_NOT_OWNED = "553 5.7.1 <{address}>: Sender address not owned by {login}; allowed: {allowed}"
S553_FROM_NOT_OWNED = "553 5.7.1 From: header address not owned by {login}; allowed: {allowed}"
S550_SPOOFED_SENDER = (
    "550 5.7.1 <{address}>: Sender address rejected: hosted domain, please authenticate"
)
S554_SENDER_BLACKLISTED = "554 5.7.1 <{address}>: Sender domain is blacklisted"
S554_SENDER_BLACKLISTED_FOR = "554 5.7.1 <{address}>: Sender domain is blacklisted for {domain}"
S451_RATE_LIMIT = "451 4.7.1 Sending rate limit exceeded for {login}, try again later"

# Security / auth
S530_STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
S530_AUTH_REQUIRED = "530 5.7.0 Authentication required"
S501_AUTH_CANCELLED = "501 5.0.0 Authentication cancelled"
S501_AUTH_MALFORMED = "501 5.5.2 Malformed authentication data"
S535_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
S454_AUTH_BLOCKED = "454 4.7.0 Too many failed logins, try again later"
S454_AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure"

# Storage / internal
S451_STORAGE = "451 4.3.0 Error: queue file write error, try again later"
S451_INTERNAL = "451 4.3.0 Error: internal server error, try again later"
S451_POLICY_UNAVAILABLE = "451 4.3.0 Error: configuration unavailable, try again later"
