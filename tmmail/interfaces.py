"""The plug points between the parts of the server (zope.interface), verified in tests."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IConnector(Interface):
    """Takes a message for some internal addresses ([SF:..], [LS:..], [SMTP:..]) and delivers it.

    ``deliver`` is called from a worker thread (it may block on disk I/O) and returns nothing
    on success or raises tmmail.errors.TransientError / PermanentError; only the runner decides
    what a failure means for the message.
    """

    scheme = Attribute("The internal-address scheme this connector serves, e.g. 'SF'.")

    def deliver(envelope, recipient, target, message_path):
        """Deliver one recipient; ``target`` is the resolved internal address."""


class ITransferEvent(Interface):
    """A hook run when the router picks a message up or a connector delivers it."""

    def onTransfer(event, envelope, message_path):
        """Return (or fire a Deferred with) one of 'accept', 'reject', 'quarantine', 'retry'."""


class IProviderStore(Interface):
    """Gives the current immutable snapshot of the provider tables, reloaded on change."""

    def current():
        """The current tmmail.providers.Providers snapshot."""
