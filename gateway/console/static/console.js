// The mcp-armor console's page. Every value from an agent, an upstream or the log is set with
// textContent (never as HTML); the page talks only to its own origin.
"use strict";

(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').getAttribute("content");
  const $ = (id) => document.getElementById(id);
  const MAX_CALLS = 1000;

  function cell(row, cls, text) {
    let td = row.querySelector("td." + cls);
    if (!td) {
      td = document.createElement("td");
      td.className = cls;
      row.appendChild(td);
    }
    td.textContent = text == null ? "" : String(text);
    return td;
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text != null) node.textContent = String(text);
    return node;
  }

  function findBy(container, attr, value) {
    for (const node of container.children) {
      if (node.getAttribute(attr) === value) return node;
    }
    return null;
  }

  function showError(text) {
    const box = $("error");
    box.textContent = text;
    box.hidden = !text;
  }

  // calls ---------------------------------------------------------------------------------------

  function matches(row) {
    const checks = [
      ["filter-session", "data-session"],
      ["filter-principal", "data-principal"],
      ["filter-tool", "data-tool"],
    ];
    for (const [input, attr] of checks) {
      const want = $(input).value.trim().toLowerCase();
      if (want && !(row.getAttribute(attr) || "").toLowerCase().includes(want)) return false;
    }
    const decision = $("filter-decision").value;
    return !decision || row.getAttribute("data-decision") === decision;
  }

  function filterCalls() {
    for (const row of $("calls").children) row.hidden = !matches(row);
  }

  function call(m) {
    const body = $("calls");
    let row = findBy(body, "data-call-id", m.call_id);
    if (!row) {
      row = el("tr", "call");
      row.setAttribute("data-call-id", m.call_id);
      body.insertBefore(row, body.firstChild);
      while (body.children.length > MAX_CALLS) body.removeChild(body.lastChild);
    }
    row.setAttribute("data-session", m.session);
    row.setAttribute("data-principal", m.principal);
    row.setAttribute("data-tool", m.tool);
    row.setAttribute("data-decision", m.decision);
    row.setAttribute("data-outcome", m.outcome);
    cell(row, "time", m.time);
    cell(row, "session", m.session);
    cell(row, "principal", m.principal);
    cell(row, "client", m.client);
    cell(row, "tool", m.tool);
    cell(row, "decision", m.decision);
    cell(row, "outcome", m.outcome);
    cell(row, "duration", m.duration);
    row.hidden = !matches(row);
  }

  // sessions, upstreams, catalogue --------------------------------------------------------------

  function session(m) {
    const body = $("sessions");
    let row = findBy(body, "data-session", m.session);
    if (!row) {
      row = el("tr", "session");
      row.setAttribute("data-session", m.session);
      body.insertBefore(row, body.firstChild);
      cell(row, "id", m.session);
      cell(row, "principal", m.principal);
      cell(row, "client", m.client);
    }
    cell(row, "state", m.state);
    cell(row, "since", m.time);
  }

  function upstream(m) {
    const body = $("upstreams");
    let row = findBy(body, "data-upstream", m.upstream);
    if (!row) {
      row = el("tr", "upstream");
      row.setAttribute("data-upstream", m.upstream);
      body.appendChild(row);
      cell(row, "name", m.upstream);
    }
    cell(row, "state", m.state);
    cell(row, "since", m.time);
  }

  function catalog(m) {
    const list = $("catalog");
    let item = findBy(list, "data-change", m.id);
    if (!item) {
      item = el("li", "catalog-change");
      item.setAttribute("data-change", m.id);
      list.insertBefore(item, list.firstChild);
    }
    item.textContent = m.text;
  }

  // approvals -----------------------------------------------------------------------------------

  async function post(path, payload) {
    const answer = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(payload),
      credentials: "same-origin",
    });
    const body = await answer.json().catch(() => ({}));
    if (!answer.ok) throw new Error(body.error || "refused (" + answer.status + ")");
    return body;
  }

  function approvalItem(a) {
    const item = el("li", "approval");
    item.setAttribute("data-approval-id", a.id);
    item.setAttribute("data-binding", a.binding);
    const head = el("div", "approval-head");
    head.appendChild(el("span", "approval-tool", a.tool));
    head.appendChild(document.createTextNode(" for "));
    head.appendChild(el("span", "approval-principal", a.principal));
    head.appendChild(document.createTextNode(" (" + a.client + ", session " + a.session.slice(0, 8) + ")"));
    item.appendChild(head);
    item.appendChild(el("pre", "approval-args", a.args));
    if (a.sent_args) {
      item.appendChild(el("div", "approval-note", "the agent sent (before a rule rewrote it):"));
      item.appendChild(el("pre", "approval-sent-args", a.sent_args));
    }
    const why = el("div", "approval-why");
    why.appendChild(document.createTextNode("rule "));
    why.appendChild(el("span", "approval-rule", a.rule));
    why.appendChild(document.createTextNode(": "));
    why.appendChild(el("span", "approval-reason", a.reason));
    why.appendChild(document.createTextNode(" — expires "));
    why.appendChild(el("span", "approval-expires", a.expires));
    item.appendChild(why);
    const reason = el("input", "deny-reason");
    reason.placeholder = "reason (optional)";
    const approve = el("button", "approve", "Approve");
    const deny = el("button", "deny", "Deny");
    approve.type = deny.type = "button";
    const decide = (yes) => async () => {
      approve.disabled = deny.disabled = true;
      try {
        await post("/console/approvals/" + encodeURIComponent(a.id), {
          approve: yes,
          binding: a.binding,
          note: reason.value,
        });
        showError("");
      } catch (error) {
        showError("approval " + a.id + ": " + error.message);
        approve.disabled = deny.disabled = false;
      }
    };
    approve.addEventListener("click", decide(true));
    deny.addEventListener("click", decide(false));
    item.appendChild(reason);
    item.appendChild(approve);
    item.appendChild(deny);
    if (!window.consoleApprover) approve.disabled = deny.disabled = true;
    return item;
  }

  function approvals(m) {
    const list = $("approvals");
    const wanted = new Set(m.pending.map((a) => a.id));
    for (const item of Array.from(list.children)) {
      if (!wanted.has(item.getAttribute("data-approval-id"))) list.removeChild(item);
    }
    for (const a of m.pending) {
      if (!findBy(list, "data-approval-id", a.id)) list.appendChild(approvalItem(a));
    }
    $("approvals-empty").hidden = m.pending.length > 0;
  }

  function asks(m) {
    const body = $("asks");
    body.replaceChildren();
    for (const r of m.rules) {
      const row = el("tr", "ask-rule");
      row.setAttribute("data-rule", r.rule);
      cell(row, "rule", r.rule);
      cell(row, "asked", r.asked);
      cell(row, "per-hour", r.per_hour);
      cell(row, "approved", r.approved);
      cell(row, "denied", r.denied);
      cell(row, "unanswered", r.unanswered);
      body.appendChild(row);
    }
  }

  // panels --------------------------------------------------------------------------------------

  function integrity(m) {
    $("verify-status").textContent = m.status;
    $("head-hash").textContent = m.head || "";
    $("last-anchor").textContent = m.anchor || "";
  }

  function policy(m) {
    $("policy-revision").textContent = m.revision;
    $("policy-files").textContent = m.files;
    $("policy-reload").textContent = m.reload;
  }

  let pinsLoaded = false;

  function hello(m) {
    $("viewer").textContent = m.viewer + (m.approver ? "" : " (watching)");
    window.consoleApprover = m.approver;
    if (!pinsLoaded) {
      pinsLoaded = true; // once per page: a review starts every upstream once
      loadPins();
    }
    const note = $("audit-note");
    note.hidden = m.on_disk;
    note.textContent = m.on_disk ? "" : "The audit log is not on disk (audit = \":memory:\"): there is nothing to show.";
  }

  // pins ----------------------------------------------------------------------------------------

  function pinItem(p) {
    const item = el("li", "pin");
    item.setAttribute("data-pin", p.selector);
    item.appendChild(el("div", "pin-title", p.title));
    item.appendChild(el("pre", "pin-diff", p.diff));
    const findings = el("ul", "pin-findings");
    for (const f of p.findings) findings.appendChild(el("li", "pin-finding", f));
    item.appendChild(findings);
    const approve = el("button", "approve-pin", "Approve " + p.selector);
    approve.type = "button";
    approve.disabled = !window.consoleApprover;
    approve.addEventListener("click", async () => {
      approve.disabled = true;
      try {
        const done = await post("/console/pins/approve", { selector: p.selector, digest: p.digest });
        $("pins-status").textContent = done.message;
        loadPins();
      } catch (error) {
        showError("pins: " + error.message);
        approve.disabled = false;
      }
    });
    item.appendChild(approve);
    return item;
  }

  async function loadPins() {
    $("pins-status").textContent = "asking the upstreams…";
    try {
      const answer = await fetch("/console/pins", { credentials: "same-origin" });
      const body = await answer.json();
      if (!answer.ok) throw new Error(body.error || "refused (" + answer.status + ")");
      $("pins").replaceChildren(...body.pins.map(pinItem));
      $("pins-status").textContent = body.note;
    } catch (error) {
      $("pins-status").textContent = "pins: " + error.message;
    }
  }

  // the stream ----------------------------------------------------------------------------------

  const error = (m) => showError(m.text);
  const handlers = { call, session, upstream, catalog, approvals, asks, integrity, policy, hello, error };

  function connect() {
    const stream = new EventSource("/console/events");
    stream.onopen = () => {
      $("connection").textContent = "live";
      $("connection").className = "live";
    };
    stream.onmessage = (event) => {
      const batch = JSON.parse(event.data);
      for (const m of batch.messages) {
        const handler = handlers[m.type];
        if (handler) handler(m);
      }
    };
    stream.onerror = () => {
      $("connection").textContent = "disconnected";
      $("connection").className = "";
    };
  }

  for (const id of ["filter-session", "filter-principal", "filter-tool", "filter-decision"]) {
    $(id).addEventListener("input", filterCalls);
    $(id).addEventListener("change", filterCalls);
  }
  $("pins-refresh").addEventListener("click", loadPins);
  connect();
})();
