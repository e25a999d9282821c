"""A transfer-event plug-in found through twisted/plugins (copied there by the tests).

``guard`` provides IPlugin and ITransferEvent; tmmail.toml selects it with
``plugin = "testguard"`` (options = { word = "..." } go through ``configured``).
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from tmmail.interfaces import ITransferEvent


@implementer(IPlugin, ITransferEvent)
class _Guard:
    name = "testguard"

    def __init__(self, word: str = "FORBIDDEN-WORD") -> None:
        self.word = word.encode()

    def configured(self, **options):
        return _Guard(**options)

    def onTransfer(self, event, envelope, message_path):
        with open(message_path, "rb") as f:
            data = f.read()
        if self.word in data:
            return ("reject", f"Refused by testguard at {event}")
        if b"PLUGIN-QUARANTINE" in data:
            return "quarantine"
        return "accept"


guard = _Guard()
