"""`upstreams.toml` parsed into typed, frozen models; every check happens here, at load time.

A malformed file raises `ConfigError` with one line naming the file, the table and the key. `${VAR}`
in any string value is taken from the gateway's environment, `${VAR:-default}` falls back to
`default` when VAR is unset or empty, and `$${` writes a literal `${`. A missing variable without a
default makes the upstream whose table takes it unavailable (the others are served), leaves
`[gateway.http] token` out for `serve --http` to refuse, and is an error naming it anywhere else.
Relative paths resolve against the directory of the file, never the current directory: agent
clients start the gateway from anywhere.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.config.environment import Passing, passed_by_default
from gateway.config.source import (
    DEFAULT_STATE,
    ENV_NAME,
    MIN_TOKEN_LENGTH,
    PASS_ENV_ENTRY,
    PRINCIPAL_MARK,
    UPSTREAM_NAME,
    location,
    log_directory,
    log_file,
    passing_for,
    placement,
    read_toml,
    read_variables,
    variables,
)
from gateway.errors import ConfigError

IN_MEMORY = ":memory:"
SEPARATOR = re.compile(r"^[A-Za-z0-9_.-]{1,8}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB)\s*$")
_UNIT_BYTES = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_duration(value: object) -> float:
    """`"500ms"`, `"30s"`, `"2m"`, `"1h"`, `"30d"` -> seconds."""
    if isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
        if seconds > 0:
            return seconds
    raise ValueError(f'expected a positive duration such as "500ms", "30s" or "2m", got {value!r}')


Duration = Annotated[float, BeforeValidator(parse_duration)]


def parse_size(value: object) -> int:
    """`"512KB"`, `"64MB"`, `"1GB"` (multiples of 1024), or a number of bytes -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(match[1]) * _UNIT_BYTES[match[2]]
        if size > 0:
            return size
    raise ValueError(f'expected a positive size such as "512KB", "64MB" or "1GB", got {value!r}')


Size = Annotated[int, BeforeValidator(parse_size)]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]


def _pass_env_entry(value: str) -> str:
    if not PASS_ENV_ENTRY.match(value):
        raise ValueError(f'{value!r} is neither an environment variable name nor a glob of names (such as "AWS_*")')
    return value


PassEnv = tuple[Annotated[StrictStr, AfterValidator(_pass_env_entry)], ...]
"""Variables of the gateway's environment an upstream also inherits: names, or globs of names."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
"""The JWS algorithms an access token may be signed with: public-key ones only. `none` is no signature,
and an HMAC algorithm (`HS256`...) checked against an issuer's public key lets anyone who has that
public key sign (the algorithm confusion attack)."""
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
"""A scope name as RFC 6749 section 3.3 allows it (printable ASCII but space, `"` and `\\`)."""


def served_url(value: str) -> str:
    """An https URL, or an http one on a loopback host (a local issuer, a test); no fragment, and nothing
    that could break out of a quoted `WWW-Authenticate` parameter."""
    parts = urlsplit(value)
    if any(char in value for char in '"\\') or any(char.isspace() or ord(char) < 0x20 for char in value):
        raise ValueError(f"{value!r} is not a URL (it holds a quote, a backslash or white space)")
    if parts.scheme == "https" and parts.hostname:
        loopback = True
    elif parts.scheme == "http" and parts.hostname:
        loopback = parts.hostname == "localhost"
        with contextlib.suppress(ValueError):
            loopback = loopback or ipaddress.ip_address(parts.hostname).is_loopback
    else:
        raise ValueError(f"{value!r} is not an absolute https URL")
    if not loopback:
        raise ValueError(f"{value!r} must be https (plain http only on a loopback host)")
    if parts.fragment or parts.query:
        raise ValueError(f"{value!r} must have no query and no fragment")
    return value


ServedUrl = Annotated[StrictStr, AfterValidator(served_url)]


class OAuthSettings(_Model):
    """`[gateway.http.oauth]`: accept OAuth 2.1 access tokens (JWTs) from one authorization server, as
    the MCP authorization spec asks of a resource server."""

    issuer: ServedUrl
    """The authorization server: a token's `iss` must equal it exactly."""
    audience: ServedUrl
    """The gateway's resource URL as clients reach it (e.g. `https://gw.example/mcp`): a token's `aud` must
    hold it (RFC 8707). Required: behind a proxy the gateway cannot know the URL clients use."""
    jwks_uri: ServedUrl | None = None
    """Where the issuer's signing keys are; by default found in its authorization server metadata."""
    principal_claim: StrictStr = "sub"
    scope_claim: StrictStr = "scope"
    """A space-separated string (`scope`) or a list of names (`scp`); `scp` is read when this is absent."""
    groups_claim: StrictStr = "groups"
    algorithms: tuple[StrictStr, ...] = ASYMMETRIC_ALGORITHMS
    leeway: Duration = 30.0
    """Clock skew tolerated on `exp`, `nbf` and `iat`."""
    scopes_required: tuple[StrictStr, ...] = ()
    """Scopes every token must carry; one lacking any is answered 403 `insufficient_scope`."""

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        refused = [name for name in value if name not in ASYMMETRIC_ALGORITHMS]
        if refused:
            raise ValueError(
                f"{', '.join(map(repr, refused))} not accepted: only public-key algorithms "
                f"({', '.join(ASYMMETRIC_ALGORITHMS)}); 'none' is no signature, and HMAC (HS*) "
                "checked with the issuer's public key lets anyone sign"
            )
        if not value:
            raise ValueError("name at least one algorithm")
        return value

    @field_validator("leeway")
    @classmethod
    def _small_leeway(cls, value: float) -> float:
        if value > 300:
            raise ValueError("at most 5m: it is clock skew, not a grace period for expired tokens")
        return value

    @field_validator("scopes_required")
    @classmethod
    def _scope_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _SCOPE_TOKEN.match(name):
                raise ValueError(f"{name!r} is not a scope name (printable ASCII, no space, quote or backslash)")
        return value

    @field_validator("principal_claim", "scope_claim", "groups_claim")
    @classmethod
    def _claim_named(cls, value: str) -> str:
        if not value:
            raise ValueError("must name a claim")
        return value


