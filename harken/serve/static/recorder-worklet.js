// AudioWorklet processor: mono float32 frames at the context's native rate, posted to the page in
// pieces of about 40 ms (the page converts them to 16-bit PCM and sends them over the WebSocket).
class HarkenRecorder extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.max(128, Math.round(sampleRate * 0.04));
    this.buf = new Float32Array(this.size);
    this.n = 0;
    this.port.onmessage = (e) => {
      if (e.data === "flush" ) {
        if (this.n) this.port.postMessage(this.buf.slice(0, this.n));
        this.n = 0;
        this.port.postMessage("flushed");
      }
    };
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0 || !input[0]) return true;
    const ch = input.length;
    const len = input[0].length;
    for (let i = 0; i < len; i++) {
      let v = 0;
      for (let c = 0; c < ch; c++) v += input[c][i];
      this.buf[this.n++] = v / ch;
      if (this.n === this.size) {
        this.port.postMessage(this.buf.slice(0));
        this.n = 0;
      }
    }
    return true;
  }
}

registerProcessor("harken-recorder", HarkenRecorder);
