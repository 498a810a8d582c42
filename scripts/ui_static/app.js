// mmekit editor: open an image, click the object, erase or replace it.
// Every edit goes through the local server (scripts/ui.py), which holds the target's
// credentials; this page only sends images, clicks and masks.
"use strict";

const $ = (id) => document.getElementById(id);

const MASK_TINT = [37, 99, 235, 130]; // RGBA of the selected region over the photo
const CLEAR = [0, 0, 0, 0];

const state = {
  image: null, // {name, dataUrl, b64, width, height, id}: what is being edited
  points: [], // [{x, y, label}] in image pixels; label 1 object, 0 background
  mask: null, // base64 PNG from /api/segment (already grown by the slider)
  maskTicket: 0, // only the latest mask request may update the page
  editing: false,
  busyTimer: null,
};

// ---------------------------------------------------------------------------------------------
// Status line

function setStatus(text, kind = "info") {
  clearInterval(state.busyTimer);
  const status = $("status");
  status.textContent = text;
  status.className = `status ${kind}`;
}

function setBusy(text) {
  const started = performance.now();
  setStatus(text, "busy");
  // long edits (Stable Diffusion on a CPU) show that they are still going
  state.busyTimer = setInterval(() => {
    const seconds = Math.round((performance.now() - started) / 1000);
    $("status").textContent = `${text} ${seconds} s`;
  }, 1000);
}

// ---------------------------------------------------------------------------------------------
// Talking to the server

async function postJson(path, body) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (error) {
    throw new Error("The editor's server is not answering: is `python -m scripts.ui` running?");
  }
  let reply = null;
  try {
    reply = await response.json();
  } catch (error) {
    reply = null;
  }
  if (!response.ok) {
    const error = new Error(reply && reply.message ? reply.message : `HTTP ${response.status}`);
    error.code = reply ? reply.error : undefined; // e.g. unknown_image_id: send the image again
    throw error;
  }
  if (!reply) throw new Error("The server answered something other than JSON.");
  return reply;
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("The file could not be read."));
    reader.readAsDataURL(blob);
  });
}

function loadPicture(src) {
  return new Promise((resolve, reject) => {
    const picture = new Image();
    picture.onload = () => resolve(picture);
    picture.onerror = () => reject(new Error("The browser cannot show this image."));
    picture.src = src;
  });
}

// ---------------------------------------------------------------------------------------------
// Step 1: the image

async function openImage(dataUrl, name) {
  const picture = await loadPicture(dataUrl);
  state.image = {
    name,
    dataUrl,
    b64: dataUrl.slice(dataUrl.indexOf(",") + 1),
    width: picture.naturalWidth,
    height: picture.naturalHeight,
    id: null, // SAM's image_id once a click has sent the image: later clicks send only this
  };
  state.points = [];
  for (const canvas of [$("canvas"), $("mask-overlay")]) {
    canvas.width = state.image.width;
    canvas.height = state.image.height;
  }
  // decoded before the stage shows, so its box (and every click's mapping) is final at once
  $("image").dataset.ready = "false";
  $("image").src = dataUrl;
  await $("image").decode();
  $("placeholder").hidden = true;
  $("stage").hidden = false;
  $("image").dataset.ready = "true";
  $("compare").hidden = true;
  $("result").dataset.ready = "false";
  clearMask();
  drawPoints();
  updateButtons();
  setStatus(`${name}: ${state.image.width}×${state.image.height}. Click the object to select it.`);
}

async function openSample(name) {
  if (!name) return;
  setBusy(`Loading ${name}…`);
  try {
    const response = await fetch(`/api/samples/${encodeURIComponent(name)}`);
    if (!response.ok) throw new Error(`No sample ${name} (HTTP ${response.status}).`);
    await openImage(await readAsDataUrl(await response.blob()), name);
  } catch (error) {
    setStatus(error.message, "error");
  }
}

async function openFile(file) {
  if (!file) return;
  try {
    await openImage(await readAsDataUrl(file), file.name.replace(/\.[^.]+$/, ""));
    $("sample-select").value = "";
  } catch (error) {
    setStatus(`${file.name}: ${error.message}`, "error");
  }
}

