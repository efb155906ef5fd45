// qworker console: page actions over the JSON API.
// No library, no inline script (the CSP forbids it), and no innerHTML: everything a
// dead letter or the API says is put into the page with textContent only.
"use strict";

(function () {
  const POLL_MS = 1000;
  const POLL_LIMIT = 6 * 3600; // polls of one job (6 hours at one a second)
  const BUSY_RETRIES = 120; // another job on the same DLQ: try again each second, this often

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") || "" : "";
  }

  function enc(value) {
    return encodeURIComponent(value);
  }

  // Names and ids reach the script percent-encoded (data-* attributes hold URL path
  // segments, made by the server); decode one for a JSON body or for display.
  function decoded(segment) {
    try {
      return decodeURIComponent(segment);
    } catch (_) {
      return null; // not UTF-8: usable in a path, not as text
    }
  }

  function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function errorText(body, response) {
    if (body && typeof body === "object") {
      const e = body.error !== undefined ? body.error : (body.detail !== undefined ? body.detail : body.message);
      if (typeof e === "string") return e;
      if (e && typeof e === "object" && typeof e.message === "string") return e.message;
    }
    return response.status + " " + response.statusText;
  }

  async function api(method, path, payload) {
    const init = {
      method: method,
      credentials: "same-origin",
      referrerPolicy: "same-origin", // so the browser sends our Origin, not "null"
      headers: { "Accept": "application/json" },
    };
    if (method !== "GET") {
      init.headers["X-CSRF-Token"] = csrfToken();
    }
    if (payload !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(payload);
    }
    const response = await fetch(path, init);
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      throw new ApiError(response.status, errorText(body, response));
    }
    return body;
  }

  // Build DOM nodes from text only.
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function show(node, children, state) {
    clear(node);
    node.hidden = false;
    node.classList.remove("done", "failed");
    if (state) node.classList.add(state);
    for (const child of children) node.appendChild(child);
  }

  function problem(node, message) {
    show(node, [el("p", "bad", message)], "failed");
  }

  function num(value) {
    return typeof value === "number" && isFinite(value) ? value : 0;
  }

  async function startJob(path, payload) {
    // Another job on the same DLQ answers 409 "busy": wait for it, bounded.
    for (let attempt = 0; ; attempt++) {
      try {
        const answer = await api("POST", path, payload);
        if (!answer || answer.job === undefined) throw new ApiError(0, "the console answered without a job id");
        return String(answer.job);
      } catch (err) {
        if (err instanceof ApiError && err.status === 409 && attempt < BUSY_RETRIES) {
          await sleep(POLL_MS);
          continue;
        }
        throw err;
      }
    }
  }

  async function follow(jobId, onUpdate) {
    let misses = 0;
    for (let i = 0; i < POLL_LIMIT; i++) {
      let job;
      try {
        job = await api("GET", "/api/jobs/" + enc(jobId));
        misses = 0;
      } catch (err) {
        if (err instanceof ApiError && err.status >= 400 && err.status < 500) throw err;
        if (++misses > 30) throw err; // the console went away for half a minute
        await sleep(POLL_MS);
        continue;
      }
      onUpdate(job);
      if (job.state === "done" || job.state === "failed") return job;
      await sleep(POLL_MS);
    }
    throw new Error("stopped following the job after " + POLL_LIMIT + " polls; it may still run");
  }

  // What a replay job's events say about messages that stayed in the DLQ.
  function leftBehind(job) {
    const list = el("ul");
    const events = Array.isArray(job.events) ? job.events : [];
    let shown = 0;
    for (const event of events) {
      if (!event || typeof event !== "object") continue;
      const outcome = String(event.outcome || event.kind || "");
      if (outcome !== "skipped" && outcome !== "failed") continue;
      const id = event.message_id === null || event.message_id === undefined ? "(no id)" : String(event.message_id);
      list.appendChild(el("li", null, outcome + " " + id + ": " + String(event.detail || "")));
      if (++shown >= 20) break;
    }
    return shown ? list : null;
  }

  function replayView(job, planned, canaries) {
    const nodes = [];
    const counts = el("p", "counts");
    counts.appendChild(el("strong", null, num(job.replayed)));
    counts.appendChild(document.createTextNode(" replayed" + (planned ? " of " + planned : "") +
      ", " + num(job.skipped) + " skipped, " + num(job.failed) + " failed"));
    nodes.push(el("p", null, "Replay " + job.id + ": " + job.state +
      (job.canary ? " (canary: " + String(job.canary) + ")" : "")));
    nodes.push(counts);
    if (canaries && job.state === "running" && num(job.replayed) <= canaries) {
      nodes.push(el("p", "hint", "Canaries first: " + num(job.replayed) + " of " + canaries +
        " replayed; the rest waits until they are handled and none came back to the DLQ."));
    } else if (job.state === "queued") {
      nodes.push(el("p", "hint", "Waiting for another pass over this DLQ to end\u2026"));
    }
    if (planned) {
      const bar = document.createElement("progress");
      bar.max = planned;
      bar.value = Math.min(planned, num(job.replayed) + num(job.skipped) + num(job.failed));
      nodes.push(bar);
    }
    const left = leftBehind(job);
    if (left) {
      nodes.push(el("p", null, "Skipped and failed messages stay in the DLQ:"));
      nodes.push(left);
    }
    if (job.error) nodes.push(el("p", "bad", String(job.error)));
    if (job.warning) nodes.push(el("p", "warn", String(job.warning)));
    return nodes;
  }

  function finished(job, node, extra, dlq) {
    const ok = job.state === "done" && !job.error;
    const children = extra.slice();
    const back = el("p", "next");
    if (dlq) {
      const toDlq = el("a", null, "Back to " + (decoded(dlq) || "the DLQ") + " (scanned afresh)");
      toDlq.href = "/dlqs/" + dlq;
      back.appendChild(toDlq);
      back.appendChild(document.createTextNode(" \u00b7 "));
    }
    const reload = el("a", null, "Reload this page");
    reload.href = location.pathname + location.search;
    back.appendChild(reload);
    children.push(back);
    show(node, children, ok ? "done" : "failed");
  }

  // Rescan links: read the DLQ again, then show the page afresh.
  function setupRescan() {
    for (const link of document.querySelectorAll("[data-rescan]")) {
      link.addEventListener("click", async function (event) {
        event.preventDefault();
        const dlq = link.getAttribute("data-rescan");
        const status = link.parentElement.querySelector("[data-rescan-status]");
        if (status) status.textContent = "scanning\u2026";
        link.setAttribute("aria-disabled", "true");
        try {
          await api("GET", "/api/dlqs/" + dlq + "/groups?rescan=1");
          const params = new URLSearchParams(location.search);
          params.delete("rescan");
          const query = params.toString();
          location.assign(location.pathname + (query ? "?" + query : ""));
        } catch (err) {
          if (status) {
            status.textContent = "rescan failed: " + err.message;
            status.className = "status bad";
          }
          link.removeAttribute("aria-disabled");
        }
      });
    }
  }

  function intOrNull(input) {
    if (!input || input.value.trim() === "") return null;
    const value = Number(input.value);
    return isFinite(value) && value > 0 ? value : null;
  }

  // A group's replay: dry run, then confirm, then live progress.
  function setupGroupReplay() {
    const section = document.getElementById("actions");
    const box = document.getElementById("replay-group");
    if (!section || !box) return;
    const dlq = section.getAttribute("data-dlq");
    const fingerprint = decoded(section.getAttribute("data-fingerprint"));
    const path = "/api/dlqs/" + dlq + "/replay";
    const dry = box.querySelector("[data-dry-run]");
    const confirm = box.querySelector("[data-confirm]");
    const summary = box.querySelector("[data-dry-summary]");
    const go = box.querySelector("[data-replay-go]");
    const cancel = box.querySelector("[data-cancel]");
    const jobNode = box.querySelector("[data-job]");
    const canaryInput = box.querySelector("[data-canary]");
    const rateInput = box.querySelector("[data-rate]");
    const toInput = box.querySelector("[data-to]");
    let planned = 0;

    function target() {
      const to = toInput ? toInput.value.trim() : "";
      return to === "" ? null : to;
    }
    let matched = 0;

    dry.addEventListener("click", async function () {
      dry.disabled = true;
      confirm.hidden = true;
      show(jobNode, [el("p", null, "Dry run: counting what would be replayed\u2026")]);
      try {
        const id = await startJob(path, { filter: { fingerprint: fingerprint }, dry_run: true, to: target() });
        const job = await follow(id, function () {});
        if (job.state !== "done" || job.error) {
          problem(jobNode, "The dry run failed: " + String(job.error || job.state));
          return;
        }
        planned = num(job.would_replay);
        matched = planned + num(job.skipped) + num(job.failed);
        jobNode.hidden = true;
        const canary = intOrNull(canaryInput);
        const rate = intOrNull(rateInput);
        summary.textContent = "Dry run: would replay " + planned + " message" + (planned === 1 ? "" : "s") +
          " of group " + fingerprint + (num(job.skipped) ? ", would skip " + num(job.skipped) + " (they would stay)" : "") +
          ". Nothing has changed yet." +
          (canary ? " " + canary + " canar" + (canary === 1 ? "y goes" : "ies go") + " first." : "") +
          (rate ? " At most " + rate + " a second." : "") +
          (target() ? " To queue " + target() + "." : "");
        go.textContent = "Replay " + planned + " message" + (planned === 1 ? "" : "s");
        go.disabled = planned === 0;
        confirm.hidden = false;
      } catch (err) {
        problem(jobNode, "The dry run failed: " + err.message);
      } finally {
        dry.disabled = false;
      }
    });

    cancel.addEventListener("click", function () {
      confirm.hidden = true;
    });

    go.addEventListener("click", async function () {
      go.disabled = true;
      dry.disabled = true;
      confirm.hidden = true;
      const payload = { filter: { fingerprint: fingerprint }, dry_run: false, limit: matched || null, to: target() };
      const canary = intOrNull(canaryInput);
      const rate = intOrNull(rateInput);
      if (canary) payload.canary = Math.floor(canary);
      if (rate) payload.rate = rate;
      show(jobNode, [el("p", null, "Starting the replay\u2026")]);
      try {
        const id = await startJob(path, payload);
        const canaries = payload.canary || 0;
        const job = await follow(id, function (job) { show(jobNode, replayView(job, planned, canaries)); });
        finished(job, jobNode, replayView(job, planned, canaries), dlq);
      } catch (err) {
        problem(jobNode, "The replay failed: " + err.message);
      } finally {
        dry.disabled = false;
      }
    });
  }

  // Selected messages: one replay job per message (filter: group and message id, limit 1),
  // one after the other, since the library's filter names one message id.
  function setupSelection() {
    const box = document.getElementById("selection");
    if (!box) return;
    const dlq = box.getAttribute("data-dlq");
    const fingerprint = decoded(box.getAttribute("data-fingerprint"));
    const button = box.querySelector("[data-replay-selected]");
    const countNode = box.querySelector("[data-selected-count]");
    const confirm = box.querySelector("[data-selection-confirm]");
    const summary = box.querySelector("[data-selection-summary]");
    const go = box.querySelector("[data-selection-go]");
    const cancel = box.querySelector("[data-selection-cancel]");
    const jobNode = box.querySelector("[data-selection-job]");
    const all = document.querySelector("[data-select-all]");
    const boxes = Array.from(document.querySelectorAll("[data-select]"));

    function selected() {
      return boxes.filter(function (b) { return b.checked && !b.disabled; }).map(function (b) { return b.value; });
    }
    for (const b of boxes) {
      if (decoded(b.value) === null) {
        b.disabled = true; // an id that is not UTF-8 cannot be named in a JSON filter
        b.title = "this message id is not UTF-8 text: replay it with the CLI";
      }
    }
    function update() {
      const n = selected().length;
      countNode.textContent = String(n);
      button.disabled = n === 0;
    }
    for (const b of boxes) b.addEventListener("change", update);
    if (all) {
      all.addEventListener("change", function () {
        for (const b of boxes) if (!b.disabled) b.checked = all.checked;
        update();
      });
    }
    button.addEventListener("click", function () {
      const n = selected().length;
      summary.textContent = "Replay " + n + " selected message" + (n === 1 ? "" : "s") +
        " to their origin queue, one replay per message. Each leaves the DLQ only once its copy is confirmed.";
      go.textContent = "Replay " + n + " message" + (n === 1 ? "" : "s");
      confirm.hidden = false;
    });
    cancel.addEventListener("click", function () { confirm.hidden = true; });
    go.addEventListener("click", async function () {
      const ids = selected();
      confirm.hidden = true;
      button.disabled = true;
      const total = { replayed: 0, skipped: 0, failed: 0 };
      const notes = [];
      for (let i = 0; i < ids.length; i++) {
        const messageId = decoded(ids[i]);
        show(jobNode, [el("p", null, "Replaying " + (i + 1) + " of " + ids.length + "\u2026"),
          el("p", "counts", total.replayed + " replayed, " + total.skipped + " skipped, " + total.failed + " failed")]);
        try {
          const id = await startJob("/api/dlqs/" + dlq + "/replay",
            { filter: { fingerprint: fingerprint, message_id: messageId }, dry_run: false, limit: 1 });
          const job = await follow(id, function () {});
          total.replayed += num(job.replayed);
          total.skipped += num(job.skipped);
          total.failed += num(job.failed);
          if (job.error) notes.push(messageId + ": " + String(job.error));
          else if (!num(job.replayed) && !num(job.skipped) && !num(job.failed)) notes.push(messageId + ": no longer in the DLQ");
          else if (num(job.skipped) || num(job.failed)) notes.push(messageId + ": " + (num(job.skipped) ? "skipped" : "failed") + ", it stays in the DLQ");
        } catch (err) {
          notes.push(messageId + ": " + err.message);
        }
      }
      const children = [el("p", "counts", total.replayed + " replayed, " + total.skipped + " skipped, " + total.failed + " failed, of " + ids.length + " selected")];
      if (notes.length) {
        const list = el("ul");
        for (const note of notes.slice(0, 20)) list.appendChild(el("li", null, note));
        children.push(list);
      }
      finished({ state: notes.length ? "failed" : "done" }, jobNode, children, dlq);
      update();
    });
    update();
  }

  // Purge: enabled only while the typed text is the DLQ's name.
  function setupPurge() {
    const section = document.getElementById("actions");
    const box = document.getElementById("purge");
    if (!section || !box) return;
    const dlq = section.getAttribute("data-dlq");
    const name = decoded(dlq);
    const fingerprint = decoded(section.getAttribute("data-fingerprint"));
    const input = box.querySelector("[data-purge-confirm]");
    const button = box.querySelector("[data-purge]");
    const jobNode = box.querySelector("[data-purge-job]");
    input.addEventListener("input", function () {
      button.disabled = input.disabled || name === null || input.value !== name;
    });
    button.addEventListener("click", async function () {
      if (name === null || input.value !== name) return;
      button.disabled = true;
      show(jobNode, [el("p", null, "Purging\u2026")]);
      try {
        const id = await startJob("/api/dlqs/" + dlq + "/purge",
          { filter: { fingerprint: fingerprint }, confirm: input.value });
        const job = await follow(id, function (job) {
          show(jobNode, [el("p", "counts", num(job.purged) + " purged (" + job.state + ")")]);
        });
        const children = [el("p", "counts", num(job.purged) + " purged")];
        if (job.error) children.push(el("p", "bad", String(job.error)));
        if (job.warning) children.push(el("p", "warn", String(job.warning)));
        finished(job, jobNode, children, dlq);
      } catch (err) {
        problem(jobNode, "The purge failed: " + err.message);
      } finally {
        input.value = "";
      }
    });
  }

  // Edit & retry one message.
  function setupEdit() {
    const section = document.getElementById("edit");
    if (!section) return;
    const go = section.querySelector("[data-edit-go]");
    if (!go) return;
    const dlq = section.getAttribute("data-dlq");
    const messageId = section.getAttribute("data-message-id");
    const body = section.querySelector("[data-edit-body]");
    const to = section.querySelector("[data-edit-to]");
    const result = section.querySelector("[data-edit-result]");
    go.addEventListener("click", async function () {
      go.disabled = true;
      show(result, [el("p", null, "Publishing\u2026")]);
      try {
        const answer = await api("POST", "/api/dlqs/" + dlq + "/messages/" + messageId + "/edit",
          { body: body.value, to: to.value.trim() === "" ? null : to.value.trim() });
        const target = answer && answer.target !== undefined ? String(answer.target) : "its queue";
        const children = [el("p", "ok", "Published to " + target + "; the dead letter was removed from " + decoded(dlq) + ".")];
        if (answer && answer.warning) children.push(el("p", "warn", String(answer.warning)));
        else if (answer && answer.validated === false) {
          children.push(el("p", "hint", "Not checked by a payload type: the console runs without an APP."));
        }
        const back = el("p");
        const link = el("a", null, "Back to the DLQ");
        link.href = "/dlqs/" + dlq;
        back.appendChild(link);
        children.push(back);
        show(result, children, "done");
      } catch (err) {
        const prefix = err.status === 422 || err.status === 400 ? "Refused, nothing was published: " : "Failed: ";
        problem(result, prefix + err.message);
        go.disabled = false;
      }
    });
  }

  function start() {
    setupRescan();
    setupGroupReplay();
    setupSelection();
    setupPurge();
    setupEdit();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
