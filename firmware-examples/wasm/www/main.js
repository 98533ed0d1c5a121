// The scoring page: loads a model into the WASM Detector, scores CSV rows in
// chunks (the tab stays responsive), draws the density of 2-D models.
import init, { Detector } from "./pkg/ffjord_wasm.js";

const $ = (id) => document.getElementById(id);
let detector = null;
let modelBytes = null;

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

const nextFrame = () => new Promise((resolve) => setTimeout(resolve, 0));
// Rows scored together by the runtime's packed path (each keeps its own step control).
const PACKED_ROWS = 32;

function applySolver() {
  if (!detector) return;
  const v = $("solver").value;
  if (v === "default") detector.use_default_solver();
  else if (v.startsWith("rk4-")) detector.use_rk4(Number(v.slice(4)));
  else if (v.startsWith("dopri5-")) detector.use_dopri5(Number(v.slice(7)));
}

async function loadModel(bytes, label) {
  try {
    const d = new Detector(bytes);
    if (detector) detector.free();
    detector = d;
    modelBytes = bytes;
  } catch (e) {
    $("info").innerHTML = "";
    $("info").append(Object.assign(document.createElement("span"), { className: "error", textContent: `${label}: ${e.message}` }));
    $("score").disabled = true;
    return;
  }
  applySolver();
  const t = detector.threshold();
  $("info").textContent = `${label}: "${detector.name()}", ${detector.dim()} dimensions, ` +
    (t === undefined ? "no anomaly threshold" : `anomaly when −log p > ${t.toFixed(3)} (quantile ${Number(detector.threshold_quantile().toFixed(4))})`) +
    `. Data: ${detector.description()}`;
  $("score").disabled = false;
  $("results").innerHTML = "";
  $("summary").textContent = "";
  setStatus("");
  if (detector.dim() === 2) {
    $("density-section").hidden = false;
    await drawDensity();
  } else {
    $("density-section").hidden = true;
  }
}

function parseCsv(text, dim) {
  const lines = text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
  if (lines.length === 0) throw new Error("no rows to score");
  let header = null;
  let first = lines[0].split(",").map((s) => s.trim());
  if (first.some((f) => f === "" || isNaN(Number(f)))) {
    header = first;
    lines.shift();
  }
  const labelCol = header ? header.findIndex((h) => /^(anomaly|label)$/i.test(h)) : -1;
  const rows = [];
  const labels = [];
  lines.forEach((line, i) => {
    const fields = line.split(",").map((s) => s.trim());
    const values = fields.filter((_, j) => j !== labelCol).map(Number);
    const lineNo = i + (header ? 2 : 1);
    if (values.length !== dim) throw new Error(`line ${lineNo}: ${values.length} values, the model needs ${dim}`);
    const bad = values.findIndex((v) => !Number.isFinite(v));
    if (bad >= 0) throw new Error(`line ${lineNo}, column ${bad + 1}: not a finite number`);
    rows.push(values);
    labels.push(labelCol >= 0 ? fields[labelCol] : null);
  });
  return { rows, labels, header };
}

async function scoreRows() {
  if (!detector) return;
  let parsed;
  try {
    parsed = parseCsv($("csv").value, detector.dim());
  } catch (e) {
    setStatus(e.message, true);
    return;
  }
  const { rows, labels } = parsed;
  const d = detector.dim();
  const threshold = detector.threshold();
  const table = $("results");
  table.innerHTML = "";
  const head = table.insertRow();
  const cols = ["row", ...Array.from({ length: Math.min(d, 4) }, (_, j) => `x${j}`), ...(d > 4 ? ["…"] : []),
    "log p", "score", "verdict", ...(labels[0] !== null ? ["label"] : [])];
  for (const c of cols) head.append(Object.assign(document.createElement("th"), { textContent: c }));
  $("progress").hidden = false;
  $("progress").value = 0;
  $("score").disabled = true;
  const chunk = 64;
  let anomalies = 0;
  let nfe = 0;
  const t0 = performance.now();
  try {
    for (let start = 0; start < rows.length; start += chunk) {
      const part = rows.slice(start, start + chunk);
      const flat = new Float32Array(part.flat());
      const logp = detector.log_density_packed(flat, PACKED_ROWS);
      nfe += detector.last_nfe();
      part.forEach((x, k) => {
        const i = start + k;
        const score = -logp[k];
        const anomaly = threshold !== undefined && score > threshold;
        if (anomaly) anomalies++;
        const tr = table.insertRow();
        tr.className = anomaly ? "anomaly" : "";
        const cells = [i + 1, ...x.slice(0, 4).map((v) => v.toPrecision(6)), ...(d > 4 ? ["…"] : []),
          logp[k].toFixed(6), score.toFixed(6), threshold === undefined ? "—" : anomaly ? "anomaly" : "normal",
          ...(labels[i] !== null ? [labels[i]] : [])];
        for (const c of cells) tr.insertCell().textContent = c;
      });
      $("progress").value = Math.min(1, (start + part.length) / rows.length);
      setStatus(`scoring… ${start + part.length} / ${rows.length}`);
      await nextFrame();
    }
  } catch (e) {
    setStatus(e.message, true);
    $("progress").hidden = true;
    $("score").disabled = false;
    return;
  }
  const ms = performance.now() - t0;
  $("progress").hidden = true;
  $("score").disabled = false;
  $("summary").textContent = `${rows.length} rows, ${anomalies} anomalies` +
    (threshold === undefined ? " (uncalibrated model)" : "") + `, ${nfe} function evaluations, ${ms.toFixed(0)} ms`;
  setStatus("done");
}

