"""`mcp-armor policy check | explain | replay`."""

from __future__ import annotations

import argparse
import json
import time
from contextlib import closing
from datetime import datetime
from typing import Any

from gateway.audit.logs import open_reading
from gateway.audit.queries import Filters
from gateway.calls import Effect, Who
from gateway.cli.common import package_warnings, print_table
from gateway.config.models import Config
from gateway.core.own_files import RULE, GatewayFiles
from gateway.errors import GatewayError
from gateway.policy.files import load_engine
from gateway.policy.lint import hidden_upstreams, lint, unkinded_attributes
from gateway.upstream.connect import Upstreams, connect


async def check(config: Config, offline: bool, as_json: bool) -> int:
    engine = load_engine(config)
    policies = engine.policies
    upstreams = Upstreams() if offline else await connect(config)
    schemas = {name: tool.source.definition["inputSchema"] for name, tool in upstreams.catalog.tools.items()}
    warnings = [] if offline else lint(policies, schemas)
    warnings += unkinded_attributes(policies)
    exposed = [(name, tool.upstream) for name, tool in upstreams.catalog.tools.items()]
    warnings += hidden_upstreams(engine, exposed)  # none in monitor mode, where nothing is hidden
    warnings += [
        f"upstream '{name}' unavailable ({reason}): its tools were not checked"
        for name, reason in upstreams.down.items()
    ]
    warnings += package_warnings(config)
    warnings += GatewayFiles.of(config).exposures(config, unset_cwd=True)
    summary = {
        "ok": True,
        "policies": str(config.policy_dir),
        "revision": policies.revision,
        "files": list(policies.files),
        "rules": len(policies.rules),
        "default": policies.default.value,
        "warnings": warnings,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    for warning in warnings:
        print(f"warning: {warning}")
    print(
        f"ok: {len(policies.rules)} rules in {len(policies.files)} files, default {policies.default.value}, "
        f"revision {policies.revision} ({len(warnings)} warning{'s' if len(warnings) != 1 else ''})"
    )
    return 0


async def explain(config: Config, args: argparse.Namespace) -> int:
    try:
        arguments = json.loads(args.args)
    except ValueError as exc:
        raise GatewayError(f"--args: not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise GatewayError(f"--args: must be a JSON object, got {type(arguments).__name__}")
    if args.attribute and not args.principal:
        raise GatewayError("--attribute: attributes are a principal's; give --principal NAME too")
    engine = load_engine(config)
    upstreams = Upstreams() if args.offline else await connect(config)
    engine.index_tools(upstreams.catalog.tools)
    notes: list[str] = []
    refusal = ""
    tool = upstreams.catalog.tools.get(args.tool)
    if args.offline:
        notes.append(
            "offline: the arguments were not checked against the tool's input schema, "
            "which a live call must pass first (it may be refused there)"
        )
    elif tool is None:
        notes.append(f"no upstream exposes '{args.tool}' now: a call to it is refused as an unknown tool")
    violation = tool.source.violation(arguments) if tool is not None else None
    if violation is not None:
        refusal = f"arguments do not match the tool's input schema: {violation}"
    who = Who(args.client, args.principal, frozenset(args.attribute))
    if not engine.visible(args.tool, who):
        notes.append("no rule can ever allow it for this caller: it is hidden from tools/list")
    decision, trace = engine.explain(args.tool, arguments, now=time.monotonic(), who=who)
    upstream = tool.upstream if tool is not None else ""
    guarded = GatewayFiles.of(config).decide(decision, upstream, arguments, engine.policies.paths.declared(args.tool))
    if guarded is not decision:
        decision = guarded
        trace.append((RULE, decision.reason))
    effect = "deny" if refusal else decision.effect.value
    reason = refusal or decision.reason
    if args.json:
        record = {**decision.to_record(), "decision": effect, "reason": reason, "notes": notes}
        record["input_schema_checked"] = tool is not None
        record["considered"] = [{"rule": rule_id, "verdict": verdict} for rule_id, verdict in trace]
        print(json.dumps(record, indent=2))
    else:
        print(f"decision: {effect}")
        print(f"reason:   {reason}")
        if decision.arguments is not None:
            print(f"forwarded as: {json.dumps(decision.arguments, sort_keys=True)} (paths normalised, then rewritten)")
        if decision.would is not None:
            print(f"monitor:  would {decision.would.value} (rules {', '.join(decision.monitored)})")
        print(f"policy revision: {decision.revision}")
        for note in notes:
            print(f"note: {note}")
        if trace:
            width = max(len(rule_id) for rule_id, _ in trace)
            print("rules:")
            for rule_id, verdict in trace:
                print(f"  {rule_id:<{width}}  {verdict}")
    upstreams.report()
    return 0


async def replay(config: Config, filters: Filters, as_json: bool) -> int:
    """Re-decide recorded calls under today's policies; list those whose decision would change."""
    engine = load_engine(config)
    own_files = GatewayFiles.of(config)
    changed: list[dict[str, Any]] = []
    replayed = skipped = 0
    with closing(open_reading(config)) as store:
        # Taken from the sessions, not the filtered events: a --tool or --decision filter leaves out session starts.
        starts = {row["session_id"]: row for row in store.sessions()}
        for record in store.events(filters):
            if record["kind"] != "decision":
                continue
            if record.get("stage", "policy") != "policy":
                skipped += 1  # refused before the policy (unknown tool, input schema): no policy decision to redo
                continue
            replayed += 1
            session, tool, arguments = record["session_id"] or "", record["tool"], record["arguments"] or {}
            who = _decided_for(record, starts.get(session, {}))
            now = _epoch(record["ts"])
            if not engine.visible(tool, who):
                effect, rules, reason = Effect.DENY.value, [], "hidden from this caller under today's policies"
            else:
                decision = engine.evaluate(tool, arguments, now=now, who=who)
                declared = engine.policies.paths.declared(tool)
                decision = own_files.decide(decision, record.get("upstream") or "", arguments, declared)
                if decision.proceeds:
                    engine.charge(decision, who, now)
                effect, rules, reason = decision.effect.value, list(decision.rules), decision.reason
            if effect != record["decision"]:
                changed.append(
                    {
                        "seq": record["seq"],
                        "ts": record["ts"],
                        "session_id": session,
                        "call_id": record["call_id"],
                        "tool": tool,
                        "recorded": record["decision"],
                        "recorded_rules": record["rules"],
                        "now": effect,
                        "rules": rules,
                        "reason": reason,
                        "masked_arguments": bool(record.get("masked")),
                    }
                )
    revision = engine.policies.revision
    if as_json:
        print(json.dumps({"policy_revision": revision, "replayed": replayed, "skipped": skipped, "changed": changed}))
        return 0
    rows = [
        (
            row["seq"],
            row["ts"],
            row["session_id"][:12],
            row["tool"],
            f"{row['recorded']} -> {row['now']}",
            ",".join(row["rules"]) or "(default)",
            row["reason"] + (" [replayed with masked argument values]" if row["masked_arguments"] else ""),
        )
        for row in changed
    ]
    print_table(("SEQ", "TIME", "SESSION", "TOOL", "DECISION", "RULES NOW", "REASON NOW"), rows, empty="")
    print(
        f"{replayed} recorded call{'s' if replayed != 1 else ''} replayed under policy revision {revision}: "
        f"{len(changed)} would be decided differently"
        + (f" ({skipped} refused before the policy were skipped)" if skipped else "")
    )
    return 0


def _decided_for(record: dict[str, Any], start: dict[str, Any]) -> Who:
    """Who a recorded decision was made for: the client, principal and attributes the event names;
    an older event names none of them, and then its session's start speaks for it."""
    client = record["client"] if isinstance(record.get("client"), str) else start.get("client_name", "")
    principal = (record["principal"] if "principal" in record else start.get("principal")) or ""
    attributes = record.get("attributes") if isinstance(record.get("attributes"), list) else start.get("attributes")
    held = frozenset(item for item in attributes or () if isinstance(item, str)) if principal else frozenset[str]()
    return Who(client, principal, held, record.get("session_id") or "")


def _epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
