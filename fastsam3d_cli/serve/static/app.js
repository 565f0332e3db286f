// fastsam3d serve: the browser page. NiiVue shows the volume and the labelmap overlay; every click goes to
// the server (/api/sessions/...), and the overlay is updated from the server's labelmap after each answer:
// only the box the answer says may have changed (labelmap.raw), or the whole map when the overlay cannot take
// the box, so what is shown is exactly what "Save labelmap" writes. A token, if the server has one, is read from the
// page address: http://host:port/#token=SECRET
"use strict";

const token = new URLSearchParams(location.hash.slice(1)).get("token");
const authHeaders = token ? { Authorization: `Bearer ${token}` } : {};
const state = { sid: null, name: null, objects: [], selected: null, hidden: new Set(), clicks: 0, busy: false,
                last: null, overlay: null, error: null };
window.fastsam3d = state; // read by the browser test

const nv = new niivue.Niivue({ dragAndDropEnabled: false, backColor: [0.07, 0.07, 0.07, 1], show3Dcrosshair: true,
                               crosshairColor: [0.2, 0.8, 1.0, 0.8],
                               multiplanarShowRender: niivue.SHOW_RENDER.ALWAYS, isResizeCanvas: true });
const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  if (isError && text.startsWith("missing or wrong token")) {
    text = `This server needs its token: open ${location.origin}/#token=YOUR_TOKEN (${text})`;
  }
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
  state.error = isError ? text : null;
}

