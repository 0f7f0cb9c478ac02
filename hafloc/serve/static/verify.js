// The photo and its best match side by side, verified inlier correspondences drawn as SVG lines.
// Keypoints are in original pixels (EXIF orientation applied), as browsers show images.
"use strict";

const MAX_LINES = 300;

function drawCorrespondences(res, queryUrl) {
  const box = document.querySelector("#verify-box");
  const plot = document.querySelector("#verify");
  plot.replaceChildren();
  const best = res.matches.length ? res.matches[0] : null;
  const corr = best && best.correspondences;
  if (!corr || !corr.query_size || !corr.db_size) { box.hidden = true; return; }
  const NS = "http://www.w3.org/2000/svg";
  const mk = (tag, attrs) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
    return n;
  };
  const H = 1000, gap = 40;
  const [qw, qh] = corr.query_size, [dw, dh] = corr.db_size;
  const sq = H / qh, sd = H / dh;
  const qW = qw * sq, dW = dw * sd;
  plot.setAttribute("viewBox", `0 0 ${(qW + gap + dW).toFixed(1)} ${H}`);
  plot.appendChild(mk("image", { href: queryUrl, x: 0, y: 0, width: qW.toFixed(1), height: H, preserveAspectRatio: "none" }));
  const dbImage = mk("image", { x: (qW + gap).toFixed(1), y: 0, width: dW.toFixed(1), height: H, preserveAspectRatio: "none" });
  plot.appendChild(dbImage);
  const loader = new Image();  // setThumb knows how to fetch with a token
  loader.addEventListener("load", () => dbImage.setAttribute("href", loader.src));
  setThumb(loader, best.id, "large");  // drawn as tall as the photo beside it: a small thumbnail would blur
  const lines = mk("g", { class: "inlier-lines" });
  const n = Math.min(corr.query.length, MAX_LINES);
  const step = corr.query.length / Math.max(n, 1);
  for (let k = 0; k < n; k++) {
    const i = Math.floor(k * step);
    const [x0, y0] = corr.query[i], [x1, y1] = corr.db[i];
    lines.appendChild(mk("line", {
      x1: (x0 * sq).toFixed(1), y1: (y0 * sq).toFixed(1),
      x2: (qW + gap + x1 * sd).toFixed(1), y2: (y1 * sd).toFixed(1),
      stroke: `hsl(${(k * 137) % 360}, 85%, 50%)`,
    }));
  }
  plot.appendChild(lines);
  document.querySelector("#verify-caption").textContent =
    `${best.inliers} verified inlier matches with #1 ${best.image}` + (n < best.inliers ? ` (${n} drawn)` : "");
  box.hidden = false;
}
