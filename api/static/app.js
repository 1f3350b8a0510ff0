// The imgsearch page: no build step, only the REST endpoints of the same service.
const $ = (selector) => document.querySelector(selector);
const state = { supportsText: false };

function headers() {
  const key = $("#api-key").value || localStorage.getItem("imgsearch-api-key") || "";
  if ($("#api-key").value) localStorage.setItem("imgsearch-api-key", $("#api-key").value);
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text, isError = false) {
  $("#status").textContent = text;
  $("#status").classList.toggle("error", isError);
}

async function call(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || response.statusText);
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

async function thumbnailUrl(id) {
  const response = await fetch(`/images/${id}?size=160`, { headers: headers() });
  return response.ok ? URL.createObjectURL(await response.blob()) : "";
}

async function showResults(results) {
  const grid = $("#grid");
  grid.replaceChildren();
  for (const hit of results) {
    const card = document.createElement("figure");
    card.className = "card";
    card.dataset.testid = "result";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.alt = hit.label || "unlabeled";
    thumbnailUrl(hit.id).then((url) => { img.src = url; });
    const caption = document.createElement("figcaption");
    caption.innerHTML = `<span class="score">${hit.score.toFixed(3)}</span> · <span class="label"></span>`;
    caption.querySelector(".label").textContent = hit.label || "–";
    card.append(img, caption);
    grid.append(card);
  }
}

async function searchImage(file) {
  const mode = document.querySelector("input[name=mode]:checked").value;
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("#k").value || "12");
  setStatus(`${mode === "search" ? "searching" : "recognising"} ${file.name}…`);
  try {
    if (mode === "search") {
      $("#recognition").hidden = true;
      const body = await call("/search", { method: "POST", body: form });
      await showResults(body.results);
      setStatus(`${body.results.length} similar images to ${file.name}`);
    } else {
      const [item] = await call("/recognize", { method: "POST", body: form });
      const box = $("#recognition");
      box.hidden = false;
      box.innerHTML = item.label === null
        ? `<span class="unknown" data-testid="label">unknown</span> (confidence ${item.confidence.toFixed(3)})`
        : `<strong data-testid="label"></strong> (confidence ${item.confidence.toFixed(3)})`;
      if (item.label !== null) box.querySelector("strong").textContent = item.label;
      await showResults(item.neighbours.slice(0, Number($("#k").value) || 12));
      setStatus(`recognised ${file.name}; its nearest labeled neighbours:`);
    }
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function searchText(event) {
  event.preventDefault();
  const text = $("#text").value.trim();
  if (!text) return;
  try {
    const body = await call("/search/text", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text, k: Number($("#k").value) || 12 }),
    });
    $("#recognition").hidden = true;
    await showResults(body.results);
    setStatus(`${body.results.length} images for “${text}”`);
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function loadInfo() {
  try {
    const info = await call("/info");
    state.supportsText = info.supports_text;
    $("#text-form").hidden = !info.supports_text;
    $("#info").textContent = `${info.count} images · ${info.model} · ${info.collection}`;
  } catch (error) {
    $("#info").textContent = error.message;
  }
}

const drop = $("#drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) searchImage(event.dataTransfer.files[0]);
});
$("#file").addEventListener("change", (event) => { if (event.target.files.length) searchImage(event.target.files[0]); });
$("#text-form").addEventListener("submit", searchText);
$("#api-key").addEventListener("change", loadInfo);
loadInfo();
