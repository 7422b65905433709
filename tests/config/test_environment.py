"""What an upstream inherits from the gateway's environment, and an upstream whose variable is not set."""

from __future__ import annotations

import json
import ssl
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from gateway.config.environment import BY_DEFAULT, Passing, environment_for
from gateway.config.models import load_config
from tests.conftest import (
    FIXTURES,
    RawSession,
    answers,
    events,
    fixture_upstream,
    gateway_process,
    ready,
    run_cli,
    write_config,
)

NETWORK_AND_LOCALE = {
    "SSL_CERT_FILE": "/etc/corp/ca.pem",
    "SSL_CERT_DIR": "/etc/corp/certs",
    "REQUESTS_CA_BUNDLE": "/etc/corp/ca.pem",
    "NODE_EXTRA_CA_CERTS": "/etc/corp/ca.pem",
    "HTTPS_PROXY": "http://proxy.corp:3128",
    "http_proxy": "http://proxy.corp:3128",
    "NO_PROXY": "localhost",
    "LANG": "C.UTF-8",
    "LC_CTYPE": "C.UTF-8",
    "TMPDIR": "/tmp",
}
RUNTIME = {
    "LD_PRELOAD": "/tmp/hook.so",
    "LD_LIBRARY_PATH": "/tmp/lib",
    "DYLD_INSERT_LIBRARIES": "/tmp/hook.dylib",
    "PYTHONPATH": "/tmp/py",
    "PYTHONSTARTUP": "/tmp/start.py",
    "NODE_OPTIONS": "--require /tmp/hook.js",
    "BASH_ENV": "/tmp/rc",
    "ENV": "/tmp/rc",
}


@pytest.fixture
def gateway_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**NETWORK_AND_LOCALE, **RUNTIME}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("GATEWAY_TOKEN", "gateway-secret-token")
    monkeypatch.setenv("MCP_ARMOR_OAUTH_SECRET", "oauth-secret")


@pytest.mark.usefixtures("gateway_environ")
def test_by_default_a_child_gets_what_networks_and_locales_need_and_nothing_that_changes_how_it_runs() -> None:
    env = environment_for({"OWN": "1"})
    assert {name: env.get(name) for name in NETWORK_AND_LOCALE} == NETWORK_AND_LOCALE
    assert env["OWN"] == "1"
    for name in [*RUNTIME, "AWS_REGION", "AWS_SECRET_ACCESS_KEY", "GATEWAY_TOKEN", "MCP_ARMOR_OAUTH_SECRET"]:
        assert name not in env


@pytest.mark.usefixtures("gateway_environ")
def test_pass_env_globs_never_reach_what_changes_how_a_child_runs_but_exact_names_do() -> None:
    env = environment_for({}, Passing(("AWS_*", "PYTHON*", "LD_*", "NODE_OPTIONS", "*")))
    assert env["AWS_REGION"] == "eu-west-1" and env["AWS_SECRET_ACCESS_KEY"] == "aws-secret"
    assert env["NODE_OPTIONS"] == RUNTIME["NODE_OPTIONS"]
    for name in ["LD_PRELOAD", "LD_LIBRARY_PATH", "DYLD_INSERT_LIBRARIES", "PYTHONPATH", "PYTHONSTARTUP", "BASH_ENV"]:
        assert name not in env
    assert environment_for({}, Passing(("PYTHONPATH",)))["PYTHONPATH"] == RUNTIME["PYTHONPATH"]


