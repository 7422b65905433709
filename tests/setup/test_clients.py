"""`register` into each agent client's configuration file, and `import` out of it.

The commands run in-process through `gateway.cli.main`, on files in a temporary HOME; the import
round trip then starts the gateway exactly as the client's rewritten file says and calls through it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from gateway.calls import Effect
from gateway.cli import main
from gateway.config.environment import environment_for
from gateway.config.models import load_config
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_policies
from gateway.setup import registration as clients
from gateway.setup import starter
from gateway.setup.clients import CLIENTS, ClientFormat
from gateway.setup.registration import launcher
from gateway.setup.starter import Listing, upstream_policy
from tests.conftest import fixture_upstream, http_gateway, node_server, text_of, write_config

CLIENT_NAMES = sorted(CLIENTS)
PROJECT_CLIENTS = sorted(name for name, client in CLIENTS.items() if client.project_file)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "home"
    directory.mkdir()
    monkeypatch.setenv("HOME", str(directory))
    for variable in ("XDG_CONFIG_HOME", "APPDATA"):
        monkeypatch.delenv(variable, raising=False)
    return directory


@pytest.fixture
def project(tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory, holding an `upstreams.toml` with one upstream."""
    directory = tmp_path / "project"
    directory.mkdir()
    monkeypatch.chdir(directory)
    write_config(directory, {"box": fixture_upstream("toolbox.py")})
    return directory


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def servers_of(client: ClientFormat, path: Path) -> dict[str, Any]:
    servers: dict[str, Any] = json.loads(path.read_text())[client.servers_key]
    return servers


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.bak-*"))


def other_servers(client: ClientFormat) -> dict[str, Any]:
    """A client file with two servers of its own and keys that have nothing to do with MCP servers."""
    stdio: dict[str, Any] = {"command": "npx", "args": ["-y", "some-server"], "env": {"LEVEL": "debug"}}
    remote: dict[str, Any] = {client.url_key: "https://remote.example/mcp"}
    if client.typed:
        stdio, remote = {"type": "stdio", **stdio}, {"type": "http", **remote}
    data: dict[str, Any] = {"theme": "dark", "numbers": [1, 2.5, None, True], "nested": {"a": {"b": "ü"}}}
    data[client.servers_key] = {"files": stdio, "remote": remote}
    if client.name == "vscode":
        data["inputs"] = [{"type": "promptString", "id": "token", "description": "Token", "password": True}]
    return data


# register -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_register_creates_the_clients_file_with_the_gateway_entry(
    name: str, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = CLIENTS[name]
    path = client.user_file()
    assert not path.exists()
    code, out, _ = run(capsys, "register", name)
    assert code == 0, out
    entry = servers_of(client, path)["mcp-armor"]
    assert entry["command"] == launcher()[0] and Path(entry["command"]).is_absolute()
    assert entry["args"][-3:] == ["serve", "--config", str(project / "upstreams.toml")]
    assert entry.get("type") == ("stdio" if client.typed else None)
    assert "audit tail -f" in out and backups(path) == []


