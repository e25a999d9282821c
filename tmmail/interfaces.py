"""The plug points between the parts of the server (zope.interface), verified in tests."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IConnector(Interface):
    """Takes a message for some internal addresses ([SF:..], [LS:..], [SMTP:..]) and delivers it.

    The runner (tmmail.runner) groups the due recipients of one message by ``scheme`` and
    ``batch_key(target)`` and calls ``deliver`` once per group **on the reactor thread**; the
    connector must not block (run disk I/O in a thread pool, network I/O asynchronously).
    It returns nothing of the message's fate itself: each outcome is ``None`` or a
    tmmail.errors.Delivered (delivered; Delivered says which host took it and whether that host
    takes over DSN reporting) or a tmmail.errors.DeliveryError (TransientError -> the runner
    defers with back-off, PermanentError -> failed); only the runner decides what a failure
    means.  An error carries ``remote_mta`` (str, e.g. "mx.example.com") only when a remote
    server gave that reply: the DSN then has Remote-MTA and Diagnostic-Code type "smtp",
    otherwise none and the type X-TMmail.  If the
    Deferred errbacks or gives the wrong number of outcomes, every item is deferred with
    451 4.3.0.  The runner saves the next attempt time before calling ``deliver`` and every
    outcome after, so a connector never needs its own queue state.
    """

    scheme = Attribute("The internal-address scheme this connector serves: 'SF', 'SMTP' or 'LS'.")

    def batch_key(target):
        """A string; targets of one message with equal keys are delivered in one call.

        ``target`` is a tmmail.address.InternalAddress of this scheme (e.g. the SMTP connector
        uses the lower-case domain, so one message goes once per domain/MX).
        """

    def deliver(envelope, items, message_path):
        """Deliver a message to a batch; return a Deferred firing with a list of outcomes.

        ``envelope``: tmmail.envelope.Envelope (read-only for the connector); ``items``: list of
        (tmmail.envelope.Recipient, InternalAddress target) pairs; ``message_path``: the spool
        ``.eml`` (LF line endings, read-only, valid until the Deferred fires).  The result has
        one outcome per item, in order: ``None``, a Delivered or a DeliveryError.
        """


class ITransferEvent(Interface):
    """A hook run when the router picks a message up or a connector delivers it."""

    def onTransfer(event, envelope, message_path):
        """Return (or fire a Deferred with) one of 'accept', 'reject', 'quarantine', 'retry'."""


class IProviderStore(Interface):
    """Gives the current immutable snapshot of the provider tables, reloaded on change."""

    def current():
        """The current tmmail.providers.Providers snapshot."""