async function listSamples() {
  try {
    const response = await fetch("/api/samples");
    const names = await response.json();
    for (const name of names) $("sample-select").add(new Option(name, name));
    setStatus("Pick a sample or open a file to start.");
  } catch (error) {
    setStatus("The samples could not be listed; open a file instead.", "error");
  }
}

// ---------------------------------------------------------------------------------------------
// Step 2: clicks and the mask

function imagePoint(event) {
  const canvas = $("canvas");
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) * canvas.width) / box.width;
  const y = ((event.clientY - box.top) * canvas.height) / box.height;
  const clamp = (value, high) => Math.min(Math.max(value, 0), high - 1);
  return { x: Math.round(clamp(x, canvas.width)), y: Math.round(clamp(y, canvas.height)) };
}

function drawPoints() {
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  // dots keep the same size on screen however much the image is scaled down
  const scale = canvas.clientWidth ? canvas.width / canvas.clientWidth : 1;
  for (const point of state.points) {
    context.beginPath();
    context.arc(point.x, point.y, 6 * scale, 0, 2 * Math.PI);
    context.fillStyle = point.label ? "#16a34a" : "#dc2626";
    context.fill();
    context.lineWidth = 2 * scale;
    context.strokeStyle = "#ffffff";
    context.stroke();
  }
}

function clearMask() {
  const overlay = $("mask-overlay");
  overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
  overlay.dataset.ready = "false";
  state.mask = null;
  state.maskTicket += 1; // a mask still on its way is no longer wanted
}

async function drawMask(b64) {
  const picture = await loadPicture(`data:image/png;base64,${b64}`);
  const overlay = $("mask-overlay");
  const context = overlay.getContext("2d");
  context.clearRect(0, 0, overlay.width, overlay.height);
  context.drawImage(picture, 0, 0, overlay.width, overlay.height);
  const pixels = context.getImageData(0, 0, overlay.width, overlay.height);
  let selected = 0;
  for (let index = 0; index < pixels.data.length; index += 4) {
    const inside = pixels.data[index] > 0;
    selected += inside;
    pixels.data.set(inside ? MASK_TINT : CLEAR, index);
  }
  context.putImageData(pixels, 0, 0);
  return selected / (overlay.width * overlay.height);
}

function segmentRequest(image, points, dilate) {
  const body = {
    points: points.map((point) => [point.x, point.y]),
    labels: points.map((point) => point.label),
    dilate,
  };
  if (image.id) body.image_id = image.id;
  else body.image = image.b64;
  return body;
}

async function segment(image, points, dilate) {
  try {
    return await postJson("/api/segment", segmentRequest(image, points, dilate));
  } catch (error) {
    if (error.code !== "unknown_image_id" || !image.id) throw error;
    // the server no longer holds the image (restarted, or many images since): send it, once
    image.id = null;
    return await postJson("/api/segment", segmentRequest(image, points, dilate));
  }
}

async function requestMask() {
  clearMask();
  updateButtons();
  if (!state.points.length) {
    setStatus("Click the object to select it.");
    return;
  }
  const ticket = state.maskTicket;
  const image = state.image; // a new image while this click is answered gets its own id
  const clicked = performance.now();
  setBusy("Finding the object…");
  try {
    const reply = await segment(image, [...state.points], Number($("dilate").value));
    if (reply.image_id) image.id = reply.image_id;
    if (ticket !== state.maskTicket) return; // a newer click asked for another mask
    const coverage = await drawMask(reply.mask);
    if (ticket !== state.maskTicket) return;
    state.mask = coverage > 0 ? reply.mask : null;
    // milliseconds from the click to the overlay drawn (read by tests/serving/test_ui.py)
    $("mask-overlay").dataset.drawnMs = (performance.now() - clicked).toFixed(1);
    $("mask-overlay").dataset.ready = "true";
    const cache = reply.embedding_cache ? ` (image embedding cache: ${reply.embedding_cache})` : "";
    if (coverage > 0) {
      const percent = (coverage * 100).toFixed(coverage < 0.01 ? 2 : 1);
      setStatus(`Selected ${percent}% of the image${cache}. Erase it, or describe what should be there and Replace.`, "ok");
    } else {
      setStatus(`Nothing selected at these clicks${cache}: click elsewhere on the object.`, "error");
    }
  } catch (error) {
    if (ticket === state.maskTicket) setStatus(error.message, "error");
  }
  updateButtons();
}

