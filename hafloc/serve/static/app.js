// hafloc web page: upload a photo, show the estimate, matches and attention maps. No external resources.
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG_NS = "http://www.w3.org/2000/svg";
const state = { token: localStorage.getItem("hafloc-token") || "", points: [], result: null, objectUrls: [] };

function authHeaders() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function api(url, options = {}) {
  const resp = await fetch(url, { ...options, headers: { ...(options.headers || {}), ...authHeaders() } });
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const msg = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : resp.statusText;
    const err = new Error(msg || ("HTTP " + resp.status));
    err.status = resp.status;
    throw err;
  }
  return body;
}

function showError(msg) {
  const el = $("#error");
  el.textContent = msg;
  el.hidden = !msg;
}

function fmtDistance(m) {
  if (m === null || m === undefined) return "no position";
  return m < 1000 ? m.toFixed(1) + " m" : (m / 1000).toFixed(1) + " km";
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

// Equirectangular projection scaled by cos(latitude): distances look right at city scale.
function drawPlot() {
  const plot = $("#plot");
  plot.replaceChildren();
  const W = 640, H = 400, pad = 24;
  const res = state.result;
  const matches = res ? res.matches.filter((m) => m.lat !== null) : [];
  const est = res && res.estimate ? res.estimate : null;
  let frame = state.points.map((p) => [p.lat, p.lon]);
  if ($("#zoom").checked && est) {
    frame = [[est.lat, est.lon]].concat(matches.filter((m) => m.distance_m !== null && m.distance_m < 5000).map((m) => [m.lat, m.lon]));
  } else {
    if (est) frame.push([est.lat, est.lon]);
  }
  if (frame.length === 0) {
    const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" });
    t.textContent = "no positioned photos in the index";
    plot.appendChild(t);
    return;
  }
  const lats = frame.map((p) => p[0]), lons = frame.map((p) => p[1]);
  const lat0 = (Math.min(...lats) + Math.max(...lats)) / 2;
  const kx = Math.cos(lat0 * Math.PI / 180);
  let x0 = Math.min(...lons) * kx, x1 = Math.max(...lons) * kx, y0 = Math.min(...lats), y1 = Math.max(...lats);
  const minSpan = 0.0005;  // ~50 m: a lone point still gets a sensible frame
  if (x1 - x0 < minSpan) { const c = (x0 + x1) / 2; x0 = c - minSpan / 2; x1 = c + minSpan / 2; }
  if (y1 - y0 < minSpan) { const c = (y0 + y1) / 2; y0 = c - minSpan / 2; y1 = c + minSpan / 2; }
  const s = Math.min((W - 2 * pad) / (x1 - x0), (H - 2 * pad) / (y1 - y0));
  const ox = (W - s * (x1 - x0)) / 2, oy = (H - s * (y1 - y0)) / 2;
  const px = (lat, lon) => [ox + (lon * kx - x0) * s, H - (oy + (lat - y0) * s)];
  const inside = ([x, y]) => x >= -20 && x <= W + 20 && y >= -20 && y <= H + 20;

  const g = svg("g");
  for (const p of state.points) {
    const xy = px(p.lat, p.lon);
    if (inside(xy)) g.appendChild(svg("circle", { cx: xy[0].toFixed(1), cy: xy[1].toFixed(1), r: 3, class: "db" }));
  }
  plot.appendChild(g);
  res && res.matches.forEach((m, i) => {
    if (m.lat === null) return;
    const xy = px(m.lat, m.lon);
    if (!inside(xy)) return;
    const c = svg("circle", { cx: xy[0].toFixed(1), cy: xy[1].toFixed(1), r: 6, class: "match" });
    const title = svg("title");
    title.textContent = `#${i + 1} ${m.image} (similarity ${m.similarity.toFixed(3)})`;
    c.appendChild(title);
    plot.appendChild(c);
    const t = svg("text", { x: (xy[0] + 7).toFixed(1), y: (xy[1] - 6).toFixed(1) });
    t.textContent = String(i + 1);
    plot.appendChild(t);
  });
  if (est) {
    const [x, y] = px(est.lat, est.lon);
    plot.appendChild(svg("circle", { cx: x.toFixed(1), cy: y.toFixed(1), r: 11, class: "est", id: "plot-estimate" }));
    plot.appendChild(svg("path", { d: `M${x - 16} ${y}h32M${x} ${y - 16}v32`, class: "est" }));
  }
  const spanM = (y1 - y0) * 111320;
  const scale = svg("text", { x: 8, y: H - 8 });
  scale.textContent = "height of the frame: " + fmtDistance(spanM);
  plot.appendChild(scale);
}

async function setThumb(img, id) {
  if (!state.token) { img.src = "/thumbnails/" + id; return; }
  // <img> cannot send a bearer token: fetch the bytes and show them from a blob URL
  const resp = await fetch("/thumbnails/" + id, { headers: authHeaders() });
  if (!resp.ok) return;
  const url = URL.createObjectURL(await resp.blob());
  state.objectUrls.push(url);
  img.src = url;
}

// The confidence in words: a calibrated index gives P(within radius_m); otherwise it is a heuristic score.
function confidenceWords(res) {
  if (!res.estimate) {
    const u = res.unknown || { reason: "none of the matches has a position" };
    return `unknown: ${u.reason}`;
  }
  const p = res.estimate.confidence, pct = `${(100 * p).toFixed(0)} %`;
  const radius = res.radius_m !== undefined ? `${res.radius_m} m` : "25 m";
  if (!res.calibrated) return `uncertain (uncalibrated score ${pct})`;
  if (p >= 0.7) return `likely within ${radius} (${pct})`;
  if (p >= 0.3) return `uncertain: ${pct} chance of lying within ${radius}`;
  return `unlikely to lie within ${radius} (${pct})`;
}

function showResult(res, file) {
  state.result = res;
  state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  state.objectUrls = [];
  const qurl = URL.createObjectURL(file);
  state.objectUrls.push(qurl);
  $("#query-img").src = qurl;
  $("#query-name").textContent = res.image;
  if (res.estimate) {
    $("#estimate").textContent = `${res.estimate.lat.toFixed(6)}, ${res.estimate.lon.toFixed(6)}`;
  } else {
    $("#estimate").textContent = res.unknown ? "unknown" : "no estimate";
  }
  $("#confidence").textContent = confidenceWords(res);
  $("#result").hidden = false;

  const att = $("#attention");
  att.replaceChildren();
  for (const level of ["low", "mid", "high"].concat(Object.keys(res.attention || {}).filter((k) => !["low", "mid", "high"].includes(k)))) {
    const a = (res.attention || {})[level];
    if (!a) continue;
    const fig = el("figure", { class: "attention-level", "data-level": level });
    fig.appendChild(el("img", { src: a.overlay, alt: `attention (${level})` }));
    fig.appendChild(el("figcaption", {}, `${level}: ${a.shape[0]}\u00d7${a.shape[1]} map` + (a.uniform ? " (uniform: nothing stands out)" : "")));
    att.appendChild(fig);
  }
  $("#attention-box").hidden = att.children.length === 0;

  const list = $("#matches");
  list.replaceChildren();
  res.matches.forEach((m, i) => {
    const li = el("li", { class: "match-card" });
    const img = el("img", { alt: m.image, loading: "eager" });
    setThumb(img, m.id);
    li.appendChild(img);
    const p = el("p");
    p.appendChild(el("span", { class: "num" }, `#${i + 1} `));
    p.appendChild(document.createTextNode(`similarity ${m.similarity.toFixed(3)} \u00b7 ${fmtDistance(m.distance_m)}`));
    li.appendChild(p);
    li.appendChild(el("div", { class: "name" }, m.image));
    list.appendChild(li);
  });
  $("#matches-box").hidden = res.matches.length === 0;
  drawPlot();
}

async function locate(file) {
  if (!file) return;
  showError("");
  $("#busy").hidden = false;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const res = await api("/locate", { method: "POST", body: form });
    showResult(res, file);
  } catch (e) {
    showError(e.status === 401 ? "This server needs an access token." : "Could not locate this photo: " + e.message);
    if (e.status === 401) $("#token-box").hidden = false;
  } finally {
    $("#busy").hidden = true;
  }
}

async function loadPositions() {
  const pos = await api("/api/positions");
  state.points = pos.points;
  drawPlot();
}

async function init() {
  const drop = $("#drop");
  $("#file").addEventListener("change", (e) => locate(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) locate(e.dataTransfer.files[0]);
  });
  $("#zoom").addEventListener("change", drawPlot);
  $("#token").value = state.token;
  $("#token-save").addEventListener("click", async () => {
    state.token = $("#token").value.trim();
    localStorage.setItem("hafloc-token", state.token);
    showError("");
    try { await loadPositions(); } catch (e) { showError(e.message); }
  });
  try {
    const health = await api("/health");
    $("#status").textContent = `${health.images} photos indexed \u00b7 uploads up to ${health.max_upload_mb} MB`;
    if (health.token_required) $("#token-box").hidden = false;
    if (!health.token_required || state.token) await loadPositions();
  } catch (e) {
    $("#status").textContent = "server unavailable";
    showError(e.message);
  }
}

init();