@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_register_keeps_everything_else_is_idempotent_and_removes_cleanly(
    name: str, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = CLIENTS[name]
    path = client.user_file()
    original = other_servers(client)
    original_bytes = write_client(path, original, indent=4)

    assert run(capsys, "register", name)[0] == 0
    registered = json.loads(path.read_text())
    entry = registered[client.servers_key].pop("mcp-armor")
    assert registered == original  # every other server and key, in meaning
    assert entry["args"][-1] == str(project / "upstreams.toml")
    assert path.read_text().startswith('{\n    "')  # the file's own indentation
    [saved] = backups(path)
    assert saved.read_bytes() == original_bytes

    after_first = path.read_bytes()
    code, out, _ = run(capsys, "register", name)
    assert code == 0 and "already registered" in out
    assert path.read_bytes() == after_first and len(backups(path)) == 1

    code, out, _ = run(capsys, "register", name, "--remove")
    assert code == 0 and "removed 'mcp-armor'" in out
    assert json.loads(path.read_text()) == original
    code, out, _ = run(capsys, "register", name, "--remove")
    assert code == 0 and "not registered" in out


@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_register_dry_run_prints_the_change_and_writes_nothing(
    name: str, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = CLIENTS[name]
    path = client.user_file()
    before = write_client(path, other_servers(client))
    code, out, _ = run(capsys, "register", name, "--dry-run")
    assert code == 0
    assert f"+++ {path}" in out and '+    "mcp-armor": {' in out and "dry run: nothing written" in out
    assert path.read_bytes() == before and backups(path) == []


@pytest.mark.parametrize("name", CLIENT_NAMES)
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{\n  "mcpServers": {\n    "a": {"command": "x",,}\n  }\n}', "not valid JSON: Expecting property name"),
        ('{"mcpServers": {}, "mcpServers": {}}', "key 'mcpServers' appears twice"),
        ("[1, 2]", "expected a JSON object at the top level, got list"),
        ('{"mcpServers": [], "servers": []}', "must be an object of servers"),
    ],
    ids=["syntax", "duplicate-key", "not-an-object", "servers-not-an-object"],
)
def test_register_refuses_a_malformed_file_and_leaves_it_untouched(
    name: str, text: str, message: str, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = CLIENTS[name].user_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    code, out, err = run(capsys, "register", name)
    assert code == 2 and out == ""
    [line] = err.splitlines()
    assert line.startswith(f"mcp-armor: error: {path}: ") and message in line
    assert path.read_text() == text and backups(path) == []


@pytest.mark.parametrize("name", CLIENT_NAMES)
def test_register_into_an_empty_file(name: str, project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = CLIENTS[name].user_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    assert run(capsys, "register", name)[0] == 0
    assert "mcp-armor" in servers_of(CLIENTS[name], path)


@pytest.mark.parametrize("name", PROJECT_CLIENTS)
def test_register_project_writes_the_projects_file(
    name: str, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = CLIENTS[name]
    assert client.project_file is not None
    assert run(capsys, "register", name, "--project")[0] == 0
    assert "mcp-armor" in servers_of(client, project / client.project_file)
    assert not client.user_file().exists()


@pytest.mark.parametrize("name", sorted(set(CLIENT_NAMES) - set(PROJECT_CLIENTS)))
def test_register_project_for_a_client_without_project_files_is_refused(
    name: str, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "register", name, "--project")
    assert code == 2 and "has no project-scoped configuration file" in err


def test_register_path_overrides_the_location(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = project / "elsewhere" / "client.json"
    assert run(capsys, "register", "cursor", "--path", str(target))[0] == 0
    assert "mcp-armor" in servers_of(CLIENTS["cursor"], target)


def test_user_files_for_linux_and_macos() -> None:
    linux = {"HOME": "/home/ann", "XDG_CONFIG_HOME": "/home/ann/.xdg"}
    mac = {"HOME": "/Users/ann"}
    expected = {
        "claude-desktop": (
            "/home/ann/.xdg/Claude/claude_desktop_config.json",
            "/Users/ann/Library/Application Support/Claude/claude_desktop_config.json",
        ),
        "claude-code": ("/home/ann/.claude.json", "/Users/ann/.claude.json"),
        "cursor": ("/home/ann/.cursor/mcp.json", "/Users/ann/.cursor/mcp.json"),
        "vscode": ("/home/ann/.xdg/Code/User/mcp.json", "/Users/ann/Library/Application Support/Code/User/mcp.json"),
        "windsurf": ("/home/ann/.codeium/windsurf/mcp_config.json", "/Users/ann/.codeium/windsurf/mcp_config.json"),
    }
    for name, (on_linux, on_mac) in expected.items():
        assert str(CLIENTS[name].user_file("linux", linux)) == on_linux
        assert str(CLIENTS[name].user_file("darwin", mac)) == on_mac
    assert str(CLIENTS["vscode"].user_file("linux", {"HOME": "/h"})) == "/h/.config/Code/User/mcp.json"


def test_register_reads_vscode_json_with_comments_and_says_they_are_not_kept(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = CLIENTS["vscode"].user_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = '{\n  // my servers\n  "servers": {\n    "files": {"type": "stdio", "command": "npx",}, /* x */\n  },\n}\n'
    path.write_text(text)
    code, _, err = run(capsys, "register", "vscode")
    assert code == 0 and "had comments; they are not kept" in err
    assert set(servers_of(CLIENTS["vscode"], path)) == {"files", "mcp-armor"}
    assert backups(path)[0].read_text() == text


def test_register_passes_the_variables_upstreams_toml_needs(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(
        project, {"box": {**fixture_upstream("toolbox.py"), "env": {"A": "${BOX_TOKEN}", "B": "${LEVEL:-info}"}}}
    )
    assert run(capsys, "register", "claude-code")[0] == 0
    env = servers_of(CLIENTS["claude-code"], CLIENTS["claude-code"].user_file())["mcp-armor"]["env"]
    assert env == {"BOX_TOKEN": "${BOX_TOKEN}", "LEVEL": "${LEVEL:-}"}
    assert run(capsys, "register", "cursor")[0] == 0
    env = servers_of(CLIENTS["cursor"], CLIENTS["cursor"].user_file())["mcp-armor"]["env"]
    assert env == {"BOX_TOKEN": "${env:BOX_TOKEN}", "LEVEL": "${env:LEVEL}"}

    # Claude Desktop expands nothing: it is told what to set by hand, and a value set there survives re-registering.
    code, _, err = run(capsys, "register", "claude-desktop")
    assert code == 0 and "set BOX_TOKEN in the 'env' of the 'mcp-armor' entry" in err
    path = CLIENTS["claude-desktop"].user_file()
    data = json.loads(path.read_text())
    assert "env" not in data["mcpServers"]["mcp-armor"]
    data["mcpServers"]["mcp-armor"]["env"] = {"BOX_TOKEN": "set-by-hand"}
    path.write_text(json.dumps(data))
    code, out, err = run(capsys, "register", "claude-desktop")
    assert "already registered" in out and "BOX_TOKEN" not in err
    assert servers_of(CLIENTS["claude-desktop"], path)["mcp-armor"]["env"] == {"BOX_TOKEN": "set-by-hand"}


def test_register_updates_an_entry_for_another_config(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "register", "cursor")[0] == 0
    other = project / "other"
    other.mkdir()
    write_config(other, {"box": fixture_upstream("toolbox.py")})
    code, out, _ = run(capsys, "register", "cursor", "--config", str(other / "upstreams.toml"))
    assert code == 0 and "updated 'mcp-armor'" in out
    assert servers_of(CLIENTS["cursor"], CLIENTS["cursor"].user_file())["mcp-armor"]["args"][-1] == str(
        other / "upstreams.toml"
    )


def test_register_without_a_config_says_how_to_make_one(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "register", "cursor", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "file not found (create one with `mcp-armor init`" in err
    assert not CLIENTS["cursor"].user_file().exists()


# import ---------------------------------------------------------------------------------------


def write_client(path: Path, data: dict[str, Any], *, indent: int = 2) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
    return path.read_bytes()


def expand(value: str, environ: dict[str, str]) -> str:
    """What Claude Code does to `${VAR}` / `${VAR:-default}` in its file before starting a server."""

    def one(match: re.Match[str]) -> str:
        return environ.get(match[1]) or (match[2] if match[2] is not None else match[0])

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}", one, value)


@pytest.mark.anyio
async def test_import_round_trip_stdio_and_http_servers_end_to_end(
    tmp_path: Path, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = "front-door-token-0123456789abcdef"
    front = tmp_path / "front"
    front.mkdir()
    remote_config = write_config(front, {"box": fixture_upstream("toolbox.py")}, http={"token": token})
    async with http_gateway(remote_config) as url:
        client = CLIENTS["claude-code"]
        path = client.user_file()
        original = {
            "numStartups": 7,
            "mcpServers": {
                "Local Box": {"type": "stdio", **fixture_upstream("toolbox.py", GREETING="${GREETING:-hello}")},
                "remote": {"type": "http", "url": url, "headers": {"Authorization": f"Bearer {token}"}},
            },
        }
        original_bytes = write_client(path, original)

        code, out, err = await anyio.to_thread.run_sync(run, capsys, "import", "claude-code")
        assert code == 0, err
        assert "imported  Local Box  upstream 'local-box'" in out and "imported  remote     upstream 'remote'" in out

        # upstreams.toml: both servers, the token not written out but referred to.
        config_text = (project / "upstreams.toml").read_text()
        assert token not in config_text
        tables = load_config(project / "upstreams.toml", environ={"REMOTE_AUTHORIZATION": "x"}).upstreams
        assert tables["local-box"].command == sys.executable and tables["local-box"].env == {"GREETING": "hello"}
        assert tables["remote"].url == url and tables["remote"].headers == {"Authorization": "x"}
        assert "policies/local-box.toml" in out.replace(str(project) + "/", "")

        # The client now starts the gateway alone, passing what the servers need; the original is backed up.
        rewritten = json.loads(path.read_text())
        assert rewritten["numStartups"] == 7
        assert list(rewritten["mcpServers"]) == ["mcp-armor"]
        entry = rewritten["mcpServers"]["mcp-armor"]
        assert entry["env"] == {"GREETING": "${GREETING:-}", "REMOTE_AUTHORIZATION": f"Bearer {token}"}
        [saved] = backups(path)
        assert saved.read_bytes() == original_bytes

        # Start the gateway as Claude Code would from that entry, and call a tool of each server through it.
        env = {key: expand(value, {}) for key, value in entry["env"].items()}
        params = StdioServerParameters(
            command=entry["command"], args=entry["args"], env={**env, "PATH": os.environ.get("PATH", "")}, cwd="/"
        )
        async with Client(params, read_timeout_seconds=60) as session:
            names = {tool.name for tool in (await session.list_tools()).tools}
            assert {"local-box__echo", "remote__box__echo"} <= names
            assert text_of(await session.call_tool("local-box__echo", {"text": "near"})) == "near"
            assert text_of(await session.call_tool("remote__box__echo", {"text": "far"})) == "far"

    code, out, _ = run(capsys, "audit", "tail", "--json", "--tool", "*__echo")
    calls = [json.loads(line) for line in out.splitlines()]
    assert {(event["tool"], event["outcome"]) for event in calls if event["kind"] == "outcome"} == {
        ("local-box__echo", "ok"),
        ("remote__box__echo", "ok"),
    }


def test_import_reports_what_it_leaves_and_keeps_it_in_the_client(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = CLIENTS["vscode"]
    path = client.user_file()
    write_client(
        path,
        {
            "inputs": [{"type": "promptString", "id": "api-key", "password": True}],
            "servers": {
                "box": {"type": "stdio", "command": "other-box"},  # clashes with the existing upstream 'box'
                "events": {"type": "sse", "url": "https://events.example/sse"},
                "dotenv": {"type": "stdio", "command": "x", "envFile": "${workspaceFolder}/.env"},
                "workspace": {"type": "stdio", "command": "x", "args": ["${workspaceFolder}"]},
                "odd": {"type": "websocket", "url": "wss://odd.example"},
                "keyed": {"type": "stdio", "command": "keyed", "env": {"KEY": "${input:api-key}"}},
                "mcp-armor-old": {"command": "/opt/mcp-armor", "args": ["serve", "--config", "/x/upstreams.toml"]},
            },
        },
    )
    code, out, err = run(capsys, "import", "vscode", "--offline")
    assert code == 1
    reasons = {line.split("'")[1]: line for line in err.splitlines() if line.startswith("mcp-armor: not imported:")}
    assert set(reasons) == {"box", "events", "dotenv", "workspace", "odd"}
    assert "different upstream named 'box'" in reasons["box"]
    assert "SSE transport" in reasons["events"]
    assert "'envFile' is not supported" in reasons["dotenv"]
    assert "'${workspaceFolder}' is a VS Code variable" in reasons["workspace"]
    assert "unknown transport type 'websocket'" in reasons["odd"]

    servers = servers_of(client, path)
    assert set(servers) == {"box", "events", "dotenv", "workspace", "odd", "mcp-armor-old", "mcp-armor"}
    assert servers["mcp-armor"]["env"] == {"MCP_ARMOR_INPUT_API_KEY": "${input:api-key}"}
    keyed = load_config(project / "upstreams.toml", environ={"MCP_ARMOR_INPUT_API_KEY": "k"}).upstreams["keyed"]
    assert keyed.env == {"KEY": "k"}
    assert json.loads(path.read_text())["inputs"][0]["id"] == "api-key"

    # Importing again finds the one it moved already fronted, and changes nothing more.
    servers["keyed"] = {"type": "stdio", "command": "keyed", "env": {"KEY": "${input:api-key}"}}
    write_client(path, {"servers": servers})
    config_before = (project / "upstreams.toml").read_text()
    code, out, _ = run(capsys, "import", "vscode", "--offline")
    assert code == 1 and re.search(r"already\s+keyed", out)
    assert (project / "upstreams.toml").read_text() == config_before
    assert "keyed" not in servers_of(client, path)


def test_import_keep_leaves_the_client_file_alone(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = CLIENTS["cursor"].user_file()
    before = write_client(
        path, {"mcpServers": {"lister": {"command": "ls", "env": {"API_KEY": "sk-abcdefghijklmnopqrstuvwx"}}}}
    )
    code, out, err = run(capsys, "import", "cursor", "--keep", "--offline")
    assert code == 0 and "unchanged (--keep)" in out
    assert path.read_bytes() == before and backups(path) == []
    assert "holds a secret written out in the client's file" in err  # kept as is: the client passes nothing
    assert load_config(project / "upstreams.toml").upstreams["lister"].env == {"API_KEY": "sk-abcdefghijklmnopqrstuvwx"}


def test_import_claude_code_local_servers_of_this_project(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = CLIENTS["claude-code"].user_file()
    write_client(
        path,
        {
            "mcpServers": {"global": {"type": "stdio", "command": "global-server"}},
            "projects": {
                str(project): {"mcpServers": {"local": {"type": "stdio", "command": "local-server"}}, "x": 1},
                "/elsewhere": {"mcpServers": {"foreign": {"type": "stdio", "command": "foreign-server"}}},
            },
        },
    )
    assert run(capsys, "import", "claude-code", "--offline")[0] == 0
    data = json.loads(path.read_text())
    assert list(data["mcpServers"]) == ["mcp-armor"]
    assert data["projects"][str(project)] == {"mcpServers": {}, "x": 1}
    assert data["projects"]["/elsewhere"]["mcpServers"] == {"foreign": {"type": "stdio", "command": "foreign-server"}}
    assert {"global", "local"} <= set(load_config(project / "upstreams.toml").upstreams)


def test_import_into_a_new_directory_starts_the_configuration(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_client(
        CLIENTS["windsurf"].user_file(),
        {"mcpServers": {"web": {"serverUrl": "https://web.example/mcp", "disabled": True}}},
    )
    code, out, _ = run(capsys, "import", "windsurf", "--offline", "--config", str(tmp_path / "new" / "upstreams.toml"))
    assert code == 0 and "created with the starter settings" in out
    config = load_config(tmp_path / "new" / "upstreams.toml")
    assert config.upstreams["web"].url == "https://web.example/mcp" and config.upstreams["web"].enabled is False
    assert (tmp_path / "new" / "policies" / "defaults.toml").exists()
    assert (tmp_path / "new" / "policies" / "web.toml").exists()


def test_import_of_a_missing_client_file_is_a_clear_error(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "import", "cursor")
    assert code == 2 and "nothing to import" in err and str(CLIENTS["cursor"].user_file()) in err


# upstream add / remove / list, init -----------------------------------------------------------

COMMENTED = """\
# The team's gateway.
[gateway]
name = "mcp-armor"   # keep this
startup_timeout = "20s"

# The toolbox fixture.
[upstreams.box]
command = "{python}"
args = ["{toolbox}"]

# Another.
[upstreams.other]
command = "other"
"""


@pytest.fixture
def commented(project: Path) -> Path:
    path = project / "upstreams.toml"
    path.write_text(COMMENTED.format(python=sys.executable, toolbox=fixture_upstream("toolbox.py")["args"][0]))
    return path


def test_upstream_add_and_remove_keep_the_file_loadable_and_its_comments(
    commented: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "upstream", "add", "time", "--env", "TZ=UTC", "--", "mcp-server-time", "--local-timezone", "UTC"
    )
    assert code == 0 and "added upstream 'time'" in out and "comments are gone" not in err
    code, _, _ = run(
        capsys,
        "upstream",
        "add",
        "web",
        "--url",
        "https://web.example/mcp",
        "--header",
        "Authorization=Bearer ${WEB_TOKEN}",
    )
    assert code == 0
    text = commented.read_text()
    assert "# keep this" in text and "# Another." in text
    config = load_config(commented, environ={"WEB_TOKEN": "t"})
    assert config.upstreams["time"].args == ("--local-timezone", "UTC") and config.upstreams["time"].env == {
        "TZ": "UTC"
    }
    assert config.upstreams["web"].headers == {"Authorization": "Bearer t"}

    assert run(capsys, "upstream", "remove", "box")[0] == 0
    text = commented.read_text()
    assert "[upstreams.box]" not in text and "# The toolbox fixture." not in text
    assert "# The team's gateway." in text and "# Another." in text
    assert set(load_config(commented, environ={"WEB_TOKEN": "t"}).upstreams) == {"other", "time", "web"}

    code, out, _ = run(capsys, "upstream", "list", "--json")
    listed = {row["name"]: row for row in json.loads(out)}
    assert listed["web"]["headers"] == ["Authorization"] and "Bearer" not in out  # values never printed
    assert listed["time"]["target"] == "mcp-server-time --local-timezone UTC"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "box", "--", "x"], "an upstream named 'box' already exists"),
        (["add", "Box", "--", "x"], "'Box' is not a valid upstream name"),
        (["add", "_x", "--", "x"], "'_x' is not a valid upstream name"),
        (["add", "new"], "say how to reach the upstream"),
        (["add", "new", "--url", "ftp://x"], "[upstreams.new]: 'url' must be an http:// or https:// URL"),
        (["add", "new", "--url", "https://x", "--", "cmd"], "give either --url URL or -- COMMAND ARGS"),
        (["add", "new", "--env", "NOEQUALS", "--", "cmd"], "--env 'NOEQUALS': expected KEY=VALUE"),
        (["add", "box__x", "--", "cmd"], "could be exposed under the same name"),
        (["remove", "ghost"], "there is no upstream named 'ghost'"),
    ],
    ids=[
        "duplicate",
        "upper-case",
        "dash",
        "no-transport",
        "bad-url",
        "both",
        "bad-env",
        "prefix-clash",
        "remove-unknown",
    ],
)
def test_upstream_edits_refused_with_one_line_and_the_file_unchanged(
    argv: list[str], message: str, commented: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = commented.read_bytes()
    code, _, err = run(capsys, "upstream", *argv)
    assert code == 2
    [line] = err.splitlines()
    assert line.startswith("mcp-armor: error: ") and message in line
    assert commented.read_bytes() == before


def test_upstream_remove_of_an_inline_table_rewrites_the_file_and_says_so(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = project / "upstreams.toml"
    path.write_text('# note\n[upstreams]\nbox = { command = "box" }\nother = { command = "other" }\n')
    code, _, err = run(capsys, "upstream", "remove", "box")
    assert code == 0 and "comments are gone" in err
    assert set(load_config(path).upstreams) == {"other"}


def test_upstream_add_check_lists_the_tools_or_writes_nothing(
    commented: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = commented.read_bytes()
    code, _, err = run(capsys, "upstream", "add", "broken", "--check", "--", str(commented.parent / "no-such-server"))
    assert code == 1 and "upstream 'broken' did not answer" in err and "nothing written" in err
    assert commented.read_bytes() == before
    code, out, _ = run(capsys, "upstream", "add", "box2", "--check", "--", *toolbox_command())
    assert code == 0 and "box2__echo" in out
    assert "box2" in load_config(commented).upstreams


def test_init_writes_a_loadable_default_deny_start_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "fresh"
    code, out, _ = run(capsys, "init", str(target))
    assert code == 0 and "default deny" in out
    assert run(capsys, "policy", "check", "--offline", "--config", str(target / "upstreams.toml"))[0] == 0
    assert load_config(target / "upstreams.toml").upstreams == {}

    before = (target / "upstreams.toml").read_bytes()
    code, _, err = run(capsys, "init", str(target))
    assert code == 2 and "already exists; pass --force" in err
    assert (target / "upstreams.toml").read_bytes() == before
    (target / "upstreams.toml").write_text("# mine\n")
    code, _, err = run(capsys, "init", str(target), "--force")
    assert code == 0 and "overwritten (--force)" in err
    assert [path.read_text() for path in backups(target / "upstreams.toml")] == ["# mine\n"]


def test_init_from_a_client_allows_the_tools_its_servers_mark_read_only(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    git_server = Path(sys.executable).parent / "mcp-server-git"
    repository = tmp_path / "repo"
    repository.mkdir()
    subprocess.run(["git", "init", "-q", str(repository)], check=True)
    client_file = write_client(
        CLIENTS["claude-desktop"].user_file(),
        {"mcpServers": {"git": {"command": str(git_server), "args": ["--repository", str(repository)]}}},
    )
    target = tmp_path / "fresh"
    code, out, _ = run(capsys, "init", str(target), "--from", "claude-desktop")
    assert code == 0
    assert CLIENTS["claude-desktop"].user_file().read_bytes() == client_file  # init never edits the client
    policy = (target / "policies" / "git.toml").read_text()
    [rule] = tomllib.loads(policy)["rule"]
    assert rule["effect"] == "allow" and {"git__git_status", "git__git_log", "git__git_diff"} <= set(rule["tools"])
    assert "git__git_commit" not in rule["tools"] and "#   git__git_commit" in policy
    assert "allows" in out and "read-only tool" in out
    assert run(capsys, "policy", "check", "--offline", "--config", str(target / "upstreams.toml"))[0] == 0


@pytest.mark.parametrize("insensitive", [False, True], ids=["case-sensitive", "case-insensitive"])
def test_init_confines_a_filesystem_server_to_its_directories_and_denies_secret_files(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], insensitive: bool
) -> None:
    monkeypatch.setattr(starter, "CASE_INSENSITIVE", insensitive)
    shared = tmp_path / "Shared"
    shared.mkdir()
    write_client(
        CLIENTS["claude-desktop"].user_file(),
        {"mcpServers": {"files": {"command": node_server("mcp-server-filesystem"), "args": [str(shared)]}}},
    )
    target = tmp_path / "fresh"
    code, out, _ = run(capsys, "init", str(target), "--from", "claude-desktop")
    assert code == 0 and f"reads only inside {shared}, secret files denied" in out
    policy = tomllib.loads((target / "policies" / "files.toml").read_text())
    assert policy["paths"] == [
        {
            "tools": ["files__*"],
            "arguments": ["path", "paths", "source", "destination"],
            "root": str(shared),
            **({"case": "insensitive"} if insensitive else {}),
        }
    ]
    engine = PolicyEngine(load_policies(target / "policies"))

    def decide(path: str, tool: str = "files__read_text_file") -> tuple[Effect, tuple[str, ...]]:
        decision = engine.evaluate(tool, {"path": path}, now=0.0)
        return decision.effect, decision.rules

    for spelling in (f"{shared}/.env/", f"{shared}/./.env", f"{shared}//.env", f"{shared}/sub/../.env", ".env"):
        assert decide(spelling) == (Effect.DENY, ("files-read-only", "files-no-secret-files")), spelling
    assert decide("sub/../notes.txt") == (Effect.ALLOW, ("files-read-only",))
    assert engine.evaluate("files__read_text_file", {"path": "./a"}, now=0.0).arguments == {"path": f"{shared}/a"}
    assert decide(f"{shared}/../elsewhere")[0] is Effect.DENY
    assert decide(f"{shared}/a.txt", "files__write_file")[0] is Effect.DENY  # not read-only: refused as before
    assert decide(f"{shared}/.ENV")[0] is (Effect.DENY if insensitive else Effect.ALLOW)
    assert decide(str(shared).lower() + "/a.txt")[0] is (Effect.ALLOW if insensitive else Effect.DENY)
    assert main(["policy", "check", "--offline", "--config", str(target / "upstreams.toml")]) == 0


@pytest.mark.parametrize(
    ("table", "root"),
    [
        ({"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/srv/ws/", "/tmp"]}, "/srv/ws"),
        ({"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem@2026.8.31", "/a/./b"]}, "/a/b"),
        ({"command": "/usr/bin/mcp-server-filesystem", "args": ["/data"]}, "/data"),
        ({"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "."]}, None),
        ({"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem-extra", "/srv"]}, None),
        ({"command": "uvx", "args": ["mcp-server-git", "/srv"]}, None),
    ],
)
def test_a_filesystem_server_is_known_by_its_package_or_command_and_needs_absolute_directories(
    table: dict[str, object], root: str | None
) -> None:
    text = upstream_policy("files", Listing(), written_by="init", separator="__", table=table).text
    declared = tomllib.loads(text).get("paths", [])
    assert [entry["root"] for entry in declared] == ([root] if root else [])


def toolbox_command() -> list[str]:
    table = fixture_upstream("toolbox.py")
    return [table["command"], *table["args"]]


# Gemini CLI -------------------------------------------------------------------------------------

GEMINI_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|AUTH|CREDENTIAL|CREDS|PRIVATE|CERT", re.IGNORECASE)


def gemini_environment(entry: dict[str, Any], environ: dict[str, str]) -> dict[str, str]:
    """The environment Gemini CLI gives a stdio server: what it inherits, less the variables whose names
    look like secrets, plus the entry's `env` with `$VAR` / `${VAR}` expanded (an unset one left as written)."""

    def one(match: re.Match[str]) -> str:
        return environ.get(match[1] or match[2], match[0])

    inherited = {key: value for key, value in environ.items() if not GEMINI_SECRET_NAME.search(key)}
    return {**inherited, **{k: re.sub(r"\$(?:(\w+)|\{([^}]+)\})", one, v) for k, v in entry.get("env", {}).items()}}


def test_gemini_files() -> None:
    gemini = CLIENTS["gemini"]
    assert str(gemini.user_file("linux", {"HOME": "/home/ann"})) == "/home/ann/.gemini/settings.json"
    assert str(gemini.user_file("darwin", {"HOME": "/Users/ann"})) == "/Users/ann/.gemini/settings.json"
    assert gemini.project_file == ".gemini/settings.json"


@pytest.mark.anyio
async def test_register_gemini_passes_the_secrets_it_would_strip_and_the_gateway_reaches_the_upstream(
    tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    record = tmp_path / "calls.jsonl"  # the "token": where the toolbox records calls, so its arrival is visible
    box = fixture_upstream("toolbox.py", TOOLBOX_RECORD="${GITHUB_PERSONAL_ACCESS_TOKEN}", LEVEL="${LEVEL:-info}")
    write_config(project, {"box": box})
    monkeypatch.setenv("GITHUB_PERSONAL_ACCESS_TOKEN", str(record))
    path = CLIENTS["gemini"].user_file()
    write_client(path, {"theme": "GitHub", "mcpServers": {"other": {"httpUrl": "https://other.example/mcp"}}})

    code, _, err = await anyio.to_thread.run_sync(run, capsys, "register", "gemini")
    assert code == 0 and "warning" not in err
    data = json.loads(path.read_text())
    assert data["theme"] == "GitHub" and set(data["mcpServers"]) == {"other", "mcp-armor"}
    entry = data["mcpServers"]["mcp-armor"]
    assert entry["env"] == {"GITHUB_PERSONAL_ACCESS_TOKEN": "${GITHUB_PERSONAL_ACCESS_TOKEN}", "LEVEL": "${LEVEL}"}

    # Started as Gemini CLI starts it: the token is stripped from what it inherits, and arrives only by `env`.
    env = gemini_environment(entry, dict(os.environ))
    assert env["GITHUB_PERSONAL_ACCESS_TOKEN"] == str(record)
    assert "GITHUB_PERSONAL_ACCESS_TOKEN" not in gemini_environment({}, dict(os.environ))
    params = StdioServerParameters(command=entry["command"], args=entry["args"], env=env, cwd="/")
    async with Client(params, read_timeout_seconds=60) as session:
        assert text_of(await session.call_tool("box__echo", {"text": "via gemini"})) == "via gemini"
    assert json.loads(record.read_text().splitlines()[-1])["tool"] == "echo"


def test_register_gemini_passes_what_pass_env_names_too(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    table = {**fixture_upstream("toolbox.py"), "pass_env": ["GITHUB_TOKEN"]}
    write_config(project, {"box": table})
    monkeypatch.setenv("GITHUB_TOKEN", "ghp-value")
    path = CLIENTS["gemini"].user_file()
    write_client(path, {"mcpServers": {}})
    code, _, _ = run(capsys, "register", "gemini")
    assert code == 0
    entry = json.loads(path.read_text())["mcpServers"]["mcp-armor"]
    assert gemini_environment(entry, dict(os.environ)).get("GITHUB_TOKEN") == "ghp-value"


def test_register_gemini_warns_of_each_pass_env_glob_and_other_clients_list_no_pass_env_names(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    table = {**fixture_upstream("toolbox.py"), "pass_env": ["NPM_CONFIG_*", "GITHUB_TOKEN"]}
    write_config(project, {"box": table}, pass_env=["AWS_*", "AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    code, _, err = run(capsys, "register", "gemini")
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("mcp-armor: warning: ")]
    assert len(warnings) == 2
    assert "[gateway] pass_env 'AWS_*': Gemini CLI strips the variables it matches" in warnings[0]
    assert "[upstreams.box] pass_env 'NPM_CONFIG_*'" in warnings[1] and "name each such variable exactly" in warnings[1]
    entry = servers_of(CLIENTS["gemini"], CLIENTS["gemini"].user_file())["mcp-armor"]
    assert entry["env"] == {"AWS_SECRET_ACCESS_KEY": "${AWS_SECRET_ACCESS_KEY}", "GITHUB_TOKEN": "${GITHUB_TOKEN}"}

    # Unset in Gemini's environment, a listed name reaches the gateway as its own reference: not passed on.
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    for name, value in gemini_environment(entry, dict(os.environ)).items():
        monkeypatch.setenv(name, value)
    assert os.environ["GITHUB_TOKEN"] == "${GITHUB_TOKEN}"
    config = load_config(project / "upstreams.toml")
    inherited = environment_for({}, config.passing("box"))
    assert inherited["AWS_SECRET_ACCESS_KEY"] == "aws-secret" and "GITHUB_TOKEN" not in inherited

    # A client that leaves the environment alone gets only what upstreams.toml refers to, and no warning.
    code, _, err = run(capsys, "register", "cursor")
    assert code == 0 and "warning" not in err
    assert "env" not in servers_of(CLIENTS["cursor"], CLIENTS["cursor"].user_file())["mcp-armor"]


def test_register_gemini_lists_no_variable_that_changes_how_the_gateway_runs(
    tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    table = {**fixture_upstream("toolbox.py"), "pass_env": ["PYTHONPATH"]}
    write_config(project, {"box": table})
    monkeypatch.delenv("PYTHONPATH", raising=False)
    path = CLIENTS["gemini"].user_file()
    write_client(path, {"mcpServers": {}})
    assert run(capsys, "register", "gemini")[0] == 0
    entry = json.loads(path.read_text())["mcpServers"]["mcp-armor"]
    # Gemini CLI starts the gateway in the project it runs in: a directory named as the reference is code there.
    workdir = tmp_path / "cloned-repository"
    (workdir / "${PYTHONPATH}").mkdir(parents=True)
    (workdir / "${PYTHONPATH}" / "sitecustomize.py").write_text("print('imported from the working directory')\n")
    environ = gemini_environment(entry, dict(os.environ))
    probe = subprocess.run(
        [sys.executable, "-c", "pass"], env=environ, cwd=workdir, capture_output=True, text=True, check=True
    )
    assert "imported from the working directory" not in probe.stdout


def test_register_gemini_an_unset_variable_stays_unset_for_the_gateway(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gh = {"command": "gh", "env": {"GITHUB_TOKEN": "${GITHUB_TOKEN}"}}
    box = {"command": "box", "env": {"LEVEL": "${LEVEL:-info}"}}
    config = write_config(project, {"gh": gh, "box": box})
    monkeypatch.delenv("GITHUB_TOKEN", raising=False)
    monkeypatch.delenv("LEVEL", raising=False)
    path = CLIENTS["gemini"].user_file()
    write_client(path, {"mcpServers": {}})
    assert run(capsys, "register", "gemini")[0] == 0
    entry = json.loads(path.read_text())["mcpServers"]["mcp-armor"]
    environ = gemini_environment(entry, dict(os.environ))  # an unset variable's reference is kept as written
    loaded = load_config(config, environ=environ)
    assert loaded.upstreams["gh"].unavailable is not None  # not started with GITHUB_TOKEN="${GITHUB_TOKEN}"
    assert loaded.upstreams["box"].env["LEVEL"] == "info"


def test_import_gemini_servers(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = CLIENTS["gemini"].user_file()
    write_client(
        path,
        {
            "general": {"vimMode": True},
            "mcpServers": {
                "files": {
                    "command": "npx",
                    "args": ["-y", "fs-server", "$PROJECTS/docs", "${HOME_DIR}/x", "costs $ 5"],
                    "env": {"API_KEY": "$MY_API_KEY", "TOKEN": "ghp_" + "a" * 36},
                    "timeout": 30000,
                    "trust": True,
                },
                "remote": {"httpUrl": "https://remote.example/mcp", "headers": {"Authorization": "Bearer ${R_TOKEN}"}},
                "typed": {"url": "https://typed.example/mcp", "type": "http"},
                "events": {"url": "https://events.example/sse"},
                "narrowed": {"command": "narrow", "includeTools": ["read"]},
                "odd": {"command": "odd", "args": ["${not a name}"]},
            },
        },
    )
    code, _, err = run(capsys, "import", "gemini", "--offline")
    assert code == 1
    reasons = {line.split("'")[1]: line for line in err.splitlines() if line.startswith("mcp-armor: not imported:")}
    assert set(reasons) == {"events", "narrowed", "odd"}
    assert "SSE transport" in reasons["events"]
    assert "'includeTools' limits which tools the client offers" in reasons["narrowed"]
    assert "'${not a name}' is not a variable the gateway can resolve" in reasons["odd"]
    assert "'files': key 'timeout' is not carried over" in err and "'files': key 'trust' is not carried over" in err

    environ = {"PROJECTS": "/p", "HOME_DIR": "/h", "MY_API_KEY": "k", "R_TOKEN": "r", "TOKEN": "t"}
    upstreams = load_config(project / "upstreams.toml", environ=environ).upstreams
    assert upstreams["files"].args == ("-y", "fs-server", "/p/docs", "/h/x", "costs $ 5")
    assert upstreams["files"].env == {"API_KEY": "k", "TOKEN": "t"}
    assert upstreams["remote"].headers == {"Authorization": "Bearer r"}
    assert upstreams["typed"].url == "https://typed.example/mcp"

    data = json.loads(path.read_text())
    assert data["general"] == {"vimMode": True}
    assert set(data["mcpServers"]) == {"events", "narrowed", "odd", "mcp-armor"}
    assert data["mcpServers"]["mcp-armor"]["env"] == {
        "HOME_DIR": "${HOME_DIR}",
        "MY_API_KEY": "${MY_API_KEY}",
        "PROJECTS": "${PROJECTS}",
        "R_TOKEN": "${R_TOKEN}",
        "TOKEN": "ghp_" + "a" * 36,  # the written-out secret stays in Gemini's file, listed so it is not stripped
    }


def test_init_from_gemini_project_settings(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = write_client(
        tmp_path / ".gemini" / "settings.json", {"mcpServers": {"web": {"httpUrl": "https://web.example/mcp"}}}
    )
    code, _, _ = run(capsys, "init", "fresh", "--from", "gemini", "--project", "--offline")
    assert code == 0
    assert load_config(tmp_path / "fresh" / "upstreams.toml").upstreams["web"].url == "https://web.example/mcp"
    assert (tmp_path / ".gemini" / "settings.json").read_bytes() == settings


def test_register_gemini_refuses_a_path_it_would_expand(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(clients, "launcher", lambda: ["/opt/$HOME/mcp-armor"])
    code, _, err = run(capsys, "register", "gemini")
    assert code == 2 and "Gemini CLI would expand the '$' in the gateway's path" in err
    assert not CLIENTS["gemini"].user_file().exists()


# register --name, scopes, variables set nowhere, project files ----------------------------------


def test_register_name_adds_a_second_entry_and_removes_only_it(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = CLIENTS["cursor"].user_file()
    write_client(path, other_servers(CLIENTS["cursor"]))
    assert run(capsys, "register", "cursor")[0] == 0
    code, out, _ = run(capsys, "register", "cursor", "--name", "armor-2")
    assert code == 0 and "added 'armor-2'" in out
    servers = servers_of(CLIENTS["cursor"], path)
    assert {"mcp-armor", "armor-2", "files", "remote"} == set(servers)
    assert servers["armor-2"] == servers["mcp-armor"]

    code, out, _ = run(capsys, "register", "cursor", "--remove", "--name", "armor-2")
    assert code == 0 and "removed 'armor-2'" in out
    assert {"mcp-armor", "files", "remote"} == set(servers_of(CLIENTS["cursor"], path))


@pytest.mark.parametrize("remove", [False, True], ids=["register", "remove"])
def test_register_name_never_touches_another_server_of_that_name(
    remove: bool, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = CLIENTS["cursor"].user_file()
    before = write_client(path, other_servers(CLIENTS["cursor"]))
    code, out, err = run(capsys, "register", "cursor", "--name", "files", *(["--remove"] if remove else []))
    assert code == 2 and out == ""
    [line] = err.splitlines()
    assert "'files' is another server, not the gateway; nothing changed" in line
    assert path.read_bytes() == before and backups(path) == []


def test_register_name_must_be_a_name(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "register", "cursor", "--name", "bad name")
    assert code == 2 and "--name 'bad name': use letters, digits" in err
    assert not CLIENTS["cursor"].user_file().exists()


def test_register_claude_code_says_when_another_scope_has_the_name(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user = CLIENTS["claude-code"].user_file()
    local = {"type": "stdio", "command": "/old/mcp-armor", "args": ["serve", "--config", "/old/upstreams.toml"]}
    write_client(user, {"projects": {str(project): {"mcpServers": {"mcp-armor": local}}}})
    code, _, err = run(capsys, "register", "claude-code", "--project")
    assert code == 0
    [line] = [line for line in err.splitlines() if "also has a server named" in line]
    assert f"Claude Code also has a server named 'mcp-armor' in {user}" in line and "another --name" in line

    code, _, err = run(capsys, "register", "claude-code", "--project", "--name", "mcp-armor-project")
    assert code == 0 and "also has a server named" not in err
    assert set(servers_of(CLIENTS["claude-code"], project / ".mcp.json")) == {"mcp-armor", "mcp-armor-project"}


def test_register_warns_of_a_variable_set_nowhere_the_client_can_see(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    box = {**fixture_upstream("toolbox.py"), "env": {"A": "${BOX_TOKEN}", "B": "${LEVEL:-info}"}}
    http = {"token": "${GW_TOKEN}-0123456789abcdef"}  # the [gateway] table needs a variable too
    write_config(project, {"box": box, "web": {"url": "https://web.example/mcp"}}, http=http)
    for variable in ("BOX_TOKEN", "LEVEL", "GW_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    code, _, err = run(capsys, "register", "cursor")
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("mcp-armor: warning: ")]
    assert len(warnings) == 2  # LEVEL has a default: it needs nothing
    assert "BOX_TOKEN is set neither in this shell nor in the 'mcp-armor' entry" in warnings[0]
    assert "upstream 'box' needs it" in warnings[0]
    assert "GW_TOKEN" in warnings[1] and "the [gateway] table needs it" in warnings[1]

    # Set in the shell, or written into the entry by hand: nothing to say.
    monkeypatch.setenv("GW_TOKEN", "t")
    path = CLIENTS["cursor"].user_file()
    data = json.loads(path.read_text())
    data["mcpServers"]["mcp-armor"]["env"]["BOX_TOKEN"] = "set-by-hand"
    path.write_text(json.dumps(data))
    code, _, err = run(capsys, "register", "cursor")
    assert code == 0 and "warning" not in err


def test_register_drops_what_changes_how_the_gateway_runs_from_the_entry_it_keeps(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A project file from a clone may carry `PYTHONPATH` in the gateway's entry: the gateway would load its code."""
    box = {**fixture_upstream("toolbox.py"), "env": {"LIB": "${PYTHONPATH}"}}
    write_config(project, {"box": box})
    path = project / ".mcp.json"
    env = {"PYTHONPATH": "./evil", "NODE_OPTIONS": "--require ./evil.js", "LD_PRELOAD": "./evil.so", "LEVEL": "debug"}
    before = write_client(path, {"mcpServers": {"mcp-armor": {"command": "mcp-armor", "args": ["serve"], "env": env}}})

    code, out, err = run(capsys, "register", "claude-code", "--project", "--dry-run")
    assert code == 0 and "dry run: nothing written" in out
    assert '-        "NODE_OPTIONS": "--require ./evil.js",' in out and '+        "PYTHONPATH"' not in out
    # upstreams.toml refers to PYTHONPATH too: it is still not put back into the gateway's own environment
    assert "upstreams.toml refers to PYTHONPATH, which changes how a program runs" in err
    dropped = [line for line in err.splitlines() if "dropped" in line]
    assert [line.split("dropped ")[1].split()[0] for line in dropped] == ["LD_PRELOAD", "NODE_OPTIONS", "PYTHONPATH"]
    assert dropped[0] == (
        f"mcp-armor: warning: {path}: dropped LD_PRELOAD from the 'env' of the 'mcp-armor' entry: "
        "it changes how the gateway runs or what code it loads"
    )
    assert path.read_bytes() == before

    code, _, err = run(capsys, "register", "claude-code", "--project")
    assert code == 0 and err.count("dropped") == 3
    entry = servers_of(CLIENTS["claude-code"], path)["mcp-armor"]
    assert entry["env"] == {"LEVEL": "debug"}

    code, out, err = run(capsys, "register", "claude-code", "--project")
    assert code == 0 and "already registered" in out and "dropped" not in err


# Where each client starts a project's servers, and how a project file names the project directory.
PROJECT_CONFIG = {
    "claude-code": "./upstreams.toml",
    "cursor": "${workspaceFolder}/upstreams.toml",
    "gemini": "./upstreams.toml",
    "vscode": "${workspaceFolder}/upstreams.toml",
}


@pytest.mark.parametrize("name", PROJECT_CLIENTS)
def test_register_project_file_names_paths_inside_the_project_portably(
    name: str, project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = CLIENTS[name]
    assert client.project_file is not None
    code, _, err = run(capsys, "register", name, "--project")
    assert code == 0
    entry = servers_of(client, project / client.project_file)["mcp-armor"]
    assert entry["args"][-1] == PROJECT_CONFIG[name]
    [line] = [line for line in err.splitlines() if "machine-specific" in line]
    assert f"it holds {launcher()[0]} (outside {project})" in line

    # The gateway installed inside the project: nothing ties the file to this machine.
    inside = project / ".venv" / "bin" / "mcp-armor"
    monkeypatch.setattr(clients, "launcher", lambda: [str(inside)])
    code, out, err = run(capsys, "register", name, "--project")
    assert code == 0 and "updated 'mcp-armor'" in out and "machine-specific" not in err
    entry = servers_of(client, project / client.project_file)["mcp-armor"]
    root = client.project_root + "/" if client.project_root else "./"
    assert entry["command"] == root + ".venv/bin/mcp-armor"

    # A user-wide file keeps absolute paths.
    if name != "claude-code":  # (its user file also holds the project's local scope; covered above)
        assert run(capsys, "register", name)[0] == 0
        assert servers_of(client, client.user_file())["mcp-armor"]["args"][-1] == str(project / "upstreams.toml")


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["claude-code", "gemini"])
async def test_project_file_with_a_relative_config_starts_the_gateway_in_the_project(
    name: str, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = CLIENTS[name]
    assert client.project_file is not None
    assert (await anyio.to_thread.run_sync(run, capsys, "register", name, "--project"))[0] == 0
    entry = servers_of(client, project / client.project_file)["mcp-armor"]
    params = StdioServerParameters(
        command=entry["command"], args=entry["args"], env={"PATH": os.environ.get("PATH", "")}, cwd=str(project)
    )
    async with Client(params, read_timeout_seconds=60) as session:
        assert text_of(await session.call_tool("box__echo", {"text": "from the project"})) == "from the project"
