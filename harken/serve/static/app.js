// The harken web page: upload a file (POST /v1/transcribe) or stream the microphone over the
// WebSocket /v1/stream (protocol v1) and watch partial results turn into finals.
"use strict";

const $ = (id) => document.getElementById(id);

// page state, also read by the end-to-end test
const harken = (window.harken = {
  state: "idle", finals: [], partial: "", segments: [], sentSeconds: 0, sampleRate: 0, sessionId: "",
  upload: null, error: null,
  // the 16-bit PCM sent in this recording (its first KEEP_SECONDS), to check or save what the server got
  sent: [], keepSeconds: 120,
  sentPcmBase64() {
    let n = 0;
    for (const b of this.sent) n += b.byteLength;
    const all = new Uint8Array(n);
    let o = 0;
    for (const b of this.sent) {
      all.set(new Uint8Array(b), o);
      o += b.byteLength;
    }
    let s = "";
    for (let i = 0; i < all.length; i += 0x8000) s += String.fromCharCode.apply(null, all.subarray(i, i + 0x8000));
    return btoa(s);
  },
});

function setState(s) {
  harken.state = s;
  document.body.dataset.state = s;
}

function status(el, text, isError) {
  el.textContent = text;
  el.classList.toggle("error", !!isError);
}

function apiKey() {
  return $("apikey").value.trim();
}

function fmt(t) {
  return Number(t).toFixed(2);
}

// ------------------------------------------------------------------------------------ model name
fetch("/v1/models", { headers: apiKey() ? { Authorization: "Bearer " + apiKey() } : {} })
  .then((r) => (r.ok ? r.json() : null))
  .then((j) => {
    if (j && j.data && j.data.length) $("model").textContent = "model: " + j.data[0].id;
  })
  .catch(() => {});

