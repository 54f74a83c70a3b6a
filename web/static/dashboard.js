// ollama-fleet dashboard: local times, live-connection state, and forms that call the management API.
// Live updates themselves are htmx (SSE extension, out-of-band swaps); nothing here touches rows.
(function () {
  "use strict";

  // ---- times in the browser's time zone --------------------------------------------------------
  const formats = {
    datetime: new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" }),
    time: new Intl.DateTimeFormat(undefined, { timeStyle: "medium" }),
    date: new Intl.DateTimeFormat(undefined, { dateStyle: "medium" }),
  };
  function localTimes(root) {
    // only new ones: swapped-in fragments arrive without the mark
    (root.querySelectorAll ? root : document).querySelectorAll("time[datetime]:not([data-local])").forEach(function (el) {
      const d = new Date(el.getAttribute("datetime"));
      el.dataset.local = "1";
      if (isNaN(d)) return;
      el.textContent = (formats[el.dataset.fmt] || formats.datetime).format(d);
      el.title = d.toISOString();
    });
  }
  localTimes(document);
  if (window.htmx) {
    htmx.onLoad(localTimes);
    // out-of-band swaps do not always fire htmx:load for the new nodes: format after every message
    document.body.addEventListener("htmx:sseMessage", function () { localTimes(document); });
  }

  // ---- live-connection indicator ---------------------------------------------------------------
  const live = document.getElementById("live-state");
  function liveState(state, text) {
    if (!live) return;
    live.dataset.state = state;
    live.textContent = text;
  }
  document.body.addEventListener("htmx:sseOpen", function () { liveState("open", "Live"); });
  document.body.addEventListener("htmx:sseError", function () { liveState("error", "Reconnecting…"); });

  // ---- toasts and confirmation -----------------------------------------------------------------
  const toastEl = document.getElementById("toast");
  let toastTimer = 0;
  function toast(text, bad) {
    toastEl.textContent = text;
    toastEl.className = "toast show" + (bad ? " bad" : "");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { toastEl.className = "toast"; }, bad ? 8000 : 4000);
  }
  function confirmed(text) {
    const dlg = document.getElementById("confirm");
    if (!text) return Promise.resolve(true);
    document.getElementById("confirm-text").textContent = text;
    return new Promise(function (resolve) {
      dlg.addEventListener("close", function () { resolve(dlg.returnValue === "ok"); }, { once: true });
      dlg.returnValue = "";
      dlg.showModal();
    });
  }

  // ---- forms calling the JSON API --------------------------------------------------------------
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const bodies = {
    settings: function (f) {
      return {
        display_name: f.get("display_name") || "",
        tags: String(f.get("tags") || "").split(",").map(function (t) { return t.trim(); }).filter(Boolean),
        notes: f.get("notes") || "",
      };
    },
    pull: function (f) { return { model_name: String(f.get("model_name") || "").trim() }; },
    distribute: function (f) {
      const body = {
        model_name: String(f.get("model_name") || "").trim(),
        target: f.get("target") || "all",
        force: f.get("force") === "on",
        queue_if_offline: f.get("queue_if_offline") === "on",
      };
      if (body.target === "specific") body.agent_ids = f.getAll("agent_ids");
      return body;
    },
  };

  async function callApi(form) {
    const [method, url] = form.dataset.api.split(" ");
    const kind = form.dataset.kind;
    const body = kind ? bodies[kind](new FormData(form)) : null;
    if (kind === "distribute" && body.target === "specific" && !body.agent_ids.length) {
      toast("Tick at least one agent, or choose another target.", true);
      return;
    }
    if (!(await confirmed(form.dataset.confirm))) return;
    const button = form.querySelector("[type=submit]");
    if (button) button.disabled = true;
    try {
      const resp = await fetch(url, {
        method: method,
        credentials: "same-origin",
        headers: Object.assign({ "X-CSRF-Token": csrf }, body ? { "Content-Type": "application/json" } : {}),
        body: body ? JSON.stringify(body) : undefined,
      });
      const doc = await resp.json().catch(function () { return {}; });
      if (!resp.ok) {
        toast((doc.error || resp.statusText || "Request failed") + " (" + resp.status + ")", true);
        return;
      }
      let done = (form.dataset.done || "Done").replace(/\{(\w+)\}/g, function (_, k) { return (body || {})[k] || ""; });
      if (doc.skipped && doc.skipped.length) {
        done += " · skipped: " + doc.skipped.map(function (s) { return s.agent_id + " (" + s.reason + ")"; }).join(", ");
      }
      toast(done, false);
      if (form.dataset.then) window.location.assign(form.dataset.then);
    } catch (err) {
      toast("Could not reach the controller: " + err, true);
    } finally {
      if (button) button.disabled = false;
    }
  }

  document.addEventListener("submit", function (ev) {
    const form = ev.target;
    if (form.dataset && form.dataset.api) {
      ev.preventDefault();
      callApi(form);
    }
  });

  document.addEventListener("change", function (ev) {
    const el = ev.target;
    if (el.matches("select[data-autosubmit]")) el.form.requestSubmit();
    // ticking an agent means "these agents"
    if (el.matches('#distribute input[name="agent_ids"]') && el.checked) {
      el.form.querySelector('input[name="target"][value="specific"]').checked = true;
    }
  });

  document.addEventListener("click", function (ev) {
    const btn = ev.target.closest("[data-fill-model]");
    if (!btn) return;
    const input = document.getElementById("dist-model");
    input.value = btn.dataset.fillModel;
    document.getElementById("distribute").scrollIntoView({ behavior: "smooth", block: "start" });
    input.focus({ preventScroll: true });
  });
})();
