"""Transfer events: hooks run when the router picks a message up and before a connector delivers it.

Two events (``settings.extra["events"]``, i.e. ``[[events.pickup]]`` / ``[[events.deliver]]``
tables in tmmail.toml):

* ``pickup``: once per message, when the runner takes it from incoming/ (before routing);
* ``deliver``: before each batch is handed to its connector (``TMMAIL_TARGETS`` says which).

A hook is an external program or an in-process plug-in::

    [[events.pickup]]
    command = ["/usr/bin/clamdscan", "--no-summary", "--fdpass", "-"]
    timeout = 60                                   # seconds; then killed -> "retry"
    exit = { 0 = "accept", 1 = "reject", 2 = "retry" }   # the default map; unknown -> "retry"
    reject_text = "Message refused: virus found"   # default: the program's first output line

    [[events.deliver]]
    plugin = "mypackage.hooks.Archiver"            # dotted name of an ITransferEvent provider
    options = { folder = "/srv/archive" }          # passed to the class (or factory) if given

    [[events.pickup]]
    plugin = "archiver"                            # no dot: the twisted/plugins object of this
                                                   # name (find_plugins; options -> .configured())

A program gets the message on stdin (the spool file itself, so nothing is read on the
reactor), the envelope in the environment (``TMMAIL_EVENT``, ``TMMAIL_QUEUE_ID``,
``TMMAIL_SENDER``, ``TMMAIL_RECIPIENTS`` and ``TMMAIL_TARGETS`` space-separated,
``TMMAIL_CLIENT_IP``, ``TMMAIL_HELO``, ``TMMAIL_AUTH``, ``TMMAIL_PROTOCOL``,
``TMMAIL_MESSAGE`` = the file's path); its exit status decides.  It runs under
``spawnProcess`` and never blocks the reactor.  A plug-in provides
:class:`tmmail.interfaces.ITransferEvent`; ``onTransfer(event, envelope, message_path)``
returns (or fires a Deferred with) an action, or ``(action, text)``.

Actions: ``accept``; ``reject`` (the recipients fail, 550 5.7.1 with the hook's text, and
the sender gets a DSN); ``quarantine`` (the message is put aside in spool/quarantine/,
nobody is told); ``retry`` (451 4.7.1, tried again with the normal back-off).  Hooks run
in order; the first one that does not accept decides.  A hook that crashes or times out
counts as ``retry``: a broken scanner delays mail, it never lets it through unchecked.
"""

from __future__ import annotations

import importlib
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from twisted.internet import defer, error, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from tmmail.errors import ConfigError
from tmmail.interfaces import ITransferEvent

__all__ = [
    "EVENTS", "PICKUP", "DELIVER", "ACCEPT", "REJECT", "QUARANTINE", "RETRY", "ACTIONS",
    "Outcome", "ProgramHook", "PluginHook", "TransferEvents", "load_events", "find_plugins",
]

log = Logger(namespace="tmmail.events")

PICKUP = "pickup"
DELIVER = "deliver"
EVENTS = (PICKUP, DELIVER)

ACCEPT = "accept"
REJECT = "reject"
QUARANTINE = "quarantine"
RETRY = "retry"
ACTIONS = (ACCEPT, REJECT, QUARANTINE, RETRY)

DEFAULT_EXIT = {0: ACCEPT, 1: REJECT, 2: RETRY, 3: QUARANTINE, 75: RETRY}
DEFAULT_TIMEOUT = 60.0
#: output kept from a program (for the reject text and the log)
MAX_OUTPUT = 4096


@dataclass(frozen=True)
class Outcome:
    """What the hooks decided; ``text`` is the human part of a reject/retry reply."""

    action: str = ACCEPT
    text: str = ""
    hook: str = ""

    @property
    def accepted(self) -> bool:
        return self.action == ACCEPT


ACCEPTED = Outcome()


def _outcome(value: Any, hook: str) -> Outcome:
    if isinstance(value, Outcome):
        return value
    text = ""
    if isinstance(value, (tuple, list)) and value:
        value, text = value[0], (str(value[1]) if len(value) > 1 else "")
    action = str(value or "").strip().lower()
    if action not in ACTIONS:
        log.error("hook {hook} returned {value!r}; treating it as retry", hook=hook, value=value)
        return Outcome(RETRY, "content check failed", hook)
    return Outcome(action, text, hook)


def envelope_environment(event: str, envelope: Any, message_path: str, targets: Sequence[str] = ()) -> dict[str, str]:
    """The server's environment plus the ``TMMAIL_*`` variables a program hook gets."""
    env = dict(os.environ)
    env.update({
        "TMMAIL_EVENT": event,
        "TMMAIL_QUEUE_ID": envelope.queue_id,
        "TMMAIL_SENDER": envelope.sender,
        "TMMAIL_RECIPIENTS": " ".join(dict.fromkeys(r.address for r in envelope.recipients)),
        "TMMAIL_TARGETS": " ".join(targets),
        "TMMAIL_CLIENT_IP": envelope.client_ip or "",
        "TMMAIL_HELO": envelope.helo or "",
        "TMMAIL_AUTH": envelope.auth_login or "",
        "TMMAIL_PROTOCOL": envelope.protocol or "",
        "TMMAIL_MESSAGE": message_path,
    })
    return env


