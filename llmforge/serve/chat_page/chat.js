// The llmforge chat page: a small client of the gateway's own OpenAI API (no framework, no build step).
//
// One conversation lives in `history` (user and assistant turns; the system prompt is prepended on each
// request from its field, so editing it applies to the next turn). Answers stream with fetch + ReadableStream,
// because EventSource cannot POST. Model text is only ever written with text nodes / textContent, never as
// markup. Errors come in the gateway's OpenAI envelope {"error": {message, type, param, code}}; a prompt the
// safety filter blocked (400, code content_filter) and an answer it cut (finish_reason content_filter) each
// show a notice of their own (#notice), apart from other errors (#error).
"use strict";

(() => {
  const KEY_STORAGE = "llmforge.apiKey";
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), reset: $("reset"), settings: $("settings"), system: $("system"),
    temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
    log: $("log"), notice: $("notice"), error: $("error"),
    form: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
  };

  let history = [];        // [{role: "user" | "assistant", content}]
  let modelName = null;    // from GET /v1/models; null: let the server pick its one model
  let controller = null;   // the AbortController of the request in flight, if any
  let epoch = 0;           // bumped by "New chat": a request from before it must not write into the new one
  let modelError = false;  // #error shows why GET /v1/models failed (cleared once it works)
  let authError = false;   // #error shows a 401 of a chat request (cleared once a key works)

  // ------------------------------------------------------------------------------------------ helpers

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = ui.apiKey.value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function show(el, text) {
    el.textContent = text;
    el.hidden = !text;
  }

  function clearMessages() {
    show(ui.notice, "");
    show(ui.error, "");
    modelError = authError = false;
  }

  // An error envelope (or anything else a failed response carried) as one readable line.
  async function errorText(resp) {
    let body = null;
    try {
      body = await resp.json();
    } catch (_) { /* not JSON: fall back to the status line */ }
    const err = body && body.error;
    if (err && typeof err === "object") return { message: String(err.message || resp.statusText), code: err.code || null };
    return { message: `HTTP ${resp.status} ${resp.statusText}`.trim(), code: null };
  }

  function describe(err) {
    if (err.status === 401) return `${err.message} Enter the server's API key in Settings.`;
    return err.message;
  }

  function addMessage(role, text) {
    const item = document.createElement("div");
    item.className = "msg " + role;
    item.dataset.role = role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : (modelName || "Assistant");
    const body = document.createElement("div");
    body.className = "text";
    body.dataset.testid = role === "user" ? "user-text" : "assistant-text";
    body.textContent = text;
    const meta = document.createElement("div");
    meta.className = "meta";
    item.append(who, body, meta);
    ui.log.append(item);
    scrollDown();
    return { item, body, meta };
  }

  function scrollDown() {
    ui.log.scrollTop = ui.log.scrollHeight;
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.hidden = !busy;
    ui.log.setAttribute("aria-busy", busy ? "true" : "false");
  }

  // The request body from the controls; a bad number is the user's to fix, so it is said here, not sent.
  function requestBody() {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history);
    const body = { messages, stream: true };
    if (modelName) body.model = modelName;
    const t = ui.temperature.value.trim();
    if (t !== "") {
      const v = Number(t);
      if (!Number.isFinite(v) || v < 0 || v > 2) throw new Error("Temperature must be a number from 0 to 2.");
      body.temperature = v;
    }
    const m = ui.maxTokens.value.trim();
    if (m !== "") {
      const v = Number(m);
      if (!Number.isInteger(v) || v < 1) throw new Error("Max tokens must be a whole number of at least 1.");
      body.max_tokens = v;
    }
    return body;
  }

  // ------------------------------------------------------------------------------------------ SSE

  // Yields the parsed JSON of each `data:` event of a text/event-stream body, until [DONE].
  async function* events(stream) {
    const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
          const data = block.split(/\r?\n/)
            .filter((line) => line.startsWith("data:"))
            .map((line) => line.slice(5).replace(/^ /, ""))
            .join("\n");
          if (!data) continue;
          if (data === "[DONE]") return;
          yield JSON.parse(data);
        }
      }
    } finally {
      reader.releaseLock();
    }
  }

  // ------------------------------------------------------------------------------------------ sending

  async function send(text) {
    clearMessages();
    let body;
    history.push({ role: "user", content: text });
    try {
      body = requestBody();
    } catch (e) {
      history.pop();
      show(ui.error, e.message);
      if (!ui.input.value) ui.input.value = text;
      return;
    }
    const mine = epoch;
    const user = addMessage("user", text);
    const answer = addMessage("assistant", "");
    answer.item.classList.add("streaming");
    answer.item.dataset.chunks = "0";
    const mineController = new AbortController();
    controller = mineController;
    setBusy(true);
    let content = "";
    let finish = null;
    try {
      let resp;
      try {
        resp = await fetch("/v1/chat/completions", {
          method: "POST", headers: headers(), body: JSON.stringify(body), signal: mineController.signal,
        });
      } catch (e) {
        if (e && e.name === "AbortError") throw e;
        throw { message: "Cannot reach the server: " + ((e && e.message) || e) };
      }
      if (!resp.ok) {
        const err = await errorText(resp);
        err.status = resp.status;
        throw err;
      }
      for await (const ev of events(resp.body)) {
        if (ev.error) throw { message: String(ev.error.message || "The server reported an error."), code: ev.error.code };
        const choice = ev.choices && ev.choices[0];
        if (!choice) continue;
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          content += delta;
          answer.body.append(delta);  // a text node per chunk: never parsed as markup
          answer.item.dataset.chunks = String(Number(answer.item.dataset.chunks) + 1);
          scrollDown();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      // the stream ended without a finish reason: the connection was cut, not the answer finished
      if (!finish) throw { message: "The connection closed before the answer was finished." };
      if (mine === epoch) finished(answer, content, finish);
    } catch (e) {
      if (mine !== epoch) {
        // the conversation was reset while this answer streamed: it belongs to no conversation now
      } else if (e && e.name === "AbortError") {
        finished(answer, content, "stopped");
      } else {
        failed(user, answer, content, e, text);
      }
    } finally {
      answer.item.classList.remove("streaming");
      // after a "New chat" the next request may already be in flight: only the request's own end frees it
      if (controller === mineController) {
        controller = null;
        setBusy(false);
      }
    }
  }

  function finished(answer, content, finish) {
    history.push({ role: "assistant", content });
    answer.item.dataset.finish = finish || "";
    if (finish === "content_filter") {
      answer.item.classList.add("cut");
      answer.meta.textContent = "cut by the content filter";
      show(ui.notice, "The content filter stopped this answer. What it had sent before is shown above.");
    } else if (finish === "length") {
      answer.meta.textContent = "stopped at max tokens";
    } else if (finish === "stopped") {
      answer.meta.textContent = "stopped";
    }
  }

  function failed(user, answer, content, err, text) {
    const message = (err && err.message) || String(err);
    if (!content) {
      // nothing came back: the turn never happened; take it out of the conversation and give the text back
      history.pop();
      answer.item.remove();
      user.item.classList.add("failed");
      user.meta.textContent = "not sent";
      if (!ui.input.value) ui.input.value = text;
    } else {
      history.push({ role: "assistant", content });
      answer.item.classList.add("failed");
      answer.meta.textContent = "interrupted";
    }
    if (err && err.code === "content_filter") {
      show(ui.notice, `The content filter blocked this message: ${message}`);
    } else {
      show(ui.error, describe(err || {}) || message);
      authError = Boolean(err && err.status === 401);
    }
  }

  // ------------------------------------------------------------------------------------------ model

  async function loadModel() {
    try {
      const resp = await fetch("/v1/models", { headers: headers() });
      if (!resp.ok) {
        const err = await errorText(resp);
        err.status = resp.status;
        ui.model.textContent = resp.status === 401 ? "API key needed" : "unavailable";
        show(ui.error, describe(err));
        modelError = true;
        return;
      }
      const body = await resp.json();
      modelName = (body.data && body.data[0] && body.data[0].id) || null;
      ui.model.textContent = modelName || "no model";
      if (modelError || authError) show(ui.error, "");  // the key works now: that error is over
      modelError = authError = false;
      return;
    } catch (e) {
      ui.model.textContent = "offline";
      show(ui.error, "Cannot reach the server: " + e.message);
    }
    modelError = true;
  }

  // ------------------------------------------------------------------------------------------ wiring

  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    const text = ui.input.value.trim();
    if (!text || controller) return;
    ui.input.value = "";
    send(text);
  });

  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ui.form.requestSubmit();
    }
  });

  ui.stop.addEventListener("click", () => {
    if (controller) controller.abort();
  });

  ui.reset.addEventListener("click", () => {
    epoch += 1;
    if (controller) controller.abort();
    controller = null;  // the aborted request finishes on its own; a new one may start right away
    setBusy(false);
    history = [];
    ui.log.replaceChildren();
    clearMessages();
    ui.input.focus();
  });

  ui.apiKey.addEventListener("change", () => {
    const key = ui.apiKey.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    loadModel();
  });

  ui.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || "";
  if (window.matchMedia("(max-width: 720px)").matches) ui.settings.open = false;
  loadModel();
})();
