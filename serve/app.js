// tessera's web page script, served as /app.js: the page's Content-Security-Policy runs no
// inline script. Loaded with `defer`, so the page's elements exist when it runs.
"use strict";
// The server writes the page's config into a JSON block (data, never run as script).
const CONFIG = JSON.parse(document.getElementById("tessera-config").textContent);
const $ = (id) => document.getElementById(id);
$("model").textContent = `model ${CONFIG.model} · ${CONFIG.resolution}×${CONFIG.resolution} px · up to ${CONFIG.max_n} images`;
$("n").max = String(CONFIG.max_n);
$("prompt").maxLength = CONFIG.max_prompt_chars;
if (!CONFIG.auth) $("keyLabel").title = "this server does not ask for a key";
// An edit keeps the image's top token rows (the DALL·E paper's priming) and draws the rest.
$("keepRows").max = String(CONFIG.grid - 1);
$("keepRows").placeholder = String(Math.floor(CONFIG.grid / 2));
$("keepRows").title = `of ${CONFIG.grid} token rows, from the top of the image (default: half)`;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = { prompt: $("prompt").value, n: Number($("n").value || 1), response_format: "b64_json" };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  const headers = {};
  const key = $("apiKey").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  const file = $("image").files[0];
  let route = "/v1/images/generations", payloadBody = JSON.stringify(body);
  if (file) {
    // The edit call is multipart (the browser sets the Content-Type with its boundary).
    if ($("keepRows").value !== "") body.keep_rows = Number($("keepRows").value);
    route = "/v1/images/edits";
    payloadBody = new FormData();
    for (const [k, v] of Object.entries(body)) payloadBody.append(k, String(v));
    payloadBody.append("image", file, file.name);
  } else {
    headers["Content-Type"] = "application/json";
  }
  $("generate").disabled = true;
  setStatus(file ? "Editing…" : "Generating…", false);
  const started = performance.now();
  try {
    const res = await fetch(CONFIG.root + route, { method: "POST", headers, body: payloadBody });
    let payload = null;
    try { payload = await res.json(); } catch (e) { /* a non-JSON body is reported below */ }
    if (!res.ok) {
      const msg = payload && payload.error ? payload.error.message : res.statusText;
      setStatus(`Error ${res.status}: ${msg}`, true);
      return;
    }
    const box = $("images");
    box.replaceChildren();
    payload.data.forEach((item, i) => {
      const fig = document.createElement("figure");
      const img = document.createElement("img");
      img.alt = `${body.prompt} (${i + 1})`;
      img.src = item.b64_json ? "data:image/png;base64," + item.b64_json : item.url;
      const cap = document.createElement("figcaption");
      cap.textContent = `#${i + 1}`;
      fig.append(img, cap);
      box.append(fig);
    });
    setStatus(`${payload.data.length} image(s) in ${((performance.now() - started) / 1000).toFixed(1)} s`, false);
  } catch (e) {
    setStatus("Request failed: " + e, true);
  } finally {
    $("generate").disabled = false;
  }
});