class _Collector(protocol.ProcessProtocol):
    """Collects output; fires ``done`` with (exit code, output) when the process is reaped.

    Without a SIGCHLD handler (a reactor run with installSignalHandlers=False, as in embedded
    use and tests) Twisted never learns that a child exited, so once both output pipes are
    closed the child is also polled with a non-blocking waitpid (``reapProcess``).
    """

    POLL = 0.05

    def __init__(self, done: defer.Deferred, reactor: Any) -> None:
        self.done = done
        self.reactor = reactor
        self.output = bytearray()
        self._open = {1, 2}
        self._poll: Any = None
        self._ended = False

    def childConnectionLost(self, childFD: int) -> None:
        self._open.discard(childFD)
        if not self._open and not self._ended:
            self._reap()

    def _reap(self) -> None:
        self._poll = None
        if self._ended:
            return
        reap = getattr(self.transport, "reapProcess", None)
        if reap is not None:
            reap()
        if not self._ended:
            self._poll = self.reactor.callLater(self.POLL, self._reap)

    def outReceived(self, data: bytes) -> None:
        if len(self.output) < MAX_OUTPUT:
            self.output += data[: MAX_OUTPUT - len(self.output)]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self._ended = True
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        if isinstance(reason.value, error.ProcessDone):
            code: int | None = 0
        elif isinstance(reason.value, error.ProcessTerminated):
            code = reason.value.exitCode
        else:  # pragma: no cover
            code = None
        self.done.callback((code, bytes(self.output)))


@dataclass
class ProgramHook:
    """An external program: message on stdin, envelope in the environment, exit status decides."""

    command: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT
    exit_map: Mapping[int, str] = field(default_factory=lambda: dict(DEFAULT_EXIT))
    reject_text: str = ""

    @property
    def name(self) -> str:
        return os.path.basename(self.command[0])

    def run(self, reactor: Any, event: str, envelope: Any, message_path: str,
            targets: Sequence[str] = ()) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()
        proto = _Collector(done, reactor)
        try:
            fd = os.open(message_path, os.O_RDONLY)
        except OSError as e:
            return defer.fail(e)
        try:
            transport = reactor.spawnProcess(
                proto, self.command[0], list(self.command),
                env=envelope_environment(event, envelope, message_path, targets),
                childFDs={0: fd, 1: "r", 2: "r"},
            )
        except Exception:
            os.close(fd)
            raise
        os.close(fd)
        timed_out = []

        def kill() -> None:
            timed_out.append(True)
            try:
                transport.signalProcess(signal.SIGKILL)
            except error.ProcessExitedAlready:
                pass

        call = reactor.callLater(self.timeout, kill)

        def ended(result: tuple[int | None, bytes]) -> Outcome:
            if call.active():
                call.cancel()
            code, output = result
            first = output.decode("utf-8", "replace").strip().splitlines()
            line = " ".join(first[0].split())[:200] if first else ""
            if timed_out:
                log.warn("{queue_id}: hook {hook} timed out after {timeout} s", queue_id=envelope.queue_id,
                         hook=self.name, timeout=self.timeout)
                return Outcome(RETRY, "content check timed out", self.name)
            action = self.exit_map.get(code, RETRY) if code is not None else RETRY
            text = (self.reject_text or line) if action in (REJECT, QUARANTINE) else line
            if action != ACCEPT:
                log.info("{queue_id}: hook {hook} exited {code}: {action} ({output})", queue_id=envelope.queue_id,
                         hook=self.name, code=code, action=action, output=line)
            return Outcome(action, text, self.name)

        done.addCallback(ended)
        return done


@dataclass
class PluginHook:
    """An in-process ITransferEvent provider."""

    plugin: Any
    name: str = ""
    timeout: float = DEFAULT_TIMEOUT

    def run(self, reactor: Any, event: str, envelope: Any, message_path: str,
            targets: Sequence[str] = ()) -> defer.Deferred:
        d = defer.maybeDeferred(self.plugin.onTransfer, event, envelope, message_path)
        d.addTimeout(self.timeout, reactor, onTimeoutCancel=lambda *_: Outcome(RETRY, "content check timed out",
                                                                                self.name))
        d.addCallback(_outcome, self.name)
        return d


