"""upstreams.toml: every malformed file is refused with one line naming file, table and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.environment import Passing
from gateway.config.models import load_config, parse_config, parse_duration
from gateway.config.source import early_starts
from gateway.errors import ConfigError

CASES = [
    pytest.param(
        '[gateway]\naudit_sync = "sometimes"\n',
        "[gateway] audit_sync: Input should be 'normal' or 'full'",
        id="audit-sync",
    ),
    pytest.param("[gateway]\naudit = 3\n", "[gateway] audit: Input is not a valid path", id="audit-not-a-path"),
    pytest.param('[upstreams.x]\ncomand = "a"\n', "[upstreams.x] comand: unknown key", id="unknown-upstream-key"),
    pytest.param("[gateway]\nfoo = 1\n", "[gateway] foo: unknown key", id="unknown-gateway-key"),
    pytest.param("[gateway.http]\nport = 1\n", "[gateway.http] port: unknown key", id="unknown-http-key"),
    pytest.param("[extra]\nx = 1\n", "top level extra: unknown key", id="unknown-table"),
    pytest.param(
        '[upstreams.x]\ncommand = "a"\nurl = "http://127.0.0.1:1/mcp"\n',
        "[upstreams.x]: give either 'command' (stdio) or 'url' (streamable HTTP), not both and not neither",
        id="both-command-and-url",
    ),
    pytest.param(
        "[upstreams.x]\nenabled = true\n",
        "[upstreams.x]: give either 'command' (stdio) or 'url' (streamable HTTP), not both and not neither",
        id="neither-command-nor-url",
    ),
    pytest.param(
        '[upstreams.Files]\ncommand = "a"\n',
        "[upstreams.Files] upstream names must match ^[a-z0-9][a-z0-9_-]*$",
        id="bad-name-uppercase",
    ),
    pytest.param(
        '[upstreams."my files"]\ncommand = "a"\n',
        "[upstreams.my files] upstream names must match ^[a-z0-9][a-z0-9_-]*$",
        id="bad-name-space",
    ),
    pytest.param(
        '[gateway]\nstate = "${MCP_ARMOR_TEST_UNSET}"\n[upstreams.x]\ncommand = "a"\n',
        "[gateway] state: environment variable MCP_ARMOR_TEST_UNSET is not set",
        id="missing-env-var",
    ),
    pytest.param(
        '[gateway.http]\nallowed_hosts = ["${MCP_ARMOR_TEST_UNSET}"]\n',
        "[gateway.http] allowed_hosts.0: environment variable MCP_ARMOR_TEST_UNSET is not set",
        id="missing-env-var-in-gateway-http",
    ),
    pytest.param(
        '[upstreams.x]\ncommand = "a"\nenv = { TOKEN = "${1X}" }\n',
        "[upstreams.x] env.TOKEN: '${1X}' is not a valid variable reference",
        id="malformed-reference-in-upstream",
    ),
    pytest.param(
        '[upstreams.x]\ncommand = "a"\nenv = { T = "${MCP_ARMOR_TEST_UNSET}" }\ncomand = "b"\n',
        "[upstreams.x] comand: unknown key",
        id="unavailable-upstream-shape-still-checked",
    ),
    pytest.param(
        '[upstreams.x]\ncommand = "a"\nunavailable = "no"\n',
        "[upstreams.x] unavailable: unknown key",
        id="unavailable-key",
    ),
    pytest.param('own_variables = ["A"]\n', "top level own_variables: unknown key", id="own-variables-key"),
    pytest.param(
        '[gateway]\npass_env = ["AWS_*", "A-B"]\n',
        "[gateway] pass_env.1: 'A-B' is neither an environment variable name nor a glob of names",
        id="bad-pass-env-entry",
    ),
    pytest.param(
        '[upstreams.x]\nurl = "http://127.0.0.1:1/mcp"\npass_env = ["A"]\n',
        "[upstreams.x]: 'pass_env' applies to 'command' upstreams, not to 'url' ones",
        id="pass-env-on-url",
    ),
    pytest.param(
        '[gateway.http]\ntoken = "${MCP_ARMOR_TEST_SHORT}"\n',
        "[gateway.http] token: must be at least 16 characters",
        id="short-token-from-variable",
    ),
    pytest.param(
        '[upstreams.x]\ncommand = "a"\nargs = ["${env:TOKEN}"]\n',
        "[upstreams.x] args.0: '${env:TOKEN}' is not a valid variable reference",
        id="foreign-variable-syntax",
    ),
    pytest.param(
        '[upstreams.a]\ncommand = "a"\n[upstreams.a__b]\ncommand = "b"\n',
        "[upstreams.a__b] tools of upstreams 'a' and 'a__b' could be exposed under the same name (separator '__')",
        id="colliding-upstream-names",
    ),
    pytest.param(
        '[upstreams.a]\ncommand = "a"\n[upstreams.b]\ncommand = "b"\nprefix = "a__c"\n',
        "[upstreams.b] tools of upstreams 'a' and 'b' could be exposed under the same name (separator '__')",
        id="prefix-colliding-with-an-upstream-name",
    ),
    pytest.param(
        '[upstreams.a]\ncommand = "a"\nprefix = "p"\n[upstreams.b]\ncommand = "b"\nprefix = "p"\n',
        "[upstreams.b] tools of upstreams 'a' and 'b' could be exposed under the same name (separator '__')",
        id="shared-prefix",
    ),
    pytest.param(
        '[upstreams.a]\ncommand = "a"\nprefix = "no way"\n',
        '[upstreams.a] prefix: must be "" (names exposed as they are) or match',
        id="bad-prefix",
    ),
    pytest.param(
        '[upstreams.x]\nurl = "ftp://example.org/mcp"\n',
        "[upstreams.x]: 'url' must be an http:// or https:// URL, got 'ftp://example.org/mcp'",
        id="bad-url-scheme",
    ),
    pytest.param(
        '[upstreams.x]\ncommand = "a"\nenv = { N = 1 }\n',
        "[upstreams.x] env.N: Input should be a valid string",
        id="env-int",
    ),
    pytest.param(
        '[upstreams.x]\ncommand = "a"\nenabled = "yes"\n',
        "[upstreams.x] enabled: Input should be a valid boolean",
        id="enabled-string",
    ),
    pytest.param(
        '[upstreams.x]\ncommand = "a"\nheaders = { A = "b" }\n',
        "[upstreams.x]: 'headers' apply to 'url' upstreams, not to 'command' ones",
        id="headers-on-stdio",
    ),
    pytest.param(
        '[gateway]\ncall_timeout = "5"\n',
        '[gateway] call_timeout: expected a positive duration such as "500ms", "30s" or "2m", got \'5\'',
        id="duration-without-unit",
    ),
    pytest.param(
        '[gateway]\nseparator = "/"\n', "[gateway] separator: must be 1 to 8 of the characters", id="bad-separator"
    ),
    pytest.param(
        '[gateway.http]\ntoken = ""\n', "[gateway.http] token: must be at least 16 characters", id="empty-token"
    ),
    pytest.param('[upstreams.x\ncommand = "a"\n', "not valid TOML", id="toml-syntax"),
]


@pytest.mark.parametrize(("text", "message"), CASES)
def test_malformed_config_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"MCP_ARMOR_TEST_SHORT": "short"})
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith(f"{path}: ")
    assert message in line


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"upstreams\.toml: file not found"):
        load_config(tmp_path / "upstreams.toml")


def test_interpolation_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "upstreams.toml"
    path.write_text(
        '[upstreams.local]\ncommand = "./bin/server"\ncwd = "data"\nargs = ["--token", "${TOKEN}", "$${LITERAL}"]\n'
        '[upstreams.remote]\nurl = "https://example.org/mcp"\nheaders = { Authorization = "Bearer ${TOKEN}" }\n'
        'timeout = "500ms"\n[upstreams.defaults]\ncommand = "x"\n'
        'env = { A = "${UNSET:-fallback}", B = "${EMPTY:-fallback}", C = "${TOKEN:-fallback}", D = "${UNSET:-}" }\n'
    )
    config = load_config(path, environ={"TOKEN": "s3cret", "EMPTY": ""})
    assert config.upstreams["defaults"].env == {"A": "fallback", "B": "fallback", "C": "s3cret", "D": ""}
    local = config.upstreams["local"]
    assert local.command == str(tmp_path / "sub" / "bin" / "server")
    assert local.cwd == tmp_path / "sub" / "data"
    assert local.args == ("--token", "s3cret", "${LITERAL}")
    assert config.upstreams["remote"].headers == {"Authorization": "Bearer s3cret"}
    assert config.call_timeout("remote") == 0.5
    assert config.call_timeout("local") == 60.0
    assert config.state_dir == tmp_path / "sub" / ".mcp-armor"


def test_the_early_reading_starts_what_the_full_reading_would(tmp_path: Path) -> None:
    """`serve` starts command upstreams from the file before validating it; for a valid file that
    is exactly the start the validated config asks for (same command, args, env, directory, log, and
    the same variables inherited); an upstream whose variable is not set is started by neither."""
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "upstreams.toml"
    path.write_text(
        '[gateway]\nstate = "${STATE:-run}"\npass_env = ["AWS_*", "CORP_CA"]\n'
        '[gateway.http]\ntoken = "${GATEWAY_TOKEN}"\n'
        '[upstreams.local]\ncommand = "./bin/server"\ncwd = "data"\nargs = ["--token", "${TOKEN}", "$${LITERAL}"]\n'
        '[upstreams.bare]\ncommand = "server"\nenv = { A = "${UNSET:-fallback}", B = "${TOKEN}" }\n'
        'pass_env = ["PYTHONPATH"]\n'
        '[upstreams.absolute]\ncommand = "/usr/bin/env"\ncwd = "/tmp"\ntimeout = "2s"\n'
        '[upstreams.off]\ncommand = "server"\nenabled = false\n'
        '[upstreams.remote]\nurl = "https://example.org/mcp"\n'
        '[upstreams.needy]\ncommand = "server"\nenv = { GITHUB_TOKEN = "${GITHUB_TOKEN}" }\n'
    )
    environ = {"TOKEN": "s3cret"}
    config = load_config(path, environ=environ)
    early = {start.name: start for start in early_starts(path, environ)}
    startable = {spec.name for spec in config.enabled_upstreams() if spec.command is not None and not spec.unavailable}
    assert set(early) == startable == {"local", "bare", "absolute"}
    for name, start in early.items():
        spec = config.upstreams[name]
        assert (start.command, tuple(start.args), start.env, start.cwd) == (spec.command, spec.args, spec.env, spec.cwd)
        assert start.log == config.log_path(name)
        assert start.passing == config.passing(name)
    assert early["local"].log == tmp_path / "sub" / "run" / "logs" / "local.log"
    # bare takes TOKEN itself; needy's GITHUB_TOKEN reaches it only if named exactly; the HTTP token's
    # variable is withheld, STATE (a path, no secret) is not
    assert early["bare"].passing == Passing(
        ("AWS_*", "CORP_CA", "PYTHONPATH"), frozenset({"GATEWAY_TOKEN"}), frozenset({"GITHUB_TOKEN"})
    )


UNSET = "MCP_ARMOR_TEST_UNSET"


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ('command = "a"\nenv = { GITHUB_TOKEN = "${VAR}" }', "env.GITHUB_TOKEN"),
        ('url = "https://example.org/mcp"\nheaders = { Authorization = "Bearer ${VAR}" }', "headers.Authorization"),
        ('command = "a"\nargs = ["--token", "${VAR}"]', "args.1"),
        ('url = "${VAR}/mcp"', "url"),
        ('command = "${VAR}"', "command"),
        ('command = "a"\ncwd = "${VAR}/data"', "cwd"),
        ('command = "a"\ntimeout = "${VAR}"', "timeout"),
        ('command = "a"\npass_env = ["AWS_*", "${VAR}"]', "pass_env.1"),
        ('command = "a"\nenabled = "${VAR}"', "enabled"),
        ('url = "https://example.org/mcp"\npinning = "${VAR}"', "pinning"),
    ],
)
def test_an_upstream_whose_variable_is_not_set_is_unavailable_and_the_others_are_read(
    tmp_path: Path, table: str, where: str
) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(f'[upstreams.git]\n{table.replace("VAR", UNSET)}\n[upstreams.time]\ncommand = "t"\n')
    config = load_config(path, environ={})
    assert config.upstreams["git"].unavailable == (
        f"environment variable {UNSET} is not set (in [upstreams.git] {where})"
    )
    assert config.upstreams["time"].unavailable is None
    assert [spec.name for spec in config.enabled_upstreams()] == ["git", "time"]
    assert [start.name for start in early_starts(path, {})] == ["time"]


def test_a_typed_key_takes_its_variable_when_set_and_is_still_checked(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text('[upstreams.git]\ncommand = "a"\ntimeout = "${T}"\npass_env = ["${P}"]\n')
    config = load_config(path, environ={"T": "5s", "P": "GIT_AUTHOR_NAME"})
    assert config.call_timeout("git") == 5.0 and config.upstreams["git"].pass_env == ("GIT_AUTHOR_NAME",)
    with pytest.raises(ConfigError, match=r"\[upstreams.git\] timeout: expected a positive duration"):
        load_config(path, environ={"T": "soon", "P": "X"})


def test_referring_to_default_variables_withholds_and_guards_none_of_them(tmp_path: Path) -> None:
    """HOME, PATH and the other default variables reach every upstream whoever refers to them; only the
    `[gateway.http]` values' variables are withheld, not those of paths such as `state`; and both readings agree."""
    path = tmp_path / "upstreams.toml"
    path.write_text(
        '[gateway]\nstate = "${HOME}/${STATE_DIR}"\naudit = "${AUDIT_DB}"\n'
        '[gateway.http]\ntoken = "${GATEWAY_TOKEN}"\nallowed_hosts = ["${GATEWAY_HOST}:8765"]\n'
        '[upstreams.a]\ncommand = "a"\nenv = { PATH = "${PATH}:/opt/a/bin", KEY = "${A_KEY}", L = "${LC_ALL}" }\n'
        '[upstreams.b]\ncommand = "b"\n'
    )
    environ = {"HOME": "/home/ann", "STATE_DIR": "s", "AUDIT_DB": "a.db", "GATEWAY_HOST": "h", "PATH": "/bin"}
    environ |= {"A_KEY": "k", "LC_ALL": "C"}
    config = load_config(path, environ=environ)
    early = {start.name: start.passing for start in early_starts(path, environ)}
    assert early == {name: config.passing(name) for name in ("a", "b")}
    assert early["b"] == Passing((), frozenset({"GATEWAY_TOKEN", "GATEWAY_HOST"}), frozenset({"A_KEY"}))
    assert early["a"] == Passing((), frozenset({"GATEWAY_TOKEN", "GATEWAY_HOST"}), frozenset())


