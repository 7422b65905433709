"""Drive an installed `mcp-armor` as a user would; run by scripts/check-wheel from a project directory.

    python installed_smoke.py VERSION

Standard library only, and it never imports the gateway: everything goes through the `mcp-armor` on
PATH (the fresh virtualenv's), run in the current directory, which holds the shipped `upstreams.toml`
and `policies/` beside a git repository: `--version`, `--help` of every command, a stdio session and a
streamable HTTP session, then the audit log they wrote, and the console showing it. Exits non-zero
with one line naming the first failure.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

TIMEOUT = 60


def fail(message: str) -> None:
    sys.exit(f"installed smoke: {message}")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["mcp-armor", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if result.returncode != 0:
        fail(f"`mcp-armor {' '.join(args)}` exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


def subcommands(help_text: str) -> list[str]:
    """The subcommands an argparse help lists under its COMMAND / SUBCOMMAND positional."""
    names: list[str] = []
    listing = False
    for line in help_text.splitlines():
        if re.match(r"^  (SUB)?COMMAND\b", line):
            listing = True
        elif listing and (match := re.match(r"^    (\S+)", line)):
            names.append(match[1])
        elif listing and line and not line.startswith("     "):
            listing = False
    return names


def check_help(path: list[str]) -> int:
    """`--help` of this command and of every subcommand below it; how many were run."""
    text = run(*path, "--help").stdout
    if not text.startswith("usage: mcp-armor"):
        fail(f"`mcp-armor {' '.join(path)} --help` printed no usage")
    return 1 + sum(check_help([*path, name]) for name in subcommands(text))


class Session:
    """A stdio MCP session with `mcp-armor serve`, spoken line by line."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["mcp-armor", "serve", "--config", "upstreams.toml", "--quiet"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.next_id = 0

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        self.notify(method, params, id=self.next_id)
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            message = json.loads(line)
            if message.get("id") == self.next_id:
                if "error" in message:
                    fail(f"{method} answered with an error: {message['error']}")
                return dict(message["result"])
        fail(f"the gateway closed stdout before answering {method}: {self.stderr()}")
        raise AssertionError  # unreachable

    def notify(self, method: str, params: dict[str, Any], **extra: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "method": method, "params": params, **extra}) + "\n")
        self.proc.stdin.flush()

    def call(self, tool: str, arguments: dict[str, Any]) -> tuple[bool, str]:
        result = self.request("tools/call", {"name": tool, "arguments": arguments})
        text = " ".join(block.get("text", "") for block in result.get("content", []))
        return bool(result.get("isError")), text

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.wait(timeout=TIMEOUT) != 0:
            fail(f"serve exited {self.proc.returncode} after stdin closed: {self.stderr()}")

    def stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        assert self.proc.stderr is not None
        return self.proc.stderr.read().strip()[-2000:]


class HttpSession:
    """A streamable HTTP session (handshake era) with `mcp-armor serve --http 127.0.0.1:0`."""

    def __init__(self) -> None:
        command = ["mcp-armor", "serve", "--config", "upstreams.toml", "--quiet", "--http", "127.0.0.1:0"]
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if match := re.search(r"serving streamable HTTP at (http://\S+/mcp)", line):
                self.url = match[1]
                break
        else:
            fail(f"serve --http exited {self.proc.wait()} before serving")
        self.headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        self.next_id = 0

    def post(self, message: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any] | None]:
        request = urllib.request.Request(self.url, json.dumps(message).encode(), self.headers, method="POST")
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            body = response.read().decode()
            headers = {key.lower(): value for key, value in response.headers.items()}
        if not body.strip():
            return headers, None
        if headers.get("content-type", "").startswith("text/event-stream"):
            body = [line[5:].strip() for line in body.splitlines() if line.startswith("data:")][-1]
        return headers, json.loads(body)

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        headers, answer = self.post({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params})
        if answer is None or "result" not in answer:
            fail(f"{method} over HTTP was answered with {answer}")
        if "mcp-session-id" in headers:
            self.headers["mcp-session-id"] = headers["mcp-session-id"]
        return dict(answer["result"])

    def stop(self) -> None:
        self.proc.terminate()
        if self.proc.wait(timeout=TIMEOUT) != 0:
            fail(f"serve --http exited {self.proc.returncode} on SIGTERM")


