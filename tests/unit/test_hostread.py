"""llmhost.hostread through pyinfra's local connector (a real host: this machine): the listed
facts come from one command, with each fact's own parser; they are answered from it until the
host runs a command that is not a fact read, and then read from the host again."""

from __future__ import annotations

import json

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.api.connect import connect_all
from pyinfra.context import ctx_host, ctx_state
from pyinfra.facts.files import Directory, File, Sha1File

from llmhost import hostread
from llmhost.facts import FileDigests, JsonFile

hostread.install()


@pytest.fixture
def local(tmp_path):
    inventory = Inventory((["@local"], {}))
    state = State(inventory, Config())
    connect_all(state)
    host = inventory.get_host("@local")
    commands: list[str] = []
    connector = host.connector
    run = connector.run_shell_command

    def counted(command, **kwargs):
        commands.append(str(command))
        return run(command, **kwargs)

    connector.run_shell_command = counted
    with ctx_state.use(state), ctx_host.use(host):
        yield host, commands


def test_the_listed_facts_are_read_in_one_command_and_parsed_by_their_own_fact(local, tmp_path):
    host, commands = local
    marker = tmp_path / "marker.json"
    marker.write_text(json.dumps({"commit": "c"}))  # no newline at the end: still parsed
    (tmp_path / "a.py").write_text("print(1)\n")
    reads = [(JsonFile, {"path": str(marker)}), (JsonFile, {"path": str(tmp_path / "none")}),
             (Directory, {"path": str(tmp_path)}), (File, {"path": str(tmp_path / "a.py")}),
             (Sha1File, {"path": str(tmp_path / "a.py")}), (FileDigests, {"path": str(tmp_path)})]
    assert hostread.prefetch(reads) == len(reads)
    assert len(commands) == 1
    answers = [host.get_fact(cls, **kwargs) for cls, kwargs in reads]
    assert len(commands) == 1, "answered from the read"
    assert answers[0] == {"commit": "c"} and answers[1] is None
    assert answers[2]["mode"] == int(oct(tmp_path.stat().st_mode & 0o777)[2:])
    assert answers[3]["size"] == 9 and len(answers[4]) == 40 and sorted(answers[5]) == ["a.py", "marker.json"]
    # Each answer is the fact's own, as read on its own (but atime: sha1sum just read a.py).
    hostread._reads.pop(host)

    def timeless(value):
        return {k: v for k, v in value.items() if k != "atime"} if isinstance(value, dict) else value

    assert [timeless(host.get_fact(cls, **kwargs)) for cls, kwargs in reads] == list(map(timeless, answers))


def test_a_command_on_the_host_ends_the_read(local, tmp_path):
    """Fails when the read answers after the host ran a command (which may have changed what it
    saw): the run then reads exactly what it read before, from the first change on."""
    host, commands = local
    marker = tmp_path / "marker.json"
    marker.write_text('{"commit": "old"}')
    hostread.prefetch([(JsonFile, {"path": str(marker)})])
    marker.write_text('{"commit": "new"}')  # changed behind the read's back
    assert host.get_fact(JsonFile, path=str(marker)) == {"commit": "old"}
    host.run_shell_command("true")
    assert host.get_fact(JsonFile, path=str(marker)) == {"commit": "new"}
    assert len(commands) == 3


def test_a_fact_not_listed_is_read_from_the_host_and_the_read_still_answers(local, tmp_path):
    host, commands = local
    hostread.prefetch([(JsonFile, {"path": str(tmp_path / "a.json")})])
    assert host.get_fact(JsonFile, path=str(tmp_path / "b.json")) is None
    assert len(commands) == 2
    assert host.get_fact(JsonFile, path=str(tmp_path / "a.json")) is None
    assert len(commands) == 2, "a fact read changes nothing: the read still answers"


def test_facts_output_is_split_at_each_marker():
    found = hostread.Facts().process(["a", f"b{hostread.MARKER} 0 0", f"{hostread.MARKER} 1 1",
                                      "c", f"{hostread.MARKER} 2 0"])
    assert found == {0: (0, ["a", "b"]), 1: (1, []), 2: (0, ["c"])}
