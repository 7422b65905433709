"""The console in a real browser (headless Chromium): what an agent does shows live, a person approves,
denies or lets expire a waiting call and approves a changed tool from the page, markup from an agent or
an upstream stays text, and the token in the printed URL is exchanged for a cookie."""

from __future__ import annotations

import json
import tomllib
import urllib.error
import urllib.request
from email.message import Message
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browser.conftest import MARKUP
from tests.browser.harness import WAIT, Agent, Scene, approval_showing, browser_missing, poll, until
from tests.conftest import events, read_records, text_of

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")


def css(driver: WebDriver, selector: str) -> list[Any]:
    return driver.find_elements(By.CSS_SELECTOR, selector)


def ended_row(driver: WebDriver, tool: str) -> Any:
    """The `#calls` row of a call to `tool` once it has an outcome."""
    rows = [row for row in css(driver, "#calls tr.call") if row.get_attribute("data-tool") == tool]
    return next((row for row in rows if row.get_attribute("data-outcome")), None)


def gone(approval_id: str) -> Any:
    return lambda driver: not css(driver, f'#approvals li.approval[data-approval-id="{approval_id}"]')


def decision_of(scene: Scene, approval_id: str) -> dict[str, Any]:
    """The audit's decision event of the call that waited as `approval_id` (the gateway commits it in the
    background, so it may land just after the agent has its answer)."""

    def found() -> list[dict[str, Any]]:
        return [
            event
            for event in events(scene.directory)
            if event["kind"] == "decision" and (event.get("approval_request") or {}).get("entry") == approval_id
        ]

    [decision] = poll(found, f"the decision event of approval {approval_id}")
    return decision


def upstream_received(scene: Scene, body: str) -> bool:
    return any((call["arguments"] or {}).get("body") == body for call in read_records(scene.record))


def get(url: str, cookies: dict[str, str] | None = None) -> tuple[int, Message, str]:
    """A plain HTTP GET (no browser): status, headers (names in any case), body."""
    request = urllib.request.Request(url)
    if cookies:
        request.add_header("Cookie", "; ".join(f"{name}={value}" for name, value in cookies.items()))
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, response.headers, response.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, refused.headers, refused.read(4096).decode(errors="replace")


def test_a_call_the_agent_makes_shows_in_calls_without_reloading(scene: Scene, agent: Agent, driver: WebDriver) -> None:
    until(driver, lambda d: d.find_element(By.ID, "connection").text == "live", "#connection to read 'live'")
    driver.execute_script("window.__sameDocument = 'kept'")
    assert text_of(agent.call("box__echo", {"text": "shown live"})) == "shown live"
    row = until(driver, lambda d: ended_row(d, "box__echo"), "the box__echo call in #calls")
    assert row.get_attribute("data-decision") == "allow"
    assert row.get_attribute("data-outcome") == "ok"
    assert row.find_element(By.CSS_SELECTOR, "td.tool").text == "box__echo"
    assert "allow" in row.find_element(By.CSS_SELECTOR, "td.decision").text
    assert driver.execute_script("return window.__sameDocument") == "kept"  # no reload brought it
    session = row.get_attribute("data-session")
    assert row.find_element(By.CSS_SELECTOR, "td.session").text in session  # shown whole or shortened
    opened = f'#sessions tr.session[data-session="{session}"] td.state'
    assert until(driver, lambda d: css(d, opened), "the agent's session in #sessions")[0].text == "open"
    box = '#upstreams tr.upstream[data-upstream="box"] td.state'
    assert until(driver, lambda d: css(d, box), "box in #upstreams")[0].text == "up"

    agent.call("box__add", {"a": 1, "b": 2})
    added = until(driver, lambda d: ended_row(d, "box__add"), "the box__add call in #calls")
    driver.find_element(By.ID, "filter-tool").send_keys("echo")
    until(driver, lambda d: not added.is_displayed(), "the filter to hide box__add")
    assert row.is_displayed()
    driver.find_element(By.ID, "filter-tool").send_keys(Keys.BACKSPACE * len("echo"))
    until(driver, lambda d: added.is_displayed(), "box__add to show again without the filter")


def test_an_approval_clicked_in_the_page_lets_the_waiting_call_through(
    scene: Scene, agent: Agent, driver: WebDriver
) -> None:
    waiting = agent.start("box__write_note", {"path": "notes/approved.txt", "body": "approve me"})
    item = until(driver, lambda d: approval_showing(d, "approve me"), "the call in #approvals")
    assert item.find_element(By.CSS_SELECTOR, ".approval-tool").text == "box__write_note"
    assert "notes/approved.txt" in item.find_element(By.CSS_SELECTOR, ".approval-args").text
    assert "notes-need-approval" in item.find_element(By.CSS_SELECTOR, ".approval-rule").text
    assert not driver.find_element(By.ID, "approvals-empty").is_displayed()
    assert not upstream_received(scene, "approve me")  # it waits for the person
    approval_id = item.get_attribute("data-approval-id")
    item.find_element(By.CSS_SELECTOR, "button.approve").click()

    result = waiting.result(WAIT)
    assert not result.is_error and text_of(result) == "stored notes/approved.txt"
    assert upstream_received(scene, "approve me")
    until(driver, gone(approval_id), "the approved call to leave #approvals")
    until(driver, lambda d: d.find_element(By.ID, "approvals-empty").is_displayed(), "#approvals-empty")
    asked = decision_of(scene, approval_id)["approval_request"]
    assert asked["through"] == "console" and asked["via"] == "queue" and asked["by"]


