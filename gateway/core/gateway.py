"""The gateway as a downstream MCP server sees it, whatever the transport: catalogue, calls, changes.

A `tools/call` is resolved to its upstream tool, turned into a `ToolCall`, run through the pipeline,
and its `Outcome` returned as the result in wire form. Lists are built from the catalogue snapshot
for the caller; prompts and resources are forwarded to their upstream. A request the gateway
refuses raises `ProtocolError`; an unexpected exception never reaches the wire with its text.

The transports answer the protocol around it: `gateway.downstream.stdio` serves both eras over the agent's
pipes with no SDK server in the process; `gateway.downstream.http` adapts it to the SDK's `Server` for
streamable HTTP. Each registers an `Announcer` to hear which lists changed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread
import mcp_types as types

from gateway import __version__
from gateway.audit.approvals import AskedCall
from gateway.audit.events import GatewayEvents
from gateway.audit.shared_approvals import approval_queue, approval_states
from gateway.audit.stages import SHUTDOWN_GRACE, CallAudit
from gateway.calls import (
    Answer,
    Approval,
    Approver,
    Channel,
    Decision,
    Handler,
    Outcome,
    OutcomeKind,
    SessionInfo,
    ToolCall,
)
from gateway.catalog.listing import Catalog, ExposedTool
from gateway.catalog.pins import Assessment, Lock
from gateway.catalog.shared_pins import shared_pins
from gateway.catalog.uris import normal_uri
from gateway.core.approvals import REQUESTED_SCHEMA, ApprovalDesk
from gateway.core.asking import QueueAsker, masked_call
from gateway.core.dispatch import Caps, Dispatcher, Route
from gateway.core.notices import Notices
from gateway.core.own_files import GatewayFiles
from gateway.core.pipeline import build_pipeline
from gateway.core.requests import Caller, Request, RoundTrip, ToolRequest
from gateway.core.sessions import Sessions
from gateway.core.targets import (
    prompt_completion,
    prompt_target,
    resource_target,
    subscription_target,
    template_completion,
)
from gateway.core.watch import watch_file, watch_policies
from gateway.errors import ApprovalsError, GatewayError, LockError, ProtocolError, format_seconds
from gateway.policy.engine import PolicyEngine, PolicySet
from gateway.policy.rules import PROMPT_PREFIX, RESOURCE_PREFIX
from gateway.principals import Principal
from gateway.upstream.pool import UpstreamPool

if TYPE_CHECKING:
    from gateway.core.notify import ApprovalNotifier

logger = logging.getLogger(__name__)

ListKind = Literal["tools", "prompts", "resources"]
Announcer = Callable[[list[ListKind]], Awaitable[None]]
"""Tells one transport's clients which lists changed."""