def main() -> None:
    expected_version = sys.argv[1]
    where = shutil.which("mcp-armor")
    if where is None or Path.cwd() in Path(where).parents:
        fail(f"mcp-armor is not installed outside this directory (found: {where})")

    version = run("--version").stdout.strip()
    if version != f"mcp-armor {expected_version}":
        fail(f"--version printed {version!r}, the distribution is {expected_version}")
    helps = check_help([])
    if helps < 20:
        fail(f"only {helps} commands answered --help; the command tree was not found")
    print(f"installed smoke: {version}; --help of {helps} commands and subcommands", file=sys.stderr)

    session = Session()
    init = session.request(
        "initialize",
        {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "smoke", "version": "1"}},
    )
    session.notify("notifications/initialized", {})
    tools = {tool["name"] for tool in session.request("tools/list", {})["tools"]}
    for wanted in ("time__get_current_time", "git__git_log", "git__git_show"):
        if wanted not in tools:
            fail(f"tools/list lacks {wanted}: {sorted(tools)}")
    refused, text = session.call("time__get_current_time", {"timezone": "UTC"})
    if refused or "datetime" not in text:
        fail(f"the allowed call time__get_current_time was not answered: {text}")
    refused, text = session.call("git__git_show", {"repo_path": ".", "revision": "HEAD:.env"})
    if not refused or "git-show-no-secret-files" not in text:
        fail(f"the call git__git_show of HEAD:.env was not refused by its rule: {text}")
    session.close()
    print(
        f"installed smoke: served {init['serverInfo']['name']} over stdio: {len(tools)} tools, "
        "one call allowed, one refused",
        file=sys.stderr,
    )

    http = HttpSession()
    http.request(
        "initialize",
        {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "smoke-http", "version": "1"}},
    )
    http.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
    listed = {tool["name"] for tool in http.request("tools/list", {})["tools"]}
    answer = http.request("tools/call", {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}})
    http.stop()
    if listed != tools or answer.get("isError"):
        fail(f"over HTTP: {len(listed)} tools listed, the allowed call answered {answer}")
    print(f"installed smoke: served streamable HTTP at {http.url}: one call allowed", file=sys.stderr)

    verified = run("audit", "verify", "--config", "upstreams.toml")
    export = run("audit", "export", "--config", "upstreams.toml", "--format", "jsonl").stdout
    events = [json.loads(line) for line in export.splitlines() if line.strip()]
    decisions = [(event["tool"], event["decision"]) for event in events if event["kind"] == "decision"]
    outcomes = [event for event in events if event["kind"] == "outcome"]
    expected = [("time__get_current_time", "allow"), ("git__git_show", "deny"), ("time__get_current_time", "allow")]
    if decisions != expected or len(outcomes) != 3:
        fail(f"the audit log holds decisions {decisions} and {len(outcomes)} outcomes")
    print(f"installed smoke: {verified.stdout.strip() or verified.stderr.strip()}", file=sys.stderr)
    check_console(len(expected))


def check_console(calls: int) -> None:
    """`mcp-armor console`: the printed URL opens the page, whose static files the wheel shipped."""
    command = ["mcp-armor", "console", "--config", "upstreams.toml", "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"open (http://\S+/console/)\?token=\S+", line)
        if match is None:
            fail(f"console printed {line!r}, not the URL to open")
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        with opener.open(line.split("open ", 1)[1].strip(), timeout=TIMEOUT) as page:  # 303 to the page, a cookie
            html = page.read().decode()
            if "default-src 'none'" not in page.headers.get("content-security-policy", ""):
                fail("the console's page came without its Content-Security-Policy")
        for name in ("console.js", "console.css"):
            with opener.open(f"{match[1]}static/{name}", timeout=TIMEOUT) as static:
                if not static.read().strip():
                    fail(f"the console's static/{name} is empty")
        with opener.open(f"{match[1]}state", timeout=TIMEOUT) as state:
            # a call's decision, then its outcome: the latest message of each call holds both
            shown = {message["call_id"]: message for message in json.load(state) if message["type"] == "call"}
        ended = [call for call in shown.values() if call["decision"] and call["outcome"]]
        if 'name="csrf-token"' not in html or len(shown) != calls or len(ended) != calls:
            fail(f"the console's page or its state is not what was served ({len(shown)} calls, {len(ended)} ended)")
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
    print(f"installed smoke: the console served its page, static files and {calls} calls", file=sys.stderr)


if __name__ == "__main__":
    main()
