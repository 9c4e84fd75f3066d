// segserve demo page: plain JavaScript, no build step, no external assets.
// It calls the public API like any client: GET /v1/models, POST /v1/segment (or /v1/models/{model}/segment)
// with the image as the body, and reads the receipt from the X-Segserve-* headers. The mask comes back as a
// PNG label map (pixel value = class id) and is painted here with the class palette (/demo/palette/{model}),
// on a canvas layered over the image: what the overlay shows is exactly the mask the server returned.
"use strict";

const MAX_8BIT_CLASSES = 256; // above this the label map is 16-bit, which canvases cannot read: ask for colours
const MAX_RUNS_SHOWN = 12;
const MAX_LEGEND = 40;

const $ = (id) => document.getElementById(id);
const state = { listing: null, file: null, bitmap: null, palettes: new Map(), runs: [], busy: false, again: false,
                lastRequest: null, lastReceipt: null };
window.segserveDemo = state; // read by the browser tests, handy in the console too

// The budget slider is logarithmic: 10 ms at the left, 10 s at the right.
function budgetMs() {
  const ms = 10 * Math.pow(1000, Number($("budget").value) / 100);
  const step = ms < 100 ? 1 : ms < 1000 ? 10 : 100;
  return Math.round(ms / step) * step;
}

function setState(name, message, isError) {
  document.body.dataset.state = name;
  $("message").textContent = message || "";
  $("message").classList.toggle("error", Boolean(isError));
}

function authHeaders() {
  const key = $("api-key") ? $("api-key").value.trim() : "";
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: authHeaders() });
  if (!response.ok) throw new Error(`GET /v1/models answered ${response.status}`);
  state.listing = await response.json();
  const select = $("target");
  select.replaceChildren();
  const pools = document.createElement("optgroup");
  pools.label = "Pool (the planner picks the model)";
  for (const [task, pool] of Object.entries(state.listing.tasks)) {
    pools.append(new Option(`${task}: ${pool.models.join(", ")}`, `task:${task}`));
  }
  const models = document.createElement("optgroup");
  models.label = "One model";
  for (const model of state.listing.models) {
    models.append(new Option(`${model.name} (${model.weights} weights)`, `model:${model.name}`));
  }
  select.append(pools, models);
  select.value = `task:${state.listing.default_task}`;
}

function target() {
  const value = $("target").value;
  const colon = value.indexOf(":");
  return { kind: value.slice(0, colon), name: value.slice(colon + 1) };
}

function classCount() {
  const { kind, name } = target();
  const model = state.listing.models.find((m) => (kind === "model" ? m.name === name : m.task === name));
  return model ? model.num_classes : 0;
}

function buildRequest() {
  const { kind, name } = target();
  const params = new URLSearchParams();
  if (kind === "task") params.set("task", name);
  params.set("latency_budget_ms", String(budgetMs()));
  params.set("quality", Number($("quality").value).toFixed(2));
  if (classCount() > MAX_8BIT_CLASSES) params.set("format", "color");
  const path = kind === "model" ? `/v1/models/${encodeURIComponent(name)}/segment` : "/v1/segment";
  return { url: `${path}?${params}`, budgetMs: budgetMs(), quality: Number($("quality").value),
           format: params.get("format") || "png" };
}

async function palette(model) {
  if (!state.palettes.has(model)) {
    const response = await fetch(`/demo/palette/${encodeURIComponent(model)}`, { headers: authHeaders() });
    if (!response.ok) throw new Error(`no palette for ${model} (${response.status})`);
    state.palettes.set(model, await response.json());
  }
  return state.palettes.get(model);
}

async function showImage(file) {
  state.file = file;
  state.bitmap = await createImageBitmap(file);
  const canvas = $("image");
  canvas.width = state.bitmap.width;
  canvas.height = state.bitmap.height;
  canvas.getContext("2d").drawImage(state.bitmap, 0, 0);
  fitStage();
  const mask = $("mask");
  mask.width = canvas.width;
  mask.height = canvas.height;
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  $("stage").hidden = false;
  $("placeholder").hidden = true;
  $("run").disabled = false;
}

