// The page in real headless Chromium (Debian's, driven by playwright-core):
// serve www/ from localhost, load a bundled model, score a CSV with known
// anomalies, compare the numbers on the page with the host's, check the 2-D
// heatmap and the cursor read-out, cancel a long run and stop one past its
// time limit (scoring runs in a Web Worker), save a screenshot, and fail on any
// console error.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { readFileSync, readdirSync, mkdirSync } from "node:fs";
import { join, extname, normalize } from "node:path";
import { chromium } from "playwright-core";

const www = new URL("../www/", import.meta.url).pathname;
const goldenDir = process.env.FFJORD_GOLDEN_DIR;
const artifacts = process.env.FFJORD_ARTIFACTS ?? new URL("../../target/wasm-artifacts/", import.meta.url).pathname;
// The bundled models' goldens: the committed f32 files (the page bundles no
// quantized model, nor the version-7 copy of cardio the Node tests score).
const goldens = readdirSync(goldenDir).filter((f) => f.endsWith(".json")).map((f) => JSON.parse(readFileSync(join(goldenDir, f))))
  .filter((g) => /\/models\/[^/]+\/model\.ffjd$/.test(g.model));
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".ffjd": "application/octet-stream" };

function serve() {
  const server = createServer((req, res) => {
    const path = normalize(decodeURIComponent(new URL(req.url, "http://x").pathname)).replace(/^\/+/, "") || "index.html";
    try {
      const body = readFileSync(join(www, path));
      res.writeHead(200, { "content-type": TYPES[extname(path)] ?? "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404);
      res.end("not found");
    }
  });
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server)));
}

const close = (a, b) => Math.abs(a - b) <= 1e-5 * (1 + Math.abs(b)) + 1e-6; // the page prints 6 decimals

/** Scores the golden rows of `g` on the page and compares each log p and
 * highlight with the host's: its packed path ("packed") or one-row path ("row"). */
async function scoreGoldens(page, file, g, path) {
  const header = [...Array.from({ length: g.dim }, (_, j) => `x${j}`), "anomaly"].join(",");
  const csv = [header, ...g.rows.map((r) => [...r.x, r.labelled_anomaly ? 1 : 0].join(","))].join("\n");
  await page.fill("#csv", csv);
  await page.click("#score");
  await page.waitForFunction(() => document.querySelector("#status").textContent === "done", null, { timeout: 60_000 });
  const table = await page.$$eval("#results tr", (trs) => trs.slice(1).map((tr) => ({
    cells: [...tr.cells].map((c) => c.textContent), anomaly: tr.classList.contains("anomaly") })));
  assert.equal(table.length, g.rows.length);
  const logpCol = (g.dim > 4 ? 6 : 1 + g.dim);
  const [logp, score, verdict] =
    path === "packed" ? ["log_p_packed", "score_packed", "verdict_packed"] : ["log_p", "score", "verdict"];
  table.forEach((row, i) => {
    const lp = Number(row.cells[logpCol]);
    assert.ok(close(lp, g.rows[i][logp]), `${file} row ${i}: page ${lp}, host ${g.rows[i][logp]}`);
    const s = Number(row.cells[logpCol + 1]);
    assert.ok(close(s, g.rows[i][score]), `${file} row ${i}: page score ${s}, host ${g.rows[i][score]}`);
    assert.equal(row.anomaly, g.rows[i][verdict] === "anomaly", `${file} row ${i} highlight`);
  });
  const flagged = g.rows.filter((r) => r[verdict] === "anomaly").length;
  assert.match(await page.textContent("#summary"), new RegExp(`^${g.rows.length} rows, ${flagged} anomalies`));
}

function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync"],
  });
}

/** Serves www/, opens `query` on it in Chromium and runs `body(page)`;
 * fails on any console error. */