def find_plugins() -> dict[str, Any]:
    """The ITransferEvent providers in ``twisted/plugins`` (twisted.plugin.getPlugins), by name.

    A drop-in module in any ``twisted/plugins`` folder on the Python path (without an
    ``__init__.py``, as Twisted's plug-in system wants) defines module-level objects that
    provide both ``twisted.plugin.IPlugin`` and ITransferEvent and have a ``name``; the name
    is what ``plugin = "..."`` in tmmail.toml selects (case-insensitive).
    """
    from twisted.plugin import IPlugin, getPlugins

    found: dict[str, Any] = {}
    for obj in getPlugins(ITransferEvent):
        if not IPlugin.providedBy(obj):
            continue
        name = str(getattr(obj, "name", "") or "").strip().lower()
        if name and name not in found:
            found[name] = obj
    return found


def _named_plugin(name: str, options: Mapping[str, Any], where: str) -> Any:
    plugins = find_plugins()
    obj = plugins.get(name.strip().lower())
    if obj is None:
        known = ", ".join(sorted(plugins)) or "none found"
        raise ConfigError(f"{where}: no transfer-event plug-in named {name!r} in twisted/plugins "
                          f"(known: {known}); a dotted name (module.Class) imports one instead")
    if options:
        configured = getattr(obj, "configured", None)
        if not callable(configured):
            raise ConfigError(f"{where}: plug-in {name!r} takes no options")
        obj = configured(**options)
    try:
        verifyObject(ITransferEvent, obj)
    except Exception as e:
        raise ConfigError(f"{where}: plug-in {name!r} does not provide ITransferEvent: {e}") from None
    return obj


def _load_plugin(dotted: str, options: Mapping[str, Any], where: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        return _named_plugin(dotted, options, where)
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}: cannot load plugin {dotted}: {e}") from None
    if ITransferEvent.providedBy(obj):
        plugin = obj
    elif callable(obj):
        plugin = obj(**options) if options else obj()
    else:
        raise ConfigError(f"{where}: {dotted} is not an ITransferEvent provider")
    try:
        verifyObject(ITransferEvent, plugin)
    except Exception as e:
        raise ConfigError(f"{where}: {dotted} does not provide ITransferEvent: {e}") from None
    return plugin


def _hook(spec: Any, where: str) -> Any:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a table with command = [...] or plugin = \"...\"")
    unknown = set(spec) - {"command", "plugin", "timeout", "exit", "reject_text", "options"}
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    timeout = spec.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"{where}.timeout must be a positive number")
    if ("command" in spec) == ("plugin" in spec):
        raise ConfigError(f"{where}: give exactly one of command or plugin")
    if "plugin" in spec:
        options = spec.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}.options must be a table")
        return PluginHook(_load_plugin(str(spec["plugin"]), options, where), str(spec["plugin"]), float(timeout))
    command = spec["command"]
    if isinstance(command, str):
        command = [command]
    if not command or not all(isinstance(c, str) and c for c in command):
        raise ConfigError(f"{where}.command must be a list of strings")
    exit_map = dict(DEFAULT_EXIT)
    for key, value in (spec.get("exit") or {}).items():
        if not str(key).lstrip("-").isdigit() or str(value).lower() not in ACTIONS:
            raise ConfigError(f"{where}.exit: {key} = {value!r} (status = accept|reject|quarantine|retry)")
        exit_map[int(key)] = str(value).lower()
    return ProgramHook(tuple(command), float(timeout), exit_map, str(spec.get("reject_text", "")))


class TransferEvents:
    """The configured hooks per event; ``run`` fires a Deferred with the combined Outcome."""

    def __init__(self, hooks: Mapping[str, Sequence[Any]] | None = None, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.hooks = {e: list((hooks or {}).get(e, ())) for e in EVENTS}

    def active(self, event: str) -> bool:
        return bool(self.hooks.get(event))

    @defer.inlineCallbacks
    def run(self, event: str, envelope: Any, message_path: str, targets: Sequence[str] = ()) -> Any:
        for hook in self.hooks.get(event, ()):
            try:
                outcome = yield hook.run(self.reactor, event, envelope, message_path, targets)
            except Exception as e:
                log.failure("{queue_id}: hook {hook} failed", Failure(e), queue_id=envelope.queue_id,
                            hook=getattr(hook, "name", "?"))
                outcome = Outcome(RETRY, "content check failed", getattr(hook, "name", ""))
            if not outcome.accepted:
                return outcome
        return ACCEPTED


def load_events(settings: Any, reactor: Any = None) -> TransferEvents:
    """Hooks from ``settings.extra["events"]``; raises ConfigError naming the bad entry."""
    section = (getattr(settings, "extra", None) or {}).get("events") or {}
    if not isinstance(section, dict):
        raise ConfigError("[events] must be a table")
    hooks: dict[str, list[Any]] = {}
    for event, specs in section.items():
        if event not in EVENTS:
            raise ConfigError(f"unknown event events.{event} (known: {', '.join(EVENTS)})")
        if isinstance(specs, dict):
            specs = [specs]
        if not isinstance(specs, list):
            raise ConfigError(f"events.{event} must be a list of tables ([[events.{event}]])")
        hooks[event] = [_hook(spec, f"events.{event}[{i}]") for i, spec in enumerate(specs)]
    return TransferEvents(hooks, reactor)
