// The imgsearch page: no build step, only the REST endpoints of the same service. Text from the service (labels,
// paths, errors) is always set as textContent, never as HTML.
const $ = (selector) => document.querySelector(selector);
const state = { supportsText: false, query: null, page: 1 };

function headers() {
  const key = $("#api-key").value || localStorage.getItem("imgsearch-api-key") || "";
  if ($("#api-key").value) localStorage.setItem("imgsearch-api-key", $("#api-key").value);
  return key ? { "X-API-Key": key } : {};
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function setStatus(text, isError = false) {
  $("#status").textContent = text;
  $("#status").classList.toggle("error", isError);
}

function clearResults() {
  $("#grid").replaceChildren();
  $("#groups").replaceChildren();
  $("#recognition").hidden = true;
  $("#more").hidden = true;
}

function showError(error) {
  clearResults();  // an error replaces the results: nothing stale stays on screen
  setStatus(error.message, true);
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

function card(hit, extra = {}) {
  const figure = document.createElement("figure");
  figure.className = "card";
  figure.dataset.testid = extra.testid || "result";
  figure.dataset.id = hit.id;
  const img = document.createElement("img");
  img.alt = hit.label || "unlabeled";
  thumbnailUrl(hit.id).then((url) => { img.src = url; });
  const caption = document.createElement("figcaption");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score === undefined ? "representative" : `${hit.grade ? hit.grade + " " : ""}${hit.score.toFixed(3)}`;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = hit.label || "–";
  const path = document.createElement("div");
  path.className = "path";
  path.textContent = hit.path;
  caption.append(score, " · ", label, path);
  figure.title = `${hit.path}\n${JSON.stringify(hit.metadata || {}, null, 1)}`;  // metadata on hover
  figure.append(img, caption);
  return figure;
}

function showResults(results) {
  $("#grid").replaceChildren(...results.map((hit) => card(hit)));
}

function showQuery(file) {
  $("#query").hidden = false;
  $("#query-image").src = URL.createObjectURL(file);
  $("#query-name").textContent = file.name;
}

function perPage() {
  return Math.max(1, Number($("#k").value) || 12);
}

async function run() {
  const { query } = state;
  if (!query) return;
  const k = perPage() * state.page;
  try {
    if (query.kind === "text") {
      const body = await call("/search/text", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: query.text, k }),
      });
      finishSearch(body.results, k, `images for “${query.text}”`);
    } else if (mode() === "recognize") {
      const form = new FormData();
      form.append("image", query.file);
      form.append("k", String(Math.min(k, 1024)));
      const [item] = await call("/recognize", { method: "POST", body: form });
      clearResults();
      const box = $("#recognition");
      box.hidden = false;
      const answer = document.createElement(item.label === null ? "span" : "strong");
      answer.dataset.testid = "label";
      answer.className = item.label === null ? "unknown" : "";
      answer.textContent = item.label === null ? "unknown" : item.label;
      box.replaceChildren(answer, ` (confidence ${item.confidence.toFixed(3)})`);
      if (item.label === null) box.append(enrolForm(query.file));
      showResults(item.neighbours.slice(0, k));
      setStatus(`recognised ${query.file.name}; its nearest labeled neighbours:`);
    } else {
      const form = new FormData();
      form.append("image", query.file);
      form.append("k", String(k));
      form.append("label", $("#label").value.trim());
      const body = await call("/search", { method: "POST", body: form });
      finishSearch(body.results, k, `similar images to ${query.file.name}`);
    }
  } catch (error) {
    showError(error);
  }
}

function finishSearch(results, k, what) {
  clearResults();
  showResults(results);
  $("#more").hidden = results.length < k;  // a full page: there may be more
  setStatus(`${results.length} ${what}`);
}

function searchImage(file) {
  if (mode() === "duplicates") {
    document.querySelector("input[value=search]").checked = true;
    switchMode();
  }
  state.query = { kind: "image", file };
  state.page = 1;
  showQuery(file);
  setStatus(`${mode() === "search" ? "searching" : "recognising"} ${file.name}…`);
  run();
}

function searchText(event) {
  event.preventDefault();
  const text = $("#text").value.trim();
  if (!text) return;
  state.query = { kind: "text", text };
  state.page = 1;
  $("#query").hidden = true;
  run();
}