async function withPage(query, body) {
  const server = await serve();
  const browser = await launch();
  const errors = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 1400 } });
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    page.on("pageerror", (e) => errors.push(e.message));
    await page.goto(`http://127.0.0.1:${server.address().port}/index.html${query}`);
    await page.waitForSelector("body[data-ready=true]");
    await body(page);
  } finally {
    await browser.close();
    server.close();
  }
  assert.deepEqual(errors, [], "no console errors");
}

test("scoring page in headless Chromium agrees with the host", () => withPage("", async (page) => {

    // cardio ends in a kernel density base and is scored by the latent
    // radius (format version 6): the page shows log p and that score.
    // (shuttle last: the cancel and time-limit checks below score its rows.)
    for (const [file, g] of [["models/8gaussians-mcu.ffjd", goldens.find((g) => g.dim === 2)],
                             ["models/cardio.ffjd", goldens.find((g) => g.dim === 21)],
                             ["models/shuttle.ffjd", goldens.find((g) => g.dim === 9)]]) {
      await page.selectOption("#bundled", file);
      await page.waitForFunction(() => !document.querySelector("#info").textContent.startsWith("No model"));
      // Chromium runs WebAssembly SIMD: the page picks that build by itself.
      assert.match(await page.textContent("#build"), /SIMD build/);
      await scoreGoldens(page, file, g, "packed");
      if (g.dim === 2) {
        await page.waitForFunction(() => document.querySelector("#density-status").textContent.startsWith("grid"));
        const spread = await page.$eval("#density", (c) => {
          const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
          let min = 255, max = 0;
          for (let i = 0; i < d.length; i += 4) { min = Math.min(min, d[i]); max = Math.max(max, d[i]); }
          return max - min;
        });
        assert.ok(spread > 100, `heatmap has contrast (${spread})`);
        const box = await page.locator("#density").boundingBox();
        await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
        assert.match(await page.textContent("#cursor"), /^log p at \(/);
        mkdirSync(artifacts, { recursive: true });
        await page.screenshot({ path: join(artifacts, "page-8gaussians.png"), fullPage: true });
      } else {
        assert.equal(await page.isHidden("#density-section"), true);
        const name = file.split("/").pop().replace(".ffjd", "");
        await page.screenshot({ path: join(artifacts, `page-${name}.png`), fullPage: true });
      }
    }
    // Scoring runs in a worker: a long run can be cancelled and one past the
    // time limit is stopped; the page stays usable and scores again afterwards.
    const g9 = goldens.find((g) => g.dim === 9);
    const header9 = [...Array.from({ length: 9 }, (_, j) => `x${j}`)].join(",");
    const many = [header9, ...Array.from({ length: 40_000 }, (_, i) => g9.rows[i % g9.rows.length].x.join(","))].join("\n");
    const status = () => page.textContent("#status");
    await page.$eval("#csv", (el, text) => { el.value = text; }, many); // fill() types too slowly for 40,000 lines
    // Score, then cancel in the same task: the run has started (its request is
    // with the worker, the button shown) and cannot have finished, however
    // fast the machine.
    const shown = await page.evaluate(() => {
      document.querySelector("#score").click();
      const visible = !document.querySelector("#cancel").hidden;
      document.querySelector("#cancel").click();
      return visible;
    });
    assert.equal(shown, true, "the cancel button shows while scoring");
    await page.waitForFunction(() => document.querySelector("#status").textContent === "cancelled");
    assert.equal(await page.isHidden("#cancel"), true);
    await page.fill("#budget", "0.001"); // 1 ms: far less than 40,000 rows take
    await page.click("#score");
    await page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("stopped"), null, { timeout: 60_000 });
    assert.match(await status(), /^stopped: scoring exceeded the 0\.001 s time limit$/);
    await page.fill("#budget", "60");
    const csv9 = [header9, ...g9.rows.map((r) => r.x.join(","))].join("\n");
    await page.fill("#csv", csv9);
    await page.click("#score");
    await page.waitForFunction(() => document.querySelector("#status").textContent === "done", null, { timeout: 60_000 });
    const again = await page.$$eval("#results tr", (trs) => trs.slice(1).map((tr) => Number(tr.cells[6].textContent)));
    again.forEach((lp, i) => assert.ok(close(lp, g9.rows[i].log_p_packed), `after a restart, row ${i}: ${lp}`));

    // A broken model file is reported on the page, not thrown.
    await page.setInputFiles("#model-file", { name: "broken.ffjd", mimeType: "application/octet-stream", buffer: Buffer.from("FFJD\u0001\u0000garbage") });
    await page.waitForFunction(() => document.querySelector("#info .error") !== null);
    assert.match(await page.textContent("#info"), /broken\.ffjd: /);
}));

