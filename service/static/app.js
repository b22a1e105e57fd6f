// The demo page: pick or drop an image -> its attention overlay and nearest gallery images.
// Plain JavaScript, no build step and no third-party code. Every request carries the API key typed
// in the page (kept in sessionStorage only), so images are fetched as blobs rather than by <img src>.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = sessionStorage.getItem("dino-api-key") || "";
keyInput.addEventListener("change", () => { sessionStorage.setItem("dino-api-key", keyInput.value); loadInfo(); });
const objectUrls = [];

function authHeaders() {
  return keyInput.value ? { Authorization: "Bearer " + keyInput.value } : {};
}

async function call(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return response;
}

async function blobUrl(url, options) {
  const url_ = URL.createObjectURL(await (await call(url, options)).blob());
  objectUrls.push(url_);
  return url_;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function attentionQuery() {
  const params = new URLSearchParams({ head: $("head").value, format: "png" });
  const threshold = parseFloat($("threshold").value);
  if (threshold > 0 && threshold <= 1) params.set("threshold", String(threshold));
  return params.toString();
}

function kValue() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) && k > 0 ? k : 12;
}

async function loadInfo() {
  try {
    const index = await (await call("/index")).json();
    $("gallery-info").textContent =
      `model ${index.model} - gallery: ${index.size} images (${index.index_type}, dim ${index.dim}` +
      `${index.persistent ? "" : ", in memory"})`;
  } catch (error) {
    $("gallery-info").textContent = "cannot read the gallery: " + error.message;
  }
}

function fillHeads(heads) {
  const select = $("head");
  if (select.options.length === heads + 1) return;
  const current = select.value;
  select.innerHTML = '<option value="mean">mean</option>';
  for (let h = 0; h < heads; h++) select.add(new Option(String(h), String(h)));
  select.value = current;
}

let lastQuery = null; // {file} or {id}

async function showNeighbors(list) {
  const ol = $("neighbors");
  ol.innerHTML = "";
  $("neighbors-title").hidden = list.length === 0;
  for (const n of list) {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.alt = n.label || n.id;
    img.title = "show this gallery image's attention and neighbours";
    img.addEventListener("click", () => analyse({ id: n.id }));
    const caption = document.createElement("div");
    caption.className = "caption";
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = n.label || n.id.slice(0, 8);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = n.score.toFixed(3);
    caption.append(label, score);
    li.append(img, caption);
    ol.append(li);
    blobUrl(`/index/${n.id}/image`).then((u) => { img.src = u; }).catch(() => { img.alt = "(image unavailable)"; });
  }
}

async function analyse(query) {
  lastQuery = query;
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
  $("result").hidden = false;
  setStatus("computing...");
  try {
    let overlayUrl, neighbors, queryUrl, heads;
    if (query.file) {
      const form = () => { const f = new FormData(); f.append("images", query.file); return f; };
      queryUrl = URL.createObjectURL(query.file);
      objectUrls.push(queryUrl);
      const meta = (await call("/attention?format=json", { method: "POST", body: form() })).json();
      [overlayUrl, neighbors, heads] = await Promise.all([
        blobUrl("/attention?" + attentionQuery(), { method: "POST", body: form() }),
        call(`/neighbors?k=${kValue()}`, { method: "POST", body: form() }).then((r) => r.json()),
        meta.then((m) => m.heads),
      ]);
    } else {
      queryUrl = await blobUrl(`/index/${query.id}/image`);
      [overlayUrl, neighbors, heads] = await Promise.all([
        blobUrl(`/attention/${query.id}?` + attentionQuery()),
        call(`/neighbors/${query.id}?k=${kValue()}`).then((r) => r.json()),
        call(`/attention/${query.id}?format=json`).then((r) => r.json()).then((m) => m.heads),
      ]);
    }
    fillHeads(heads);
    $("query").src = queryUrl;
    $("overlay").src = overlayUrl;
    await showNeighbors(neighbors.neighbors);
    setStatus(neighbors.neighbors.length ? "" : "the gallery is empty: add images with POST /index or 'dino index build'");
  } catch (error) {
    setStatus(error.message, true);
  }
}

const drop = $("drop");
drop.addEventListener("click", (event) => { if (event.target.tagName !== "INPUT") $("file").click(); });
drop.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") $("file").click(); });
$("file").addEventListener("change", (event) => { if (event.target.files[0]) analyse({ file: event.target.files[0] }); });
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) analyse({ file });
});
for (const id of ["head", "threshold", "k"]) {
  $(id).addEventListener("change", () => { if (lastQuery) analyse(lastQuery); });
}
loadInfo();
