// The relay's browser speaker: loaded before listen.js, which joins the
// room's stage over WebTransport (a framed JOIN with the speaker flag and a
// publish token) and plays what comes back, the stage without this
// speaker's own voice. Once joined, this sends the microphone: captured
// with echo cancellation and noise suppression, encoded to Opus in 20 ms
// frames by WebCodecs' AudioEncoder, each frame an RTP packet (PT 111, the
// RFC 6464 audio level in a one-byte header extension, id 1) in one
// WebTransport datagram. QUIC encrypts and authenticates the datagrams, so
// no SRTP and no key exchange (docs/speakers.md). Everything it shows is in
// window.relaySpeaker too, for tests and for debugging from the console.
"use strict";

const SPEAK_PT = 111, LEVEL_EXT_ID = 1, SILENT = 127;
// the browser's voice processing, on unless the page is opened with
// ?processing=off (a studio microphone, or a test that compares waveforms)
const PROCESSING = new URLSearchParams(location.search).get("processing") !== "off";
const MIC = { echoCancellation: PROCESSING, noiseSuppression: PROCESSING, autoGainControl: PROCESSING,
  channelCount: 1 };

window.relaySpeaker = {
  state: "off", error: "", muted: false, hostMuted: false, encoded: 0, sent: 0, sendErrors: 0,
  micLevelDb: -Infinity,

  // the session is up on `wt`: capture, encode, send until the connection ends
  async start(wt) {
    const sp = this;
    if (!("AudioEncoder" in window) || !("MediaStreamTrackProcessor" in window)) {
      return sp.fail("this browser cannot encode its microphone (WebCodecs' AudioEncoder and "
        + "MediaStreamTrackProcessor are missing)");
    }
    let media;
    try {
      media = await navigator.mediaDevices.getUserMedia({ audio: MIC });
    } catch (e) {
      return sp.fail("microphone: " + (e.message || e.name));
    }
    const track = media.getAudioTracks()[0];
    const frames = new MediaStreamTrackProcessor({ track }).readable.getReader();
    const out = wt.datagrams.writable.getWriter();
    const rand = (bits) => crypto.getRandomValues(bits === 16 ? new Uint16Array(1) : new Uint32Array(1))[0];
    const ssrc = rand(32), tsBase = rand(32);
    let seq = rand(16), level = SILENT;
    const encoder = new AudioEncoder({
      output: (chunk) => {
        sp.encoded++;
        // muted: nothing goes out, and the stage stops mixing us within a second
        if (sp.muted) return;
        const payload = new Uint8Array(chunk.byteLength);
        chunk.copyTo(payload);
        out.write(rtp(seq, (tsBase + Math.round(chunk.timestamp * 0.048)) >>> 0, ssrc, level, payload))
          .then(() => { sp.sent++; }, () => { sp.sendErrors++; });
        seq = (seq + 1) & 0xffff;
      },
      error: (e) => sp.fail("encoder: " + e.message),
    });
    wt.closed.finally(() => { track.stop(); sp.show("off"); });
    sp.show("sending");
    for (;;) {
      const { value, done } = await frames.read().catch(() => ({ done: true }));
      if (done) break;
      if (encoder.state === "unconfigured") {
        encoder.configure({ codec: "opus", sampleRate: value.sampleRate, numberOfChannels: value.numberOfChannels,
          bitrate: 48000, opus: { frameDuration: 20000 } });
      }
      sp.micLevelDb = levelDb(value);
      level = Math.max(0, Math.min(SILENT, Math.round(-sp.micLevelDb)));
      if (encoder.state === "configured") encoder.encode(value);
      value.close();
    }
  },

  fail(why) {
    this.error = why;
    this.show("error");
  },

  show(state) {
    this.state = state;
    const el = document.getElementById("send-state");
    if (el) el.textContent = state === "error" ? "error: " + this.error : this.muted ? "muted" : state;
    const box = document.getElementById("speak");
    if (box) box.className = this.muted ? "muted" : "";
  },
};

// an RTP packet with the audio level extension (RFC 8285 one-byte form)
function rtp(seq, ts, ssrc, level, payload) {
  const p = new Uint8Array(20 + payload.length), v = new DataView(p.buffer);
  p[0] = 0x90;                      // version 2, extension
  p[1] = SPEAK_PT;
  v.setUint16(2, seq);
  v.setUint32(4, ts);
  v.setUint32(8, ssrc);
  v.setUint16(12, 0xbede);
  v.setUint16(14, 1);               // one 32-bit word of extensions
  p[16] = LEVEL_EXT_ID << 4;        // id 1, one byte
  p[17] = 0x80 | level;             // voice activity, -dBov
  p.set(payload, 20);
  return p;
}

// a JWT's `sub` (its payload is base64url JSON; the node checks the signature)
function subOf(token) {
  try {
    const b64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(b64 + "===".slice((b64.length + 3) % 4))).sub || "";
  } catch (e) {
    return "";
  }
}

// the frame's level in dBov (first channel)
function levelDb(data) {
  const n = data.numberOfFrames, x = new Float32Array(n);
  data.copyTo(x, { planeIndex: 0, format: "f32-planar" });
  let sum = 0;
  for (let i = 0; i < n; i++) sum += x[i] * x[i];
  return n ? 10 * Math.log10(sum / n + 1e-12) : -Infinity;
}

document.addEventListener("DOMContentLoaded", () => {
  const sp = window.relaySpeaker;
  const button = document.getElementById("mute");
  button.onclick = () => {
    sp.muted = !sp.muted;
    button.textContent = sp.muted ? "Unmute" : "Mute";
    sp.show(sp.state);
  };
  // our own id on the stage is our token's `sub`: a host's mute shows here
  const me = subOf(new URLSearchParams(location.search).get("token") || "");
  setInterval(() => {
    const mine = (window.relayListener.speakers || []).find((s) => s.id === me);
    const muted = Boolean(mine && mine.muted);
    if (muted !== sp.hostMuted) {
      sp.hostMuted = muted;
      document.getElementById("send-state").textContent = muted ? "muted by the host" : sp.state;
    }
    document.getElementById("sent").textContent = sp.sent;
    const meter = document.getElementById("mic-meter");
    meter.style.width = Math.max(0, Math.min(100, 100 + 2 * sp.micLevelDb)) + "%";
  }, 250);
});
