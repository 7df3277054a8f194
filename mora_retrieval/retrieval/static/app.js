// The search page of `mora-ret serve`: no framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
// The query image: a file chosen or dropped by the user, or a row of the index (a clicked hit).
const query = { file: null, row: null };
let categoryNames = {};
let searches = 0;

function setStatus(text) { $("status").textContent = text; }

function showError(text) {
  $("error").textContent = text ? "error: " + text : "";
  $("error").hidden = !text;
}

function setQueryImage(file, row, src) {
  query.file = file;
  query.row = row;
  const preview = $("query-preview");
  if (preview.dataset.objectUrl) URL.revokeObjectURL(preview.dataset.objectUrl);
  delete preview.dataset.objectUrl;
  if (file) {
    preview.dataset.objectUrl = URL.createObjectURL(file);
    preview.src = preview.dataset.objectUrl;
  } else if (src) {
    preview.src = src;
  } else {
    preview.removeAttribute("src");
  }
  const has = Boolean(file || row !== null);
  preview.hidden = !has;
  $("clear-image").hidden = !has;
  $("drop-hint").hidden = has;
}

function describeCategories(ids) {
  return ids.map((id) => categoryNames[String(id)] || String(id)).join(", ");
}

function renderHits(payload) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of payload.results) {
    const fig = document.createElement("figure");
    fig.className = "hit";
    fig.dataset.row = hit.row;
    fig.dataset.rank = hit.rank;
    fig.dataset.score = hit.score;
    fig.title = hit.path + "\nclick: use as the query image";
    const img = document.createElement("img");
    img.src = "images/" + hit.row;
    img.alt = "result " + hit.rank;
    img.loading = "lazy";
    const cap = document.createElement("figcaption");
    const head = document.createElement("div");
    head.innerHTML = "#" + hit.rank + " · <span class='score'></span>";
    head.querySelector(".score").textContent = hit.score.toFixed(4);
    cap.appendChild(head);
    const meta = [];
    if (hit.image_id !== null && hit.image_id !== undefined) meta.push("id " + hit.image_id);
    if (hit.categories && hit.categories.length) meta.push(describeCategories(hit.categories));
    if (meta.length) {
      const line = document.createElement("div");
      line.textContent = meta.join(" · ");
      cap.appendChild(line);
    }
    const path = document.createElement("div");
    path.className = "path";
    path.textContent = hit.path.split(/[\\/]/).pop();
    cap.appendChild(path);
    fig.append(img, cap);
    fig.addEventListener("click", () => {
      setQueryImage(null, hit.row, "images/" + hit.row);
      runSearch();
    });
    grid.appendChild(fig);
  }
}

function renderQuery(payload, truncatedAt) {
  const parts = [];
  if (payload.image !== null) parts.push("image " + payload.image.split(/[\\/]/).pop());
  if (payload.text !== null) parts.push("text \u201c" + payload.text + "\u201d");
  let line = payload.mode + " query: " + parts.join(" + ");
  if (payload.mode === "composed") line += " (combined by " + payload.composed_with + ")";
  if (truncatedAt) line += " \u2014 the text was cut to the model's " + truncatedAt + " tokens";
  $("query-text").textContent = line;
  $("query-summary").hidden = false;
}

async function runSearch() {
  const text = $("text-input").value;
  const form = new FormData();
  if (query.file) form.append("image", query.file, query.file.name);
  else if (query.row !== null) form.append("row", String(query.row));
  if (text.trim()) form.append("text", text);
  form.append("k", $("k-input").value);
  const id = ++searches;
  const grid = $("results");
  grid.dataset.state = "searching";
  showError("");
  setStatus("searching…");
  const started = performance.now();
  try {
    const response = await fetch("api/search", { method: "POST", body: form });
    const payload = await response.json();
    if (id !== searches) return;  // a newer search was started meanwhile
    if (!response.ok) throw new Error(payload.error || response.statusText);
    renderQuery(payload, response.headers.get("X-Mora-Text-Truncated"));
    renderHits(payload);
    setStatus(payload.results.length + " results in " + Math.round(performance.now() - started) + " ms");
    grid.dataset.state = "done";
    grid.dataset.search = String(id);
  } catch (err) {
    if (id !== searches) return;
    showError(err.message);
    setStatus("");
    grid.dataset.state = "error";
  }
}

function takeFile(file) {
  if (!file) return;
  setQueryImage(file, null, null);
}

function setup() {
  const drop = $("drop");
  $("image-input").addEventListener("change", (e) => takeFile(e.target.files[0]));
  $("clear-image").addEventListener("click", () => { $("image-input").value = ""; setQueryImage(null, null, null); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    takeFile(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter") $("image-input").click(); });
  $("query-form").addEventListener("submit", (e) => { e.preventDefault(); runSearch(); });
  fetch("api/info").then((r) => r.json()).then((info) => {
    categoryNames = info.categories || {};
    $("info").textContent = info.index + ": " + info.count + " images · model " + info.model + " · " +
      info.index_type + " index, dim " + info.dim + " · composed queries: " + info.composed_with;
  }).catch((err) => { $("info").textContent = "could not read /api/info: " + err.message; });
}

setup();