// Show the image as large as the column allows, at most 62% of the window's height or 560 px (the receipt stays in
// view) and 3x its size, keeping its shape.
function fitStage() {
  const canvas = $("image");
  if (!canvas.width) return;
  const room = $("stage").parentElement.clientWidth;
  const height = Math.min(0.62 * window.innerHeight, 560);
  const scale = Math.min(room / canvas.width, height / canvas.height, 3);
  canvas.style.width = `${Math.floor(canvas.width * scale)}px`;
  canvas.style.height = `${Math.floor(canvas.height * scale)}px`;
}

// Pixels of a PNG exactly as stored: no colour management, no premultiplication.
async function pixels(blob) {
  const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  return ctx.getImageData(0, 0, bitmap.width, bitmap.height);
}

// Class ids per pixel from the label map (R channel), or from a colour PNG by looking each colour up.
function labelIds(image, format, colours) {
  const n = image.width * image.height;
  const ids = new Int32Array(n);
  const data = image.data;
  if (format === "png") {
    for (let i = 0; i < n; i++) ids[i] = data[4 * i];
    return ids;
  }
  const byColour = new Map();
  colours.forEach((c, id) => { const key = (c[0] << 16) | (c[1] << 8) | c[2]; if (!byColour.has(key)) byColour.set(key, id); });
  for (let i = 0; i < n; i++) {
    const key = (data[4 * i] << 16) | (data[4 * i + 1] << 8) | data[4 * i + 2];
    ids[i] = byColour.has(key) ? byColour.get(key) : -1;
  }
  return ids;
}

function paintMask(ids, width, height, colours) {
  const mask = $("mask");
  mask.width = width;
  mask.height = height;
  const ctx = mask.getContext("2d");
  const out = ctx.createImageData(width, height);
  const counts = new Map();
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    const c = colours[id] || [0, 0, 0];
    out.data[4 * i] = c[0];
    out.data[4 * i + 1] = c[1];
    out.data[4 * i + 2] = c[2];
    out.data[4 * i + 3] = 255;
    counts.set(id, (counts.get(id) || 0) + 1);
  }
  ctx.putImageData(out, 0, 0);
  return counts;
}

