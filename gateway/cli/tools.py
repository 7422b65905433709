"""`tools`: the tools the gateway exposes, with what policy does to each."""

from __future__ import annotations

import json
from typing import Any

from gateway.catalog.listing import Naming
from gateway.cli.common import print_table
from gateway.config.models import Config
from gateway.policy.engine import PolicyEngine
from gateway.policy.files import load_engine
from gateway.upstream.connect import connect


async def tools(config: Config, as_json: bool) -> int:
    engine = load_engine(config)
    upstreams = await connect(config)
    engine.index_tools(upstreams.catalog.tools)
    names = Naming.of(config)
    rows: list[dict[str, Any]] = [
        {
            "name": tool.name,
            "upstream": tool.upstream,
            "upstream_tool": tool.upstream_name,
            "shortened": tool.name != names.written(tool.upstream, tool.upstream_name),
            "policy": _policy_summary(engine, tool.name),
            "description": tool.model.description or "",
        }
        for tool in upstreams.catalog.tools.values()
    ]
    rows += [
        {
            "name": name,
            "upstream": held.item.upstream,
            "upstream_tool": held.item.name,
            "shortened": name != names.written(held.item.upstream, held.item.name),
            "policy": f"quarantined ({held.verdict}): see `mcp-armor pins diff {held.item.label}`",
            "description": str(held.item.form.get("description", "")),
        }
        for name, held in upstreams.quarantined.items()
    ]
    if as_json:
        down, problems = upstreams.down, list(upstreams.catalog.problems)
        print(json.dumps({"tools": rows, "unavailable": down, "problems": problems}, indent=2))
    else:
        _print_tools(rows)
    upstreams.report()
    return 1 if upstreams.down else 0


def _policy_summary(engine: PolicyEngine, tool: str) -> str:
    """What policy does to a tool, for a caller no rule names (by `clients`, `principals` or `attributes`)."""
    if not engine.reachable(tool):
        return "hidden (no rule allows it)"
    if not engine.visible(tool):
        return "hidden (but from callers some rule names)"
    rules = engine.rules_for(tool).call
    if not rules:
        return f"{engine.policies.default.value} (default)"
    effects = sorted({rule.effect.value for rule in rules if rule.effect is not None and not rule.monitor})
    conditional = any(rule.when is not None or rule.rate is not None or not rule.for_every_caller for rule in rules)
    return "/".join(effects) + (" (conditional)" if conditional else "")


def _print_tools(rows: list[dict[str, Any]]) -> None:
    table = [
        (row["name"], row["upstream"], row["upstream_tool"], row["policy"] + ("  (name shortened)" * row["shortened"]))
        for row in rows
    ]
    print_table(("TOOL", "UPSTREAM", "UPSTREAM TOOL", "POLICY"), table, empty="(no tools exposed)")