class Gateway:
    """Serves the pool's catalogue downstream and routes every tool call through the pipeline."""

    def __init__(
        self, pool: UpstreamPool, engine: PolicyEngine, audit: CallAudit, events: GatewayEvents, *, transport: str
    ) -> None:
        self.pool = pool
        self.engine = engine
        self.audit = audit
        self.events = events
        self.sessions = Sessions(events, engine)
        self.notices = Notices(engine, pool.set_log_level, pool.unsubscribe, pool.connection)
        """Log levels and resource subscriptions per session; what upstreams send on their own."""
        self.sessions.on_end.append(self.notices.forget)
        self.transport = transport
        own_files = GatewayFiles.of(pool.config)
        for line in own_files.exposures(pool.config):
            logger.warning("%s", line)
        self.pipeline: Handler = build_pipeline(pool, engine, audit, own_files)
        self.desk = ApprovalDesk(
            pool.config.gateway.ask_timeout,
            declared=lambda tool: engine.policies.paths.declared(tool),
            states=approval_states(pool.config),
        )
        approvals = pool.config.gateway.approvals
        self.notifier: ApprovalNotifier | None = None
        """Announces each waiting approval (`[gateway.approvals] notify`), in the background."""
        if approvals.notify is not None:
            from gateway.core.notify import ApprovalNotifier  # its HTTP client, only when notices are sent

            self.notifier = ApprovalNotifier(approvals.notify, approvals.notify_headers, approvals.console_url)
        self.asker = QueueAsker(
            approval_queue(pool.config),
            self.desk,
            self._asked_call,
            lambda: engine.policies.revision,
            self.notifier.notify if self.notifier is not None else None,
            pool.config.gateway.max_calls_per_session,
        )
        """The approval queue as a way of asking (`[gateway.approvals] via`)."""
        engine.index_tools(pool.catalog.tools)
        self._startup_timeout = pool.config.gateway.startup_timeout
        self._started = False
        self.stdio_session = uuid.uuid4().hex
        self.announcers: list[Announcer] = []
        self._published = pool.catalog
        self.dispatcher = Dispatcher(
            {
                "tools/list": Route(types.PaginatedRequestParams, self.list_tools),
                "tools/call": Route(types.CallToolRequestParams, self.call_tool),
                "prompts/list": Route(types.PaginatedRequestParams, self.list_prompts),
                "prompts/get": Route(types.GetPromptRequestParams, self.get_prompt),
                "resources/list": Route(types.PaginatedRequestParams, self.list_resources),
                "resources/templates/list": Route(types.PaginatedRequestParams, self.list_resource_templates),
                "resources/read": Route(types.ReadResourceRequestParams, self.read_resource),
                "resources/subscribe": Route(types.SubscribeRequestParams, self.subscribe),
                "resources/unsubscribe": Route(types.UnsubscribeRequestParams, self.unsubscribe),
                "completion/complete": Route(types.CompleteRequestParams, self.complete),
                "logging/setLevel": Route(types.SetLevelRequestParams, self.set_log_level),
            },
            audit,
            events.relayed,
            Caps(pool.config.gateway.max_calls_in_flight, pool.config.gateway.max_calls_per_session),
        )
        """Every downstream request, and every request an upstream sends, goes through it."""
        pool.listen(self)
        self.name = pool.config.gateway.name
        self.version = __version__

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the upstream pool, the policy watcher and the approval notices until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.pool.run)
                if self.notifier is not None:
                    await tg.start(self.notifier.run)
                policy_dir = self.pool.config.policy_dir
                tg.start_soon(
                    watch_policies, policy_dir, self._revision, self.install_policies, self.events.policy_reload_failed
                )
                shared = shared_pins(self.pool.config)
                if shared is None:
                    tg.start_soon(watch_file, self.pool.config.lock_path, self.reload_lock)
                else:
                    install = partial(self.put_lock_in_force, source=shared.label)
                    tg.start_soon(shared.watch, lambda: self.pool.lock, install, self._lock_failed)
                task_status.started()
        finally:
            if self.asker.queue.remote:  # the shared store's connections, let go of off the event loop
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self.asker.queue.close)
                    await anyio.to_thread.run_sync(self.desk.close)

    async def reload_lock(self) -> None:
        """`upstreams.lock` changed (an approval, say): put its pins in force; a damaged one changes nothing."""
        path = self.pool.config.lock_path
        try:
            lock = Lock.read(path)
        except LockError as exc:
            logger.error("%s; the pins in force stay", exc)
            self.events.lock_reloaded("error", f"{exc}; the pins in force stay")
            return
        if lock is None and self.pool.lock is not None:
            logger.error("%s disappeared; the pins in force stay until the gateway restarts", path)
            self.events.lock_reloaded("error", "the lock file disappeared; the pins in force stay")
            return
        await self.put_lock_in_force(lock, source=str(path))

    async def put_lock_in_force(self, lock: Lock | None, *, source: str) -> None:
        """New pins (from the lock file, or the store's): in force now, and the definitions screened again."""
        await self.pool.install_lock(lock)
        held = len(self.pool.quarantined)
        logger.info("pins reloaded from %s: %d tools quarantined", source, held)
        self.events.lock_reloaded("ok", f"{held} tools quarantined")

    def _lock_failed(self, detail: str) -> None:
        self.events.lock_reloaded("error", detail)

    def _revision(self) -> str:
        return self.engine.policies.revision

    async def install_policies(self, policies: PolicySet, trigger: str) -> None:
        """Put a new policy set in force; which tools are visible may change, so clients are told."""
        self.engine.replace_policies(policies)
        self.events.policy_reloaded(policies.revision, len(policies.rules), list(policies.files), trigger)
        if self._started:
            await self._announce(["tools"])

    # The pool's `UpstreamListener`.

    def upstream_changed(self, upstream: str, up: bool, description: str) -> None:
        self.events.upstream_changed(upstream, up, description)

    def assessed(self, assessments: list[Assessment]) -> None:
        self.events.assessed(assessments)

    async def upstream_request(
        self, upstream: str, method: str, params: Mapping[str, Any], calls: Sequence[ToolCall]
    ) -> dict[str, Any]:
        return await self.dispatcher.upstream_request(upstream, method, params, calls)

    async def upstream_notification(
        self,
        upstream: str,
        method: str,
        params: Mapping[str, Any],
        calls: Sequence[ToolCall],
        principal: str | None = None,
    ) -> None:
        await self.notices.relay(upstream, method, params, calls, principal)

    async def catalog_changed(self, catalog: Catalog) -> None:
        """Tell every downstream peer what changed: notifications (handshake era) and listen streams (2026)."""
        before, self._published = self._published, catalog
        self.engine.index_tools(catalog.tools)
        self.events.catalog_changed(_tool_definitions(before), _tool_definitions(catalog))
        if not self._started:
            return  # nobody has listed yet: the first list, which waits for start-up, tells it all
        changed: list[ListKind] = []
        if _tool_signature(before) != _tool_signature(catalog):
            changed.append("tools")
        if set(before.prompts) != set(catalog.prompts):
            changed.append("prompts")
        if set(before.resources) != set(catalog.resources) or len(before.templates) != len(catalog.templates):
            changed.append("resources")
        await self._announce(changed)

    async def _announce(self, changed: list[ListKind]) -> None:
        if not changed:
            return
        for announce in list(self.announcers):
            try:
                await announce(changed)
            except Exception:  # one transport's failure never keeps the others uninformed
                logger.exception("announcing changed lists failed")

    async def wait_for_startup(self) -> None:
        """The first lists wait for upstreams still starting, up to `startup_timeout`."""
        if not self._started:
            await self.pool.wait_settled(self._startup_timeout)
            self._started = True

    def input_schema(self, name: str) -> dict[str, Any] | None:
        tool = self.pool.catalog.tools.get(name)
        return dict(tool.source.definition["inputSchema"]) if tool is not None else None

    async def list_tools(self, request: Request, params: types.PaginatedRequestParams) -> types.ListToolsResult:
        """The tools this caller may see (the first list waits for upstreams still starting)."""
        session = request.caller.session
        await self.wait_for_startup()
        return types.ListToolsResult(
            tools=[tool.model for tool in self.pool.catalog.tools.values() if self._visible(tool.name, session)]
        )

    async def _unknown(
        self, session: SessionInfo, name: str, arguments: Mapping[str, Any], message: str, quarantine: str | None = None
    ) -> ProtocolError:
        """Record a call to something that does not exist, is hidden from this caller or is quarantined;
        the error it is answered with."""
        self.sessions.note(session)
        await self.audit.unknown_tool(session, name, arguments, quarantine=quarantine)
        return ProtocolError(types.INVALID_PARAMS, message)

    async def _quarantined(
        self, session: SessionInfo, name: str, arguments: Mapping[str, Any], what: str, held: Assessment
    ) -> ProtocolError:
        """Record a call to a quarantined definition; the error, saying why and how to release it."""
        reason = held.reason()
        return await self._unknown(session, name, arguments, f"{what} is refused: {reason}", reason)

    async def refuse_misclaimed(
        self, session: SessionInfo, method: str, params: Mapping[str, Any] | None, error: ProtocolError
    ) -> ProtocolError:
        """A request naming another client than its connection's (`session`'s): a call is recorded as
        refused before any policy decision, under the connection's session; returns `error`, to answer with.
        A record that cannot be made is logged: the refusal stands."""
        name = (params or {}).get("name")
        arguments = (params or {}).get("arguments")
        if method == "tools/call" and isinstance(name, str):
            try:
                self.sessions.note(session)
                await self.audit.unresolved(
                    session,
                    name,
                    arguments if isinstance(arguments, Mapping) else {},
                    stage="client-identity",
                    reason=error.message,
                    outcome=OutcomeKind.REFUSED,
                )
            except Exception as exc:
                logger.error("a call refused for naming another client could not be recorded (%s)", type(exc).__name__)
        return error

    def _visible(self, name: str, session: SessionInfo) -> bool:
        """Whether policy can ever let this caller reach `name` (a tool, `resource:URI` or `prompt:NAME`)."""
        return self.engine.visible(name, session.who)

    async def call_tool(
        self, request: Request, checked: ToolRequest | types.CallToolRequestParams
    ) -> Mapping[str, Any]:
        """One `tools/call`, on either path: resolve the tool, run the pipeline, return the result (wire form).

        A tool that does not exist, is hidden from this caller or is quarantined raises `ProtocolError`.
        """
        caller, session = request.caller, request.caller.session
        params = checked if isinstance(checked, ToolRequest) else ToolRequest.of(checked)
        try:
            await self.wait_for_startup()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(SHUTDOWN_GRACE):
                reason = "cancelled while the gateway's upstreams were still starting, before any policy decision"
                self.sessions.note(session)
                await self.audit.unresolved(
                    session,
                    params.name,
                    params.arguments,
                    stage="startup",
                    reason=reason,
                    outcome=OutcomeKind.CANCELLED,
                )
            raise
        tool = self.pool.catalog.tools.get(params.name)
        if tool is None and (held := self.pool.quarantined.get(params.name)) is not None:
            raise await self._quarantined(session, params.name, params.arguments, f"Tool {params.name}", held)
        if tool is None or not self._visible(tool.name, session):
            # A tool no rule lets this client call is hidden, and refused like one that does not exist.
            raise await self._unknown(session, params.name, params.arguments, f"Unknown tool: {params.name}")
        call = await self._call(caller, tool, params.arguments, self._approver(caller, params))
        return (await self._run(call)).result

    async def _run(self, call: ToolCall) -> Outcome:
        """The pipeline, with its boundary: an unexpected fault is logged, never sent with its text."""
        try:
            return await self.pipeline(call)
        except ProtocolError:
            raise
        except GatewayError as exc:
            raise ProtocolError(types.INTERNAL_ERROR, str(exc)) from None
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            logger.exception("call %s (a %s) failed inside the gateway", call.id, call.tool.kind)
            raise ProtocolError(types.INTERNAL_ERROR, f"internal gateway error (call {call.id})") from None

    async def _mediated(
        self, caller: Caller, target: ExposedTool, arguments: Mapping[str, Any], retry: RoundTrip
    ) -> Mapping[str, Any]:
        """A resource read or a prompt get through the pipeline, as a tool call goes: its result (or, asking
        a person on a 2026-07-28 connection, its `input_required` result), or what ended it as a JSON-RPC
        error (these results cannot say "refused" themselves)."""
        call = await self._call(caller, target, arguments, self._approver(caller, retry))
        outcome = await self._run(call)
        if outcome.kind in (OutcomeKind.OK, OutcomeKind.INPUT_REQUIRED):
            return outcome.result
        text = outcome.result["content"][0]["text"] if outcome.result.get("content") else outcome.reason
        code = types.INVALID_PARAMS if outcome.kind is OutcomeKind.REFUSED else types.INTERNAL_ERROR
        raise ProtocolError(code, text)

    async def _call(
        self, caller: Caller, target: ExposedTool, arguments: Mapping[str, Any], approver: Approver | None
    ) -> ToolCall:
        """The call `caller` makes of `target`, with everything that reaches back to its client."""
        if caller.log is not None and caller.log_level is not None:
            await self.notices.want_level(caller.log_level)
        return ToolCall(
            caller.session,
            target,
            arguments,
            progress=caller.progress,
            log=caller.log,
            approver=approver,
            relay=caller.relay,
        )

    def _approver(self, caller: Caller, params: ToolRequest | RoundTrip) -> Approver | None:
        """How this request can ask a person (`_asking`), once the approval key is at hand: with a shared
        store it is read from there the first time, and a store that cannot be reached refuses the call."""
        asking = self._asking(caller, params)
        desk = self.desk
        if asking is None or not desk.blocking:
            return asking

        async def key_first(call: ToolCall, decision: Decision) -> Approval:
            try:
                await anyio.to_thread.run_sync(desk.ready)
            except ApprovalsError as exc:
                return Approval(Answer.CANNOT_ASK, str(exc), Channel.QUEUE)
            return await asking(call, decision)

        return key_first

    def _asking(self, caller: Caller, params: ToolRequest | RoundTrip) -> Approver | None:
        """How this request can ask a person: the agent's client (elicitation now in the handshake era,
        an input-required round trip in 2026-07-28: `params` carries the retry's state and answer), the
        approval queue, or both (the first decision wins), as `[gateway.approvals]` says."""
        settings = self.pool.config.gateway.approvals
        client_asks = caller.can_elicit and "client" in settings.via
        queue = self.asker if "queue" in settings.via and (settings.queue == "always" or not client_asks) else None
        desk = self.desk
        if caller.modern and client_asks:

            async def by_round_trip(call: ToolCall, decision: Decision) -> Approval:
                if params.request_state is None and params.answer is None:
                    entry = await queue.enter(call, decision) if queue is not None else None
                    return desk.pending(call, decision, entry.id if entry is not None else None)
                if desk.blocking:  # the used-once record is in the shared store
                    redeem = desk.redeem
                    verdict = await anyio.to_thread.run_sync(redeem, params.request_state, params.answer, call)
                else:
                    verdict = desk.redeem(params.request_state, params.answer, call)
                if queue is None or verdict.entry is None or verdict.answer is Answer.INVALID:
                    return verdict
                return await queue.settle(verdict.entry, verdict, call, decision)

            return by_round_trip
        elicit = caller.elicit if client_asks and not caller.modern else None
        client: Callable[[ToolCall, Decision], Awaitable[Approval]] | None = None
        if elicit is not None:

            async def by_elicitation(call: ToolCall, decision: Decision) -> Approval:
                with anyio.move_on_after(desk.ttl):
                    try:
                        result = await elicit(desk.message(call, decision), REQUESTED_SCHEMA)
                    except ProtocolError as exc:
                        failed = f"the client could not ask a person ({exc.message})"
                        return Approval(Answer.CANNOT_ASK, failed, Channel.ELICITATION)
                    return desk.answer(result)
                return Approval(Answer.NO_ANSWER, f"no answer within {format_seconds(desk.ttl)}", Channel.ELICITATION)

            client = by_elicitation
        if queue is None:
            return client

        async def by_queue(call: ToolCall, decision: Decision) -> Approval:
            ask = client
            return await queue.ask(call, decision, None if ask is None else lambda: ask(call, decision))

        return by_queue

    def _asked_call(self, call: ToolCall, decision: Decision) -> AskedCall:
        """What the approval queue shows of `call`: masked as its decision event will be."""
        redactor = self.audit.recorder.redactor
        rules = self.engine.rules_for(call.tool.name)
        paths = tuple(self.engine.policies.paths.declared(call.tool.name))
        redaction = redactor.redact(call.arguments, rules.mask)

        def mask(arguments: Mapping[str, Any]) -> Mapping[str, Any]:
            masked: Mapping[str, Any] = (
                redaction if arguments is call.arguments else redactor.redact(arguments, rules.mask)
            ).value
            return masked

        return masked_call(call, decision, mask, paths, lambda text: redaction.scrub(text, redactor))

    def session_info(
        self,
        session_id: str,
        protocol_version: str,
        client_name: str,
        client_version: str,
        principal: Principal | None = None,
        address: str = "",
    ) -> SessionInfo:
        """One downstream connection (noted in the audit log the first time it is seen), with the principal
        the transport authenticated, if any, and the client's address where the transport has one."""
        session = SessionInfo(
            session_id,
            self.transport,
            protocol_version,
            client_name,
            client_version,
            principal.name if principal is not None else "",
            principal.attributes if principal is not None else frozenset(),
            address,
        )
        self.sessions.note(session)
        return session

    async def list_prompts(self, request: Request, params: types.PaginatedRequestParams) -> types.ListPromptsResult:
        """The prompts this caller may get (a prompt no rule can let it get is hidden, as tools are)."""
        session = request.caller.session
        await self.wait_for_startup()
        prompts = self.pool.catalog.prompts.values()
        return types.ListPromptsResult(
            prompts=[p.model for p in prompts if self._visible(PROMPT_PREFIX + p.name, session)]
        )

    async def get_prompt(self, request: Request, params: types.GetPromptRequestParams) -> Mapping[str, Any]:
        """The prompt from its upstream, decided, recorded and screened like a tool call."""
        session = request.caller.session
        await self.wait_for_startup()
        prompt = self.pool.catalog.prompts.get(params.name)
        arguments = dict(params.arguments or {})
        if prompt is None and (held := self.pool.quarantined_prompts.get(params.name)) is not None:
            raise await self._quarantined(
                session, PROMPT_PREFIX + params.name, arguments, f"Prompt {params.name}", held
            )
        if prompt is None or not self._visible(PROMPT_PREFIX + params.name, session):
            raise await self._unknown(session, PROMPT_PREFIX + params.name, arguments, f"Unknown prompt: {params.name}")
        return await self._mediated(request.caller, prompt_target(prompt), arguments, RoundTrip.of(params))

    async def list_resources(self, request: Request, params: types.PaginatedRequestParams) -> types.ListResourcesResult:
        """The listed resources this caller may read (one no rule can let it read is hidden)."""
        session = request.caller.session
        await self.wait_for_startup()
        listed = self.pool.catalog.resources.items()
        shown = [resource for uri, (_, resource) in listed if self._visible(RESOURCE_PREFIX + normal_uri(uri), session)]
        return types.ListResourcesResult(resources=shown)

    async def list_resource_templates(
        self, request: Request, params: types.PaginatedRequestParams
    ) -> types.ListResourceTemplatesResult:
        """The templates, when some rule (or the default) can let this caller read what they stand for."""
        session = request.caller.session
        await self.wait_for_startup()
        templates: list[types.ResourceTemplate] = []
        if self.engine.lists_templates(session.who):
            templates = [template for _, _, template in self.pool.catalog.templates]
        return types.ListResourceTemplatesResult(resource_templates=templates)

    async def read_resource(self, request: Request, params: types.ReadResourceRequestParams) -> Mapping[str, Any]:
        """The resource from the upstream that serves it, decided, recorded and screened like a tool call."""
        uri, upstream, definition, variables = await self._resource(request, str(params.uri))
        target = resource_target(upstream, uri, definition)
        return await self._mediated(request.caller, target, {**variables, "uri": uri}, RoundTrip.of(params))

    async def _resource(self, request: Request, asked: str) -> tuple[str, str, dict[str, Any], Mapping[str, str]]:
        """The resource a request names: its URI in normal form, the upstream serving it, the definition
        it falls under and its template variables. One unknown, or hidden from this caller, is recorded
        and refused."""
        session = request.caller.session
        await self.wait_for_startup()
        uri = normal_uri(asked)
        source = self.pool.catalog.resource_source(uri)
        if source is None and (held := self.pool.quarantined_read(uri)) is not None:
            raise await self._quarantined(session, RESOURCE_PREFIX + uri, {"uri": uri}, f"Resource {uri}", held)
        if source is None or not self._visible(RESOURCE_PREFIX + uri, session):
            raise await self._unknown(session, RESOURCE_PREFIX + uri, {"uri": uri}, f"Unknown resource: {uri}")
        upstream, definition, variables = source
        return uri, upstream, definition.model_dump(by_alias=True, mode="json", exclude_none=True), variables

    async def subscribe(self, request: Request, params: types.SubscribeRequestParams) -> Mapping[str, Any]:
        """A subscription to a resource, decided as a read of it (only an allow lets it go ahead) and
        recorded; its updates then reach this session alone (`Notices`)."""
        caller = request.caller
        if caller.updated is None:
            raise ProtocolError(types.INVALID_REQUEST, "this connection cannot receive resource updates")
        uri, upstream, definition, variables = await self._resource(request, str(params.uri))
        target = subscription_target(upstream, uri, definition)
        arguments = {**variables, "uri": uri}
        await self._mediated(caller, target, arguments, RoundTrip())
        self.notices.follow(
            upstream, uri, target.upstream_name, str(params.uri), arguments, caller.session, caller.updated
        )
        return {}

    async def unsubscribe(self, request: Request, params: types.UnsubscribeRequestParams) -> Mapping[str, Any]:
        """This session stops following a resource (nothing is decided: it only gives something up)."""
        await self.notices.unfollow(normal_uri(str(params.uri)), request.caller.session.id)
        return {}

    async def set_log_level(self, request: Request, params: types.SetLevelRequestParams) -> Mapping[str, Any]:
        """The level from which this session receives the log messages of its calls' upstreams."""
        await self.wait_for_startup()
        await self.notices.choose_level(request.caller.session, params.level)
        return {}

    async def complete(self, request: Request, params: types.CompleteRequestParams) -> Mapping[str, Any]:
        """Completing a prompt's or a resource template's argument: decided as the get or the read the
        value would make (only an allow lets it go ahead), recorded, and each value suggested kept only
        when the policy lets this caller reach what it would make."""
        session = request.caller.session
        await self.wait_for_startup()
        values = dict(params.context.arguments or {}) if params.context is not None else {}
        values[params.argument.name] = params.argument.value
        ref = params.ref
        if isinstance(ref, types.PromptReference):
            prompt = self.pool.catalog.prompts.get(ref.name)
            if prompt is None or not self._visible(PROMPT_PREFIX + ref.name, session):
                raise await self._unknown(session, PROMPT_PREFIX + ref.name, values, f"Unknown prompt: {ref.name}")
            declared = {argument.name for argument in prompt.model.arguments or ()}
            if not values.keys() <= declared:
                # A rule names the prompt's own arguments: values under another name would pass it unseen.
                unknown = ", ".join(sorted(values.keys() - declared))
                why = f"Prompt {ref.name} has no argument {unknown}"
                raise await self._unknown(session, PROMPT_PREFIX + ref.name, values, why)
            target, arguments = prompt_completion(prompt, params.argument.name, values)
        else:
            found = self.pool.catalog.template(ref.uri)
            if found is None:
                raise await self._unknown(
                    session, RESOURCE_PREFIX + ref.uri, values, f"Unknown resource template: {ref.uri}"
                )
            upstream, template, definition = found
            dumped = definition.model_dump(by_alias=True, mode="json", exclude_none=True)
            target, arguments = template_completion(upstream, template, dumped, params.argument.name, values)
            made = template.variables(str(arguments["uri"]))
            if made is None or any(made.get(name) != value for name, value in values.items()):
                # Only the template's lone variables (`{name}`, `{+path}`) make a URI a read would be
                # decided on; a value that would not show in it would be decided on another URI.
                why = f"Resource template {ref.uri} cannot be completed for {params.argument.name}"
                raise await self._unknown(session, target.name, arguments, why)
            if not self._visible(target.name, session):
                raise await self._unknown(session, target.name, arguments, f"Unknown resource template: {ref.uri}")
        return await self._mediated(request.caller, target, arguments, RoundTrip())


def _tool_definitions(catalog: Catalog) -> dict[str, tuple[str, str, Any]]:
    return {name: (tool.upstream, tool.source.digest, tool.source.definition) for name, tool in catalog.tools.items()}


def _tool_signature(catalog: Catalog) -> list[tuple[str, str]]:
    return [(name, tool.source.digest) for name, tool in catalog.tools.items()]