def test_a_deny_with_a_reason_typed_in_the_page_refuses_the_call_with_it(
    scene: Scene, agent: Agent, driver: WebDriver
) -> None:
    waiting = agent.start("box__write_note", {"path": "notes/denied.txt", "body": "deny me"})
    item = until(driver, lambda d: approval_showing(d, "deny me"), "the call in #approvals")
    approval_id = item.get_attribute("data-approval-id")
    item.find_element(By.CSS_SELECTOR, "input.deny-reason").send_keys("not on a Sunday")
    item.find_element(By.CSS_SELECTOR, "button.deny").click()

    result = waiting.result(WAIT)
    assert result.is_error and "not on a Sunday" in text_of(result)
    until(driver, gone(approval_id), "the denied call to leave #approvals")
    assert not upstream_received(scene, "deny me")
    asked = decision_of(scene, approval_id)["approval_request"]
    assert asked["through"] == "console" and asked["answer"] == "declined" and "not on a Sunday" in asked["reason"]


def test_an_approval_nobody_decides_leaves_the_page_and_the_call_is_refused(scene: Scene, driver: WebDriver) -> None:
    hurried = scene.agent("expiring.toml", ask_timeout="2s")  # a second gateway on the same state
    waiting = hurried.start("box__write_note", {"path": "notes/late.txt", "body": "let me expire"})
    item = until(driver, lambda d: approval_showing(d, "let me expire"), "the call in #approvals")
    until(driver, gone(item.get_attribute("data-approval-id")), "the expired call to leave #approvals")
    result = waiting.result(WAIT)
    assert result.is_error and "no answer within 2s" in text_of(result)
    assert not upstream_received(scene, "let me expire")


def test_a_changed_tool_approved_in_the_page_is_served_again(scene: Scene, agent: Agent, driver: WebDriver) -> None:
    # Since it was pinned, shifty's `reads` has come to carry markup in its description.
    assert "shifty__reads" not in agent.tools() and "shifty__stable" in agent.tools()
    with pytest.raises(MCPError, match="quarantined"):
        agent.call("shifty__reads", {})

    for review in css(driver, "#pins-refresh"):  # the page asks the upstreams for their definitions on request
        review.click()
    pin = until(driver, lambda d: css(d, '#pins li.pin[data-pin="shifty.reads"]'), "shifty.reads in #pins")[0]
    diff = pin.find_element(By.CSS_SELECTOR, ".pin-diff").text  # as the page shows it
    assert '-  "description": "Read a value.",' in diff
    assert f'+  "description": {json.dumps(f"Read a value. {MARKUP}")},' in diff  # the upstream's markup, as text
    assert not css(driver, "#pins img, #pins script, [onerror]")
    assert driver.execute_script("return window.__pwned") is None
    pin.find_element(By.CSS_SELECTOR, "button.approve-pin").click()

    poll(lambda: "shifty__reads" in agent.tools(), "the serving gateway to release shifty__reads")
    assert text_of(agent.call("shifty__reads", {})) == "reads done"
    lock = tomllib.loads((scene.directory / "upstreams.lock").read_text())
    pinned = json.loads(lock["upstreams"]["shifty"]["tools"]["reads"]["definition"])
    assert pinned["description"] == f"Read a value. {MARKUP}"
    until(driver, lambda d: not css(d, '#pins li.pin[data-pin="shifty.reads"]'), "shifty.reads to leave #pins")


def test_markup_from_an_agent_shows_as_text_and_runs_nothing(scene: Scene, agent: Agent, driver: WebDriver) -> None:
    title = driver.title
    with pytest.raises(MCPError, match="Unknown tool"):
        agent.call(MARKUP, {})  # refused, but logged under the name the agent sent
    waiting = agent.start("box__write_note", {"path": "notes/markup.txt", "body": MARKUP})
    row = until(driver, lambda d: ended_row(d, MARKUP), "the call named with markup in #calls")
    assert row.find_element(By.CSS_SELECTOR, "td.tool").text == MARKUP
    item = until(driver, lambda d: approval_showing(d, "<script>window.__pwned=2</script>"), "the markup approval")
    assert '<img src=x onerror=\\"window.__pwned=1\\">' in item.find_element(By.CSS_SELECTOR, ".approval-args").text

    assert not css(driver, 'img[src="x"], [onerror], #calls script, #approvals script')
    assert driver.execute_script("return window.__pwned") is None
    assert driver.title == title
    item.find_element(By.CSS_SELECTOR, "button.deny").click()
    assert waiting.result(WAIT).is_error

    cookies = {cookie["name"]: cookie["value"] for cookie in driver.get_cookies()}
    status, headers, _ = get(f"{scene.console.origin}/console/", cookies)
    assert status == 200
    policy = {part.strip() for part in (headers["Content-Security-Policy"] or "").split(";")}
    assert {"default-src 'none'", "script-src 'self'", "base-uri 'none'", "frame-ancestors 'none'"} <= policy


def test_the_token_is_exchanged_for_a_cookie_and_nothing_is_shown_without_it(
    scene: Scene, driver: WebDriver, fresh_profile: WebDriver
) -> None:
    assert "token=" not in driver.current_url and driver.current_url.endswith("/console/")
    [cookie] = driver.get_cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert css(driver, 'meta[name="csrf-token"]')

    origin = scene.console.origin
    for address in (f"{origin}/console/", f"{origin}/console/?token=not-the-token"):
        fresh_profile.get(address)
        assert not css(fresh_profile, 'meta[name="csrf-token"], #calls tr.call')
        assert not fresh_profile.get_cookies()
    assert get(f"{origin}/console/")[0] == 401
    assert get(f"{origin}/console/events")[0] == 401