test("the small build (for engines without SIMD) scores like the host's one-row path", () => withPage("?build=small", async (page) => {
    // (cardio's kernel density base is not in this build: the node tests
    // check that it is refused with the reason.)
    for (const [file, g] of [["models/8gaussians-mcu.ffjd", goldens.find((g) => g.dim === 2)],
                             ["models/shuttle.ffjd", goldens.find((g) => g.dim === 9)]]) {
      await page.selectOption("#bundled", file);
      await page.waitForFunction(() => !document.querySelector("#info").textContent.startsWith("No model"));
      assert.match(await page.textContent("#build"), /small build/);
      await scoreGoldens(page, file, g, "row");
      if (g.dim === 2) await page.waitForFunction(() => document.querySelector("#density-status").textContent.startsWith("grid"));
    }
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: join(artifacts, "page-small-build.png"), fullPage: true });
}));

// The drawing pad (image models): a known image set on the pad scores as the
// host scores it; a mouse stroke paints pixels and scores; samples draw.
const image = goldens.find((g) => g.image_stages);
test("the drawing pad scores drawn images like the host and draws samples", { skip: !image && "no image model" }, () => withPage("", async (page) => {
    await page.selectOption("#bundled", "models/mnist-8x8.ffjd");
    await page.waitForSelector("#pad-section:not([hidden])");
    assert.match(await page.textContent("#build"), /SIMD build/);
    for (const row of image.rows.slice(0, 2)) {
      await page.evaluate((x) => window.ffjordPad.set(Uint8Array.from(x)), row.x);
      await page.click("#pad-score");
      await page.waitForFunction(() => document.querySelector("#pad-result").textContent.startsWith("log p ="));
      const text = await page.textContent("#pad-result");
      const lp = Number(/log p = (-?[\d.]+)/.exec(text)[1]);
      assert.ok(Math.abs(lp - row.log_p) <= 1e-4 * (1 + Math.abs(row.log_p)), `pad ${lp} vs host ${row.log_p}`);
      const bpd = Number(/([\d.]+) bits\/dim/.exec(text)[1]);
      assert.ok(Math.abs(bpd + row.log_p / (64 * Math.LN2)) < 1e-3, text);
      assert.match(text, row.verdict === "anomaly" ? /ANOMALY/ : /normal/);
      await page.evaluate(() => document.querySelector("#pad-result").textContent = "");
    }
    // A stroke across the pad with the mouse.
    await page.click("#pad-clear");
    const box = await page.locator("#pad").boundingBox();
    await page.mouse.move(box.x + box.width * 0.3, box.y + box.height * 0.2);
    await page.mouse.down();
    await page.mouse.move(box.x + box.width * 0.5, box.y + box.height * 0.8, { steps: 12 });
    await page.mouse.up();
    const painted = await page.evaluate(() => window.ffjordPad.pixels.filter((v) => v > 0).length);
    assert.ok(painted >= 4, `the stroke painted ${painted} pixels`);
    await page.click("#pad-score");
    await page.waitForFunction(() => document.querySelector("#pad-result").textContent.startsWith("log p ="));
    await page.click("#pad-sample");
    await page.waitForFunction(() => document.querySelector("#pad-result").textContent === "8 samples from the model", null, { timeout: 60_000 });
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: join(artifacts, "page-drawing-pad.png"), fullPage: true });
}));