function showLegend(counts, info, total) {
  const items = [...counts.entries()].sort((a, b) => b[1] - a[1]);
  const list = $("legend");
  list.replaceChildren();
  for (const [id, count] of items.slice(0, MAX_LEGEND)) {
    const li = document.createElement("li");
    li.dataset.classId = String(id);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    const c = info.palette[id] || [0, 0, 0];
    swatch.style.background = `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
    const name = document.createElement("span");
    name.textContent = info.classes[id] || `class ${id}`;
    const share = document.createElement("span");
    share.className = "share";
    const percent = (100 * count) / total;
    share.textContent = percent < 0.1 ? "<0.1%" : `${percent.toFixed(1)}%`;
    li.append(swatch, name, share);
    list.append(li);
  }
  if (items.length > MAX_LEGEND) {
    const li = document.createElement("li");
    li.textContent = `+${items.length - MAX_LEGEND} more classes`;
    list.append(li);
  }
}

function receiptOf(headers) {
  const h = (name) => headers.get(`x-segserve-${name}`);
  return {
    point: h("point"), model: h("model"), level: h("level"), scale: h("scale"), quality: h("quality"),
    qualitySource: h("quality-source"), plan: h("plan"), cache: h("cache"), queueMs: h("queue-ms"),
    computeMs: h("compute-ms"), totalMs: h("total-ms"), predictedMs: h("predicted-ms"),
    batchSize: h("batch-size"), budgetMet: h("budget-met"),
  };
}

function showReceipt(receipt, request) {
  const ms = (value) => (value == null ? "-" : `${Number(value).toFixed(1)} ms`);
  const rows = [
    ["point chosen", receipt.point], ["model", receipt.model], ["plan", receipt.plan], ["cache", receipt.cache],
    ["queue", ms(receipt.queueMs)], ["compute", ms(receipt.computeMs)], ["total", ms(receipt.totalMs)],
    ["predicted", ms(receipt.predictedMs)], ["budget", `${request.budgetMs} ms`],
    ["budget met", receipt.budgetMet ?? "-"], ["batch size", receipt.batchSize],
    ["point quality", `${receipt.quality} (${receipt.qualitySource})`],
  ];
  const body = $("receipt").tBodies[0];
  body.replaceChildren();
  for (const [key, value] of rows) {
    const tr = body.insertRow();
    tr.dataset.key = key;
    tr.insertCell().textContent = key;
    const cell = tr.insertCell();
    cell.textContent = value ?? "-";
    if (key === "budget met") cell.className = `met-${value}`;
  }
}

function addRun(run) {
  state.runs.push(run);
  const body = $("history").tBodies[0];
  const tr = body.insertRow(0);
  const met = run.receipt ? run.receipt.budgetMet : null;
  const cells = [state.runs.length, `${run.request.budgetMs} ms`, run.request.quality.toFixed(2),
                 run.receipt ? run.receipt.point : run.error, run.receipt ? run.receipt.plan : "-",
                 run.receipt ? run.receipt.cache : "-",
                 run.receipt ? `${Number(run.receipt.totalMs).toFixed(1)} ms` : "-", met ?? "-"];
  for (const value of cells) tr.insertCell().textContent = String(value);
  tr.cells[cells.length - 1].className = `met-${met}`;
  while (body.rows.length > MAX_RUNS_SHOWN) body.deleteRow(-1);
  document.body.dataset.runs = String(state.runs.length);
}

async function run() {
  if (!state.file) return;
  if (state.busy) { state.again = true; return; } // one request at a time; the latest settings run next
  state.busy = true;
  const request = buildRequest();
  state.lastRequest = request;
  $("request").textContent = `POST ${request.url}`;
  setState("running", "Segmenting…");
  try {
    const response = await fetch(request.url, {
      method: "POST", body: state.file,
      headers: { "Content-Type": state.file.type || "application/octet-stream", ...authHeaders() },
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      const message = body.error ? (body.error.message || body.error) : `HTTP ${response.status}`;
      throw new Error(`${response.status}: ${message}`);
    }
    const receipt = receiptOf(response.headers);
    const info = await palette(receipt.model);
    const image = await pixels(await response.blob());
    const ids = labelIds(image, request.format, info.palette);
    const counts = paintMask(ids, image.width, image.height, info.palette);
    showLegend(counts, info, ids.length);
    showReceipt(receipt, request);
    state.lastReceipt = receipt;
    addRun({ request, receipt });
    const notes = [];
    if (receipt.cache === "hit") {
      notes.push("Served from the result cache: the best mask computed so far for this image, at no cost.");
    }
    if (image.width !== state.bitmap.width || image.height !== state.bitmap.height) {
      notes.push(`The mask is ${image.width}×${image.height}, the image is shown ${state.bitmap.width}×` +
                 `${state.bitmap.height}: the mask is stretched over it.`);
    }
    setState("done", notes.join(" "));
  } catch (error) {
    addRun({ request, receipt: null, error: String(error.message || error) });
    setState("error", String(error.message || error), true);
  } finally {
    state.busy = false;
    if (state.again) { state.again = false; run(); }
  }
}

function updateLabels() {
  $("budget-value").textContent = `${budgetMs()} ms`;
  $("quality-value").textContent = Number($("quality").value).toFixed(2);
  $("opacity-value").textContent = Number($("opacity").value).toFixed(2);
  $("mask").style.opacity = $("opacity").value;
}

async function chooseFile(file) {
  if (!file) return;
  try {
    await showImage(file);
  } catch (error) {
    setState("error", `This file cannot be shown as an image: ${error.message || error}`, true);
    return;
  }
  run();
}

function wire() {
  for (const id of ["budget", "quality", "opacity"]) $(id).addEventListener("input", updateLabels);
  // A released slider or a new target sends the request again, so the effect of a budget is seen at once.
  for (const id of ["budget", "quality", "target"]) $(id).addEventListener("change", run);
  $("run").addEventListener("click", run);
  $("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  const zone = $("dropzone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", () => zone.classList.remove("over")); // the document's handler takes the file
  // A file dropped anywhere on the page is taken, not opened by the browser in place of the page.
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => { event.preventDefault(); chooseFile(event.dataTransfer.files[0]); });
  window.addEventListener("resize", fitStage);
  updateLabels();
}

function start() {
  loadModels().then(() => setState("ready", "Choose or drop an image."),
                    (error) => setState("error", `Cannot list the models: ${error.message}`, true));
}

wire();
$("api-key").addEventListener("change", start); // a server with API keys lists its models once given one
start();
