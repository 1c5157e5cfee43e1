"""The web page of `harken serve`, end to end in headless Chromium (Debian's `chromium`), driven
over the DevTools protocol: a file upload shows the engine's transcript with word times, and the
fake microphone (a synthesized WAV) is captured by the page's AudioWorklet at the browser's
native rate, streamed over the WebSocket, and the finals the page shows equal the server's
record and the StreamingModel's result on exactly the audio the page sent, which is the
synthesized speech. A screenshot is saved in the test's tmp dir."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_serve_stream import reference, serve_model_path, speech  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required",
         "--window-size=1100,1000", "--remote-debugging-port=0", "--remote-allow-origins=*"]


def find_chromium() -> str:
    """The chromium binary; installs Debian's package when it is absent (as root), else skips loudly."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    why = "no chromium on PATH"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for first in ([], ["apt-get", "update"]):  # a stale package list: update once, then retry
            if first:
                subprocess.run(first, capture_output=True, timeout=600, env=env)
            r = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True,
                               timeout=900, env=env)
            p = shutil.which("chromium")
            if p:
                return p
        why = f"`apt-get install -y chromium` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    pytest.skip(f"CHROMIUM UNAVAILABLE, the web page end-to-end test did not run: {why}")


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, binary: str, profile: Path, fake_wav: Path):
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}",
                                      f"--use-file-for-fake-audio-capture={fake_wav}%noloop", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > end:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
                self.close()
                pytest.fail(f"chromium did not start: {err}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = []
        while not pages and time.monotonic() < end:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            time.sleep(0.1)
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=20).__enter__()
        self.ids = itertools.count(1)
        self.console: list[str] = []

    def cmd(self, method: str, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            m = json.loads(self.ws.recv(timeout=60))
            if m.get("method") == "Runtime.consoleAPICalled":
                args = m["params"]["args"]
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif m.get("method") == "Runtime.exceptionThrown":
                self.console.append("EXCEPTION " + json.dumps(m["params"]["exceptionDetails"])[:500])
            if m.get("id") == i:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]

    def js(self, expr: str, gesture: bool = False):
        r = self.cmd("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True, userGesture=gesture)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expr: str, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = self.js(expr)
            if v:
                return v
            time.sleep(0.1)
        page = self.js("JSON.stringify({state: harken.state, error: harken.error, sent: harken.sentSeconds})")
        raise AssertionError(f"timed out waiting for {what}; page state {page}; console {self.console[-10:]}")

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def speech_blocks_found(ref: np.ndarray, got: np.ndarray, block: int = 4000, thresh: float = 0.9) -> tuple[int, int]:
    """How many 0.25 s speech blocks of ``ref`` occur (normalised cross-correlation > ``thresh``)
    somewhere in ``got``; robust to a capture that starts late or drops a few samples under load."""
    n = 1 << int(np.ceil(np.log2(len(got) + block)))
    g = np.fft.rfft(got, n)
    energy = np.concatenate([[0.0], np.cumsum(got.astype(np.float64) ** 2)])
    found = blocks = 0
    for i in range(0, len(ref) - block, block):
        b = ref[i: i + block]
        if np.sqrt(np.mean(b ** 2)) < 0.01:  # silence: nothing to find
            continue
        blocks += 1
        xc = np.fft.irfft(g * np.conj(np.fft.rfft(b, n)), n)[: len(got) - block + 1]
        win = np.sqrt(np.maximum(energy[block: len(got) + 1] - energy[: len(got) - block + 1], 1e-12))
        found += float(np.max(xc / (win * np.linalg.norm(b)))) > thresh
    return found, blocks


@pytest.fixture(scope="module")
def served(tiny_corpus, tmp_path_factory):
    from harken.runtime import Engine
    from harken.runtime.streaming import StreamingModel
    from harken.serve.config import ServeConfig
    from harken.serve.testing import LiveServer

    engine = Engine.load(serve_model_path(tiny_corpus, tmp_path_factory), num_threads=1)
    sm = StreamingModel.from_engine(engine)
    cfg = ServeConfig()
    cfg.grpc_port = 0
    cfg.store.url = str(tmp_path_factory.mktemp("page_store") / "requests.sqlite")
    cfg.store.retain_audio = True
    with LiveServer(cfg, engine, sm) as srv:
        yield srv, engine, sm


def test_page_upload_and_microphone_in_chromium(served, tiny_corpus, tmp_path):
    import httpx
    import soxr

    from harken.audio import save_wav
    from harken.runtime.options import DecodeOptions

    binary = find_chromium()
    srv, engine, sm = served
    wave = speech(tiny_corpus, n=2, gap=0.6)
    wav = tmp_path / "speech.wav"
    save_wav(wav, wave, 16000)
    dur = len(wave) / 16000
    br = Browser(binary, tmp_path / "profile", wav)
    try:
        br.cmd("Runtime.enable")
        br.cmd("Page.enable")
        br.cmd("Page.navigate", url=srv.url + "/")
        br.wait("document.readyState === 'complete' && !!window.harken", 30, "the page to load")

        # ---- upload: the page shows the engine's transcript and word times
        doc = br.cmd("DOM.getDocument")
        node = br.cmd("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")["nodeId"]
        br.cmd("DOM.setFileInputFiles", nodeId=node, files=[str(wav)])
        br.js("document.getElementById('transcribe').click()", gesture=True)
        up = br.wait("harken.upload && JSON.stringify(harken.upload)", 60, "the upload result")
        up = json.loads(up)
        ref = engine.transcribe(str(wav), DecodeOptions(word_timestamps=True))
        assert "error" not in up, up
        assert up["text"] == ref.text and ref.text
        assert br.js("document.getElementById('upload-text').textContent") == ref.text
        rows = br.js("Array.from(document.querySelectorAll('#upload-table tbody tr')).map(r => r.cells[0].textContent)")
        assert rows == [w.word for w in ref.words]

        # ---- microphone: AudioWorklet -> WebSocket -> partials -> finals
        br.js("document.getElementById('rec-start').click()", gesture=True)
        br.wait("harken.state === 'streaming' || harken.state === 'error'", 30, "the stream to start")
        assert br.js("harken.state") == "streaming", br.js("JSON.stringify(harken.error)")
        br.wait(f"harken.sentSeconds >= {dur + 0.6}", 60, "the fake microphone to play the file")
        saw_partial = br.js("document.getElementById('live-partial').textContent.length > 0 "
                            "|| harken.finals.length > 0")
        br.js("document.getElementById('rec-stop').click()", gesture=True)
        br.wait("harken.state === 'done' || harken.state === 'error'", 60, "the final results")
        state = json.loads(br.js("JSON.stringify({state: harken.state, error: harken.error, finals: harken.finals, "
                                 "rate: harken.sampleRate, sid: harken.sessionId})"))
        assert state["state"] == "done", state
        rate = int(state["rate"])
        sent = np.frombuffer(base64.b64decode(br.js("harken.sentPcmBase64()")), "<i2").astype(np.float32) / 32768.0
        shown = br.js("document.getElementById('live-finals').textContent")
        n_items = br.js("document.querySelectorAll('#live-segments li').length")
        br.cmd("Emulation.setDeviceMetricsOverride", width=1100, height=1000, deviceScaleFactor=1, mobile=False)
        png = base64.b64decode(br.cmd("Page.captureScreenshot", format="png")["data"])
        (tmp_path / "page.png").write_bytes(png)
        print(f"screenshot: {tmp_path / 'page.png'}; capture rate {rate} Hz; finals {state['finals']}")
    finally:
        br.close()

    assert saw_partial
    # the audio the page sent is the synthesized speech, at the browser's rate
    got16 = soxr.resample(sent, rate, 16000, quality="HQ").astype(np.float32)
    save_wav(tmp_path / "sent.wav", got16, 16000)
    assert len(got16) >= 0.9 * len(wave)
    found, blocks = speech_blocks_found(wave, got16)
    assert found >= 0.8 * blocks, f"only {found} of {blocks} speech blocks of the file are in the captured audio"
    # the page's finals are the server's, and the StreamingModel's on exactly that audio
    finals = state["finals"]
    assert finals and shown == " ".join(finals) and n_items == len(finals)
    assert finals == [r.text for r in reference(sm, got16)]
    srv.state.store.flush()
    rec = httpx.get(f"{srv.url}/v1/requests/{state['sid']}", timeout=10).json()
    assert rec["endpoint"] == "ws" and rec["status"] == 200 and rec["text"] == " ".join(finals)
    assert rec["options"]["sample_rate"] == rate
    # the retained stream audio is what the server decoded: the page's audio resampled to 16 kHz
    import io

    import soundfile as sf

    r = httpx.get(f"{srv.url}/v1/requests/{state['sid']}/audio", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("audio/wav")
    kept, kept_rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert kept_rate == 16000 and len(kept) == len(got16)
    assert np.abs(kept - got16).max() < 2.0 / 32768