def test_serving_http_without_its_token_starts_nothing_early(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text('[gateway.http]\ntoken = "${GATEWAY_TOKEN}"\n[upstreams.a]\ncommand = "a"\n')
    assert early_starts(path, {}, serving_http=True) == []
    assert [start.name for start in early_starts(path, {})] == ["a"]
    assert [start.name for start in early_starts(path, {"GATEWAY_TOKEN": "t" * 20}, serving_http=True)] == ["a"]
    # a token too short to serve with refuses serving just the same: nothing starts for it
    assert early_starts(path, {"GATEWAY_TOKEN": "short"}, serving_http=True) == []
    assert [start.name for start in early_starts(path, {"GATEWAY_TOKEN": "short"})] == ["a"]


def test_the_first_unset_variable_is_the_reason_and_a_set_one_makes_it_available(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text('[upstreams.git]\ncommand = "a"\nargs = ["${FIRST}"]\nenv = { B = "${SECOND}" }\n')
    reason = load_config(path, environ={}).upstreams["git"].unavailable
    assert reason == "environment variable FIRST is not set (in [upstreams.git] args.0)"
    assert load_config(path, environ={"FIRST": "1", "SECOND": "2"}).upstreams["git"].unavailable is None


@pytest.mark.parametrize("placeholder", ["${VAR}", "$VAR", "${env:VAR}"])
def test_a_variable_set_to_its_own_reference_is_not_set(tmp_path: Path, placeholder: str) -> None:
    """What a client that leaves an unset variable's reference as written (Gemini CLI) hands the gateway."""
    path = tmp_path / "upstreams.toml"
    path.write_text(
        '[gateway]\nstate = "${STATE:-.state}"\n'
        '[upstreams.gh]\ncommand = "gh"\nenv = { GITHUB_TOKEN = "${GITHUB_TOKEN}" }\n'
        '[upstreams.box]\ncommand = "box"\nenv = { LEVEL = "${LEVEL:-info}" }\n'
    )
    environ = {name: placeholder.replace("VAR", name) for name in ("STATE", "GITHUB_TOKEN", "LEVEL")}
    config = load_config(path, environ=environ)
    assert config.upstreams["gh"].unavailable == (
        "environment variable GITHUB_TOKEN is not set (in [upstreams.gh] env.GITHUB_TOKEN)"
    )
    assert config.upstreams["box"].env == {"LEVEL": "info"}
    assert config.state_dir == tmp_path / ".state"
    assert [start.name for start in early_starts(path, environ)] == ["box"]

    # Another variable's reference, or one inside a longer value, is a value like any other.
    config = load_config(path, environ={"GITHUB_TOKEN": "${LEVEL}", "LEVEL": "x${LEVEL}"})
    assert config.upstreams["gh"].env == {"GITHUB_TOKEN": "${LEVEL}"}
    assert config.upstreams["box"].env == {"LEVEL": "x${LEVEL}"}

    # In a [gateway] value it is an error, as when the variable is not there at all.
    path.write_text('[gateway]\nstate = "${STATE}"\n')
    with pytest.raises(ConfigError, match="environment variable STATE is not set"):
        load_config(path, environ=environ)


def test_the_http_token_is_needed_by_serving_http_alone(tmp_path: Path) -> None:
    """An unset token variable leaves the token out and says why, instead of failing every command."""
    path = tmp_path / "upstreams.toml"
    path.write_text('[gateway.http]\ntoken = "${ARMOR_TOKEN}"\nallowed_hosts = ["h:1"]\n')
    unset = load_config(path, environ={})
    assert unset.gateway.http.token is None and unset.gateway.http.allowed_hosts == ("h:1",)
    assert unset.token_unset == (
        f"{path}: [gateway.http] token: environment variable ARMOR_TOKEN is not set (`serve --http` needs it)"
    )
    assert unset.own_variables == {"ARMOR_TOKEN"}
    token = "t" * 20
    found = load_config(path, environ={"ARMOR_TOKEN": token})
    assert found.gateway.http.token == token and found.token_unset is None


def test_a_stand_in_reads_for_unset_gateway_variables_only(tmp_path: Path) -> None:
    raw = {"gateway": {"state": "${STATE}"}, "upstreams": {"x": {"command": "a", "env": {"A": "${A}"}}}}
    config = parse_config(raw, tmp_path / "upstreams.toml", label="f", environ={}, stand_in="placeholder")
    assert config.state_dir == tmp_path / "placeholder"
    assert config.upstreams["x"].unavailable == "environment variable A is not set (in [upstreams.x] env.A)"


@pytest.mark.parametrize(
    "text",
    [
        "[upstreams.x]\ncommand = 3\n",
        '[upstreams.x]\ncommand = ""\n',
        '[upstreams.x]\ncommand = "a"\nargs = ["b", 1]\n',
        '[upstreams.x]\ncommand = "a"\nenv = ["A=1"]\n',
        '[upstreams.x]\ncommand = "a"\ncwd = 1\n',
        '[upstreams.x]\ncommand = "a"\nurl = "http://127.0.0.1:1/mcp"\n',
        '[upstreams.x]\ncommand = "a"\nenabled = "yes"\n',
        '[upstreams.X]\ncommand = "a"\n',
        '[gateway]\nstate = 1\n[upstreams.x]\ncommand = "a"\n',
        "upstreams = 1\n",
    ],
)
def test_the_early_reading_starts_nothing_from_a_table_of_the_wrong_shape(tmp_path: Path, text: str) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text(text)
    assert early_starts(path, {}) == []


def test_stdio_cwd_defaults_to_config_directory(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text('[upstreams.x]\ncommand = "server"\n')
    assert load_config(path).upstreams["x"].cwd == tmp_path


def test_config_models_are_frozen(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text('[upstreams.x]\ncommand = "server"\n')
    config = load_config(path)
    with pytest.raises(ValueError, match="frozen"):
        config.upstreams["x"].command = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), ("30d", 2592000.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0s", "5", "-1s", "1w", 5])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="expected a positive duration"):
        parse_duration(text)


def test_the_audit_log_defaults_beside_the_config_and_may_be_moved(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text("")
    assert load_config(path, environ={}).audit_path == tmp_path / ".mcp-armor" / "audit.db"
    path.write_text('[gateway]\naudit = "logs/a.db"\n')
    assert load_config(path, environ={}).audit_path == tmp_path / "logs" / "a.db"
    path.write_text('[gateway]\naudit = ":memory:"\n')
    assert str(load_config(path, environ={}).audit_path) == ":memory:"


def test_an_empty_prefix_is_accepted_beside_any_upstream_name(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.toml"
    path.write_text('[upstreams.a]\ncommand = "a"\nprefix = ""\n[upstreams.b]\ncommand = "b"\nprefix = ""\n')
    config = load_config(path)
    assert config.prefixes == {"a": "", "b": ""}
    path.write_text('[upstreams.a]\ncommand = "a"\n[upstreams.b]\ncommand = "b"\nprefix = "other"\n')
    assert load_config(path).prefixes == {"a": "a", "b": "other"}