let view = null;

async function drawDensity() {
  const canvas = $("density");
  const ctx = canvas.getContext("2d");
  const n = 90;
  $("density-status").textContent = "drawing…";
  const samples = detector.sample(7n, 600);
  const xs = [], ys = [];
  for (let i = 0; i < samples.length; i += 2) { xs.push(samples[i]); ys.push(samples[i + 1]); }
  const q = (a, p) => { const s = [...a].sort((u, v) => u - v); return s[Math.floor(p * (s.length - 1))]; };
  const pad = (lo, hi) => { const m = 0.15 * (hi - lo || 1); return [lo - m, hi + m]; };
  const [x0, x1] = pad(q(xs, 0.005), q(xs, 0.995));
  const [y0, y1] = pad(q(ys, 0.005), q(ys, 0.995));
  view = { x0, x1, y0, y1 };
  const logp = new Float32Array(n * n);
  for (let r = 0; r < n; r++) {
    const row = new Float32Array(2 * n);
    for (let c = 0; c < n; c++) {
      row[2 * c] = x0 + (c + 0.5) / n * (x1 - x0);
      row[2 * c + 1] = y1 - (r + 0.5) / n * (y1 - y0);
    }
    logp.set(detector.log_density_packed(row, PACKED_ROWS), r * n);
    if (r % 10 === 9) { $("density-status").textContent = `drawing… ${r + 1}/${n}`; await nextFrame(); }
  }
  const max = Math.max(...logp);
  const img = ctx.createImageData(n, n);
  for (let i = 0; i < n * n; i++) {
    const [r, g, b] = magma(Math.exp(logp[i] - max));
    img.data.set([r, g, b, 255], 4 * i);
  }
  const tmp = Object.assign(document.createElement("canvas"), { width: n, height: n });
  tmp.getContext("2d").putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(tmp, 0, 0, canvas.width, canvas.height);
  if ($("show-samples").checked) {
    ctx.fillStyle = "rgba(255,255,255,0.8)";
    for (let i = 0; i < xs.length; i++) {
      const [px, py] = toCanvas(xs[i], ys[i]);
      ctx.fillRect(px - 1, py - 1, 2, 2);
    }
  }
  $("density-status").textContent = `grid ${n}×${n}, ${xs.length} samples`;
}

// A dark-to-bright colour map (magma-like anchors), v in [0, 1].
const MAP = [[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]];
function magma(v) {
  const t = Math.min(1, Math.max(0, v)) * (MAP.length - 1);
  const i = Math.min(MAP.length - 2, Math.floor(t)), f = t - i;
  return MAP[i].map((a, k) => Math.round(a * (1 - f) + MAP[i + 1][k] * f));
}

function toCanvas(x, y) {
  const c = $("density");
  return [(x - view.x0) / (view.x1 - view.x0) * c.width, (view.y1 - y) / (view.y1 - view.y0) * c.height];
}

function fromCanvas(event) {
  const c = $("density");
  const rect = c.getBoundingClientRect();
  const px = (event.clientX - rect.left) / rect.width, py = (event.clientY - rect.top) / rect.height;
  return [view.x0 + px * (view.x1 - view.x0), view.y1 - py * (view.y1 - view.y0)];
}

function showCursor(event) {
  if (!detector || !view) return;
  const [x, y] = fromCanvas(event);
  try {
    const lp = detector.log_density(new Float32Array([x, y]));
    $("cursor").textContent = `log p at (${x.toFixed(3)}, ${y.toFixed(3)}): ${lp.toFixed(4)}`;
  } catch (e) {
    $("cursor").textContent = e.message;
  }
}

async function main() {
  await init();
  $("bundled").addEventListener("change", async (e) => {
    if (!e.target.value) return;
    const res = await fetch(e.target.value);
    await loadModel(new Uint8Array(await res.arrayBuffer()), e.target.value.split("/").pop());
  });
  $("model-file").addEventListener("change", async (e) => {
    const f = e.target.files[0];
    if (f) await loadModel(new Uint8Array(await f.arrayBuffer()), f.name);
  });
  $("csv-file").addEventListener("change", async (e) => {
    const f = e.target.files[0];
    if (f) $("csv").value = await f.text();
  });
  $("solver").addEventListener("change", () => { try { applySolver(); } catch (e) { setStatus(e.message, true); } });
  $("score").addEventListener("click", scoreRows);
  $("density").addEventListener("mousemove", showCursor);
  $("density").addEventListener("click", showCursor);
  $("show-samples").addEventListener("change", () => detector && drawDensity());
  document.body.dataset.ready = "true";
}

main();