function enrolForm(file) {
  // An "unknown" answer can be named on the spot: the query becomes a reference of that label at once.
  const form = document.createElement("form");
  form.dataset.testid = "enrol";
  const input = document.createElement("input");
  input.type = "text";
  input.placeholder = "what is it? a label";
  input.maxLength = 512;
  const button = document.createElement("button");
  button.type = "submit";
  button.textContent = "Enrol";
  form.append(" ", input, " ", button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const label = input.value.trim();
    if (!label) return;
    const body = new FormData();
    body.append("label", label);
    body.append("image", file);
    try {
      const answer = await call("/enroll", { method: "POST", body });
      form.replaceChildren();
      const warnings = (answer.check && answer.check.warnings) || [];
      setStatus(`enrolled ${file.name} as ${label}${warnings.length ? "; " + warnings.join("; ") : ""}`);
    } catch (error) {
      setStatus(error.message, true);
    }
  });
  return form;
}

async function findDuplicates(event) {
  event.preventDefault();
  clearResults();
  setStatus("finding duplicates…");
  try {
    const body = await call(`/duplicates?similar=${$("#similar").checked}`);
    const show = (groups, kind) => {
      for (const group of groups) {
        const section = document.createElement("section");
        section.className = `group ${kind}`;
        section.dataset.testid = kind;
        const grid = document.createElement("div");
        grid.className = "grid";
        const representative = card(group.representative, { testid: "representative" });
        representative.classList.add("representative");
        grid.append(representative, ...group.members.map((member) => memberCard(member)));
        section.append(grid);
        $("#groups").append(section);
      }
    };
    show(body.groups, "group");
    if (body.similar && body.similar.length) {
      const heading = document.createElement("h2");
      heading.textContent = "Look-alikes: not verified as copies (different pictures, maybe of one product)";
      $("#groups").append(heading);
      show(body.similar, "lookalike");
    }
    setStatus(`${body.total} groups among ${body.rows} images${body.total > body.groups.length ? ` (the first ${body.groups.length} shown)` : ""}`);
  } catch (error) {
    showError(error);
  }
}

function memberCard(member) {
  const figure = card(member, { testid: "member" });
  if (member.evidence) {  // what the pixel check found, e.g. "mirrored, resized to 50%"
    const evidence = document.createElement("div");
    evidence.className = "evidence";
    evidence.textContent = member.evidence;
    figure.append(evidence);
  }
  if (member.copy_of) {  // a file with a stored row's bytes: deleting "it" would delete that row
    const note = document.createElement("div");
    note.className = "copy-of";
    note.textContent = `same file as ${member.copy_of}`;
    figure.append(note);
    return figure;
  }
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Delete";
  button.addEventListener("click", async () => {
    if (!window.confirm(`Delete ${member.path} from the collection?`)) return;
    try {
      const body = await call(`/images/${member.id}`, { method: "DELETE" });
      figure.remove();
      setStatus(`deleted ${member.path}${body.file_removed ? " and its uploaded file" : ""}`);
    } catch (error) {
      setStatus(error.message, true);
    }
  });
  figure.append(button);
  return figure;
}

function switchMode() {
  const duplicates = mode() === "duplicates";
  $("#duplicates-form").hidden = !duplicates;
  $("#drop").hidden = duplicates;
  $("#query").hidden = duplicates || !state.query || state.query.kind !== "image";
  clearResults();
  setStatus("");
  if (!duplicates && state.query) run();
}

async function loadInfo() {
  try {
    const info = await call("/info");
    state.supportsText = info.supports_text;
    $("#text-form").hidden = !info.supports_text;
    const embedding = info.weights ? ` (${info.weights})` : "";  // an adapted embedding: imgsearch adapt
    $("#info").textContent = `${info.count} images · ${info.model}${embedding} · ${info.collection}`;
  } catch (error) {
    $("#info").textContent = error.message;
    if (error.message.startsWith("401")) $("#key-box").open = true;  // ask for the key where it is typed
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
$("#duplicates-form").addEventListener("submit", findDuplicates);
$("#more").addEventListener("click", () => { state.page += 1; run(); });
$("#label").addEventListener("change", () => { state.page = 1; run(); });
for (const radio of document.querySelectorAll("input[name=mode]")) radio.addEventListener("change", switchMode);
$("#api-key").addEventListener("change", loadInfo);
loadInfo();