REDIRECTING = {
    "UV_INDEX_URL": "https://evil.example/simple",
    "UV_PYTHON": "/tmp/python",
    "PIP_INDEX_URL": "https://evil.example/simple",
    "PIPX_HOME": "/tmp/pipx",
    "npm_config_registry": "https://evil.example/",
    "NPM_CONFIG_NODE_OPTIONS": "--require /tmp/hook.js",
    "Npm_Config_Userconfig": "/tmp/npmrc",  # npm reads its variables ignoring case
    "NODE_TLS_REJECT_UNAUTHORIZED": "0",
    "COREPACK_NPM_REGISTRY": "https://evil.example/",
    "YARN_NPM_REGISTRY_SERVER": "https://evil.example/",
    "GIT_SSH_COMMAND": "/tmp/ssh",
    "DOTNET_STARTUP_HOOKS": "/tmp/hook.dll",
    "CORECLR_PROFILER_PATH": "/tmp/profiler.so",
    "GOFLAGS": "-toolexec=/tmp/run",
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "core.fsmonitor",
    "GIT_EXEC_PATH": "/tmp/git",
    "LUA_INIT": "@/tmp/init.lua",
}


def test_a_glob_never_hands_over_what_redirects_a_package_manager_or_tool_but_the_defaults_still_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {**REDIRECTING, "UV_NATIVE_TLS": "1", "NODE_EXTRA_CA_CERTS": "/etc/corp/ca.pem"}.items():
        monkeypatch.setenv(name, value)
    env = environment_for({}, Passing(("*", "UV_*", "PIP_*", "NPM_CONFIG_*", "npm_config_*", "GIT_*", "LUA_*")))
    assert [name for name in REDIRECTING if name in env] == []
    assert env["UV_NATIVE_TLS"] == "1" and env["NODE_EXTRA_CA_CERTS"] == "/etc/corp/ca.pem"
    assert environment_for({}, BY_DEFAULT)["UV_NATIVE_TLS"] == "1"
    named = environment_for({}, Passing(("npm_config_registry", "GIT_SSH_COMMAND")))
    assert named["npm_config_registry"] == REDIRECTING["npm_config_registry"]
    assert named["GIT_SSH_COMMAND"] == REDIRECTING["GIT_SSH_COMMAND"]


@pytest.mark.usefixtures("gateway_environ")
def test_the_gateways_own_secrets_never_pass_however_named_unless_an_upstream_sets_one_itself() -> None:
    passing = Passing(("GATEWAY_*", "GATEWAY_TOKEN", "MCP_ARMOR_OAUTH_SECRET", "*"), frozenset({"GATEWAY_TOKEN"}))
    env = environment_for({}, passing)
    assert "GATEWAY_TOKEN" not in env and "MCP_ARMOR_OAUTH_SECRET" not in env
    assert environment_for({"GATEWAY_TOKEN": "given"}, passing)["GATEWAY_TOKEN"] == "given"


@pytest.mark.usefixtures("gateway_environ")
def test_another_upstreams_credential_passes_only_when_named_exactly(tmp_path: Path) -> None:
    """A glob such as `"*"` or `"AWS_*"` never hands one upstream the variable another upstream's table
    takes (its token): a confused deputy by configuration. Naming it exactly still passes it."""
    path = tmp_path / "upstreams.toml"
    path.write_text(
        '[gateway]\npass_env = ["*"]\n'
        '[upstreams.cloud]\ncommand = "server"\nenv = { KEY = "${AWS_SECRET_ACCESS_KEY}" }\n'
        '[upstreams.other]\ncommand = "server"\n'
        '[upstreams.named]\ncommand = "server"\npass_env = ["AWS_SECRET_ACCESS_KEY"]\n'
    )
    config = load_config(path)
    assert "AWS_SECRET_ACCESS_KEY" not in environment_for({}, config.passing("other"))
    assert environment_for({}, config.passing("other"))["AWS_REGION"] == "eu-west-1"
    assert environment_for({}, config.passing("cloud"))["AWS_SECRET_ACCESS_KEY"] == "aws-secret"
    assert environment_for({}, config.passing("named"))["AWS_SECRET_ACCESS_KEY"] == "aws-secret"


async def _call_environ(raw: RawSession) -> dict[str, str]:
    await ready(raw)
    with anyio.fail_after(30):
        await raw.send(raw.call(1, "env__environ", {}))
        found = await answers(raw, {1})
    child: dict[str, str] = json.loads(found[1]["result"]["content"][0]["text"])
    return child


