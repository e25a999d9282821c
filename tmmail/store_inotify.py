"""Optional push of changes made by *other* processes (Dovecot, another TMmail) via inotify.

``Store.watch`` only sees changes made by this process; other writers are found by polling
``Folder.refresh()``.  Where Linux inotify is available, ``FolderNotifier`` calls a callback
shortly after any change in a folder's ``new/``, ``cur/`` or its ``dovecot-uidlist``, so IMAP IDLE
can refresh at once instead of on its next poll.  Events are coalesced (``delay``); the callback
runs on the reactor thread and should just call ``refresh()``.  Without inotify, ``available``
is False and ``watch`` returns a no-op cancel function (keep polling).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.logger import Logger
from twisted.python.filepath import FilePath

log = Logger()

try:
    from twisted.internet import inotify as _inotify
except ImportError:  # not Linux
    _inotify = None  # type: ignore[assignment]


class FolderNotifier:
    """One inotify instance for the process; one kernel watch per directory, many callbacks."""

    def __init__(self, reactor: Any = None, delay: float = 0.05) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.delay = delay
        self._notifier: Any = None
        self._subs: dict[str, list[Callable[[str], None]]] = {}
        self._pending: dict[str, Any] = {}

    @property
    def available(self) -> bool:
        return _inotify is not None

    def _start(self) -> Any:
        if self._notifier is None:
            self._notifier = _inotify.INotify(self.reactor)
            self._notifier.startReading()
        return self._notifier

    def watch(self, folder: str, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(folder)`` after changes by anyone; returns a cancel function.

        Call on the reactor thread.
        """
        if _inotify is None:
            return lambda: None
        key = os.path.realpath(folder)
        subs = self._subs.get(key)
        if subs is None:
            subs = self._subs[key] = []
            notifier = self._start()
            mask = _inotify.IN_CREATE | _inotify.IN_DELETE | _inotify.IN_MOVED_FROM | _inotify.IN_MOVED_TO
            try:
                for path in (key, os.path.join(key, "new"), os.path.join(key, "cur")):
                    notifier.watch(FilePath(path), mask, callbacks=[lambda _w, _p, _m, k=key: self._event(k)])
            except Exception:
                log.failure("inotify watch failed for {folder}; polling only", folder=key)
                self._ignore(key)
                del self._subs[key]
                return lambda: None
        subs.append(callback)

        def cancel() -> None:
            lst = self._subs.get(key)
            if lst is not None and callback in lst:
                lst.remove(callback)
                if not lst:
                    del self._subs[key]
                    self._ignore(key)

        return cancel

    def _ignore(self, key: str) -> None:
        if self._notifier is None:
            return
        for path in (key, os.path.join(key, "new"), os.path.join(key, "cur")):
            try:
                self._notifier.ignore(FilePath(path))
            except KeyError:
                pass
        call = self._pending.pop(key, None)
        if call is not None and call.active():
            call.cancel()

    def _event(self, key: str) -> None:
        if key in self._pending or key not in self._subs:
            return
        self._pending[key] = self.reactor.callLater(self.delay, self._fire, key)

    def _fire(self, key: str) -> None:
        self._pending.pop(key, None)
        for callback in list(self._subs.get(key, ())):
            try:
                callback(key)
            except Exception:
                log.failure("inotify callback failed for {folder}", folder=key)

    def stop(self) -> None:
        for key in list(self._subs):
            self._ignore(key)
        self._subs.clear()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
