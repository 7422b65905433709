"""The policy engine, sans-IO: compiled rules in, a `Decision` out, from data alone.

No networking, no clock, no MCP: the caller passes the time, so decisions are deterministic and the
engine is tested from tables and measured in microseconds. Rules are indexed per exposed tool whenever
the catalogue changes; a call only looks at the rules whose `tools` globs match its tool. The one
exception: with a store configured, a rate-limited call's charge awaits the counts every replica
shares (`gateway.policy.shared_rates`).

Precedence: `deny` beats `ask` beats `rewrite`/`allow`; no matching rule means the default effect;
an error while evaluating means `deny`. `monitor` rules (and the whole gateway in monitor mode) only
record what they would have done.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from gateway.calls import ANONYMOUS, Decision, Effect, Who
from gateway.errors import StoreError
from gateway.policy.items import when_holds
from gateway.policy.paths import PathArguments
from gateway.policy.rates import Charge, RateLimiter
from gateway.policy.results import Screening, screen
from gateway.policy.rules import Rule, ToolRules

if TYPE_CHECKING:
    from gateway.policy.shared_rates import SharedRates

logger = logging.getLogger(__name__)

_PRECEDENCE = (Effect.DENY, Effect.ASK, Effect.REWRITE, Effect.ALLOW)


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every rule of every policy file, compiled, with the default effect and the revision."""

    rules: tuple[Rule, ...]
    default: Effect = Effect.DENY
    revision: str = ""
    files: tuple[str, ...] = ()
    paths: PathArguments = field(default_factory=PathArguments)
    """The `[[paths]]` declarations: arguments normalised before any rule sees them."""


@dataclass(slots=True)
class _Match:
    rule: Rule
    effect: Effect
    note: str = ""