async function api(method, path, body, extra = {}) {
  const options = { method, headers: { ...authHeaders, ...(extra.headers || {}) } };
  if (body !== undefined && !(body instanceof Blob) && !(body instanceof ArrayBuffer)) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  } else if (body !== undefined) {
    options.body = body;
  }
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = `${response.status}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return extra.raw ? response : response.json();
}

// ------------------------------------------------------------------------------------------ volumes
async function refreshLists() {
  const info = await api("GET", "/api/info");
  $("model").textContent = `${info.model} · ${info.device} · ${info.checkpoint}`;
  const files = await api("GET", "/api/files");
  $("files").innerHTML = files.files.map((f) => `<option>${escapeHtml(f)}</option>`).join("")
    || "<option disabled>(no --root)</option>";
  const sessions = await api("GET", "/api/sessions");
  $("sessions").innerHTML = "<option value=''>open sessions…</option>" + sessions.sessions.map(
    (s) => `<option value="${s.id}">${escapeHtml(s.name)} (${s.id.slice(0, 6)})</option>`).join("");
}

async function showSession(described) {
  state.sid = described.id;
  state.name = described.name;
  state.objects = described.objects;
  state.clicks = 0;
  state.hidden.clear();
  const fileName = described.viewer_file || described.name.split("/").pop(); // a DICOM series: a NIfTI of it
  await nv.loadVolumes([{ url: `/api/sessions/${state.sid}/volume/${encodeURIComponent(fileName)}`,
                          name: fileName, headers: authHeaders }]);
  state.overlay = null;
  if (!state.objects.length) await addObject();
  else state.selected = state.objects[0].name;
  renderObjects();
  await reloadOverlay();
  setStatus(`${described.name}: ${described.size.join("×")} voxels`);
  refreshLists();
}

async function openPath(path) {
  setStatus(`opening ${path}…`);
  try { await showSession(await api("POST", "/api/sessions", { path })); } catch (e) { setStatus(e.message, true); }
}

async function openUpload(file) {
  setStatus(`uploading ${file.name}…`);
  try {
    const described = await api("POST", `/api/sessions?filename=${encodeURIComponent(file.name)}`, file,
                                 { headers: { "Content-Type": "application/octet-stream" } });
    await showSession(described);
  } catch (e) { setStatus(e.message, true); }
}

// ------------------------------------------------------------------------------------------ objects
async function addObject() {
  const used = new Set(state.objects.map((o) => o.name));
  let n = state.objects.length + 1;
  while (used.has(`object ${n}`)) n += 1;
  const created = await api("POST", `/api/sessions/${state.sid}/objects`, { name: `object ${n}` });
  state.objects.push(created);
  state.selected = created.name;
  renderObjects();
}

function renderObjects() {
  $("objects").innerHTML = "";
  for (const o of state.objects) {
    const li = document.createElement("li");
    li.className = o.name === state.selected ? "selected" : "";
    li.innerHTML = `<input type="checkbox" ${state.hidden.has(o.name) ? "" : "checked"} title="visible">
      <span class="swatch" style="background:${o.colour}"></span><span class="name">${escapeHtml(o.name)}</span>
      <span class="count">${o.clicks} · ${o.label}</span><button title="delete">×</button>`;
    li.addEventListener("click", (e) => {
      if (e.target.tagName === "INPUT" || e.target.tagName === "BUTTON") return;
      state.selected = o.name;
      renderObjects();
    });
    li.querySelector("input").addEventListener("change", (e) => {
      if (e.target.checked) state.hidden.delete(o.name); else state.hidden.add(o.name);
      applyColours();
    });
    li.querySelector("button").addEventListener("click", async () => {
      await run(async () => {
        await api("DELETE", objectPath(o.name));
        state.objects = state.objects.filter((x) => x.name !== o.name);
        if (state.selected === o.name) state.selected = state.objects.length ? state.objects[0].name : null;
        renderObjects();
        await reloadOverlay();
      });
    });
    $("objects").appendChild(li);
  }
}

const objectPath = (name) => `/api/sessions/${state.sid}/objects/${encodeURIComponent(name)}`;

function updateObject(result) {
  const o = state.objects.find((x) => x.name === result.name);
  if (o) Object.assign(o, { clicks: result.clicks, redo: result.redo });
  renderObjects();
}

// ------------------------------------------------------------------------------------------ overlay
function hexToRgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

function applyColours() {
  if (!state.overlay) return;
  const cm = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: [""] };
  for (const o of state.objects) {
    const [r, g, b] = hexToRgb(o.colour);
    cm.R.push(r); cm.G.push(g); cm.B.push(b); cm.I.push(o.label); cm.labels.push(o.name);
    cm.A.push(state.hidden.has(o.name) ? 0 : 255);
  }
  state.overlay.setColormapLabel(cm);
  state.overlay.opacity = parseFloat($("opacity").value);
  nv.updateGLVolume();
}

async function reloadOverlay() {
  if (state.overlay) { nv.removeVolume(state.overlay); state.overlay = null; }
  const overlay = await nv.addVolumeFromUrl({ url: `/api/sessions/${state.sid}/labelmap.nii`, name: "labelmap.nii",
                                              headers: authHeaders, opacity: parseFloat($("opacity").value) });
  state.overlay = overlay;
  applyColours();
  countOverlay();
}

// Patch the overlay with the labelmap's voxels in the box a click, undo or redo may have changed.
async function patchOverlay(changed) {
  if (!changed) return; // the object's mask was empty before and after: nothing to draw
  if (!state.overlay) { await reloadOverlay(); return; }
  const query = `start=${changed.start.join(",")}&shape=${changed.shape.join(",")}`;
  const response = await api("GET", `/api/sessions/${state.sid}/labelmap.raw?${query}`, undefined, { raw: true });
  const wide = response.headers.get("X-Labelmap-Dtype") === "uint16";
  const buffer = await response.arrayBuffer();
  const values = wide ? new Uint16Array(buffer) : new Uint8Array(buffer);
  const img = state.overlay.img;
  if (img.BYTES_PER_ELEMENT !== values.BYTES_PER_ELEMENT) { await reloadOverlay(); return; } // e.g. a label > 255 now
  const nx = state.overlay.hdr.dims[1], ny = state.overlay.hdr.dims[2];
  const [i0, j0, k0] = changed.start;
  const [ni, nj, nk] = changed.shape;
  let from = 0;
  for (let k = 0; k < nk; k++) {
    for (let j = 0; j < nj; j++) {
      img.set(values.subarray(from, from + ni), i0 + nx * (j0 + j + ny * (k0 + k)));
      from += ni;
    }
  }
  nv.updateGLVolume();
  countOverlay();
}

function countOverlay() {
  let voxels = 0;
  for (const v of state.overlay.img) if (v) voxels += 1;
  state.overlayVoxels = voxels;
}

// ------------------------------------------------------------------------------------------ clicks
async function run(task) {
  if (state.busy) return;
  state.busy = true;
  try { await task(); } catch (e) { setStatus(e.message, true); } finally { state.busy = false; }
}

function report(result) {
  state.last = result;
  updateObject(result);
  const t = result.timing;
  setStatus(`${result.name}: ${result.clicks} click(s), ${result.voxels} voxels (${result.volume_ml} mL)\n` +
            `${t.action} ${t.ms.toFixed(0)} ms · encode ${t.encode.toFixed(0)} · decode ${t.decode.toFixed(0)}`);
}

async function sendClick(mm, include) {
  if (!state.sid || !state.selected) return;
  await run(async () => {
    const result = await api("POST", `${objectPath(state.selected)}/clicks`,
                             { point: [mm[0], mm[1], mm[2]], include, space: "ras" });
    await patchOverlay(result.changed);
    state.clicks += 1;
    report(result);
  });
}

async function objectAction(action) {
  if (!state.sid || !state.selected) return;
  await run(async () => {
    const result = await api("POST", `${objectPath(state.selected)}/${action}`);
    if (action === "reset") await reloadOverlay(); else await patchOverlay(result.changed);
    if (action === "reset") { updateObject({ ...result }); setStatus(`${result.name}: reset`); } else report(result);
  });
}

let down = null;
const canvas = $("gl");
canvas.addEventListener("pointerdown", (e) => { down = { x: e.clientX, y: e.clientY, button: e.button }; });
canvas.addEventListener("contextmenu", (e) => e.preventDefault());
canvas.addEventListener("pointerup", (e) => {
  if (!down || Math.hypot(e.clientX - down.x, e.clientY - down.y) > 4) { down = null; return; } // a drag
  const button = down.button;
  down = null;
  if (button !== 0 && button !== 2) return;
  const rect = canvas.getBoundingClientRect();
  const dpr = nv.uiData.dpr || 1;
  const frac = nv.canvasPos2frac([(e.clientX - rect.left) * dpr, (e.clientY - rect.top) * dpr]);
  if (!frac || frac[0] < 0) return; // not on a 2D slice
  const include = button === 0 && !e.shiftKey && !$("exclude").checked;
  sendClick(nv.frac2mm(frac), include);
});

// ------------------------------------------------------------------------------------------ saving
async function download(path, name) {
  const response = await api("GET", path, undefined, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url; a.download = name; document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function stem(name) {
  return name.split("/").pop().replace(/\.(nii\.gz|nii|nrrd|nhdr|mha|mhd)$/i, "");
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// ------------------------------------------------------------------------------------------ wiring
$("open").addEventListener("click", () => { if ($("files").value) openPath($("files").value); });
$("sessions").addEventListener("change", async () => {
  const sid = $("sessions").value;
  if (sid) { try { await showSession(await api("GET", `/api/sessions/${sid}`)); } catch (e) { setStatus(e.message, true); } }
});
$("add").addEventListener("click", () => run(addObject));
$("load-mask").addEventListener("click", () => state.sid && state.selected && $("mask-file").click());
$("mask-file").addEventListener("change", async () => {
  const file = $("mask-file").files[0];
  $("mask-file").value = "";
  if (!file || !state.sid || !state.selected) return;
  await run(async () => {
    const result = await api("PUT", `${objectPath(state.selected)}/mask?filename=${encodeURIComponent(file.name)}`,
                             file, { headers: { "Content-Type": "application/octet-stream" } });
    await reloadOverlay(); // the object's clicks were replaced: the whole map may differ
    report(result);
  });
});
$("undo").addEventListener("click", () => objectAction("undo"));
$("redo").addEventListener("click", () => objectAction("redo"));
$("reset").addEventListener("click", () => objectAction("reset"));
$("opacity").addEventListener("input", () => applyColours());
$("save-labelmap").addEventListener("click", () => state.sid && download(`/api/sessions/${state.sid}/labelmap.nii.gz`, `${stem(state.name)}_mask.nii.gz`));
$("save-clicks").addEventListener("click", () => state.sid && download(`/api/sessions/${state.sid}/clicks.json`, `${stem(state.name)}_clicks.json`));
document.querySelectorAll("[data-view]").forEach((b) => b.addEventListener("click", () => {
  const types = { multi: nv.sliceTypeMultiplanar, axial: nv.sliceTypeAxial, coronal: nv.sliceTypeCoronal,
                  sagittal: nv.sliceTypeSagittal, render: nv.sliceTypeRender };
  nv.setSliceType(types[b.dataset.view]);
}));
document.addEventListener("keydown", (e) => {
  if ((e.ctrlKey || e.metaKey) && e.key === "z") { e.preventDefault(); objectAction(e.shiftKey ? "redo" : "undo"); }
});
const viewer = $("viewer");
document.addEventListener("dragover", (e) => { e.preventDefault(); viewer.classList.add("dragging"); });
document.addEventListener("dragleave", () => viewer.classList.remove("dragging"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  viewer.classList.remove("dragging");
  const file = e.dataTransfer.files[0];
  if (file) openUpload(file);
});

(async () => {
  await nv.attachToCanvas(canvas);
  nv.setSliceType(nv.sliceTypeMultiplanar);
  try {
    await refreshLists();
    const wanted = new URLSearchParams(location.search).get("session");
    if (wanted) await showSession(await api("GET", `/api/sessions/${wanted}`));
    state.ready = true;
  } catch (e) { setStatus(e.message, true); state.ready = true; }
})();
