"""One host read: the facts a deploy's operations will ask a host for, read in one SSH command.

pyinfra 3.10 keeps no fact cache (whatever ``Host.get_fact``'s docstring says): every fact an
operation reads is a command on the host and a round trip, ~30 of them in a rerun that changes
nothing. ``prefetch(reads)`` runs each listed fact's own command in one shell command (each in a
subshell, its exit status printed after it) and parses each output with the fact's own
``process``; ``install()`` makes ``Host.get_fact`` answer those reads from it for as long as the
host has run nothing but fact reads since. The first command an operation runs on the host (it
may have changed what the read saw), other connector arguments (a ``_sudo_user``, say), or a
fact that was not listed: the fact is read from the host as pyinfra always does. So a run that
changes something reads exactly what it read before from the first change on, and a run that
changes nothing reads each host in two commands (``GpuHost``, which the build plan needs, then
this one).

Installed by importing llmhost.deploys. It wraps, in ``pyinfra.api.host.Host`` only,
``get_fact`` (answers from the read) and ``run_shell_command`` / ``put_file`` (a command that is
not a fact read ends the read's validity for that host).
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Any, Iterable

from pyinfra.api import FactBase, StringCommand
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS
from pyinfra.api.facts import ShortFactBase, _handle_fact_kwargs, _make_command
from pyinfra.api.host import Host
from pyinfra.context import ctx_host

_INSTALLED = "_llmhost_hostread"
# Printed after each fact's output: "<marker> <index> <exit status>".
MARKER = "@@llmhost-read-7f3c@@"
# Connector arguments that do not change what a fact's command prints.
_IGNORED_ARGUMENTS = {"_timeout", "_get_pty", "_stdin", "_success_exit_codes", "_retries",
                      "_retry_delay", "_retry_until", "_sudo_password", "_su_password"}


class _Read:
    """One host's read: (fact class, its arguments) -> value, valid until ``stale``."""

    def __init__(self, arguments: dict[str, Any]):
        self.arguments = arguments
        self.values: dict[tuple, Any] = {}
        self.stale = False
        self.reading = 0  # > 0 while a fact is read: its command changes nothing


_reads: "weakref.WeakKeyDictionary[Host, _Read]" = weakref.WeakKeyDictionary()


def _key(cls, fact_kwargs: dict) -> tuple:
    return cls, repr(sorted((k, v) for k, v in fact_kwargs.items() if k != "self"))


def _connector_arguments(global_kwargs: dict) -> dict:
    return {k: v for k, v in global_kwargs.items()
            if k in CONNECTOR_ARGUMENT_KEYS and k not in _IGNORED_ARGUMENTS}


def fact_command(fact: FactBase, fact_kwargs: dict) -> str | None:
    """The fact's command as pyinfra runs it (with its requires_command guard), or None for a
    fact this read cannot batch (its own shell, preconditions, no command). Some facts keep
    their arguments for ``process``: the same instance must process the output."""
    if fact.shell_executable or type(fact).check_preconditions is not FactBase.check_preconditions:
        return None
    command = _make_command(fact.command, dict(fact_kwargs))
    requires = _make_command(fact.requires_command, dict(fact_kwargs))
    if not command:
        return None
    text = command.get_raw_value() if isinstance(command, StringCommand) else str(command)
    if requires:
        # As pyinfra.api.facts: a missing binary prints its marker; such a read is not kept.
        text = (f"if command -v {requires} >/dev/null 2>&1; then ( {text} ); "
                f"else echo '##PYINFRA_NOCMD##'; fi")
    return text


class Commands(tuple):
    """The facts' commands, shown as their number where pyinfra prints a fact's arguments
    (-v, --debug): the commands themselves are printed once, as the command (-vv)."""

    def __str__(self) -> str:
        return f"{len(self)} facts"

    __repr__ = __str__