class HttpSettings(_Model):
    """`[gateway.http]`: the streamable HTTP front door (`mcp-armor serve --http`)."""

    token: str | None = None
    """Bearer token every HTTP request must carry; `None` serves without authentication."""
    allowed_origins: tuple[str, ...] = ()
    """Extra `Origin` values accepted besides the loopback ones (e.g. `"https://app.example"`)."""
    allowed_hosts: tuple[str, ...] = ()
    """Extra `Host` values accepted besides the bound address (e.g. `"gateway.internal:8765"`)."""
    session_idle_timeout: Duration = 1800.0
    """A handshake-era session with no request in flight for this long is closed (and its end recorded)."""
    oauth: OAuthSettings | None = None
    """Accept access tokens from an OAuth authorization server (`[gateway.http.oauth]`)."""
    tls_certificate: Path | None = None
    """PEM certificate (chain) to serve HTTPS with, relative to this file; with `tls_key`, or neither."""
    tls_key: Path | None = None
    """PEM private key (unencrypted) of `tls_certificate`, relative to this file."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks (`"10.0.0.0/8"`) of the proxies whose `Forwarded` / `X-Forwarded-For` names the client."""

    @field_validator("token")
    @classmethod
    def _token_not_empty(cls, value: str | None) -> str | None:
        if value is not None and len(value) < MIN_TOKEN_LENGTH:
            raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} characters (an empty or short token guards nothing)")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            try:
                network = ipaddress.ip_network(value)
            except ValueError:
                try:
                    meant = ipaddress.ip_network(value, strict=False)
                except ValueError:
                    raise ValueError(f"{value!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
                raise ValueError(f"{value!r} has host bits set (the network is {meant})") from None
            if network.prefixlen == 0:
                raise ValueError(f"{value!r} trusts every address: any client could choose the address recorded")
        return values

    @model_validator(mode="after")
    def _both_tls_files(self) -> Self:
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ValueError("give both tls_certificate and tls_key (HTTPS), or neither")
        return self


class ApprovalSettings(_Model):
    """`[gateway.approvals]`: where a person is asked to approve an `ask` call."""

    via: tuple[Literal["client", "queue"], ...] = ("client", "queue")
    """`client`: the agent's client's elicitation, where it has one; `queue`: the approval queue
    (`mcp-armor approvals`, the console). With both, the first decision wins."""
    queue: Literal["always", "fallback"] = "always"
    """`always`: a call waits in the queue even while the client asks; `fallback`: only when the client cannot."""
    notify: str | None = None
    """An `http(s)://` address POSTed a JSON notice (Slack/Teams `text` and the call) when an approval waits."""
    notify_headers: Mapping[str, StrictStr] = Field(default_factory=dict)
    """Headers sent with each notice (an `Authorization`, say); `${VAR}` is read from the environment."""
    console_url: str | None = None
    """The console's address, for the link a notice carries (e.g. `"https://gateway.internal:8443/console"`)."""

    @field_validator("via")
    @classmethod
    def _some_channel(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        if not values:
            raise ValueError('name at least one of "client", "queue" (no channel: every ask would be refused)')
        if len(set(values)) != len(values):
            raise ValueError("names a channel twice")
        return values

    @field_validator("notify", "console_url")
    @classmethod
    def _http_address(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/?#]+", value):
            raise ValueError("is not an http:// or https:// address (not repeated here: it may hold a secret)")
        return value

    @field_validator("notify_headers")
    @classmethod
    def _sendable_headers(cls, values: Mapping[str, str]) -> Mapping[str, str]:
        # Checked here, not when a notice is sent: a value carries a secret, so it is never quoted.
        for name, value in values.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not an HTTP header name")
            if not re.fullmatch(r"[\x20-\x7e\t]*", value):
                raise ValueError(f"the value of {name!r} has a character no header can carry (non-ASCII, line break)")
        return values


class GatewaySettings(_Model):
    """`[gateway]`: settings of the gateway itself."""

    name: str = "mcp-armor"
    separator: str = "__"
    call_timeout: Duration = 60.0
    startup_timeout: Duration = 10.0
    state: Path = Path(DEFAULT_STATE)
    policies: Path = Path("policies")
    """Directory of the policy files (`*.toml`), relative to this file."""
    mode: Literal["enforce", "monitor"] = "enforce"
    """`monitor` records what policy would refuse or ask, and lets every call through."""
    ask_timeout: Duration = 120.0
    """How long a person has to approve an `ask` call before it is refused."""
    audit: Path | None = None
    """The audit database, relative to this file; `STATE/audit.db` when unset; `":memory:"` keeps
    it in memory only (for trials and benchmarks: nothing survives the process)."""
    store: str | None = None
    """A PostgreSQL database shared by gateway replicas (`postgresql://user:${PASSWORD}@host:port/name`):
    the audit log, approval queue, rate-limit counts, session records and approval keys live there
    instead of in the state directory's SQLite files (gateway.store)."""
    audit_sync: Literal["normal", "full"] = "normal"
    """`normal`: a committed event survives the gateway crashing or being killed; `full`: also power loss."""
    audit_anchor: str | None = None
    """The file the audit log's head is appended to for `audit verify`, relative to this file and outside
    the state directory; by default one per log under `$XDG_STATE_HOME/mcp-armor/anchors/`; "off": none."""
    audit_anchor_command: tuple[str, ...] = ()
    """A command (no shell) given each anchor line on stdin, to ship it off the host (`["logger", ...]`)."""
    audit_anchor_interval: Duration = 60.0
    """How often the head is anchored while it moves (also when a session ends, and at shutdown)."""
    pinning: Literal["enforce", "warn", "off"] = "enforce"
    """Upstream definitions held against `upstreams.lock` and the poisoning scan: `enforce` quarantines
    what is new, changed or poisoned; `warn` only reports it; `off` checks nothing."""
    http: HttpSettings = HttpSettings()
    approvals: ApprovalSettings = ApprovalSettings()
    pass_env: PassEnv = ()
    """What every command upstream inherits besides the default variables (gateway.config.environment)."""
    max_message_size: Size = 64 * 1024**2
    """The largest message a client may send (a stdio line, an HTTP request body); larger is refused."""
    max_upstream_message_size: Size = 64 * 1024**2
    """The largest message an upstream may send (a stdio line, an HTTP answer, one event of a stream); a
    larger answer fails the call it answers."""
    max_calls_in_flight: PositiveInt = 1024
    """Requests served at once, over every session; one more is refused as busy (and recorded)."""
    max_calls_per_session: PositiveInt = 256
    """Requests served at once for one session; one more is refused as busy (and recorded)."""

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, _, rest = value.partition("://")
        if scheme not in ("postgresql", "postgres") or not rest:
            raise ValueError("must be a PostgreSQL URL: postgresql://user:${PASSWORD}@host:port/database")
        return value

    @field_validator("separator")
    @classmethod
    def _check_separator(cls, value: str) -> str:
        if not SEPARATOR.match(value):
            raise ValueError("must be 1 to 8 of the characters A-Z a-z 0-9 _ . -")
        return value


_GLOB = frozenset("*?[")
MAX_PRINCIPAL_NAME = 256
_NAME_FIRST, _NAME_NEXT = "[A-Za-z0-9]", "[A-Za-z0-9_.@-]"
PRINCIPAL_NAME = re.compile(rf"^{_NAME_FIRST}{_NAME_NEXT}{{0,63}}$")
"""A name `principal add` gives a principal (and a role): an upstream's characters and `.` `@` (an e-mail
address, `ci.nightly`)."""
_NAMEABLE = re.compile(rf"{_NAME_FIRST}{_NAME_NEXT}*")
"""A principal name `${principal.name}` is read as: the characters `principal add` allows, none of which
separates a path, a cookie or a list where the value lands (of any length: an access token's name can be
longer)."""


def _principal_name(name: str) -> str:
    """A principal table's name: the one principal it is for, as the gateway authenticates it."""
    if not name or len(name) > MAX_PRINCIPAL_NAME:
        raise ValueError(f"principals: {name!r} is not a principal's name (1 to {MAX_PRINCIPAL_NAME} characters)")
    if not name.isprintable():
        raise ValueError(f"principals: {name!r} holds a control character, which no principal's name does")
    if _GLOB & set(name):
        raise ValueError(f"principals: {name!r}: a table is for one principal, named exactly (not a glob)")
    return name


class PrincipalCredentials(_Model):
    """`[upstreams.NAME.principals.PRINCIPAL]`: what one principal's calls to the upstream run with, over
    (and instead of) the upstream's own `headers` (a URL upstream) or `env` (a command upstream)."""

    headers: Mapping[str, StrictStr] = Field(default_factory=dict)
    env: Mapping[str, StrictStr] = Field(default_factory=dict)


class UpstreamSpec(_Model):
    """`[upstreams.NAME]`: one upstream MCP server, reached over stdio (`command`) or HTTP (`url`)."""

    name: str
    prefix: StrictStr | None = None
    """What this upstream's tool and prompt names are exposed under (`<prefix><separator><name>`); its
    name when unset; `""` exposes them as they are (a name another upstream also exposes is withheld)."""
    command: str | None = None
    args: tuple[StrictStr, ...] = ()
    env: Mapping[str, StrictStr] = Field(default_factory=dict)
    cwd: Path | None = None
    url: str | None = None
    headers: Mapping[str, StrictStr] = Field(default_factory=dict)
    enabled: StrictBool = True
    timeout: Duration | None = None
    """Per-call timeout; `[gateway] call_timeout` when unset."""
    pinning: Literal["enforce", "warn", "off"] | None = None
    """This upstream's pinning mode; `[gateway] pinning` when unset."""
    pass_env: PassEnv = ()
    """What this command upstream inherits besides the default variables and `[gateway] pass_env`."""
    principals: Mapping[str, PrincipalCredentials] = Field(default_factory=dict)
    """Per principal, the `headers` or `env` its calls run with: the upstream is then served per principal
    (`per_principal`), and a principal without a table is refused unless the upstream's own values name
    the caller (`${principal.name}`)."""
    unavailable: str | None = None
    """Set by the reading, never written: why the upstream cannot be started (a variable its table
    takes is not set). Its values are then unknown: only the table's shape is checked."""

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str | None) -> str | None:
        if value and not UPSTREAM_NAME.match(value):
            raise ValueError(f'must be "" (names exposed as they are) or match {UPSTREAM_NAME.pattern}')
        return value

    @model_validator(mode="after")
    def _one_transport(self) -> Self:
        if (self.command is None) == (self.url is None):
            raise ValueError("give either 'command' (stdio) or 'url' (streamable HTTP), not both and not neither")
        if self.url is not None:
            if self.args or self.env or self.cwd is not None:
                raise ValueError("'args', 'env' and 'cwd' apply to 'command' upstreams, not to 'url' ones")
            if self.pass_env:
                raise ValueError("'pass_env' applies to 'command' upstreams, not to 'url' ones")
            parts = urlsplit(self.url)
            if self.unavailable is None and (parts.scheme not in ("http", "https") or not parts.netloc):
                raise ValueError(f"'url' must be an http:// or https:// URL, got {self.url!r}")
        elif self.headers:
            raise ValueError("'headers' apply to 'url' upstreams, not to 'command' ones")
        elif not self.command and self.unavailable is None:
            raise ValueError("'command' must not be empty")
        for key in self.env:
            if not ENV_NAME.match(key):
                raise ValueError(f"env: {key!r} is not a valid environment variable name")
        for principal, own in self.principals.items():
            _principal_name(principal)
            if self.url is not None and own.env:
                raise ValueError(f"principals.{principal}.env: applies to 'command' upstreams; give 'headers'")
            if self.command is not None and own.headers:
                raise ValueError(f"principals.{principal}.headers: apply to 'url' upstreams; give 'env'")
            for key in own.env:
                if not ENV_NAME.match(key):
                    raise ValueError(f"principals.{principal}.env: {key!r} is not a valid environment variable name")
        return self

    @property
    def names_principal(self) -> bool:
        """Whether the upstream's own `headers` or `env` name the calling principal (`${principal.name}`)."""
        return any(PRINCIPAL_MARK in value for value in (*self.headers.values(), *self.env.values()))

    @property
    def per_principal(self) -> bool:
        """Whether each principal's calls run on a connection (or process) of their own, with their values."""
        return bool(self.principals) or self.names_principal

    def refusal(self, principal: str) -> str | None:
        """Why a call of `principal` ("": an unauthenticated caller) cannot run on this upstream; `None`
        when it can. A per-principal upstream never runs a call on another principal's (or a shared)
        connection: a caller it has no values for is refused."""
        if not self.per_principal:
            return None
        if not principal:
            return (
                f"upstream '{self.name}' runs each call with the calling principal's own credentials, and this "
                "caller is not authenticated as a principal"
            )
        if principal not in self.principals and not self.names_principal:
            return (
                f"upstream '{self.name}' has no credentials for principal '{principal}' "
                f"(no [upstreams.{self.name}.principals.{principal}] table)"
            )
        if not principal.isprintable():
            return f"upstream '{self.name}' cannot carry the name of principal {principal!r} (a control character)"
        if self._names(principal) and (not _NAMEABLE.fullmatch(principal) or ".." in principal):
            # An access token's name can hold anything printable; in a value it could climb a path
            # (`x/../alice`) or add a cookie or list item (`bob; admin=1`).
            return (
                f"upstream '{self.name}' cannot carry the name of principal {principal!r} in ${{principal.name}} "
                "(only letters, digits and _ . @ -, beginning with a letter or digit, never '..')"
            )
        return None

    def _names(self, principal: str) -> bool:
        """Whether the values `principal`'s calls run with hold its name (`${principal.name}`)."""
        own = self.principals.get(principal, PrincipalCredentials())
        return self.names_principal or any(
            PRINCIPAL_MARK in value for value in (*own.headers.values(), *own.env.values())
        )

    def for_principal(self, principal: str) -> UpstreamSpec:
        """The upstream as `principal`'s calls run it: its own values, then the principal's table over them,
        `${principal.name}` read as the principal's name."""
        own = self.principals.get(principal, PrincipalCredentials())

        def named(values: Mapping[str, str]) -> dict[str, str]:
            return {key: value.replace(PRINCIPAL_MARK, principal) for key, value in values.items()}

        # Header names are case-insensitive: the principal's replaces the upstream's however either is spelt.
        replaced = {key.lower() for key in own.headers}
        headers = {key: value for key, value in self.headers.items() if key.lower() not in replaced}
        update = {"headers": named({**headers, **own.headers}), "env": named({**self.env, **own.env})}
        return self.model_copy(update={**update, "principals": {}})

    def for_catalogue(self) -> UpstreamSpec:
        """The upstream as it is listed: its own values, those naming the principal left out (no principal
        calls it), and no principal's table."""
        if not self.per_principal:
            return self

        def unnamed(values: Mapping[str, str]) -> dict[str, str]:
            return {key: value for key, value in values.items() if PRINCIPAL_MARK not in value}

        update = {"headers": unnamed(self.headers), "env": unnamed(self.env), "principals": {}}
        return self.model_copy(update=update)

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "http"


class Config(_Model):
    """The whole of `upstreams.toml`, with paths made absolute."""

    path: Path
    gateway: GatewaySettings = GatewaySettings()
    upstreams: Mapping[str, UpstreamSpec] = Field(default_factory=dict)
    own_variables: frozenset[str] = frozenset()
    """Set by the reading: the variables `[gateway.http]` values are taken from, never passed to an upstream."""
    upstream_variables: Mapping[str, frozenset[str]] = Field(default_factory=dict)
    """Set by the reading: the variables each upstream's table takes, passed to no other upstream unless
    it names one exactly in `pass_env`."""
    principal_variables: Mapping[str, Mapping[str, frozenset[str]]] = Field(default_factory=dict)
    """Set by the reading: per upstream, per principal table, the variables that table alone takes (its
    principal's credentials), passed to no other principal's process of that upstream."""
    token_unset: str | None = None
    """Set by the reading: why `[gateway.http] token` is missing (its variable is not set), the line
    `serve --http` refuses to start with."""

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def state_dir(self) -> Path:
        return self.directory / self.gateway.state

    @property
    def policy_dir(self) -> Path:
        return self.directory / self.gateway.policies

    @property
    def audit_path(self) -> Path:
        audit = self.gateway.audit
        if audit is not None and str(audit) == IN_MEMORY:
            return audit
        return self.directory / audit if audit is not None else self.state_dir / "audit.db"

    @property
    def principals_path(self) -> Path:
        """The named principals and their tokens' hashes (`mcp-armor principal`), in the state directory."""
        return self.state_dir / "principals.db"

    @property
    def approvals_path(self) -> Path:
        """The approval queue (`mcp-armor approvals`, the console), in the state directory."""
        return self.state_dir / "approvals.db"

    @property
    def lock_path(self) -> Path:
        return self.directory / "upstreams.lock"

    @property
    def prefixes(self) -> Mapping[str, str]:
        """Each upstream's exposed-name prefix (`UpstreamSpec.prefix`): its name unless set."""
        return {name: spec.name if spec.prefix is None else spec.prefix for name, spec in self.upstreams.items()}

    def pinning(self, upstream: str) -> str:
        spec = self.upstreams[upstream]
        return spec.pinning if spec.pinning is not None else self.gateway.pinning

    @property
    def log_dir(self) -> Path:
        return log_directory(self.state_dir)

    def log_path(self, upstream: str) -> Path:
        """Where an upstream's stderr goes."""
        return log_file(self.state_dir, upstream)

    def enabled_upstreams(self) -> list[UpstreamSpec]:
        return [spec for spec in self.upstreams.values() if spec.enabled]

    def passing(self, upstream: str, principal: str | None = None) -> Passing:
        """Which of the gateway's environment variables a command upstream inherits: its process for
        `principal` (`None`: the one it is listed with) never those only another principal's table takes."""
        names = (*self.gateway.pass_env, *self.upstreams[upstream].pass_env)
        passing = passing_for(upstream, names, self.own_variables, self.upstream_variables)
        tables = self.principal_variables.get(upstream, {})
        others = frozenset().union(*(taken for name, taken in tables.items() if name != principal))
        theirs = others - tables.get(principal or "", frozenset()) if principal is not None else others
        guarded = frozenset(name for name in theirs if not passed_by_default(name))
        return passing._replace(guarded=passing.guarded | guarded) if guarded else passing

    def call_timeout(self, upstream: str) -> float:
        spec = self.upstreams[upstream]
        return spec.timeout if spec.timeout is not None else self.gateway.call_timeout


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate `upstreams.toml`; raise `ConfigError` with one line on any fault."""
    path = Path(path)
    raw = read_toml(path)
    return parse_config(raw, path.resolve(), label=str(path), environ=os.environ if environ is None else environ)


_READ_KEYS = ("own_variables", "principal_variables", "token_unset", "upstream_variables")
"""`Config` fields the reading sets, which the file may not."""


def parse_config(
    raw: Mapping[str, Any], path: Path, *, label: str, environ: Mapping[str, str], stand_in: str | None = None
) -> Config:
    """Validate already-parsed TOML data; `path` is the absolute location of the file it came from.
    `stand_in`: what a variable a `[gateway]` key takes reads as when unset, instead of an error
    (checking a file's shape without this shell's secrets)."""
    reading = read_variables(raw, label, environ, stand_in)
    data = reading.data
    for key in _READ_KEYS:
        if key in data:
            raise ConfigError(f"{label}: top level {key}: unknown key")
    upstreams = data.get("upstreams", {})
    if isinstance(upstreams, dict):
        for name, table in upstreams.items():
            if not UPSTREAM_NAME.match(name):
                raise ConfigError(f"{label}: [upstreams.{name}] upstream names must match {UPSTREAM_NAME.pattern}")
            if isinstance(table, dict):
                if "name" in table:
                    raise ConfigError(f"{label}: [upstreams.{name}] name: unknown key (the table name is the name)")
                if "unavailable" in table:
                    raise ConfigError(f"{label}: [upstreams.{name}] unavailable: unknown key")
                table["name"] = name
                if name in reading.unavailable:
                    table["unavailable"] = reading.unavailable[name]
    try:
        config = Config.model_validate(
            {
                **data,
                "path": path,
                "own_variables": reading.own_variables,
                "token_unset": reading.token_unset,
                "upstream_variables": reading.upstream_variables,
                "principal_variables": _principal_variables(raw),
            }
        )
    except ValidationError as exc:
        raise ConfigError(f"{label}: {_describe(exc)}") from None
    _check_names(config, label)
    _check_anchor(config, label)
    return _resolve_paths(config)


def _principal_variables(raw: Mapping[str, Any]) -> dict[str, dict[str, frozenset[str]]]:
    """Per upstream, per principal table, the variables that table takes and the upstream's own values do not."""
    found: dict[str, dict[str, frozenset[str]]] = {}
    upstreams = raw.get("upstreams")
    for name, table in upstreams.items() if isinstance(upstreams, dict) else ():
        tables = table.get("principals") if isinstance(table, dict) else None
        if isinstance(tables, dict):
            shared = variables({key: value for key, value in table.items() if key != "principals"})
            found[name] = {principal: frozenset(variables(own)) - shared.keys() for principal, own in tables.items()}
    return found


def _check_anchor(config: Config, label: str) -> None:
    """An anchor beside the log would be rewritten along with it: it must be outside the state directory."""
    if config.gateway.audit_anchor_interval < 1:
        raise ConfigError(f'{label}: [gateway] audit_anchor_interval: at least "1s"')
    anchor = config.gateway.audit_anchor
    if anchor is None or anchor == "off":
        return
    if not anchor.strip():
        raise ConfigError(f'{label}: [gateway] audit_anchor: empty (give a file, or "off")')
    where = (config.directory / Path(anchor).expanduser()).resolve()
    state = config.state_dir.resolve()
    if where.is_relative_to(state) or (str(config.audit_path) != IN_MEMORY and where == config.audit_path.resolve()):
        raise ConfigError(
            f"{label}: [gateway] audit_anchor: {where} is inside the state directory {state}; whoever "
            "can rewrite the audit log there could rewrite the anchor too: put it elsewhere"
        )


def _check_names(config: Config, label: str) -> None:
    """Refuse upstream prefixes whose exposed names could collide (`a` + `__` is a prefix of `a__b`, or two
    upstreams share one). An unprefixed upstream's names can meet anyone's: the catalogue withholds those."""
    separator = config.gateway.separator
    prefixes = config.prefixes
    for first, first_prefix in prefixes.items():
        for second, second_prefix in prefixes.items():
            if first == second or not first_prefix or not second_prefix:
                continue
            if second_prefix.startswith(first_prefix + separator) or (first < second and first_prefix == second_prefix):
                raise ConfigError(
                    f"{label}: [upstreams.{second}] tools of upstreams '{first}' and '{second}' could be exposed "
                    f"under the same name (separator '{separator}'); rename one of them"
                )


def _resolve_paths(config: Config) -> Config:
    base = config.directory
    upstreams = {}
    for name, spec in config.upstreams.items():
        if spec.command is not None:
            command, cwd = placement(base, spec.command, spec.cwd)
            spec = spec.model_copy(update={"command": command, "cwd": cwd})
        upstreams[name] = spec
    return config.model_copy(update={"upstreams": upstreams})


def _describe(exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = tuple(part for part in error["loc"] if part != "function-after")
    if error["type"] == "extra_forbidden":
        return f"{location(loc)}: unknown key"
    if error["type"] == "missing":
        return f"{location(loc)}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{location(loc)}: {message}"
