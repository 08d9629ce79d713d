// PolyAgents dashboard: ask the panel, follow it live over WS /ws/{id}, replay recent conversations.
// Untrusted text (questions, positions, errors) is written with textContent; answers are Markdown,
// rendered by marked and cleaned by DOMPurify (static/vendor/) before they reach the page.
"use strict";

(() => {
  const KEY_STORAGE = "polyagents.apiKey";
  const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  const STATUS_LABELS = {
    completed: "Consensus",
    no_consensus: "No consensus",
    failed: "Failed",
    cancelled: "Cancelled",
    running: "Running",
    pending: "Pending",
  };
  const TIE_BREAKS = {
    confidence: "the ballots' confidence",
    previous_leader: "the leader of the last discussion turn",
    stable_order: "the order the options were proposed in",
  };
  const HUES = 8; // position colours: the same answer has the same colour everywhere
  const $ = (id) => document.getElementById(id);

  const state = {
    socket: null,
    conversationId: null,
    lastSeq: 0,
    finished: false,
    retries: 0,
    pendingReplay: null, // a shared link opened before a key was given
    agents: new Map(), // agent_id -> {column, turns: Map(turn -> block), usage}
    ballots: new Map(), // voter -> vote event
    decision: null, // the consensus_reached event
    synthesis: null, // {text, streaming, event}
    totals: null, // the conversation_completed / conversation_failed event
    renderQueued: new Set(),
  };

  // --- small helpers -------------------------------------------------------------------------
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function setStatus(text, isError) {
    const line = $("status-line");
    line.textContent = text;
    line.classList.toggle("error", Boolean(isError));
  }

  const isNumber = (value) => typeof value === "number" && Number.isFinite(value);

  function percent(value) {
    return isNumber(value) ? `${Math.round(value * 100)}%` : "–";
  }

  function integer(value) {
    return Math.round(value).toLocaleString("en-US");
  }

  function seconds(ms) {
    if (!isNumber(ms)) return "";
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(ms < 10000 ? 1 : 0)} s`;
  }

  function money(value) {
    if (!isNumber(value)) return "";
    if (value === 0) return "$0";
    if (value < 0.01) return `$${value.toPrecision(2)}`;
    return `$${value.toFixed(value < 1 ? 3 : 2)}`;
  }

  function tally(value) {
    return Number.isInteger(value) ? String(value) : value.toFixed(2).replace(/0+$/, "").replace(/\.$/, "");
  }

  function relativeTime(iso) {
    const then = Date.parse(iso);
    if (Number.isNaN(then)) return "";
    const minutes = Math.round((Date.now() - then) / 60000);
    if (minutes < 1) return "just now";
    if (minutes < 60) return `${minutes} min ago`;
    if (minutes < 60 * 24) return `${Math.round(minutes / 60)} h ago`;
    return new Date(then).toLocaleDateString(undefined, { day: "numeric", month: "short" });
  }

  function uuid4() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") return window.crypto.randomUUID();
    const bytes = window.crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  function hueOf(position) {
    const key = String(position || "").trim().toLowerCase().replace(/[\s.!?,;:]+$/g, "");
    let hash = 0;
    for (const ch of key) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
    return hash % HUES;
  }

  function chip(text, extra) {
    const node = el("span", `chip ${extra || ""}`.trim(), text);
    if (!extra) node.classList.add(`hue-${hueOf(text)}`);
    node.title = text;
    return node;
  }

  // --- usage: tokens, latency, cost (cost only when the server reports one) -----------------
  function tokensOf(data) {
    const tokens = data && (data.tokens !== undefined ? data.tokens : data.usage);
    if (isNumber(tokens)) return tokens;
    if (!tokens || typeof tokens !== "object") return null;
    if (isNumber(tokens.total)) return tokens.total;
    if (isNumber(tokens.total_tokens)) return tokens.total_tokens;
    const parts = [tokens.prompt, tokens.completion, tokens.prompt_tokens, tokens.completion_tokens].filter(isNumber);
    return parts.length ? parts.reduce((a, b) => a + b, 0) : null;
  }

  function costOf(data) {
    if (!data || typeof data !== "object") return null;
    // The server prices only models it knows: `cost_estimated: false` (the simulator, unknown
    // models) means there is no estimate, not a cost of zero.
    if (data.cost_estimated === false) return null;
    if (data.cost && typeof data.cost === "object" && data.cost.estimated === false) return null;
    for (const value of [data.cost_usd, data.estimated_cost_usd, data.estimated_cost, data.cost]) {
      if (isNumber(value)) return value;
      if (value && typeof value === "object") {
        for (const inner of [value.usd, value.total_usd, value.total, value.estimated]) if (isNumber(inner)) return inner;
      }
    }
    for (const nested of [data.usage, data.tokens]) {
      if (nested && typeof nested === "object" && (isNumber(nested.cost) || isNumber(nested.cost_usd))) {
        return isNumber(nested.cost_usd) ? nested.cost_usd : nested.cost;
      }
    }
    return null;
  }

  function emptyUsage() {
    return { tokens: 0, latencyMs: 0, cost: 0, costKnown: false, calls: 0 };
  }

  function addUsage(usage, data) {
    const tokens = tokensOf(data);
    const cost = costOf(data);
    if (isNumber(tokens)) usage.tokens += tokens;
    if (isNumber(data.latency_ms)) usage.latencyMs += data.latency_ms;
    if (isNumber(cost)) {
      usage.cost += cost;
      usage.costKnown = true;
    }
    usage.calls += 1;
  }

  function usageParts(tokens, latencyMs, cost) {
    const parts = [];
    if (isNumber(tokens) && tokens > 0) parts.push(`${integer(tokens)} tokens`);
    if (isNumber(latencyMs) && latencyMs > 0) parts.push(seconds(latencyMs));
    if (isNumber(cost)) parts.push(`${money(cost)} est.`);
    return parts;
  }

  // --- answers: machine lines out, Markdown in ------------------------------------------------
  const MACHINE_LINE = /^[\s>#*_`~\-+•]*(?:final\s+position|final\s+answer|confidence|certainty)(?:\s+level)?\s*[*_`~]*\s*[:=：]/i;
  const EMPTY_LABEL = /[:=：]\s*[*_`~]*\s*$/;
  const MARKERS = ["final position", "final answer", "confidence", "certainty"];

  /** The answer without its trailing FINAL POSITION / CONFIDENCE lines (the chip and figure show them). */
  function stripMachineLines(text, streaming) {
    const lines = String(text || "").replace(/\r\n?/g, "\n").split("\n");
    if (streaming && lines.length) {
      // Hide a half-streamed label ("FINAL POS") until it is either a machine line or not.
      const last = lines[lines.length - 1].replace(/^[\s>#*_`~\-+•]+/, "").toLowerCase();
      if (last && MARKERS.some((m) => m.startsWith(last) || MACHINE_LINE.test(lines[lines.length - 1]))) lines.pop();
    }
    let cut = lines.length;
    for (let i = lines.length - 1; i >= 0; i -= 1) {
      const line = lines[i];
      if (!line.trim()) continue;
      if (MACHINE_LINE.test(line)) {
        cut = i;
        continue;
      }
      // "FINAL POSITION:" alone, its value on the next line.
      if (i > 0 && MACHINE_LINE.test(lines[i - 1]) && EMPTY_LABEL.test(lines[i - 1])) continue;
      break;
    }
    return lines.slice(0, cut).join("\n").trimEnd();
  }

  /** The readable text of an answer: the clean field when the server sends one, else stripped. */
  function answerText(data, streaming) {
    const text = data.content ?? data.response ?? data.text ?? "";
    const clean = data.raw_response !== undefined || data.raw_content !== undefined;
    return clean ? String(text) : stripMachineLines(text, streaming);
  }

  let purifyReady = false;
  function setUpPurify() {
    if (purifyReady || !window.DOMPurify) return;
    // Links from answers open elsewhere and tell the target nothing about us.
    window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName !== "A") return;
      if (node.hasAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      } else {
        node.setAttribute("title", "unsafe link removed");
      }
    });
    purifyReady = true;
  }

  const PURIFY_CONFIG = {
    USE_PROFILES: { html: true }, // no SVG or MathML
    FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe", "video", "audio"],
    FORBID_ATTR: ["style", "class", "id"],
    RETURN_DOM_FRAGMENT: true,
  };

  /** Untrusted Markdown into `node`: parsed by marked, cleaned by DOMPurify; plain text if either is missing. */
  function renderMarkdown(node, text) {
    if (!window.marked || !window.DOMPurify) {
      node.textContent = text;
      return;
    }
    setUpPurify();
    const html = window.marked.parse(text, { gfm: true, breaks: false, async: false });
    node.replaceChildren(window.DOMPurify.sanitize(html, PURIFY_CONFIG));
  }

  // --- the API key ---------------------------------------------------------------------------
  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  function showKeyState() {
    const key = apiKey();
    if (!key) $("recent-note").textContent = "Your conversations appear here once a key is in use.";
    $("key-state").textContent = key ? `Key …${key.slice(-4)} (this tab only)` : "";
    $("key-form").classList.toggle("has-key", Boolean(key));
    if (key && $("status-line").textContent === "Paste an API key to begin.") setStatus("Ready.");
    if (!key) setStatus("Paste an API key to begin.");
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json", Authorization: `Bearer ${apiKey()}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null;
    }
    return { ok: response.ok, status: response.status, data };
  }

  function errorText(result) {
    const data = result.data || {};
    let text = data.detail || `HTTP ${result.status}`;
    if (data.errors) {
      text += " " + Object.entries(data.errors).map(([f, msgs]) => `${f}: ${[].concat(msgs).join(" ")}`).join("; ");
    }
    return text;
  }

  // --- the board: one column per agent -----------------------------------------------------------
  function resetBoard(conversationId) {
    state.agents.clear();
    state.ballots.clear();
    state.decision = null;
    state.synthesis = null;
    state.totals = null;
    $("agents").replaceChildren();
    $("turn-confidence").replaceChildren();
    $("agreement-block").hidden = true;
    $("final").hidden = true;
    $("final").className = "final";
    $("final-answer").replaceChildren();
    $("synthesis-note").hidden = true;
    $("question-view").textContent = "";
    $("answer-card").classList.toggle("empty", !conversationId);
    $("final-status").textContent = conversationId ? STATUS_LABELS.running : "";
    $("final-status").className = conversationId ? "badge status-running" : "badge";
    $("conversation-label").textContent = conversationId || "";
    renderVotes();
    renderTotals();
    showShareLink(conversationId);
    markActiveRecent();
  }

  function agentColumn(agentId, info) {
    let agent = state.agents.get(agentId);
    if (!agent) {
      const column = el("article", "agent");
      column.dataset.agent = agentId;
      const header = el("header");
      const title = el("div", "agent-title");
      title.append(el("span", `dot hue-${state.agents.size % HUES}`), el("span", "name", agentId));
      header.append(title, el("span", "meta-line", ""), el("span", "usage-line", ""));
      column.append(header, el("div", "turns"));
      $("agents").append(column);
      agent = { column, turns: new Map(), usage: emptyUsage() };
      state.agents.set(agentId, agent);
    }
    if (info) {
      const parts = [info.model, isNumber(info.temperature) ? `t ${info.temperature}` : null, info.personality];
      agent.column.querySelector(".meta-line").textContent = parts.filter((p) => p !== null && p !== undefined && p !== "").join(" · ");
    }
    return agent;
  }

  function showAgentUsage(agent) {
    const usage = agent.usage;
    agent.column.querySelector(".usage-line").textContent = usageParts(
      usage.tokens,
      usage.latencyMs,
      usage.costKnown ? usage.cost : null,
    ).join(" · ");
  }

  function turnBlock(agentId, turn) {
    const agent = agentColumn(agentId);
    let block = agent.turns.get(turn);
    if (!block) {
      block = el("details", "turn");
      block.dataset.turn = String(turn);
      block.open = true;
      const summary = el("summary");
      summary.append(el("span", "turn-label", `Turn ${turn}`), el("span", "turn-position"), el("span", "figure"));
      block.append(summary, el("div", "text md"), el("div", "meta"));
      block.raw = "";
      // Only the latest turn stays open: earlier ones fold to their position and confidence.
      for (const [other, previous] of agent.turns) if (other < turn) previous.open = false;
      const turns = agent.column.querySelector(".turns");
      const later = [...agent.turns.entries()].filter(([other]) => other > turn).sort((a, b) => a[0] - b[0]);
      turns.insertBefore(block, later.length ? later[0][1] : null);
      agent.turns.set(turn, block);
    }
    return block;
  }

  function queueRender(block) {
    if (state.renderQueued.has(block)) return;
    state.renderQueued.add(block);
    requestAnimationFrame(() => {
      state.renderQueued.delete(block);
      renderMarkdown(block.querySelector(".text"), stripMachineLines(block.raw, true));
    });
  }

  function showAgentResponse(event) {
    const block = turnBlock(event.agent_id, event.turn);
    const agent = state.agents.get(event.agent_id);
    block.classList.remove("streaming", "failed");
    state.renderQueued.delete(block);
    block.raw = String(event.content ?? event.response ?? "");
    renderMarkdown(block.querySelector(".text"), answerText(event, false));
    const position = block.querySelector(".turn-position");
    position.replaceChildren(
      event.abstained || !event.position ? chip("abstained", "chip-muted") : chip(String(event.position)),
    );
    const figure = block.querySelector(".figure");
    figure.textContent = isNumber(event.confidence) ? percent(event.confidence) : "";
    figure.title = "the agent's stated confidence";
    block.querySelector(".meta").textContent = usageParts(tokensOf(event), event.latency_ms, costOf(event)).join(" · ");
    if (event.simulated && !agent.column.querySelector(".simulated")) {
      const badge = el("span", "badge simulated", "simulated");
      badge.title = "offline simulated provider: no LLM was called";
      agent.column.querySelector(".agent-title").append(badge);
    }
    addUsage(agent.usage, event);
    if (event.model && !agent.column.querySelector(".meta-line").textContent) agentColumn(event.agent_id, event);
    showAgentUsage(agent);
    renderTotals();
  }

  // --- consensus: agreement by turn, the vote chart, the answer ----------------------------------
  function showAgreement(event) {
    const item = el("li");
    item.dataset.turn = String(event.turn);
    const head = el("div", "agreement-head");
    head.append(el("span", "turn-label", `Turn ${event.turn}`));
    if (event.consensus) head.append(chip(String(event.consensus)));
    head.append(el("span", "figure", percent(event.confidence)));
    const bar = el("div", "bar");
    const fill = el("span");
    fill.style.width = isNumber(event.confidence) ? `${Math.max(0, Math.min(1, event.confidence)) * 100}%` : "0%";
    bar.append(fill);
    item.append(head, bar);
    $("turn-confidence").append(item);
    $("agreement-block").hidden = false;
  }

  /** Options with their tallies: the decision's when it has arrived, else live counts of the ballots. */
  function voteOptions() {
    const options = new Map(); // label -> {label, position, tally, voters}
    const option = (label) => {
      if (!options.has(label)) options.set(label, { label, position: "", tally: 0, voters: [] });
      return options.get(label);
    };
    for (const ballot of state.ballots.values()) {
      if (!ballot.choice) continue;
      const entry = option(ballot.choice);
      entry.voters.push(ballot.voter);
      if (ballot.position) entry.position = ballot.position;
      entry.tally += 1;
    }
    const tallies = state.decision && state.decision.tallies;
    if (tallies && typeof tallies === "object") {
      for (const entry of options.values()) entry.tally = 0;
      for (const [label, value] of Object.entries(tallies)) if (isNumber(value)) option(label).tally = value;
    }
    return [...options.values()].sort((a, b) => b.tally - a.tally || a.label.localeCompare(b.label));
  }

  function renderVotes() {
    const chart = $("votes");
    const options = voteOptions();
    const abstained = [...state.ballots.values()].filter((b) => !b.choice);
    $("vote-block").hidden = options.length === 0 && abstained.length === 0 && !state.decision;
    chart.replaceChildren();
    const max = Math.max(1, ...options.map((o) => o.tally));
    const winner = state.decision && state.decision.winner;
    for (const entry of options) {
      const row = el("li", "vote-row");
      row.dataset.option = entry.label;
      if (winner && entry.label === winner) row.classList.add("winner");
      const head = el("div", "vote-head");
      head.append(el("span", "vote-label", entry.label));
      if (entry.position) head.append(chip(entry.position));
      if (winner && entry.label === winner) head.append(el("span", "winner-mark", "winner"));
      head.append(el("span", "vote-tally", tally(entry.tally)));
      const bar = el("div", "bar");
      const fill = el("span");
      fill.className = `hue-${hueOf(entry.position || entry.label)}`;
      fill.style.width = `${(entry.tally / max) * 100}%`;
      bar.append(fill);
      row.append(head, bar);
      if (entry.voters.length) row.append(el("div", "voters", entry.voters.join(", ")));
      chart.append(row);
    }
    const notes = $("vote-notes");
    notes.replaceChildren();
    const decision = state.decision;
    if (decision && decision.tie_break) {
      notes.append(el("p", "note", `Tie broken by ${TIE_BREAKS[decision.tie_break] || decision.tie_break}.`));
    }
    const dissent = decision && Array.isArray(decision.dissent) ? decision.dissent : [];
    if (dissent.length) {
      const list = el("ul", "dissent");
      for (const ballot of dissent) {
        const item = el("li");
        const choice = ballot.choice ? `voted ${ballot.choice}` : "abstained";
        item.append(el("strong", null, String(ballot.voter || "?")), document.createTextNode(` ${choice}`));
        if (ballot.reason) item.append(el("span", "reason", ` — ${ballot.reason}`));
        list.append(item);
      }
      notes.append(el("p", "note-title", "Dissent"), list);
    } else if (decision && options.length) {
      notes.append(el("p", "note", "No dissent: every ballot backed the winner."));
    }
    if (abstained.length && !dissent.length) {
      notes.append(el("p", "note", `Abstained: ${abstained.map((b) => b.voter).join(", ")}.`));
    }
    const method = decision && decision.method ? `${decision.method.replace(/_/g, " ")} vote` : "";
    $("vote-method").textContent = method;
  }

  function showFinal(status, answer, confidence, extra) {
    const final = $("final");
    final.hidden = false;
    final.className = `final outcome-${status}`;
    $("final-status").textContent = STATUS_LABELS[status] || status;
    $("final-status").className = `badge status-${status}`;
    if (!state.synthesis) {
      const text = answer ? stripMachineLines(answer, false) : status === "no_consensus" ? "The panel did not agree." : "";
      if (status === "completed" || status === "no_consensus") renderMarkdown($("final-answer"), text);
      else $("final-answer").textContent = text;
    }
    $("final-confidence").textContent = percent(confidence);
    const position = $("final-position");
    position.replaceChildren();
    if (extra && extra.position) position.append(chip(String(extra.position)));
    showAgreementFigure(extra && extra.agreement);
    showConfidenceSource(extra && extra.confidence_source);
    $("confidence-figure").hidden = !isNumber(confidence);
  }

  const CONFIDENCE_SOURCES = {
    prior: "no history yet: the model's prior reliabilities",
    history: "reliabilities fitted on the panels' past answers (no labels)",
    feedback: "recalibrated on answers users marked right or wrong",
  };

  /** What the confidence rests on (prior, history or feedback), beside the figure. */
  function showConfidenceSource(source) {
    const node = $("confidence-source");
    const known = typeof source === "string" && Object.prototype.hasOwnProperty.call(CONFIDENCE_SOURCES, source);
    node.textContent = known ? `from ${source}` : "";
    node.title = known ? CONFIDENCE_SOURCES[source] : "";
    node.hidden = !known;
  }

  /** `agreement` (the vote share beside the calibrated confidence): a number or {share, margin}. */
  function showAgreementFigure(agreement) {
    let text = "";
    if (isNumber(agreement)) text = percent(agreement);
    else if (agreement && typeof agreement === "object" && isNumber(agreement.share)) text = percent(agreement.share);
    $("final-agreement").textContent = text;
    $("agreement-figure").hidden = !text;
    if (agreement && typeof agreement === "object" && isNumber(agreement.margin)) {
      $("agreement-figure").title = `vote share; margin over the runner-up ${percent(agreement.margin)}`;
    }
  }

  function showSynthesis(event, done) {
    const delta = event.delta ?? "";
    if (!state.synthesis) state.synthesis = { text: "", streaming: true };
    if (done) {
      const text = event.content ?? event.synthesis ?? event.text ?? event.answer;
      if (typeof text === "string") state.synthesis.text = text;
      state.synthesis.streaming = false;
      state.synthesis.event = event;
    } else {
      state.synthesis.text += String(delta);
    }
    $("final").hidden = false;
    $("final-answer").classList.toggle("streaming", !done);
    const note = $("synthesis-note");
    note.hidden = false;
    const by = [event.model, event.agent_id].filter(Boolean).join(" · ");
    note.textContent = done ? `Synthesised answer${by ? ` (${by})` : ""}` : "Writing the synthesised answer…";
    const usage = done ? usageParts(tokensOf(event), event.latency_ms, costOf(event)) : [];
    if (usage.length) note.textContent += ` · ${usage.join(" · ")}`;
    renderMarkdown($("final-answer"), stripMachineLines(state.synthesis.text, !done));
    renderTotals();
  }

  function renderTotals() {
    const list = $("totals");
    list.replaceChildren();
    const usage = emptyUsage();
    for (const agent of state.agents.values()) {
      usage.tokens += agent.usage.tokens;
      usage.latencyMs += agent.usage.latencyMs;
      if (agent.usage.costKnown) {
        usage.cost += agent.usage.cost;
        usage.costKnown = true;
      }
    }
    if (state.synthesis && state.synthesis.event) addUsage(usage, state.synthesis.event);
    const totals = state.totals || {};
    const tokens = tokensOf(totals) ?? usage.tokens;
    const cost = costOf(totals) ?? (usage.costKnown ? usage.cost : null);
    const items = [];
    if (tokens) items.push(["tokens", integer(tokens)]);
    if (isNumber(totals.duration)) items.push(["time", seconds(totals.duration * 1000)]);
    else if (usage.latencyMs) items.push(["model time", seconds(usage.latencyMs)]);
    if (isNumber(cost)) items.push(["est. cost", money(cost)]);
    if (isNumber(totals.turns_completed)) items.push(["turns", String(totals.turns_completed)]);
    for (const [label, value] of items) {
      const item = el("div", "total");
      item.dataset.kind = label;
      item.append(el("dd", null, value), el("dt", null, label));
      list.append(item);
    }
    list.hidden = items.length === 0;
  }

  // --- events ------------------------------------------------------------------------------------
  function onEvent(event) {
    if (isNumber(event.seq)) {
      if (event.seq <= state.lastSeq) return; // already shown
      state.lastSeq = event.seq;
    }
    switch (event.type) {
      case "conversation_started":
        resetBoard(event.conversation_id);
        $("question-view").textContent = event.question || "";
        (event.agents || []).forEach((a) => agentColumn(a.agent_id, a));
        setStatus(`Running: ${event.num_agents || "?"} agents, ${event.turns || "?"} turns${event.resumed ? " (resumed)" : ""}.`);
        break;
      case "turn_started":
        setStatus(`Turn ${event.turn} in progress…`);
        break;
      case "agent_delta": {
        const block = turnBlock(event.agent_id, event.turn);
        block.classList.add("streaming");
        block.raw += event.delta || "";
        queueRender(block);
        break;
      }
      case "agent_response":
        showAgentResponse(event);
        break;
      case "agent_error": {
        const block = turnBlock(event.agent_id, event.turn);
        block.classList.remove("streaming");
        block.classList.add("failed");
        state.renderQueued.delete(block);
        block.querySelector(".text").textContent = `Failed: ${event.error || event.kind || "error"}`;
        block.querySelector(".turn-position").replaceChildren(chip("failed", "chip-bad"));
        break;
      }
      case "consensus_update":
        showAgreement(event);
        break;
      case "vote":
        setStatus("The panel is voting…");
        state.ballots.set(event.voter, event);
        agentUsageFromVote(event);
        renderVotes();
        break;
      case "consensus_reached":
        setStatus(event.reached ? "The panel has decided." : "The panel did not agree.");
        state.decision = event;
        renderVotes();
        showFinal(event.reached ? "completed" : "no_consensus", event.reached ? event.consensus : null, event.confidence, event);
        break;
      case "synthesis_delta":
        setStatus("Writing the synthesised answer…");
        showSynthesis(event, false);
        break;
      case "synthesis":
        showSynthesis(event, true);
        break;
      case "conversation_completed":
        state.finished = true;
        state.totals = event;
        if ($("final").hidden || !state.decision) {
          showFinal(event.status || "completed", event.consensus || event.consensus_result, event.confidence, event);
        } else {
          if (event.status) {
            $("final-status").textContent = STATUS_LABELS[event.status] || event.status;
            $("final-status").className = `badge status-${event.status}`;
          }
          if (event.agreement !== undefined) showAgreementFigure(event.agreement);
          if (event.confidence_source !== undefined) showConfidenceSource(event.confidence_source);
        }
        if (typeof event.synthesis === "string" && event.synthesis && !(state.synthesis && state.synthesis.text)) {
          showSynthesis({ content: event.synthesis }, true);
        }
        renderTotals();
        setStatus(`Finished: ${STATUS_LABELS[event.status] || event.status || "completed"}.`);
        $("cancel-button").disabled = true;
        loadRecent();
        break;
      case "conversation_failed":
        state.finished = true;
        state.totals = event;
        showFinal(event.status || "failed", event.reason || event.error || "failed", null, null);
        renderTotals();
        setStatus(`Ended: ${event.status || "failed"} — ${event.reason || event.error || ""}`, event.status !== "cancelled");
        $("cancel-button").disabled = true;
        loadRecent();
        break;
      default:
        break;
    }
  }

  function agentUsageFromVote(event) {
    // Ballots cost tokens too once the server reports them; count them with the agent.
    const agent = state.agents.get(event.voter);
    if (!agent || (tokensOf(event) === null && costOf(event) === null)) return;
    addUsage(agent.usage, event);
    showAgentUsage(agent);
    renderTotals();
  }

  // --- the WebSocket -------------------------------------------------------------------------------
  function closeSocket() {
    if (state.socket) {
      state.socket.onclose = null;
      state.socket.close();
      state.socket = null;
    }
  }

  function follow(conversationId, after) {
    closeSocket();
    state.conversationId = conversationId;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${location.host}/ws/${conversationId}?after=${after}`;
    // Browsers cannot set Authorization on a WebSocket: the key travels as a subprotocol.
    const socket = new WebSocket(url, [`bearer.${apiKey()}`]);
    state.socket = socket;
    socket.onopen = () => {
      state.retries = 0;
    };
    socket.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch (_) {
        return;
      }
      onEvent(event);
    };
    socket.onclose = (close) => {
      state.socket = null;
      if (close.code === 4401) return setStatus("The key was refused (4401).", true);
      if (close.code === 4403) return setStatus("This key may not read that conversation (4403).", true);
      if (close.code === 4404) return setStatus("Unknown conversation (4404).", true);
      if (state.finished || state.conversationId !== conversationId) return;
      // Lost connection: reconnect and resume after the last event shown; nothing is lost.
      state.retries += 1;
      const delay = Math.min(10000, 500 * 2 ** Math.min(state.retries, 5)) * (0.5 + Math.random() / 2);
      setStatus(`Connection lost; reconnecting in ${Math.round(delay / 100) / 10}s…`);
      setTimeout(() => {
        if (state.conversationId === conversationId && !state.socket) follow(conversationId, state.lastSeq);
      }, delay);
    };
  }

  // --- links ---------------------------------------------------------------------------------------
  function shareUrl(conversationId) {
    return `${location.origin}${location.pathname}?c=${conversationId}`;
  }

  function linkedConversation() {
    const fromQuery = new URLSearchParams(location.search).get("c") || "";
    const fromHash = location.hash.slice(1); // the older /#<id> links keep working
    return [fromQuery, fromHash].find((id) => UUID_RE.test(id)) || null;
  }

  function remember(conversationId, push) {
    const url = `${location.pathname}?c=${conversationId}`;
    if (`${location.pathname}${location.search}` === url && !location.hash) return;
    if (push) history.pushState({ c: conversationId }, "", url);
    else history.replaceState({ c: conversationId }, "", url);
  }

  function showShareLink(conversationId) {
    const share = $("share");
    share.hidden = !conversationId;
    if (!conversationId) return;
    const link = $("share-link");
    link.href = shareUrl(conversationId);
    link.textContent = `?c=${conversationId.slice(0, 8)}…`;
    $("copy-link").textContent = "Copy link";
  }

  async function copyLink() {
    const url = $("share-link").href;
    try {
      await navigator.clipboard.writeText(url);
      $("copy-link").textContent = "Copied";
    } catch (_) {
      window.prompt("Copy this link:", url);
    }
  }

  // --- actions -------------------------------------------------------------------------------------
  async function ask(event) {
    event.preventDefault();
    if (!apiKey()) return setStatus("Paste an API key first.", true);
    const message = $("question").value.trim();
    if (!message) return setStatus("Type a question.", true);
    const conversationId = uuid4();
    const body = {
      message,
      num_agents: Number($("num-agents").value) || undefined,
      turns: Number($("turns").value) || undefined,
    };
    $("ask-button").disabled = true;
    setStatus("Starting…");
    try {
      const result = await api("POST", `/stream/${conversationId}`, body);
      if (!result.ok) return setStatus(`Could not start: ${errorText(result)}`, true);
      resetBoard(conversationId);
      $("question-view").textContent = message;
      state.lastSeq = 0;
      state.finished = false;
      $("cancel-button").disabled = false;
      remember(conversationId, true); // reload or share the link to replay it
      setStatus("Started; waiting for the first turn…");
      follow(result.data.conversation_id, 0);
      loadRecent();
    } catch (err) {
      setStatus(`Network error: ${err}`, true);
    } finally {
      $("ask-button").disabled = false;
    }
  }

  function replay(conversationId, push) {
    if (!apiKey()) {
      state.pendingReplay = conversationId;
      setStatus("Paste an API key to open this conversation.");
      return;
    }
    state.pendingReplay = null;
    remember(conversationId, push);
    resetBoard(conversationId);
    state.lastSeq = 0;
    state.finished = false;
    $("cancel-button").disabled = false;
    setStatus("Replaying…");
    follow(conversationId, 0);
  }

  function cancel() {
    if (!state.finished && state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify({ type: "cancel" }));
      setStatus("Cancel requested…");
      return true;
    }
    return false;
  }

  function markActiveRecent() {
    for (const button of $("recent-list").querySelectorAll("button")) {
      const active = button.dataset.conversation === state.conversationId;
      if (active) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
  }

  async function loadRecent() {
    const list = $("recent-list");
    const note = $("recent-note");
    if (!apiKey()) return;
    const status = $("status-filter").value;
    const query = new URLSearchParams({ limit: "50" });
    if (status) query.set("status", status);
    try {
      const result = await api("GET", `/conversations/recent?${query}`);
      if (result.status === 404) {
        note.textContent = "Recent conversations are not available on this server.";
        return;
      }
      if (!result.ok) {
        note.textContent = `Could not load: ${errorText(result)}`;
        return;
      }
      if ($("status-filter").value !== status) return; // a newer filter is loading
      const data = result.data;
      const items = Array.isArray(data) ? data : data.conversations || data.results || data.items || [];
      list.replaceChildren();
      note.textContent = items.length ? "" : status ? `No ${(STATUS_LABELS[status] || status).toLowerCase()} conversations.` : "None yet.";
      for (const item of items) {
        const id = item.conversation_id || item.id;
        if (!id) continue;
        const title = item.title || item.question || id;
        const button = el("button", "recent-item");
        button.type = "button";
        button.dataset.conversation = id;
        button.dataset.status = item.status || "";
        button.title = title;
        const meta = el("span", "recent-meta");
        meta.append(el("span", `badge status-${item.status || "pending"}`, STATUS_LABELS[item.status] || item.status || ""));
        if (isNumber(item.confidence)) meta.append(el("span", null, percent(item.confidence)));
        if (item.created_at) {
          const when = el("time", null, relativeTime(item.created_at));
          when.dateTime = item.created_at;
          when.title = new Date(item.created_at).toLocaleString();
          meta.append(when);
        }
        button.append(el("span", "title", title), meta);
        button.addEventListener("click", () => replay(id, true));
        const li = el("li");
        li.append(button);
        list.append(li);
      }
      markActiveRecent();
    } catch (err) {
      note.textContent = `Could not load: ${err}`;
    }
  }

  function init() {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("api-key").value = "";
      showKeyState();
      loadRecent();
      if (state.pendingReplay) replay(state.pendingReplay, false);
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      closeSocket();
      showKeyState();
      $("recent-list").replaceChildren();
    });
    $("ask-form").addEventListener("submit", ask);
    $("question").addEventListener("keydown", (event) => {
      // Enter asks; Shift+Enter is a new line; an IME composing text keeps its Enter.
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        $("ask-form").requestSubmit();
      }
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && cancel()) event.preventDefault();
    });
    $("cancel-button").addEventListener("click", cancel);
    $("refresh-recent").addEventListener("click", loadRecent);
    $("status-filter").addEventListener("change", loadRecent);
    $("copy-link").addEventListener("click", copyLink);
    window.addEventListener("popstate", () => {
      const id = linkedConversation();
      if (id && id !== state.conversationId) replay(id, false);
    });
    resetBoard(null);
    showKeyState();
    loadRecent();
    const linked = linkedConversation();
    if (linked) replay(linked, false);
  }

  document.addEventListener("DOMContentLoaded", init);
})();
