"""`scan`: what the upstreams' definitions say to the model, checked for tool poisoning."""

from __future__ import annotations

import json

from gateway.cli.common import connect, print_table
from gateway.config import Config
from gateway.scan import Finding, Severity, scan_definition


async def scan(config: Config, as_json: bool) -> int:
    """Scan every definition the upstreams offer for poisoning; exit 1 if anything is high severity."""
    upstreams = await connect(config)
    catalog = upstreams.catalog
    findings: list[Finding] = []
    for tool in catalog.tools.values():
        others = [
            name
            for other in catalog.tools.values()
            if other.upstream != tool.upstream
            for name in (other.name, other.upstream_name)
        ]
        findings += scan_definition("tool", tool.name, tool.source.definition, others)
    for prompt in catalog.prompts.values():
        findings += scan_definition("prompt", prompt.name, prompt.model.model_dump(by_alias=True, exclude_none=True))
    for upstream, _, template in catalog.templates:
        definition = template.model_dump(by_alias=True, exclude_none=True)
        findings += scan_definition("resource template", f"{upstream}: {template.uri_template}", definition)
    for upstream, text in upstreams.instructions.items():
        findings += scan_definition("server", upstream, {"instructions": text})
    scanned = len(catalog.tools) + len(catalog.prompts) + len(catalog.templates) + len(upstreams.instructions)
    if as_json:
        report = {"findings": [finding.to_record() for finding in findings], "unavailable": upstreams.down}
        print(json.dumps({**report, "scanned": scanned}))
    else:
        rows = [(finding.severity, finding.kind, finding.where, finding.detail) for finding in findings]
        print_table(("SEVERITY", "KIND", "WHERE", "FINDING"), rows, empty="(no findings)")
    upstreams.report()
    high = any(finding.severity is Severity.HIGH for finding in findings)
    return 1 if high or upstreams.down else 0