class PolicyEngine:
    """Decides calls and screens results under the current `PolicySet`; swapped whole on reload."""

    def __init__(self, policies: PolicySet, *, monitor_mode: bool = False) -> None:
        self.policies = policies
        self.monitor_mode = monitor_mode
        self.limiter = RateLimiter()
        self.shared: SharedRates | None = None
        """The counts every replica shares, with a store configured: they decide at charge time."""
        self._by_id = {rule.id: rule for rule in policies.rules}
        self._tools: tuple[str, ...] = ()
        self._index: dict[str, ToolRules] = {}
        self._seen = functools.lru_cache(maxsize=4096)(self._visible)
        """`visible` answers under the current rules (cleared when the rules or the tools change)."""

    # -- state changes -------------------------------------------------------------------------

    def replace_policies(self, policies: PolicySet) -> None:
        """Install a new, fully compiled set (atomically: one assignment, then the re-index)."""
        self.policies = policies
        self._by_id = {rule.id: rule for rule in policies.rules}
        self._index = {tool: self._rules_of(tool) for tool in self._tools}
        self._seen.cache_clear()

    def index_tools(self, tools: Iterable[str]) -> None:
        """Re-index the rules for the exposed tools of a new catalogue."""
        self._tools = tuple(tools)
        self._index = {tool: self._rules_of(tool) for tool in self._tools}
        self._seen.cache_clear()

    def rules_for(self, tool: str) -> ToolRules:
        found = self._index.get(tool)
        return found if found is not None else self._rules_of(tool)

    def _rules_of(self, tool: str) -> ToolRules:
        concerned = [rule for rule in self.policies.rules if rule.concerns(tool)]
        return ToolRules(
            call=tuple(rule for rule in concerned if not rule.on_result and rule.effect is not None),
            result=tuple(rule for rule in concerned if rule.on_result),
            mask=tuple(path for rule in concerned for path in rule.mask),
        )

    # -- decisions -----------------------------------------------------------------------------

    def evaluate(
        self,
        tool: str,
        arguments: Mapping[str, Any],
        *,
        now: float,
        who: Who = ANONYMOUS,
    ) -> Decision:
        """The decision on one call for `who`. Never raises: an error while evaluating is a `deny`."""
        return self._decide(tool, arguments, now, who, None)

    def explain(
        self,
        tool: str,
        arguments: Mapping[str, Any],
        *,
        now: float,
        who: Who = ANONYMOUS,
    ) -> tuple[Decision, list[tuple[str, str]]]:
        """The decision, and for every rule of every file what it made of this call and why."""
        trace: list[tuple[str, str]] = []
        concerned = {rule.id for rule in self.rules_for(tool).call}
        for rule in self.policies.rules:
            if rule.on_result:
                trace.append((rule.id, "result rule: applies to what the tool returns, not to the call"))
            elif rule.effect is None:
                trace.append((rule.id, "masks argument paths in the audit log; decides nothing"))
            elif rule.id not in concerned:
                named = (
                    ("tools", rule.tools),
                    ("resources", rule.resources),
                    ("prompts", rule.prompts),
                    ("sampling", rule.sampling),
                    ("elicitation", rule.elicitation),
                )
                globs = ", ".join(f"{key} {list(values)}" for key, values in named if values)
                trace.append((rule.id, f"{globs} do not match '{tool}'"))
        decision = self._decide(tool, arguments, now, who, trace)
        order = {rule.id: index for index, rule in enumerate(self.policies.rules)}
        trace.sort(key=lambda item: order.get(item[0], -1))
        return decision, trace

    def _decide(
        self,
        tool: str,
        arguments: Mapping[str, Any],
        now: float,
        who: Who,
        trace: list[tuple[str, str]] | None,
    ) -> Decision:
        given = arguments
        try:
            arguments, forwarded = self.policies.paths.normalise(tool, given)
        except ValueError as exc:  # fail closed, also in monitor mode: no rule can judge such a path
            return Decision(Effect.DENY, f"{exc}; refused", self.policies.revision)
        except Exception as exc:  # arrays nested past the recursion limit, say
            reason = f"the declared paths of '{tool}' could not be normalised ({type(exc).__name__})"
            return Decision(Effect.DENY, reason + "; refused to be safe", self.policies.revision)
        enforced: list[_Match] = []
        monitored: list[_Match] = []
        rated: list[str] = []
        unmatched: list[str] = []
        for rule in self.rules_for(tool).call:
            unmet = rule.unmet_by(who)
            if unmet is not None:
                if trace is not None:
                    trace.append((rule.id, _unmet_note(rule, unmet, who)))
                continue
            if rule.when is not None:
                try:
                    applies = when_holds(rule, arguments)
                except Exception as exc:  # fail closed: a rule that cannot be evaluated denies
                    reason = f"rule '{rule.id}' could not be evaluated ({type(exc).__name__}); refused to be safe"
                    if trace is not None:
                        trace.append((rule.id, reason))
                    return Decision(Effect.DENY, reason, self.policies.revision, (rule.id,))
                if not applies:
                    unmatched.append(rule.id)
                    if trace is not None:
                        trace.append((rule.id, "matches the tool, but 'when' does not match the arguments"))
                    continue
            match = _Match(rule, rule.effect or Effect.DENY)  # call rules always have one (checked at load)
            if rule.rate is not None:
                wait = self.limiter.wait(who, rule, now)
                if wait:
                    match = _Match(rule, Effect.DENY, _rate_note(rule, wait, who))
                else:
                    rated.append(rule.id)
            (monitored if rule.monitor else enforced).append(match)
            if trace is not None:
                verdict = match.note or f"matches: {match.effect.value}"
                trace.append((rule.id, verdict + (" (monitor: recorded, not enforced)" if rule.monitor else "")))
        decision = self._resolve(tool, forwarded, given, enforced, unmatched)
        would: Effect | None = None
        if monitored:
            with_monitored = self._resolve(tool, forwarded, given, enforced + monitored, unmatched)
            if with_monitored.effect is not decision.effect:
                would = with_monitored.effect
        if self.monitor_mode and not decision.proceeds:
            would = decision.effect
            rewritten = decision.arguments not in (None, forwarded)
            effect = Effect.REWRITE if rewritten else Effect.ALLOW
            sent = decision.arguments if rewritten or forwarded is given else forwarded
            reason = f"monitor mode, would {would.value}: {decision.reason}"
            decision = replace(decision, effect=effect, reason=reason, arguments=sent)
        if would is None and not monitored and not rated:
            return decision
        return replace(decision, would=would, monitored=tuple(match.rule.id for match in monitored), rated=tuple(rated))

    def _resolve(
        self,
        tool: str,
        arguments: Mapping[str, Any],
        given: Mapping[str, Any],
        matches: list[_Match],
        unmatched: list[str],
    ) -> Decision:
        """The decision on `arguments` (declared paths normalised) that these matching rules make; a
        decision that lets the call go on carries them when they are not those `given`."""
        revision = self.policies.revision
        normalised = arguments if arguments is not given else None
        if not matches:
            default = self.policies.default
            reason = f"no policy rule decides this call to '{tool}', and the default is {default.value}"
            if unmatched:
                reason += " (rules whose conditions these arguments do not meet: "
                reason += ", ".join(f"'{rule_id}'" for rule_id in unmatched) + ")"
            return Decision(default, reason, revision, arguments=normalised if default is not Effect.DENY else None)
        ids = tuple(match.rule.id for match in matches)
        top = min(matches, key=lambda match: _PRECEDENCE.index(match.effect))
        rewritten: Mapping[str, Any] | None = None
        if top.effect in (Effect.ASK, Effect.REWRITE, Effect.ALLOW):
            patched: Any = arguments
            for match in matches:
                if match.effect is Effect.REWRITE and match.rule.patch is not None:
                    patched = merge_patch(patched, match.rule.patch)
            if patched != arguments:
                rewritten = patched
        effect = top.effect
        if effect is Effect.REWRITE and rewritten is None:
            effect = Effect.ALLOW  # the arguments already were what the rewrite asks for
        rule = top.rule
        if top.note:
            reason = top.note
        elif top.effect is Effect.DENY:
            reason = f"denied by rule '{rule.id}'" + (f": {rule.reason}" if rule.reason else "")
        elif top.effect is Effect.ASK:
            reason = f"rule '{rule.id}' needs a person's approval" + (f": {rule.reason}" if rule.reason else "")
        elif top.effect is Effect.REWRITE:
            by = ", ".join(f"'{match.rule.id}'" for match in matches if match.effect is Effect.REWRITE)
            reason = f"arguments rewritten by rule {by}" + (f": {rule.reason}" if rule.reason else "")
        else:
            reason = f"allowed by rule '{rule.id}'" + (f": {rule.reason}" if rule.reason else "")
        if rewritten is None and top.effect is not Effect.DENY:
            rewritten = normalised
        return Decision(effect, reason, revision, ids, rewritten)

    def charge(self, decision: Decision, who: Who, now: float) -> bool:
        """Count a call that goes ahead against its rate-limited rules in memory; `False` if one is now at
        its limit (a dry run's counts; a gateway's go through `charge_call`)."""
        return self.limiter.charge(who, self._rated(decision), now)

    def refund(self, decision: Decision, who: Who, now: float) -> None:
        self.limiter.refund(who, self._rated(decision), now)

    async def charge_call(self, decision: Decision, who: Who, now: float) -> Charge:
        """Count a call that goes ahead against its rate-limited rules, all or none; `Charge.refusal` says
        why it may not go ahead after all (a rule now at its limit, or shared counts out of reach). A call
        no rate applies to costs nothing, and in memory nothing waits."""
        rules = self._rated(decision)
        if not rules:
            return Charge(who)
        if self.shared is not None:
            return await self._charge_shared(self.shared, who, rules, now, count=True)
        if self.limiter.charge(who, rules, now):
            return Charge(who, tuple(rules), now)
        limited = next(rule for rule in rules if self.limiter.wait(who, rule, now))
        return Charge(who, refusal=_rate_note(limited, self.limiter.wait(who, limited, now), who))

    async def before_asking(self, decision: Decision, who: Who) -> Decision:
        """`decision` (an ask) as shared counts stand now: denied when a rule is at its limit, as `evaluate`
        denies it from counts in memory, so that nobody is asked about a call that could not go ahead."""
        rules = self._rated(decision)
        if self.shared is None or not rules:
            return decision
        return self.charged(decision, await self._charge_shared(self.shared, who, rules, 0.0, count=False))

    async def _charge_shared(
        self, shared: SharedRates, who: Who, rules: list[Rule], now: float, *, count: bool
    ) -> Charge:
        """The charge counted in the store (or, not `count`ing, the counts looked at): its answer decides,
        as `wait` does in memory (fail closed: counts that cannot be reached refuse every call an enforced
        rate applies to)."""
        enforced = [not (rule.monitor or self.monitor_mode) for rule in rules]
        try:
            counted = await (shared.charge(who, rules, enforced) if count else shared.waits(who, rules))
        except StoreError as exc:
            if not any(enforced):
                logger.warning("monitored rate limits not counted: %s", exc)
                return Charge(who)
            by = ", ".join(f"'{rule.id}'" for rule, on in zip(rules, enforced, strict=True) if on)
            return Charge(who, refusal=f"the rate limits of rule {by} cannot be counted ({exc}); refused to be safe")
        for rule, on in zip(rules, enforced, strict=True):
            if on and rule.id in counted.waits:
                return Charge(who, refusal=_rate_note(rule, counted.waits[rule.id], who))
        return Charge(who, tuple(rules), now, counted.hits, would_deny=bool(counted.waits))

    def charged(self, decision: Decision, charge: Charge) -> Decision:
        """`decision` as its charge leaves it: a deny when a rule was at its limit (or the counts out of
        reach), noting a monitored rule that was."""
        if charge.refusal is not None:
            return replace(decision, effect=Effect.DENY, reason=charge.refusal, arguments=None, rated=())
        if charge.would_deny and decision.would is None:
            return replace(decision, would=Effect.DENY)
        return decision

    async def refund_call(self, charge: Charge) -> None:
        """Take back a charge whose call was refused after all."""
        if self.shared is not None:
            if charge.hits:
                try:
                    await self.shared.refund(charge.hits)
                except StoreError as exc:  # the hits stay counted until they expire: never more calls than allowed
                    logger.warning("a refused call's rate-limit count could not be taken back: %s", exc)
        elif charge.rules:
            self.limiter.refund(charge.who, charge.rules, charge.at)

    def forget(self, session: str) -> None:
        """Drop a finished session's own rate-limit counts (a principal's outlive its sessions)."""
        self.limiter.forget(session)
        if self.shared is not None:
            self.shared.forget(session)

    def _rated(self, decision: Decision) -> list[Rule]:
        if not decision.rated:
            return []
        rules = (self._by_id.get(rule_id) for rule_id in decision.rated)
        return [rule for rule in rules if rule is not None and rule.rate is not None]

    # -- visibility ----------------------------------------------------------------------------

    def visible(self, tool: str, who: Who = ANONYMOUS) -> bool:
        """False when no rule can ever let this caller call `tool`: it is then hidden from its lists."""
        if self.monitor_mode:
            return True
        return self._seen(tool, who.client, who.principal, who.attributes)

    def lists_templates(self, who: Who = ANONYMOUS) -> bool:
        """Whether resource templates are listed for this caller: a template stands for URIs known only
        when they are read (each read is then decided on its own), so it is listed when the default, or
        some rule naming resources, can let a read go ahead."""
        if self.monitor_mode or self.policies.default is not Effect.DENY:
            return True
        return any(
            rule.resources
            and not rule.on_result
            and not rule.monitor
            and rule.effect not in (None, Effect.DENY)
            and rule.applies_to(who)
            for rule in self.policies.rules
        )

    def reachable(self, tool: str) -> bool:
        """False when no caller at all can ever call `tool` (`policy check` warns of an upstream whose every
        tool is so): a rule denies it to every caller whatever the arguments, or none allows it to any."""
        return self.monitor_mode or self._visible(tool, None, "", frozenset())

    def _visible(self, tool: str, client: str | None, principal: str, attributes: frozenset[str]) -> bool:
        """`client` None: any caller, for whom a rule limited to some callers allows but never denies."""
        who = Who(client or "", principal, attributes)
        rules = [
            rule for rule in self.rules_for(tool).call if not rule.monitor and (client is None or rule.applies_to(who))
        ]
        if any(
            rule.effect is Effect.DENY and rule.when is None and (client is not None or rule.for_every_caller)
            for rule in rules
        ):
            return False
        if self.policies.default is not Effect.DENY:
            return True
        return any(rule.effect is not Effect.DENY for rule in rules)

    # -- results -------------------------------------------------------------------------------

    def screen_result(self, tool: str, result: Mapping[str, Any], who: Who = ANONYMOUS) -> Screening:
        """Apply the result rules for `who` to what the upstream returned: withhold it, or mask parts of its text."""
        rules = [rule for rule in self.rules_for(tool).result if rule.applies_to(who)]
        return screen(rules, result, monitor_mode=self.monitor_mode)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, `null` removes a key, anything else replaces."""
    if not isinstance(patch, Mapping):
        return patch
    merged = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _rate_note(rule: Rule, wait: float, who: Who) -> str:
    limit = rule.rate.text if rule.rate is not None else "a limited number of calls"
    per = "per principal" if who.principal else "per session"
    return f"rule '{rule.id}' allows {limit} {per} and that limit is reached; try again in {math.ceil(wait)}s"


def _unmet_note(rule: Rule, key: str, who: Who) -> str:
    """Why a rule does not concern `who`, for `explain`: the key whose globs it does not match."""
    globs = list(getattr(rule, key) or ())
    if key == "clients":
        return f"clients {globs} do not match {who.client!r}"
    if key == "principals":
        held = repr(who.principal) if who.principal else "no principal (none authenticated)"
        return f"principals {globs} do not match {held}"
    return f"attributes {globs} match none of the caller's {sorted(who.attributes)}"
