// hafloc web page: upload a photo, show the estimate, matches and attention maps. No external resources.
// The map lives in map.js (window.haflocMap).
"use strict";

const $ = (sel) => document.querySelector(sel);
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

// size "small" (the default) or "large" (the server's sizes: serve/app.py THUMB_SIDES)
async function setThumb(img, id, size = "small") {
  const src = "/thumbnails/" + id + (size === "small" ? "" : "?size=" + size);
  if (!state.token) { img.src = src; return; }
  // <img> cannot send a bearer token: fetch the bytes and show them from a blob URL
  const resp = await fetch(src, { headers: authHeaders() });
  if (!resp.ok) return;
  const url = URL.createObjectURL(await resp.blob());
  state.objectUrls.push(url);
  img.src = url;
}

// The confidence in words: a calibrated index gives P(within radius_m); otherwise it is a heuristic score.
function confidenceWords(res) {
  if (!res.estimate) {
    const u = res.unknown || { reason: "no match has a position" };
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
    // re-ranked answers say whether geometry verified them: "verified" only above the scorer's threshold
    const reranked = (res.matches || []).some((m) => m.inliers !== null && m.inliers !== undefined);
    const check = reranked ? (res.estimate.verified ? " \u00b7 verified" : " \u00b7 not verified") : "";
    $("#estimate").textContent = `${res.estimate.lat.toFixed(6)}, ${res.estimate.lon.toFixed(6)}${check}`;
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
    if (m.inliers !== null && m.inliers !== undefined) p.appendChild(el("span", { class: "inliers" }, ` \u00b7 ${m.inliers} inliers`));
    li.appendChild(p);
    li.appendChild(el("div", { class: "name" }, m.image));
    list.appendChild(li);
  });
  $("#matches-box").hidden = res.matches.length === 0;
  drawCorrespondences(res, qurl);
  haflocMap.showResult(res);
}

async function locate(file) {
  if (!file) return;
  showError("");
  $("#busy").hidden = false;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    // the document of 'hafloc locate --json' (docs/locate.schema.json); the page shows the attention maps
    const doc = await api("/locate?attention=1", { method: "POST", body: form });
    showResult(doc.results[0], file);
  } catch (e) {
    showError(e.status === 401 ? "This server needs an access token." : "Could not locate this photo: " + e.message);
    if (e.status === 401) $("#token-box").hidden = false;
  } finally {
    $("#busy").hidden = true;
  }
}

async function loadPositions() {
  try {
    const pos = await api("/api/positions");
    state.points = pos.points;
    haflocMap.setPoints(pos.points);
  } catch (e) {
    haflocMap.setPoints(null, "database positions not loaded: " + e.message);
    throw e;
  }
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
  $("#zoom").addEventListener("change", () => haflocMap.fit());
  $("#token").value = state.token;
  $("#token-save").addEventListener("click", async () => {
    state.token = $("#token").value.trim();
    localStorage.setItem("hafloc-token", state.token);
    showError("");
    haflocMap.setPoints(null);  // "loading…" again
    try { await loadPositions(); } catch (e) { showError(e.message); }
  });
  let health;
  try {
    health = await api("/health");
  } catch (e) {
    $("#status").textContent = "server unavailable";
    $("#map-message").hidden = true;  // no "loading…" that never ends
    showError(e.message);
    return;
  }
  $("#status").textContent = `${health.images} photos indexed \u00b7 uploads up to ${health.max_upload_mb} MB`;
  if (health.token_required) $("#token-box").hidden = false;
  haflocMap.init($("#map"), { ...(health.map || {}), thumb: setThumb, distance: fmtDistance });
  if (health.token_required && !state.token) {
    haflocMap.setPoints(null, "the database positions need the access token");
    return;
  }
  try { await loadPositions(); } catch (e) { showError(e.message); }
}

init();