@pytest.mark.anyio
async def test_a_served_child_receives_the_ca_and_proxy_but_not_ld_preload_or_the_token_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through `serve` as agents run it: the upstream started ahead is adopted, so the early reading
    computed the very environment the full reading did."""
    cafile = ssl.get_default_verify_paths().openssl_cafile  # OpenSSL's own default: changes nothing here
    token = "t" * 24
    for name, value in {
        "SSL_CERT_FILE": cafile,
        "HTTPS_PROXY": "http://proxy.invalid:3128",
        "no_proxy": "localhost",
        "LD_PRELOAD": "",  # empty: the loader ignores it in the gateway itself
        "ARMOR_TEST_TOKEN": token,
        "ARMOR_TEST_REGION": "eu",
        "MCP_ARMOR_TEST_SECRET": "never",
    }.items():
        monkeypatch.setenv(name, value)
    environ = {
        "command": sys.executable,
        "args": [str(FIXTURES / "environ.py")],
        "env": {"GIVEN": "${ARMOR_TEST_TOKEN}"},
    }
    config = write_config(
        tmp_path,
        {"env": environ},
        pass_env=["ARMOR_TEST_*", "ARMOR_TEST_TOKEN", "LD_*", "MCP_ARMOR_TEST_SECRET"],
        http={"token": "${ARMOR_TEST_TOKEN}"},
    )
    async with gateway_process(config, "--verbose") as (proc, log):
        child = await _call_environ(RawSession(proc))
        await log.wait_for(r"upstream 'env': adopted the process started ahead")
    assert child["SSL_CERT_FILE"] == cafile
    assert child["HTTPS_PROXY"] == "http://proxy.invalid:3128" and child["no_proxy"] == "localhost"
    assert child["ARMOR_TEST_REGION"] == "eu"
    assert child["GIVEN"] == token  # set in its own env table, explicitly
    for name in ["LD_PRELOAD", "ARMOR_TEST_TOKEN", "MCP_ARMOR_TEST_SECRET"]:
        assert name not in child
    assert token not in {value for name, value in child.items() if name != "GIVEN"}


def _write_needy_config(directory: Path) -> Path:
    """`box` serves; `git` takes a variable that is not set (as after `import`, when the client's file held it)."""
    git = {"command": "mcp-server-git-never-started", "env": {"GITHUB_TOKEN": "${ARMOR_TEST_UNSET_GITHUB}"}}
    return write_config(
        directory, {"box": fixture_upstream("toolbox.py"), "git": git}, http={"token": "${ARMOR_TEST_UNSET_TOKEN}"}
    )


REASON = "environment variable ARMOR_TEST_UNSET_GITHUB is not set (in [upstreams.git] env.GITHUB_TOKEN)"


@pytest.mark.anyio
async def test_an_upstream_whose_variable_is_not_set_is_unavailable_and_the_others_are_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ARMOR_TEST_UNSET_GITHUB", raising=False)
    monkeypatch.delenv("ARMOR_TEST_UNSET_TOKEN", raising=False)
    config = _write_needy_config(tmp_path)
    async with gateway_process(config) as (proc, log):
        raw = RawSession(proc)
        await ready(raw)
        await raw.send({"id": "tools", "method": "tools/list"})
        tools = (await answers(raw, {"tools"}))["tools"]["result"]["tools"]
        with anyio.fail_after(30):
            await raw.send(raw.call(1, "box__echo", {"text": "still here"}))
            echoed = await answers(raw, {1})
        await log.wait_for(r"upstream 'git' unavailable")
    names = {tool["name"] for tool in tools}
    assert "box__echo" in names and not any(name.startswith("git__") for name in names)
    assert echoed[1]["result"]["content"][0]["text"] == "still here"
    git_lines = [line for line in log.text.splitlines() if "'git'" in line]
    assert git_lines == [f"mcp-armor WARNING: upstream 'git' unavailable: {REASON}"]
    recorded = [(e["upstream"], e["outcome"], e["reason"]) for e in events(tmp_path) if e["kind"] == "upstream"]
    assert ("git", "down", f"unavailable: {REASON}") in recorded
    assert [entry for entry in recorded if entry[0] == "git"] == [("git", "down", f"unavailable: {REASON}")]
    tail = _cli(tmp_path, "audit", "tail", "-n", "100", "--json")  # neither variable needed offline
    assert tail.returncode == 0, tail.stderr
    assert REASON in tail.stdout


def _cli(directory: Path, *args: str) -> Any:
    return run_cli(*args, "--config", str(directory / "upstreams.toml"), cwd=directory)


def test_the_commands_name_the_unset_variable_and_only_serving_http_needs_the_token(tmp_path: Path) -> None:
    _write_needy_config(tmp_path)
    tools = _cli(tmp_path, "tools", "--json")
    assert tools.returncode == 1, tools.stderr
    listing = json.loads(tools.stdout)
    assert listing["unavailable"] == {"git": REASON}
    assert "box__echo" in {row["name"] for row in listing["tools"]}
    assert f"mcp-armor: upstream 'git' unavailable: {REASON}" in tools.stderr.splitlines()

    listed = _cli(tmp_path, "upstream", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"git: unavailable: {REASON}" in listed.stdout.splitlines()
    rows = {row["name"]: row for row in json.loads(_cli(tmp_path, "upstream", "list", "--json").stdout)}
    assert rows["git"]["unavailable"] == REASON and rows["box"]["unavailable"] is None

    checked = _cli(tmp_path, "policy", "check", "--offline")
    assert checked.returncode == 0, checked.stderr
    registered = _cli(tmp_path, "register", "cursor", "--path", str(tmp_path / "mcp.json"), "--dry-run")
    assert registered.returncode == 0, registered.stderr

    served = _cli(tmp_path, "serve", "--http", "127.0.0.1:0")
    assert served.returncode == 2
    assert served.stderr.strip().splitlines() == [
        "mcp-armor: error: "
        f"{tmp_path / 'upstreams.toml'}: [gateway.http] token: environment variable ARMOR_TEST_UNSET_TOKEN is not set "
        "(`serve --http` needs it)"
    ]


def test_referring_to_home_or_path_elsewhere_does_not_take_them_from_an_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", "/home/ann")
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin")
    path = tmp_path / "upstreams.toml"
    path.write_text(
        '[gateway]\nstate = "${HOME}/.cache/mcp-armor"\n'
        '[upstreams.a]\ncommand = "a"\nenv = { PATH = "${PATH}:/opt/a/bin" }\n'
        '[upstreams.b]\ncommand = "b"\npass_env = ["HOME"]\n'
    )
    config = load_config(path)
    env = environment_for(config.upstreams["b"].env, config.passing("b"))
    assert env.get("PATH") == "/usr/local/bin:/usr/bin"
    assert env.get("HOME") == "/home/ann"


def test_only_the_http_settings_variables_are_withheld_not_those_of_other_gateway_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`state` and `audit` are paths, not secrets: a glob still passes their variables; the HTTP token's
    variable never passes, not even by exact name."""
    monkeypatch.setenv("CORP_STATE", "/var/lib/armor")
    monkeypatch.setenv("CORP_TOKEN", "t" * 24)
    path = tmp_path / "upstreams.toml"
    path.write_text(
        '[gateway]\nstate = "${CORP_STATE}"\npass_env = ["CORP_*", "CORP_TOKEN"]\n'
        '[gateway.http]\ntoken = "${CORP_TOKEN}"\n[upstreams.b]\ncommand = "b"\n'
    )
    env = environment_for({}, load_config(path).passing("b"))
    assert env["CORP_STATE"] == "/var/lib/armor"
    assert "CORP_TOKEN" not in env