function addPoint(event) {
  if (!state.image || state.editing) return;
  const background = event.shiftKey || $("label-background").checked;
  state.points.push({ ...imagePoint(event), label: background ? 0 : 1 });
  drawPoints();
  requestMask();
}

function undoPoint() {
  state.points.pop();
  drawPoints();
  requestMask();
}

function clearPoints() {
  state.points = [];
  drawPoints();
  requestMask();
}

let dilateTimer = null;

function dilateChanged() {
  $("dilate-value").textContent = $("dilate").value;
  // the mask is fetched again once the slider rests (SAM's embedding is cached: quick)
  clearTimeout(dilateTimer);
  if (state.points.length) dilateTimer = setTimeout(requestMask, 250);
}

// ---------------------------------------------------------------------------------------------
// Step 3: the edits

function editRequest(kind) {
  // dilate 0: the mask already grew by the slider's amount, as the overlay shows
  const body = { image: state.image.b64, mask: state.mask, dilate: 0 };
  if (kind === "replace") {
    body.prompt = $("prompt").value.trim();
    body.negative_prompt = $("negative-prompt").value.trim();
    if ($("steps").value !== "") body.steps = Number($("steps").value); // else the model's
    if ($("seed").value !== "") body.seed = Number($("seed").value);
  }
  return body;
}

async function runEdit(kind) {
  if (!state.mask) return;
  if (kind === "replace" && !$("prompt").value.trim()) {
    setStatus("Describe what should be there instead, then Replace.", "error");
    $("prompt").focus();
    return;
  }
  state.editing = true;
  updateButtons();
  $("result").dataset.ready = "false";
  setBusy(kind === "erase" ? "Erasing…" : "Replacing (Stable Diffusion takes a while)…");
  try {
    const reply = await postJson(`/api/${kind}`, editRequest(kind));
    await showResult(`data:image/png;base64,${reply.image}`, kind);
    const seed = reply.seed === undefined || reply.seed === null ? "" : ` with seed ${reply.seed}`;
    setStatus(`Done: ${kind === "erase" ? "erased" : "replaced"}${seed}. Download it, or keep editing the result.`, "ok");
  } catch (error) {
    setStatus(error.message, "error");
  } finally {
    state.editing = false;
    updateButtons();
  }
}

async function showResult(dataUrl, kind) {
  await loadPicture(dataUrl); // decoded before it is shown, so data-ready means visible
  $("before").src = state.image.dataUrl;
  $("result").src = dataUrl;
  $("download").href = dataUrl;
  $("download").download = `${state.image.name}-${kind === "erase" ? "erased" : "replaced"}.png`;
  $("compare").hidden = false;
  $("result").dataset.ready = "true";
}

async function useResult() {
  const result = $("result").src;
  if (!result) return;
  try {
    await openImage(result, `${state.image.name.replace(/-edited$/, "")}-edited`);
  } catch (error) {
    setStatus(error.message, "error");
  }
}

function updateButtons() {
  const idle = !state.editing;
  $("erase").disabled = !(idle && state.mask);
  $("replace").disabled = !(idle && state.mask);
  $("undo-point").disabled = !(idle && state.points.length);
  $("clear-points").disabled = !(idle && state.points.length);
  $("use-result").disabled = !idle;
}

// ---------------------------------------------------------------------------------------------

function start() {
  $("sample-select").addEventListener("change", (event) => openSample(event.target.value));
  $("file-input").addEventListener("change", (event) => openFile(event.target.files[0]));
  $("canvas").addEventListener("click", addPoint);
  $("undo-point").addEventListener("click", undoPoint);
  $("clear-points").addEventListener("click", clearPoints);
  $("dilate").addEventListener("input", dilateChanged);
  $("erase").addEventListener("click", () => runEdit("erase"));
  $("replace").addEventListener("click", () => runEdit("replace"));
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter") runEdit("replace");
  });
  $("use-result").addEventListener("click", useResult);
  window.addEventListener("resize", drawPoints);
  updateButtons();
  listSamples();
}

start();
