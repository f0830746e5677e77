// raylm web console: a client of the JSON API (/v1). No build step, no framework.
//
// The tenant's token lives in sessionStorage (this tab only) and goes out only as the
// Authorization header of fetch() calls to this origin: never in a URL, never in a cookie.
// Everything from the API is put on the page as text (textContent), never as HTML; the run
// report, which is HTML, is shown in a sandboxed frame (no scripts, opaque origin).
"use strict";

(() => {
  const TOKEN_KEY = "raylm.token";
  const ACTIVE = ["QUEUED", "SUBMITTING", "PENDING", "RUNNING"];
  const $ = (sel) => document.querySelector(sel);
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    e.append(...children);
    return e;
  }

  function svg(tag, attrs = {}, ...children) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    e.append(...children);
    return e;
  }

  // ------------------------------------------------------------------ the API

  const token = () => sessionStorage.getItem(TOKEN_KEY);

  async function api(path, { method = "GET", body, headers = {} } = {}) {
    const h = { ...headers, Authorization: `Bearer ${token()}` };
    if (body !== undefined) h["Content-Type"] = "application/json";
    const r = await fetch(`/v1${path}`, {
      method, headers: h, body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
    });
    if (r.status === 401) {
      signOut();
      throw new Error("signed out");
    }
    return r;
  }

  async function errorText(r) {
    try {
      const body = await r.json();
      if (typeof body.detail === "string") return body.detail;
      if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
    } catch (e) { /* not JSON */ }
    return `${r.status} ${r.statusText}`;
  }

  function signOut() {
    sessionStorage.removeItem(TOKEN_KEY);
    location.assign("/ui/signin");
  }

  const jobPath = (id) => `/jobs/${encodeURIComponent(id)}`;

  // ------------------------------------------------------------------ formats: the user's time zone, human sizes

  const dateFmt = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit",
                                                       minute: "2-digit", second: "2-digit", timeZoneName: "short" });

  function timeEl(seconds) {
    if (seconds == null) return document.createTextNode("–");
    const d = new Date(seconds * 1000);
    return el("time", { datetime: d.toISOString() }, dateFmt.format(d));
  }

  function fmtBytes(n) {
    if (n == null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i === 0 ? `${n} B` : `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
  }

  function fmtDuration(s) {
    if (s == null) return "–";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return h ? `${h} h ${m} min` : m ? `${m} min ${sec} s` : `${sec} s`;
  }

  const statusEl = (status) => el("span", { class: `status status-${status.toLowerCase()}` }, status);

  // ------------------------------------------------------------------ pages

  async function signinPage() {
    const form = $("#signin-form"), input = $("#token"), err = $("#signin-error");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      err.textContent = "";
      const t = input.value.trim();
      if (!t) { err.textContent = "Enter your token."; input.focus(); return; }
      const r = await fetch("/v1/tenant", { headers: { Authorization: `Bearer ${t}` }, credentials: "omit",
                                            cache: "no-store" });
      if (!r.ok) {
        err.textContent = r.status === 401 ? "That token is not known to this service." : await errorText(r);
        input.setAttribute("aria-invalid", "true");
        input.focus();
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, t);
      input.value = "";
      location.assign("/ui");
    });
  }

  async function header() {
    $("#signout").addEventListener("click", signOut);
    const r = await api("/tenant");
    if (r.ok) $("#who").textContent = `tenant ${(await r.json()).name}`;
  }

  async function jobsPage() {
    const kind = $("#f-kind"), status = $("#f-status"), tbody = $("#jobs-table tbody");
    let timer = null;
    async function refresh() {
      clearTimeout(timer);
      const q = new URLSearchParams({ limit: "100" });
      if (kind.value) q.set("kind", kind.value);
      if (status.value) q.set("status", status.value);
      try {
        const r = await api(`/jobs?${q}`);
        if (!r.ok) { $("#jobs-error").textContent = await errorText(r); return; }
        $("#jobs-error").textContent = "";
        const data = await r.json();
        tbody.replaceChildren(...data.items.map((j) => el("tr", {},
          el("td", {}, el("a", { href: `/ui/jobs/${encodeURIComponent(j.id)}` }, el("code", {}, j.id))),
          el("td", {}, j.kind), el("td", {}, statusEl(j.status)), el("td", {}, timeEl(j.timings.created_at)),
          el("td", {}, fmtDuration(j.timings.run_s)), el("td", { class: "message" }, j.message || ""))));
        const count = data.total === data.items.length ? `${data.total}` : `${data.items.length} of ${data.total}`;
        const text = `${count} job${data.total === 1 ? "" : "s"}`;
        if ($("#jobs-count").textContent !== text) $("#jobs-count").textContent = text;
      } finally {
        timer = setTimeout(refresh, 3000);
      }
    }
    kind.addEventListener("change", refresh);
    status.addEventListener("change", refresh);
    $("#filters").addEventListener("submit", (ev) => { ev.preventDefault(); refresh(); });
    await refresh();
  }

  // ------------------------------------------------------------------ the job page

  async function jobPage() {
    const id = $("main").dataset.job;
    let job = await loadJob(id);
    if (!job) return;
    $("#job-body").hidden = false;
    $("#stop").addEventListener("click", () => stopJob(id));
    $("#load-report").addEventListener("click", () => showReport(id));
    showConfig(job);
    const wasActive = ACTIVE.includes(job.status);
    const following = wasActive ? followLog(id) : tailLog(id);
    for (;;) {
      await drawLoss(id);
      if (!ACTIVE.includes(job.status)) break;
      await sleep(2000);
      job = await loadJob(id);
      if (!job) return;
    }
    await following;
    if (wasActive) await tailLog(id);  // the archived log, whole, once the job has ended
    showReport(id);
  }

  const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

  async function loadJob(id) {
    const r = await api(jobPath(id));
    if (r.status === 404) {
      $("#job-error").textContent = `Job ${id} not found.`;
      $("#job-body").hidden = true;
      return null;
    }
    if (!r.ok) { $("#job-error").textContent = await errorText(r); return null; }
    const job = await r.json();
    $("#job-kind").textContent = job.kind;
    if ($("#job-status").textContent !== job.status) $("#job-status").replaceChildren(statusEl(job.status));
    $("#job-created").replaceChildren(timeEl(job.timings.created_at));
    $("#job-started").replaceChildren(timeEl(job.timings.started_at));
    $("#job-ended").replaceChildren(timeEl(job.timings.ended_at));
    $("#job-run").textContent = fmtDuration(job.timings.run_s);
    $("#job-message").textContent = job.message || "–";
    $("#stop").disabled = !ACTIVE.includes(job.status);
    showArtifacts(id, job.artifacts);
    return job;
  }

  function showConfig(job) {
    const spec = { kind: job.kind, ...job.spec };
    $("#config").textContent = window.jsyaml ? jsyaml.dump(spec) : JSON.stringify(spec, null, 2);
  }

  async function stopJob(id) {
    $("#stop").disabled = true;
    const r = await api(`${jobPath(id)}/stop`, { method: "POST" });
    $("#stop-status").textContent = r.ok ? "Stopping…" : await errorText(r);
  }

  const MAX_LOG_CHARS = 1 << 20;

  // Ray colours its workers' prefixes; the page shows the text without the escape codes.
  const ANSI = /\x1b\[[0-9;?]*[A-Za-z]/g;

  function setLog(text, append) {
    text = text.replace(ANSI, "");
    const pre = $("#log");
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    let t = append ? pre.textContent + text : text;
    if (t.length > MAX_LOG_CHARS) t = "…\n" + t.slice(t.length - MAX_LOG_CHARS);
    pre.textContent = t;
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }

  async function followLog(id) {
    try {
      const r = await api(`${jobPath(id)}/logs?follow=true`);
      if (!r.ok || !r.body) return;
      setLog("", false);
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        setLog(value, true);
      }
    } catch (e) { /* the stream broke: the archived log is fetched at the end */ }
  }

  async function tailLog(id) {
    const r = await api(`${jobPath(id)}/logs?tail=5000`);
    if (r.ok) setLog(await r.text(), false);
  }

  function artifactRows(a) {
    if (!a) return [];
    const rows = [];
    for (const [kind, list] of [["manifest", a.manifests], ["metrics", a.metrics], ["plot", a.plots], ["other", a.other]]) {
      for (const f of list || []) rows.push({ path: f.path, kind, size: f.size });
    }
    for (const ck of a.checkpoints || []) {
      for (const f of ck.files) rows.push({ path: `${ck.name}/${f}`, kind: "checkpoint", size: null });
    }
    return rows.sort((x, y) => x.path.localeCompare(y.path));
  }

  function showArtifacts(id, a) {
    const rows = artifactRows(a);
    const key = JSON.stringify(rows);
    const tbody = $("#artifacts tbody");
    if (tbody.dataset.key === key) return;  // unchanged: keep the keyboard focus where it is
    tbody.dataset.key = key;
    tbody.replaceChildren(...rows.map((f) => {
      const b = el("button", { type: "button", class: "download", "data-path": f.path,
                               "aria-label": `Download ${f.path}` }, "Download");
      b.addEventListener("click", () => download(id, f.path));
      return el("tr", {}, el("td", {}, el("code", {}, f.path)), el("td", {}, f.kind), el("td", { class: "num" },
        fmtBytes(f.size)), el("td", {}, b));
    }));
    $("#artifacts-note").textContent = rows.length ? (a.truncated ? "Only the first files are listed." : "")
      : "No files in the output yet.";
  }

  async function download(id, path) {
    const status = $("#download-status");
    status.textContent = `Downloading ${path}…`;
    const r = await api(`${jobPath(id)}/artifacts/${path.split("/").map(encodeURIComponent).join("/")}`);
    if (!r.ok) { status.textContent = await errorText(r); return; }
    const blob = await r.blob();
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: path.split("/").pop() });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    status.textContent = `Downloaded ${path} (${fmtBytes(blob.size)}).`;
  }

  async function showReport(id) {
    const status = $("#report-status"), frame = $("#report");
    status.textContent = "Loading the report…";
    const r = await api(`${jobPath(id)}/report`);
    if (!r.ok) { status.textContent = await errorText(r); return; }
    frame.srcdoc = await r.text();  // sandbox="": no scripts, no same-origin access, no navigation of this page
    frame.hidden = false;
    status.textContent = "";
    $("#load-report").textContent = "Reload report";
  }

  // ------------------------------------------------------------------ the loss curve (inline SVG)

  async function drawLoss(id) {
    const r = await api(`${jobPath(id)}/metrics?max_points=500`);
    if (!r.ok) return;
    const m = await r.json();
    const series = [
      { key: "loss", label: "train", cls: "train" },
      { key: "val_loss", label: "val", cls: "val" },
      { key: "eval_loss", label: "eval", cls: "val" },
    ].map((s) => ({ ...s, pts: m.records.filter((rec) => typeof rec[s.key] === "number").map((rec) => [rec.step, rec[s.key]]) }))
      .filter((s) => s.pts.length);
    const box = $("#loss-chart");
    if (!series.length) { box.replaceChildren(); return; }
    const all = series.flatMap((s) => s.pts);
    const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    const W = 640, H = 260, L = 52, R = 12, T = 12, B = 36;
    const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    const last = series[0].pts[series[0].pts.length - 1];
    const summary = `Loss by step: ${series.map((s) => `${s.label} ${s.pts[s.pts.length - 1][1].toFixed(3)}`).join(", ")} at step ${last[0]}`;
    const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: "100%", role: "img", "aria-label": summary, class: "chart" },
      svg("title", {}, summary));
    const yt = ticks(y0, y1, 5);
    for (const y of yt.values) {
      g.append(svg("line", { x1: L, x2: W - R, y1: py(y), y2: py(y), class: "grid" }),
        svg("text", { x: L - 6, y: py(y) + 4, "text-anchor": "end", class: "tick" }, y.toFixed(yt.decimals)));
    }
    for (const x of ticks(x0, x1, 6, true).values) {
      g.append(svg("text", { x: px(x), y: H - B + 16, "text-anchor": "middle", class: "tick" }, String(x)));
    }
    g.append(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis" }, "step"));
    series.forEach((s, i) => {
      const points = s.pts.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ");
      g.append(svg("polyline", { points, class: `line ${s.cls}`, "data-series": s.key, "data-count": s.pts.length }));
      if (s.cls === "val") s.pts.forEach(([x, y]) => g.append(svg("circle", { cx: px(x), cy: py(y), r: 3, class: "dot val" })));
      g.append(svg("text", { x: W - R - 4, y: T + 14 + 16 * i, "text-anchor": "end", class: `legend ${s.cls}` }, s.label));
    });
    box.replaceChildren(g);
    $("#loss-note").textContent = m.truncated ? "Only the newest records are drawn." : "";
  }

  // Round tick values (1, 2 or 5 times a power of ten) inside [lo, hi], about n of them.
  function ticks(lo, hi, n, integers = false) {
    const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
    let step = [1, 2, 5, 10].map((k) => k * mag).find((s) => s >= raw);
    if (integers) step = Math.max(1, Math.round(step));
    const values = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) values.push(+v.toPrecision(12));
    return { values, decimals: Math.max(0, -Math.floor(Math.log10(step))) };
  }

  // ------------------------------------------------------------------ submit

  function submitPage() {
    const form = $("#submit-form"), text = $("#spec"), kindSel = $("#kind");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearErrors();
      const status = $("#submit-status");
      status.textContent = "";
      let data;
      try {
        data = jsyaml.load(text.value);
      } catch (e) {
        const line = e.mark ? e.mark.line + 1 : null;
        fieldErrors("spec", [{ path: "", line, msg: `not valid YAML: ${e.reason || e.message}` }]);
        return;
      }
      if (!data || typeof data !== "object" || Array.isArray(data)) {
        fieldErrors("spec", [{ path: "", line: null, msg: "the YAML must be a mapping of the job's fields" }]);
        return;
      }
      let spec, section = null;
      const kind = kindSel.value;
      if ("kind" in data) {
        if (kind && kind !== data.kind) {
          fieldErrors("kind", [{ path: "kind", line: null, msg: `the YAML's kind is ${data.kind}, not ${kind}` }]);
          return;
        }
        spec = data;
      } else {
        const sections = Object.keys(data).filter((k) => data[k] && typeof data[k] === "object" && !Array.isArray(data[k]));
        section = kind || (sections.length === 1 ? sections[0] : null);
        if (!section || !(section in data)) {
          fieldErrors("kind", [{ path: "kind", line: null,
            msg: section ? `the YAML has no section ${section} (sections: ${sections.join(", ")})`
                         : `pick a kind: the YAML has no kind: and its sections are ${sections.join(", ") || "none"}` }]);
          return;
        }
        spec = { kind: section, ...data[section] };
      }
      const idem = $("#idem").value.trim();
      status.textContent = "Submitting…";
      const r = await api("/jobs", { method: "POST", body: spec, headers: idem ? { "Idempotency-Key": idem } : {} });
      if (r.ok) {
        const job = await r.json();
        status.textContent = `Submitted ${job.id}.`;
        location.assign(`/ui/jobs/${encodeURIComponent(job.id)}`);
        return;
      }
      let body = null;
      try { body = await r.json(); } catch (e) { /* not JSON */ }
      status.textContent = `Refused (${r.status}).`;
      if (body && Array.isArray(body.detail)) {
        const byField = { kind: [], spec: [] };
        for (const d of body.detail) {
          let path = (d.loc || []).slice(d.loc && d.loc[0] === "body" ? 1 : 0);
          if (path.length > 1 && path[0] === spec.kind) path = path.slice(1);  // the union's tag, not a field
          const name = path.join(".");
          const msg = name && d.msg.startsWith(`${name}: `) ? d.msg.slice(name.length + 2) : d.msg;
          (path[0] === "kind" ? byField.kind : byField.spec).push(
            { path: name, line: lineOf(text.value, path, section), msg });
        }
        if (byField.kind.length) fieldErrors("kind", byField.kind);
        if (byField.spec.length) fieldErrors("spec", byField.spec);
      } else {
        status.textContent = `Refused (${r.status}): ${body && typeof body.detail === "string" ? body.detail : r.statusText}`;
      }
    });
  }

  function clearErrors() {
    for (const f of ["kind", "spec"]) {
      $(`#${f}-errors`).replaceChildren();
      $(`#${f}`).removeAttribute("aria-invalid");
    }
  }

  // Each error under the field it concerns: the field path, the line of the YAML it is on (a button
  // that puts the cursor there), and the API's message.
  function fieldErrors(field, errors) {
    const list = $(`#${field}-errors`), input = $(`#${field}`);
    input.setAttribute("aria-invalid", "true");
    list.replaceChildren(...errors.map((e) => {
      const li = el("li", { class: "field-error" });
      if (e.line && field === "spec") {
        const b = el("button", { type: "button", class: "linkish" }, `line ${e.line}`);
        b.addEventListener("click", () => gotoLine(input, e.line));
        li.append(b, " ");
      }
      if (e.path) li.append(el("code", { class: "field-path" }, e.path), ": ");
      li.append(e.msg);
      return li;
    }));
    // one announcement per submission, not one per list item
    $("#submit-status").textContent = `${errors.length} problem${errors.length === 1 ? "" : "s"} with the ${field === "kind" ? "kind" : "YAML"}: ${errors.map((e) => (e.path ? `${e.path}: ` : "") + e.msg).join("; ")}`;
    input.focus();
  }

  function gotoLine(textarea, line) {
    const lines = textarea.value.split("\n");
    const start = lines.slice(0, line - 1).reduce((n, l) => n + l.length + 1, 0);
    textarea.focus();
    textarea.setSelectionRange(start, start + (lines[line - 1] || "").length);
  }

  // The line of a field in the YAML the user wrote: each key of the path in turn, below and
  // indented deeper than the one before (list indices are skipped: their items start with "- ").
  function lineOf(yaml, path, section) {
    const lines = yaml.split("\n");
    const keys = (section ? [section, ...path] : path).filter((k) => typeof k === "string");
    let from = 0, indent = -1, found = null;
    for (const key of keys) {
      const esc = key.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
      const re = new RegExp(`^(\\s*(?:-\\s+)?)["']?${esc}["']?\\s*:`);
      let hit = null;
      for (let i = from; i < lines.length; i++) {
        const m = lines[i].match(re);
        if (m && m[1].length > indent) { hit = i; indent = m[1].length; break; }
      }
      if (hit === null) break;
      found = hit + 1;
      from = hit + 1;
    }
    return found;
  }

  // ------------------------------------------------------------------ start

  document.addEventListener("DOMContentLoaded", () => {
    const page = document.body.dataset.page;
    if (page === "signin") { signinPage(); return; }
    if (!token()) { location.replace("/ui/signin"); return; }
    header();
    ({ jobs: jobsPage, job: jobPage, submit: submitPage })[page]();
  });
})();
