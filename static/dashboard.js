// PolyAgents dashboard: ask the panel, follow it live over WS /ws/{id}, replay recent conversations.
// Untrusted text (questions, answers, errors) is only ever written with textContent.
"use strict";

(() => {
  const KEY_STORAGE = "polyagents.apiKey";
  const FINAL_TYPES = new Set(["conversation_completed", "conversation_failed"]);
  const $ = (id) => document.getElementById(id);

  const state = {
    socket: null,
    conversationId: null,
    lastSeq: 0,
    finished: false,
    retries: 0,
    agents: new Map(), // agent_id -> {column, turns: Map(turn -> element)}
  };

  // --- small DOM helpers -------------------------------------------------------------
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

  function percent(value) {
    return typeof value === "number" ? `${Math.round(value * 100)}%` : "–";
  }

  function uuid4() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") return window.crypto.randomUUID();
    const bytes = window.crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  // --- the API key ---------------------------------------------------------------------
  function apiKey() {
    return sessionStorage.getItem(KEY_STORAGE) || "";
  }

  function showKeyState() {
    const key = apiKey();
    $("key-state").textContent = key ? `key …${key.slice(-4)} in use (this tab only)` : "no key";
    if (key && $("status-line").textContent === "Paste an API key to begin.") setStatus("Ready.");
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

  // --- board rendering -----------------------------------------------------------------
  function resetBoard(conversationId) {
    state.agents.clear();
    $("agents").replaceChildren();
    $("turn-confidence").replaceChildren();
    $("votes").replaceChildren();
    $("final").hidden = true;
    $("final").className = "final";
    $("question-view").textContent = "";
    $("conversation-label").textContent = conversationId ? `conversation ${conversationId}` : "";
  }

  function agentColumn(agentId, info) {
    let agent = state.agents.get(agentId);
    if (!agent) {
      const column = el("article", "agent");
      column.dataset.agent = agentId;
      const header = el("header");
      header.append(el("span", "name", agentId), el("span", "muted meta-line", ""));
      column.append(header);
      $("agents").append(column);
      agent = { column, turns: new Map() };
      state.agents.set(agentId, agent);
    }
    if (info) {
      const parts = [info.model, info.temperature !== undefined ? `t=${info.temperature}` : null, info.personality];
      agent.column.querySelector(".meta-line").textContent = parts.filter((p) => p !== null && p !== undefined && p !== "").join(" · ");
    }
    return agent;
  }

  function turnBlock(agentId, turn) {
    const agent = agentColumn(agentId);
    let block = agent.turns.get(turn);
    if (!block) {
      block = el("section", "turn");
      block.dataset.turn = String(turn);
      block.append(el("div", "turn-label", `Turn ${turn}`), el("div", "text", ""), el("div", "meta", ""));
      agent.column.append(block);
      agent.turns.set(turn, block);
    }
    return block;
  }

  function onEvent(event) {
    if (typeof event.seq === "number") {
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
        block.querySelector(".text").textContent += event.delta || "";
        break;
      }
      case "agent_response": {
        const block = turnBlock(event.agent_id, event.turn);
        block.classList.remove("streaming", "failed");
        block.querySelector(".text").textContent = event.content || "";
        const meta = [];
        if (typeof event.confidence === "number") meta.push(`confidence ${percent(event.confidence)}`);
        if (typeof event.latency_ms === "number") meta.push(`${Math.round(event.latency_ms)} ms`);
        if (event.model) meta.push(event.model);
        if (event.simulated) meta.push("simulated (offline, no LLM)");
        block.querySelector(".meta").textContent = meta.join(" · ");
        break;
      }
      case "agent_error": {
        const block = turnBlock(event.agent_id, event.turn);
        block.classList.remove("streaming");
        block.classList.add("failed");
        block.querySelector(".text").textContent = `failed: ${event.error || event.kind || "error"}`;
        break;
      }
      case "consensus_update": {
        const item = el("li");
        item.dataset.turn = String(event.turn);
        item.append(el("span", null, `Turn ${event.turn}: ${percent(event.confidence)} `), el("span", "muted", event.consensus || ""));
        const bar = el("div", "bar");
        const fill = el("span");
        fill.style.width = percent(event.confidence) === "–" ? "0%" : percent(event.confidence);
        bar.append(fill);
        item.append(bar);
        $("turn-confidence").append(item);
        break;
      }
      case "vote": {
        const choice = event.choice ? `${event.choice}${event.position ? ` (${event.position})` : ""}` : "abstains";
        $("votes").append(el("li", null, `${event.voter} → ${choice} · ${percent(event.confidence)}`));
        break;
      }
      case "synthesis_delta": {
        // The chairman writes the final answer: stream it into the final box.
        const final = $("final");
        if (final.hidden || final.dataset.synthesis !== "streaming") {
          showFinal("completed", "", null, "chairman writing…");
          final.dataset.synthesis = "streaming";
        }
        $("final-answer").textContent += event.delta || "";
        break;
      }
      case "synthesis":
        $("final").dataset.synthesis = "done";
        break;
      case "consensus_reached": {
        const method = event.synthesis === "chairman" ? `${event.method} · written by the chairman` : event.method;
        showFinal(event.reached ? "completed" : "no_consensus", event.reached ? event.consensus : event.position, event.confidence, method);
        break;
      }
      case "conversation_completed":
        state.finished = true;
        if ($("final").hidden) showFinal(event.status || "completed", event.consensus || event.consensus_result || event.reason, event.confidence);
        setStatus(`Finished: ${event.status || "completed"}.`);
        $("cancel-button").disabled = true;
        loadRecent();
        break;
      case "conversation_failed":
        state.finished = true;
        showFinal(event.status || "failed", event.reason || event.error || "failed", null);
        setStatus(`Ended: ${event.status || "failed"} — ${event.reason || event.error || ""}`, event.status !== "cancelled");
        $("cancel-button").disabled = true;
        loadRecent();
        break;
      default:
        break;
    }
  }

  function showFinal(status, answer, confidence, method) {
    const final = $("final");
    final.hidden = false;
    final.className = `final ${status === "completed" ? "" : status === "no_consensus" ? "no-consensus" : "failed"}`;
    $("final-answer").textContent = answer || (status === "no_consensus" ? "No consensus." : "");
    $("final-confidence").textContent = confidence === null || confidence === undefined ? "–" : percent(confidence);
    $("final-method").textContent = method ? ` · ${method}` : "";
  }

  // --- the WebSocket ---------------------------------------------------------------------
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

  // --- actions -------------------------------------------------------------------------
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
      history.replaceState(null, "", `#${conversationId}`); // reload or share to replay it
      setStatus("Started; waiting for the first turn…");
      follow(result.data.conversation_id, 0);
      loadRecent();
    } catch (err) {
      setStatus(`Network error: ${err}`, true);
    } finally {
      $("ask-button").disabled = false;
    }
  }

  function replay(conversationId) {
    history.replaceState(null, "", `#${conversationId}`);
    resetBoard(conversationId);
    state.lastSeq = 0;
    state.finished = false;
    $("cancel-button").disabled = false;
    setStatus("Replaying…");
    follow(conversationId, 0);
  }

  function cancel() {
    if (state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify({ type: "cancel" }));
      setStatus("Cancel requested…");
    }
  }

  async function loadRecent() {
    const list = $("recent-list");
    const note = $("recent-note");
    if (!apiKey()) return;
    try {
      const result = await api("GET", "/conversations/recent");
      if (result.status === 404) {
        note.textContent = "Recent conversations are not available on this server.";
        return;
      }
      if (!result.ok) {
        note.textContent = `Could not load: ${errorText(result)}`;
        return;
      }
      const data = result.data;
      const items = Array.isArray(data) ? data : data.conversations || data.results || data.items || [];
      list.replaceChildren();
      note.textContent = items.length ? "" : "None yet.";
      for (const item of items.slice(0, 25)) {
        const id = item.conversation_id || item.id;
        if (!id) continue;
        const button = el("button", null);
        button.type = "button";
        button.dataset.conversation = id;
        button.append(el("span", "title", item.title || item.question || id));
        button.append(el("span", "muted", [item.status, item.created_at ? new Date(item.created_at).toLocaleString() : null].filter(Boolean).join(" · ")));
        button.addEventListener("click", () => replay(id));
        const li = el("li");
        li.append(button);
        list.append(li);
      }
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
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      closeSocket();
      showKeyState();
      $("recent-list").replaceChildren();
    });
    $("ask-form").addEventListener("submit", ask);
    $("cancel-button").addEventListener("click", cancel);
    $("refresh-recent").addEventListener("click", loadRecent);
    showKeyState();
    loadRecent();
    const fromUrl = location.hash.slice(1);
    if (apiKey() && /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(fromUrl)) replay(fromUrl);
  }

  document.addEventListener("DOMContentLoaded", init);
})();