class Facts(FactBase):
    """Several facts' outputs from one command: each fact's command in a subshell (stdin and
    stderr closed off), then a line with its index and exit status. Returns one (exit status,
    stdout lines) per command; never fails (a command that fails has its status)."""

    def command(self, commands: tuple[str, ...]) -> str:
        parts = [f"( {command}\n) </dev/null 2>/dev/null; echo \"{MARKER} {i} $?\""
                 for i, command in enumerate(commands)]
        return "\n".join(parts + ["true"])

    def process(self, output):
        found, lines = {}, []
        for line in output:
            head, marker, tail = line.partition(MARKER)
            if not marker:
                lines.append(line)
                continue
            if head:  # output that did not end with a newline
                lines.append(head)
            index, _, status = tail.strip().partition(" ")
            found[int(index)] = (int(status), lines)
            lines = []
        return found

    @staticmethod
    def default():
        return {}


def prefetch(reads: Iterable[tuple[type[FactBase], dict]]) -> int:
    """Read every ``(fact class, keyword arguments)`` of ``reads`` from the current host in one
    command; ``Host.get_fact`` answers them from it until the host runs another command. Call it
    where the reads' connector arguments are the operations' (in the deploy function). Returns
    how many reads it holds."""
    host = ctx_host.get()  # the Host itself (not pyinfra's proxy): _reads is keyed by it
    state = host.state
    wanted: list[tuple[tuple, FactBase, str]] = []
    arguments = None
    for cls, kwargs in reads:
        if issubclass(cls, ShortFactBase):
            continue
        fact_kwargs, global_kwargs = _handle_fact_kwargs(state, host, cls, (), dict(kwargs))
        arguments = _connector_arguments(global_kwargs)
        fact = cls()
        command = fact_command(fact, fact_kwargs)
        key = _key(cls, fact_kwargs)
        if command is not None and all(key != w[0] for w in wanted):
            wanted.append((key, fact, command))
    if not wanted:
        return 0
    if any(arguments.get(k) for k in ("_sudo_user", "_su_user", "_doas_user", "_dzdo_user")):
        return 0  # pyinfra reads "no such user" from stderr there, which a batch does not keep
    outputs = host.get_fact(Facts, commands=Commands(w[2] for w in wanted))
    read = _Read(arguments)
    for index, (key, fact, _) in enumerate(wanted):
        if index not in outputs:
            continue
        status, lines = outputs[index]
        if status != 0 or lines == ["##PYINFRA_NOCMD##"]:
            continue  # read on its own: pyinfra fails the host, or skips the fact, as it says
        try:
            value = fact.process(lines) if lines else fact.default()
        except Exception:  # noqa: BLE001 - read again, so the error shows as pyinfra shows it
            continue
        read.values[key] = value
    _reads[host] = read
    return len(read.values)


def _answer(host: Host, cls, args, kwargs):
    read = _reads.get(host)
    if read is None or read.stale or args or any(k.startswith("_") for k in kwargs):
        return False, None
    if not isinstance(cls, type) or not issubclass(cls, FactBase) or issubclass(cls, ShortFactBase):
        return False, None
    fact_kwargs, global_kwargs = _handle_fact_kwargs(host.state, host, cls, (), dict(kwargs))
    key = _key(cls, fact_kwargs)
    if key not in read.values or _connector_arguments(global_kwargs) != read.arguments:
        return False, None
    return True, copy.deepcopy(read.values[key])


def install() -> None:
    """Answer prefetched facts from the read (see the module docstring); idempotent."""
    if getattr(Host, _INSTALLED, False):
        return
    get_fact, run_shell_command, put_file = Host.get_fact, Host.run_shell_command, Host.put_file

    @functools.wraps(get_fact)
    def cached_get_fact(self, name_or_cls, *args, **kwargs):
        found, value = _answer(self, name_or_cls, args, kwargs)
        if found:
            return value
        read = _reads.get(self)
        if read is not None:
            read.reading += 1
        try:
            return get_fact(self, name_or_cls, *args, **kwargs)
        finally:
            if read is not None:
                read.reading -= 1

    def changes(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            read = _reads.get(self)
            if read is not None and not read.reading:
                read.stale = True
            return method(self, *args, **kwargs)
        return wrapper

    Host.get_fact = cached_get_fact
    Host.run_shell_command = changes(run_shell_command)
    Host.put_file = changes(put_file)
    setattr(Host, _INSTALLED, True)
