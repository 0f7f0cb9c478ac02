// hafloc map: the database positions, the estimate with its radius and the numbered matches on a
// Leaflet map (vendored, no CDN). No tiles unless the server was started with --tiles: then a plain
// lat/lon grid, so the page works offline. Used by app.js through window.haflocMap.
"use strict";

const haflocMap = (() => {
  const DB_SVG_MAX = 2000;  // more database dots than this go to one canvas (SVG slows down)
  const ZOOM_MATCH_M = 5000;  // "zoom to the estimate" frames the matches within this distance
  let map = null, dbLayer = null, resultLayer = null, grid = null, message = null, renderers = null;
  let opts = { tiles: null, attribution: null, radius_m: 25, thumb: null, distance: (m) => m + " m" };
  let points = null, result = null;  // points null: not loaded (yet), pointsNote says why
  let pointsNote = "loading\u2026";

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  // rank 1 red, through orange and green, to blue for the last
  function rankColour(i, n) {
    const hue = n > 1 ? Math.round(220 * i / (n - 1)) : 0;
    return `hsl(${hue}, 80%, 45%)`;
  }

  function niceStep(span, lines) {
    const raw = Math.max(span, 1e-7) / lines;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
    return 10 * p;
  }

  function fmtDeg(v, step, pos, neg) {
    const digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
    return Math.abs(v).toFixed(digits) + "\u00b0" + (v > 0 ? pos : v < 0 ? neg : "");
  }

  // A lat/lon graticule redrawn for the view: the map's background when there are no tiles.
  const Graticule = L.Layer.extend({
    onAdd(m) {
      this._group = L.layerGroup().addTo(m);
      m.on("moveend", this._draw, this);
      this._draw();
    },
    onRemove(m) {
      m.off("moveend", this._draw, this);
      this._group.remove();
    },
    _draw() {
      const m = this._map, g = this._group;
      g.clearLayers();
      const b = m.getBounds();
      const s = Math.max(b.getSouth(), -85), n = Math.min(b.getNorth(), 85), w = b.getWest(), e = b.getEast();
      if (!(n > s && e > w)) return;
      const latStep = niceStep(n - s, 5), lonStep = niceStep(e - w, 7);
      // labels clear of the corner controls: latitudes beside the zoom buttons, longitudes along the top
      const labelLon = m.containerPointToLatLng([48, 0]).lng, labelLat = m.containerPointToLatLng([0, 4]).lat;
      const line = { pane: "graticule", interactive: false, className: "hafloc-grid" };
      const label = (latlng, text, anchor) => L.marker(latlng, {
        pane: "graticule", interactive: false, keyboard: false,
        icon: L.divIcon({ className: "hafloc-grid-label", html: escapeHtml(text), iconSize: null, iconAnchor: anchor }),
      });
      for (let lat = Math.ceil(s / latStep) * latStep; lat <= n; lat += latStep) {
        g.addLayer(L.polyline([[lat, w], [lat, e]], line));
        g.addLayer(label([lat, labelLon], fmtDeg(lat, latStep, "N", "S"), [0, 13]));
      }
      for (let lon = Math.ceil(w / lonStep) * lonStep; lon <= e; lon += lonStep) {
        const wrapped = ((lon + 540) % 360) - 180;
        g.addLayer(L.polyline([[s, lon], [n, lon]], line));
        g.addLayer(label([labelLat, lon], fmtDeg(wrapped, lonStep, "E", "W"), [-3, 0]));
      }
    },
  });

  function showMessage(text) {
    message.textContent = text || "";
    message.hidden = !text;
  }

  function init(container, config = {}) {
    opts = { ...opts, ...config };
    message = document.getElementById("map-message");
    map = L.map(container, { minZoom: 1, maxZoom: 22, zoomSnap: 0.25, worldCopyJump: true });
    map.createPane("database").style.zIndex = 350;  // under the estimate and the matches (overlayPane: 400)
    renderers = { svg: L.svg({ pane: "database" }), canvas: L.canvas({ pane: "database", padding: 0.5 }) };
    map.attributionControl.setPrefix(false);
    map.createPane("graticule").style.zIndex = 250;  // above tiles, below the data
    const overlays = {};
    if (opts.tiles) {
      L.tileLayer(opts.tiles, { maxNativeZoom: 19, maxZoom: 22, attribution: escapeHtml(opts.attribution || "") })
        .addTo(map);
      container.classList.add("with-tiles");
    }
    grid = new Graticule();
    if (!opts.tiles) grid.addTo(map);
    overlays["coordinate grid"] = grid;
    dbLayer = L.featureGroup().addTo(map);
    resultLayer = L.featureGroup().addTo(map);
    overlays["database photos"] = dbLayer;
    overlays["estimate and matches"] = resultLayer;
    L.control.layers(null, overlays, { collapsed: true }).addTo(map);
    L.control.scale({ imperial: false }).addTo(map);
    map.setView([20, 0], 1);
    drawPoints();
    drawResult();
  }

  // pts null: the positions are not there (yet); note: the map's message meanwhile (default "loading…")
  function setPoints(pts, note) {
    points = pts || null;
    pointsNote = note || "loading\u2026";
    drawPoints();
    drawResult();
  }

  function showResult(res) {
    result = res;
    drawResult();
  }

  function radiusOf(res) {
    return (res.estimate && res.estimate.radius_m) || opts.radius_m || 25;
  }

  function popupFor(m, i) {
    const box = document.createElement("div");
    box.className = "hafloc-popup";
    const img = document.createElement("img");
    img.alt = m.image;
    if (opts.thumb && m.id !== undefined) opts.thumb(img, m.id);
    box.appendChild(img);
    const title = document.createElement("p");
    const num = document.createElement("b");
    num.textContent = `#${i + 1} `;
    title.appendChild(num);
    title.appendChild(document.createTextNode(m.image));
    box.appendChild(title);
    const info = document.createElement("p");
    info.textContent = `similarity ${m.similarity.toFixed(3)}` +
      (m.distance_m !== null && m.distance_m !== undefined ? ` \u00b7 ${opts.distance(m.distance_m)} from the estimate` : "");
    box.appendChild(info);
    return box;
  }

  function drawPoints() {
    if (!map) return;
    dbLayer.clearLayers();
    const shown = points || [];
    const renderer = shown.length > DB_SVG_MAX ? renderers.canvas : renderers.svg;
    for (const p of shown) {
      dbLayer.addLayer(L.circleMarker([p.lat, p.lon], { renderer, pane: "database", radius: 3, stroke: false, fillOpacity: 0.7,
        fillColor: "#8a96ad", interactive: false, className: "hafloc-db" }));
    }
    map.getContainer().dataset.dbPoints = String(shown.length);
  }

  function drawResult() {
    if (!map) return;
    resultLayer.clearLayers();
    const res = result;
    const est = res && res.estimate ? res.estimate : null;
    const positioned = res ? res.matches.map((m, i) => [m, i]).filter(([m]) => m.lat !== null && m.lat !== undefined) : [];
    if (est) {
      L.circle([est.lat, est.lon], { radius: radiusOf(res), className: "hafloc-radius", color: "#d63031", weight: 2,
        fillOpacity: 0.08, interactive: false }).addTo(resultLayer);
      for (const [m] of positioned) {
        L.polyline([[est.lat, est.lon], [m.lat, m.lon]], { className: "hafloc-link", color: "#d63031", weight: 1,
          opacity: 0.5, dashArray: "3 4", interactive: false }).addTo(resultLayer);
      }
    }
    const n = res ? res.matches.length : 0;
    for (const [m, i] of positioned) {
      const colour = rankColour(i, n);
      const icon = L.divIcon({ className: "hafloc-match", iconSize: [22, 22], iconAnchor: [11, 11], popupAnchor: [0, -10],
        html: `<span style="background:${colour}">${i + 1}</span>` });
      L.marker([m.lat, m.lon], { icon, title: `#${i + 1} ${m.image} (similarity ${m.similarity.toFixed(3)})`,
        alt: `match ${i + 1}`, zIndexOffset: 10 * (n - i), riseOnHover: true })
        .bindPopup(() => popupFor(m, i), { maxWidth: 240, minWidth: 200 })
        .addTo(resultLayer);
    }
    if (est) {
      const mk = L.marker([est.lat, est.lon], { icon: L.divIcon({ className: "hafloc-estimate", iconSize: [26, 26],
        iconAnchor: [13, 13] }), title: `estimate ${est.lat.toFixed(6)}, ${est.lon.toFixed(6)}`,
        zIndexOffset: 20 * (n + 1), interactive: false }).addTo(resultLayer);
      mk.getElement().id = "map-estimate";
    }
    if (res && !est) {
      const why = (res.unknown && res.unknown.reason) ||
        (positioned.length ? "the matches do not agree on a place" : "no match has a position");
      showMessage("no estimate: " + why);
    } else if (!res && points === null) {
      showMessage(pointsNote);
    } else if (!res && !points.length) {
      showMessage("no positioned photos in the index");
    } else {
      showMessage("");
    }
    fit();
  }

  // Frame the estimate with its radius and nearby matches (the "zoom" box), else everything shown.
  function fit() {
    if (!map) return;
    const zoomBox = document.getElementById("zoom");
    const res = result, est = res && res.estimate ? res.estimate : null;
    const positioned = res ? res.matches.filter((m) => m.lat !== null && m.lat !== undefined) : [];
    let bounds = null;
    if (est && (!zoomBox || zoomBox.checked)) {
      bounds = L.latLng(est.lat, est.lon).toBounds(2 * radiusOf(res));
      for (const m of positioned) if (m.distance_m !== null && m.distance_m < ZOOM_MATCH_M) bounds.extend([m.lat, m.lon]);
    } else if (res && !est && positioned.length && (!zoomBox || zoomBox.checked)) {
      bounds = L.latLngBounds(positioned.map((m) => [m.lat, m.lon]));
    } else {
      const all = (points || []).map((p) => [p.lat, p.lon]);
      if (est) all.push([est.lat, est.lon]);
      for (const m of positioned) all.push([m.lat, m.lon]);
      if (all.length) bounds = L.latLngBounds(all);
    }
    map.invalidateSize();
    if (bounds) map.fitBounds(bounds.pad(0.05), { padding: [24, 24], maxZoom: 18, animate: false });
  }

  return { init, setPoints, showResult, fit };
})();
window.haflocMap = haflocMap;