// ------------------------------------------------------------------------------------ upload
$("upload-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("file").files[0];
  const st = $("upload-status");
  if (!file) {
    status(st, "Choose an audio file first.", true);
    return;
  }
  const words = $("upload-words").checked;
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("word_timestamps", words ? "true" : "false");
  form.append("format", "json");
  status(st, "Transcribing " + file.name + " ...");
  $("upload-text").textContent = "";
  const tbody = $("upload-table").querySelector("tbody");
  tbody.replaceChildren();
  $("upload-table").hidden = true;
  harken.upload = null;
  const t0 = performance.now();
  try {
    const headers = apiKey() ? { Authorization: "Bearer " + apiKey() } : {};
    const r = await fetch("/v1/transcribe", { method: "POST", body: form, headers });
    const j = await r.json().catch(() => null);
    if (!r.ok) {
      const msg = j && j.error ? j.error.message : "HTTP " + r.status;
      status(st, "Failed: " + msg, true);
      harken.upload = { error: msg, status: r.status };
      return;
    }
    harken.upload = j;
    $("upload-text").textContent = j.text;
    for (const w of j.words || []) {
      const tr = document.createElement("tr");
      for (const v of [w.word, fmt(w.start), fmt(w.end), w.confidence != null ? Number(w.confidence).toFixed(2) : ""]) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      }
      tbody.appendChild(tr);
    }
    $("upload-table").hidden = !(j.words && j.words.length);
    status(st, `${fmt(j.duration)} s of audio in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
  } catch (e) {
    status(st, "Failed: " + e, true);
    harken.upload = { error: String(e) };
  }
});

// ------------------------------------------------------------------------------------ live
let ws = null, ctx = null, mic = null, node = null, ready = false, queue = [], stopping = false;

function toInt16(f32) {
  const out = new Int16Array(f32.length);
  for (let i = 0; i < f32.length; i++) {
    const v = Math.max(-1, Math.min(1, f32[i]));
    out[i] = v < 0 ? v * 32768 : v * 32767;
  }
  return out.buffer;
}

function sendAudio(buf) {
  if (harken.sentSeconds <= harken.keepSeconds) harken.sent.push(buf);
  if (ready && ws && ws.readyState === WebSocket.OPEN) ws.send(buf);
  else queue.push(buf);
}

function renderPartial() {
  $("live-partial").textContent = harken.partial ? " " + harken.partial : "";
}

function addFinal(m) {
  harken.finals.push(m.text);
  harken.segments.push(m);
  $("live-finals").textContent = harken.finals.join(" ");
  const li = document.createElement("li");
  const times = document.createElement("span");
  times.className = "times";
  times.textContent = `[${fmt(m.start)} - ${fmt(m.end)}]`;
  li.appendChild(times);
  if (m.words && m.words.length) {
    for (const w of m.words) {
      const s = document.createElement("span");
      s.className = "word";
      s.textContent = w.word + " ";
      const small = document.createElement("small");
      small.textContent = fmt(w.start);
      s.appendChild(small);
      li.appendChild(s);
    }
  } else {
    li.appendChild(document.createTextNode(m.text));
  }
  $("live-segments").appendChild(li);
}

function onMessage(ev) {
  let m;
  try {
    m = JSON.parse(ev.data);
  } catch (e) {
    return;
  }
  if (m.type === "ready") {
    ready = true;
    harken.sessionId = m.session_id;
    setState("streaming");
    status($("status"), `Listening (${harken.sampleRate} Hz -> ${m.sample_rate} Hz, chunks of ${m.chunk_ms} ms) ...`);
    for (const b of queue) ws.send(b);
    queue = [];
    if (stopping) finishSending();
  } else if (m.type === "partial") {
    harken.partial = m.text;
    renderPartial();
  } else if (m.type === "final") {
    harken.partial = "";
    addFinal(m);
    renderPartial();
  } else if (m.type === "end") {
    setState("done");
    status($("status"), `Done: ${fmt(m.audio_seconds)} s of audio, ${m.segments} segment(s).`);
  } else if (m.type === "error") {
    harken.error = m;
    setState("error");
    status($("status"), `Error (${m.code}): ${m.message}`, true);
  }
}

async function startRecording() {
  $("rec-start").disabled = true;
  harken.finals = [];
  harken.segments = [];
  harken.partial = "";
  harken.sentSeconds = 0;
  harken.sent = [];
  harken.error = null;
  $("live-finals").textContent = "";
  $("live-segments").replaceChildren();
  renderPartial();
  ready = false;
  stopping = false;
  queue = [];
  setState("starting");
  if (!window.isSecureContext) {
    status($("status"), "The microphone needs https or http://localhost.", true);
  }
  try {
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
    });
    ctx = new AudioContext(); // the device's native rate: the server resamples
    harken.sampleRate = ctx.sampleRate;
    await ctx.audioWorklet.addModule("/static/recorder-worklet.js");
    const src = ctx.createMediaStreamSource(mic);
    node = new AudioWorkletNode(ctx, "harken-recorder");
    const mute = ctx.createGain();
    mute.gain.value = 0;
    src.connect(node);
    node.connect(mute);
    mute.connect(ctx.destination);
    node.port.onmessage = (e) => {
      if (e.data === "flushed") {
        finishSending();
        return;
      }
      harken.sentSeconds += e.data.length / ctx.sampleRate;
      $("rec-meter").textContent = fmt(harken.sentSeconds) + " s";
      sendAudio(toInt16(e.data));
    };
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(`${proto}//${location.host}/v1/stream`);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {
      const start = {
        type: "start", version: 1, sample_rate: ctx.sampleRate, encoding: "pcm_s16le", channels: 1,
        interim_results: true, word_timestamps: true,
      };
      if (apiKey()) start.api_key = apiKey();
      ws.send(JSON.stringify(start));
    };
    ws.onmessage = onMessage;
    ws.onclose = (e) => {
      if (harken.state !== "done" && harken.state !== "error") {
        setState("error");
        status($("status"), `The connection closed (${e.code}${e.reason ? ": " + e.reason : ""}).`, true);
      }
      cleanup();
    };
    await ctx.resume();
    $("rec-stop").disabled = false;
  } catch (e) {
    setState("error");
    harken.error = { code: "client", message: String(e) };
    status($("status"), "Cannot record: " + e, true);
    cleanup();
  }
}

function finishSending() {
  if (!ready) return; // sent once ready arrives
  if (ws && ws.readyState === WebSocket.OPEN) {
    for (const b of queue) ws.send(b);
    queue = [];
    ws.send(JSON.stringify({ type: "stop" }));
  }
  if (mic) mic.getTracks().forEach((t) => t.stop());
}

function stopRecording() {
  $("rec-stop").disabled = true;
  if (stopping) return;
  stopping = true;
  setState("finishing");
  status($("status"), "Finishing ...");
  if (node) node.port.postMessage("flush");
  else finishSending();
}

function cleanup() {
  if (mic) mic.getTracks().forEach((t) => t.stop());
  if (ctx && ctx.state !== "closed") ctx.close().catch(() => {});
  mic = null;
  ctx = null;
  node = null;
  $("rec-start").disabled = false;
  $("rec-stop").disabled = true;
}

$("rec-start").addEventListener("click", startRecording);
$("rec-stop").addEventListener("click", stopRecording);
