// The relay's browser listener: WebTransport to the node's QUIC port, a
// framed JOIN on a bidirectional stream (docs/protocol.md), RTP/Opus as
// datagrams, decoded by WebCodecs' AudioDecoder and played through Web Audio.
// Where WebTransport or WebCodecs is missing, or WebTransport cannot connect
// (UDP blocked), the node's LL-HLS (docs/hls.md) plays in an audio element:
// natively where the browser has HLS (Safari), else through hls.js, which
// the node serves itself (/hls.min.js, pinned by scripts/bootstrap.sh).
// Everything the page shows is also in window.relayListener, for tests and
// for anyone debugging from the console.
"use strict";

// refusals worth asking again after a while (with backoff)
const RETRY = ["node_full", "room_full", "rate_limited", "draining"];
const REASONS = ["", "bad_request", "unsupported_version", "bad_token", "expired_token",
  "wrong_room", "unknown_room", "node_full", "room_full", "stale_cookie", "unknown_session",
  "draining", "wrong_role", "rate_limited", "token_in_use", "stage_full", "no_stage",
  "room_ended", "removed", "audience"];
const MAGIC = 0x0b, VERSION = 1, JOIN = 1, ACCEPT = 3, REJECT = 4, KEEPALIVE = 5, SPEAKERS = 7;
const REACTIONS = 10, INVITE = 11;   // the stage's messages (stage.js sends hands and reactions)
const JOIN_SPEAKER = 0x01, JOIN_RESUME = 0x04, ACCEPT_ORIGIN = 0x02;
// the speaker's page (speak.js, loaded first) joins the stage and sends its
// microphone once joined; what this page plays is then its mix-minus
const speaker = window.relaySpeaker || null;
const PLAYOUT_DELAY = 0.08;   // seconds of audio scheduled ahead, absorbs jitter
// no audio for this long: ask the node (a KEEPALIVE it echoes) whether it is
// still there; no echo within as long again and it is taken for dead, and
// the page moves to an alternate (docs/cluster.md, as `relay listen` does)
const PROBE_MS = 250;
// a node that answers our probes while the room is quiet is asked again this often
const QUIET_PROBE_MS = 1000;
// how long a node we move to has to take the connection before we try the next
const MOVE_CONNECT_MS = 1500;

const params = new URLSearchParams(location.search);
const st = window.relayListener = {
  state: "starting", room: params.get("room") || "demo", error: "",
  packets: 0, bytes: 0, lost: 0, framesDecoded: 0, decodeErrors: 0,
  bitrateKbps: 0, levelDb: -Infinity, pitchHz: 0, audio: "off", ssrc: 0, retries: 0,
  moves: 0, node: "", transport: "", delaySec: NaN,
  alternates: [],  // where to move if our node dies: {node, webtransport, cert_sha256}, from /join
  moveSilenceMs: 0, // the gap in audio the last move cost, from the last packet before to the first after
  speakers: [],   // who is on the room's stage: {id, name, level (-dBov), speaking, muted}
  reactions: {},  // the room's reactions in the last second: {emoji index: count}
  invited: false, // a host invited this listener on stage
};
const via = params.get("via");
let generation = 0;          // each connection's number: a dead one's errors are not ours
let lastDatagram = 0;
let gapSince = 0;            // moving: when the last packet before the move came
let session = null;          // the live session: {writer, sessionId}, for probes
let probeAt = 0, echoAt = 0; // when we last asked the node if it is there, and it last answered
const $ = (id) => document.getElementById(id);
$("room").textContent = st.room;

// what a state shows beside its name when it carries no error of its own
const HINTS = { "click-to-play": "the browser plays sound only after a click on this page" };

function setState(state, error) {
  st.state = state;
  // an error belongs to the state it came with: a page that connects or
  // plays again has none left (not "playing: node_full, retrying in 0.8 s")
  st.error = error ? String(error) : "";
  const el = $("state");
  const detail = st.error || HINTS[state] || "";
  el.textContent = state.replace(/-/g, " ") + (detail ? ": " + detail : "");
  el.className = state === "playing" ? "playing" : (state === "error" || state === "rejected") ? "error" : "";
}

// decoded audio is on its way out only while the AudioContext runs; a
// browser's autoplay policy keeps it suspended until the user clicks
function audible() {
  return ctx !== null && ctx.state === "running";
}

// joined and decoding: playing, or waiting for the click that lets it play
function setPlaying() {
  setState(audible() ? "playing" : "click-to-play");
}

function setTransport(text) {
  st.transport = text;
  $("transport").textContent = text;
}

function hexBytes(hex) {
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
  return out;
}

// ------------------------------------------------------------ control stream

// `resume`: moving from a dead node, the last origin sequence number we
// have; the new node sends what it still holds after it
function framedJoin(room, token, resume) {
  const enc = new TextEncoder(), r = enc.encode(room), t = enc.encode(token);
  const extra = resume === null ? 0 : 2;
  const n = 4 + 1 + r.length + 2 + t.length + 1 + extra;
  const b = new Uint8Array(2 + n), v = new DataView(b.buffer);
  v.setUint16(0, n);
  b.set([MAGIC, VERSION, JOIN, (resume === null ? 0 : JOIN_RESUME) | (speaker ? JOIN_SPEAKER : 0), r.length], 2);
  b.set(r, 7);
  v.setUint16(7 + r.length, t.length);
  b.set(t, 9 + r.length);
  b[9 + r.length + t.length] = 0;      // no cookie: QUIC already proved our address
  if (extra) v.setUint16(10 + r.length + t.length, resume & 0xffff);
  return b;
}

function framedKeepalive(sessionId) {
  const b = new Uint8Array(2 + 4 + sessionId.length);
  b.set([0, 4 + sessionId.length, MAGIC, VERSION, KEEPALIVE, 0]);
  b.set(sessionId, 6);
  return b;
}

// yields each framed control message from the node
async function* frames(readable) {
  const reader = readable.getReader();
  let buf = new Uint8Array(0);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const joined = new Uint8Array(buf.length + value.length);
    joined.set(buf); joined.set(value, buf.length); buf = joined;
    while (buf.length >= 2) {
      const n = (buf[0] << 8) | buf[1];
      if (buf.length < 2 + n) break;
      yield buf.slice(2, 2 + n);
      buf = buf.slice(2 + n);
    }
  }
}

function parseControl(m) {
  if (m.length < 4 || m[0] !== MAGIC) throw new Error("not a relay control message");
  const v = new DataView(m.buffer, m.byteOffset, m.byteLength);
  if (m[2] === ACCEPT) {
    // with ACCEPT_ORIGIN: the session's offsets from the origin's numbering
    // (the same packet has the same origin number on every node)
    const origin = (m[3] & ACCEPT_ORIGIN) && m.length >= 31 ? v.getUint16(24) : null;
    return { type: "accept", sessionId: m.slice(4, 12), ssrc: v.getUint32(12), origin };
  }
  if (m[2] === KEEPALIVE) return { type: "keepalive" };
  if (m[2] === REJECT) {
    const redirect = new TextDecoder().decode(m.subarray(6, 6 + m[5]));
    return { type: "reject", reason: REASONS[m[4]] || "reason " + m[4], redirect };
  }
  if (m[2] === SPEAKERS) {
    // count, then per speaker: level|speaking<<7, id (length, UTF-8), name (length, UTF-8)
    const dec = new TextDecoder(), speakers = [];
    let at = 5;
    for (let i = 0; i < m[4] && at + 2 <= m.length; i++) {
      const level = m[at] & 0x7f, speaking = (m[at] & 0x80) !== 0;
      const n = m[at + 1] & 0x7f, muted = (m[at + 1] & 0x80) !== 0;   // muted by a host
      const id = dec.decode(m.subarray(at + 2, at + 2 + n));
      at += 2 + n;
      const name = dec.decode(m.subarray(at + 1, at + 1 + m[at]));
      at += 1 + m[at];
      speakers.push({ id, name, level, speaking, muted });
    }
    return { type: "speakers", speakers };
  }
  if (m[2] === REACTIONS) {
    const counts = {};
    for (let k = 0; k < m[4] && 5 + 3 * k + 3 <= m.length; k++) counts[m[5 + 3 * k]] = v.getUint16(6 + 3 * k);
    return { type: "reactions", counts };
  }
  if (m[2] === INVITE) return { type: "invite" };
  return { type: "other" };
}

// the stage: each speaker's name and a bar for its level (-60 dBov and
// below shows empty), the ones speaking now in bold
function renderStage() {
  const box = $("stage");
  box.hidden = st.speakers.length === 0;
  const list = $("speakers");
  list.replaceChildren(...st.speakers.map((s) => {
    const row = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = s.name + (s.muted ? " (muted)" : "");
    name.className = s.speaking ? "speaking" : "";
    const track = document.createElement("span"), bar = document.createElement("span");
    track.className = "track";
    bar.className = "bar";
    bar.style.width = Math.max(0, Math.min(100, (60 - s.level) * 100 / 60)) + "%";
    track.append(bar);
    const db = document.createElement("span");
    db.className = "db";
    db.textContent = s.level >= 127 ? "silent" : "-" + s.level + " dBov";
    row.append(name, track, db);
    return row;
  }));
}

// ------------------------------------------------------------------ audio

let ctx = null, playAt = 0;
const window1s = [];                 // [time, bytes] of the last second
let pitchCrossings = 0, pitchSamples = 0;

function setupAudio() {
  if (ctx) return;   // once per page, also across retries
  try {
    ctx = new AudioContext({ sampleRate: 48000, latencyHint: "interactive" });
  } catch (e) {
    st.audio = "unavailable: " + e.message;
    return;
  }
  // a browser that blocks autoplay leaves the context suspended until a click
  const show = () => {
    st.audio = ctx.state;
    $("play").hidden = ctx.state === "running";
    if (["playing", "click-to-play"].includes(st.state)) setPlaying();
  };
  ctx.onstatechange = show;
  show();
  $("play").onclick = () => ctx.resume();
}

function onFrame(data) {
  st.framesDecoded++;
  const n = data.numberOfFrames, ch = data.numberOfChannels;
  const planes = [];
  for (let c = 0; c < ch; c++) {
    const p = new Float32Array(n);
    data.copyTo(p, { planeIndex: c, format: "f32-planar" });
    planes.push(p);
  }
  const sr = data.sampleRate;
  data.close();
  // level and a zero-crossing pitch estimate of the first channel
  const x = planes[0];
  let sum = 0;
  for (let i = 0; i < n; i++) {
    sum += x[i] * x[i];
    if (i && (x[i - 1] < 0) !== (x[i] < 0)) pitchCrossings++;
  }
  pitchSamples += n;
  if (pitchSamples >= sr) {
    st.pitchHz = Math.round(pitchCrossings / 2 / (pitchSamples / sr));
    pitchCrossings = pitchSamples = 0;
  }
  st.levelDb = n ? 10 * Math.log10(sum / n + 1e-12) : -Infinity;
  if (!ctx || ctx.state !== "running") return;
  const buf = ctx.createBuffer(ch, n, sr);
  planes.forEach((p, c) => buf.copyToChannel(p, c));
  const src = ctx.createBufferSource();
  src.buffer = buf;
  src.connect(ctx.destination);
  const now = ctx.currentTime;
  if (playAt < now) playAt = now + PLAYOUT_DELAY;   // start, or recover from an underrun
  src.start(playAt);
  playAt += buf.duration;
  // what is scheduled ahead and the output's own: the delay this page adds to the network's
  st.delaySec = playAt - now + (ctx.outputLatency || 0);
}

function makeDecoder() {
  const dec = new AudioDecoder({
    output: onFrame,
    error: (e) => { st.decodeErrors++; setState("error", "decoder: " + e.message); },
  });
  dec.configure({ codec: "opus", sampleRate: 48000, numberOfChannels: 2 });
  return dec;
}

// ------------------------------------------------------------------- RTP in

// highSeq and firstSeq count in the origin's numbering where the node gives
// it, and then carry across moves: a gap a move left is counted as lost
let highSeq = -1, firstSeq = -1, tsBase = -1, seqOff = null;

function onDatagram(d, decoder) {
  if (d.length < 12 || (d[0] >> 6) !== 2) return;
  const v = new DataView(d.buffer, d.byteOffset, d.byteLength);
  let off = 12 + 4 * (d[0] & 0x0f);
  if (d[0] & 0x10) off += 4 + 4 * v.getUint16(off + 2);
  let end = d.length;
  if (d[0] & 0x20) end -= d[end - 1];
  if (off >= end) return;
  const seq = (v.getUint16(2) - (seqOff || 0)) & 0xffff, ts = v.getUint32(4);
  const now = performance.now();
  if (gapSince) { st.moveSilenceMs = Math.round(now - gapSince); gapSince = 0; }
  lastDatagram = now;
  st.packets++;
  st.bytes += d.length;
  window1s.push([performance.now(), d.length]);
  // extended sequence numbers; a gap is loss (the relay never reorders)
  if (highSeq < 0) { highSeq = firstSeq = seq; } else {
    const delta = ((seq - (highSeq & 0xffff) + 0x8000) & 0xffff) - 0x8000;
    // a packet we have had (a moved-to node's burst repeats the newest we
    // heard before the move) is not played twice
    if (delta <= 0) return;
    st.lost += delta - 1;
    highSeq += delta;
  }
  if (tsBase < 0) tsBase = ts;
  const tsRel = (ts - tsBase) >>> 0;   // the chunk timestamp only labels frames; wrapping after a day is harmless
  if (decoder.state !== "configured") return;
  decoder.decode(new EncodedAudioChunk({
    type: "key", timestamp: Math.round(tsRel * 1e6 / 48000), data: d.subarray(off, end),
  }));
  if (st.state === "joined" && st.framesDecoded > 0) setPlaying();
}

// ------------------------------------------------------------------- main

// where this page's own node takes WebTransport listeners
async function ownNode() {
  const answer0 = await fetch("/quic.json");
  const info = await answer0.json();
  if (!answer0.ok || !info.port) {
    // the node serves this page but has no QUIC port: say so, not a URL error
    throw new Error(info.error || "this node does not offer QUIC listeners");
  }
  // a node bound to every address names none: use the host this page came
  // from (an IPv6 hostname comes with its brackets)
  return { url: info.webtransport || "https://" + location.hostname + ":" + info.port + info.path,
           cert: info.cert_sha256 };
}

// a node's /join: where a listener of this room should go (null if nowhere)
async function askJoin(url) {
  // a node with tokens answers only a joiner that holds one for the room
  const answer = await fetch(url + (url.includes("?") ? "&" : "?") + "room=" + encodeURIComponent(st.room)
    + "&token=" + encodeURIComponent(params.get("token") || ""));
  const where = await answer.json();
  return answer.ok && where.webtransport ? where : null;
}

// refused or drained: if our node's /join (or ?via=) names another node, go
// there; false if it names none
async function goWhereJoinSays(why) {
  const where = await askJoin(via || "/join").catch(() => null);
  if (!where || where.node === st.node) return false;
  st.moves++;
  setState("moving", why + ", to " + where.node);
  listen({ url: where.webtransport, cert: where.cert_sha256, node: where.node })
    .catch((e) => setState("error", e.message || e));
  return true;
}

// where to move if this node dies, as the node that served this page sees
// it now (its /join names the room's alternates): asked after each join
async function refreshAlternates() {
  const where = await askJoin("/join").catch(() => null);
  if (where && where.alternates) st.alternates = where.alternates.filter((a) => a.node !== st.node);
}

// our node is gone: its alternates in turn, then ?via=, asking each for
// what it still holds after our last packet
async function moveOn(why) {
  gapSince = lastDatagram;
  const tried = st.node;
  const targets = st.alternates.filter((a) => a.node !== tried && a.webtransport)
    .map((a) => ({ url: a.webtransport, cert: a.cert_sha256, node: a.node }));
  if (via) {
    const where = await askJoin(via).catch(() => null);
    if (where && where.node !== tried) targets.push({ url: where.webtransport, cert: where.cert_sha256, node: where.node });
  }
  if (!targets.length) throw new Error(why + ", and no node to move to");
  st.moves++;
  for (const t of targets) {
    setState("moving", why + ", to " + t.node);
    try {
      await listen(t, { connectMs: MOVE_CONNECT_MS, resume: highSeq >= 0 && seqOff !== null ? highSeq : null });
      return;
    } catch (e) {
      if (st.state === "playing" || st.state === "click-to-play") return;   // it played, then ended
    }
  }
  setState("error", why + ", and no alternate took us");
}

let moving = false;
setInterval(() => {
  if (moving || !["joined", "playing", "click-to-play", "closed"].includes(st.state)) return;
  const now = performance.now();
  const dead = (why) => {
    // a speaker's stage is on the node it joined: an alternate has none
    if (speaker) return setState("error", why + " (reload the page to join the stage again)");
    moving = true;
    setState("lost", why);
    moveOn(why).catch((e) => setState("error", e.message || e)).finally(() => { moving = false; });
  };
  // the connection closed under us without a word from the node: it is gone
  if (st.state === "closed") return dead("the connection to " + st.node + " closed");
  if (now - lastDatagram < PROBE_MS) { probeAt = 0; return; }
  if (probeAt && echoAt < probeAt && now - probeAt > PROBE_MS) {
    return dead("no audio and no answer from " + st.node + " for " + Math.round(now - lastDatagram) + " ms");
  }
  if (session && (!probeAt || (echoAt >= probeAt && now - probeAt > QUIET_PROBE_MS))) {
    probeAt = now;
    session.writer.write(framedKeepalive(session.sessionId)).catch(() => {});
  }
}, 50);

// ------------------------------------------------------------- LL-HLS

// the room's LL-HLS base URL on this page's node ("…/rooms/NAME/"), or null if it offers none
async function hlsUrl() {
  const answer = await fetch("/hls.json").catch(() => null);
  if (!answer || !answer.ok) return null;
  const info = await answer.json();
  const base = info.base || location.protocol + "//" + location.hostname + ":" + info.port + info.path;
  return base + encodeURIComponent(st.room) + "/";
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const el = document.createElement("script");
    el.src = src;
    el.onload = resolve;
    el.onerror = () => reject(new Error(src + " did not load"));
    document.head.append(el);
  });
}

// one rendition, never the multivariant: players that switch variants may
// not switch codecs (Chromium's native HLS refuses to), so the page picks
// Opus where Media Source plays it in MP4, else AAC
async function listenHls(base) {
  const audio = document.createElement("audio");
  // the HLS port is another origin: with its CORS, Web Audio may read the level
  audio.crossOrigin = "anonymous";
  document.body.append(audio);
  let hls = null;
  const native = audio.canPlayType("application/vnd.apple.mpegurl") !== "";
  // Safari's own player where it has one (iOS has no Media Source to give hls.js)
  if (native && (/Apple/.test(navigator.vendor) || !("MediaSource" in window))) {
    setTransport("LL-HLS (native)");
    audio.src = base + "aac/index.m3u8";
  } else {
    if (!window.Hls) await loadScript("/hls.min.js");
    if (!window.Hls || !window.Hls.isSupported()) throw new Error("this browser plays neither WebTransport nor HLS");
    const opus = MediaSource.isTypeSupported('audio/mp4; codecs="opus"');
    setTransport("LL-HLS (hls.js " + window.Hls.version + ", " + (opus ? "Opus" : "AAC") + ")");
    hls = new window.Hls({ lowLatencyMode: true });
    hls.on(window.Hls.Events.ERROR, (_, d) => { if (d.fatal) setState("error", "hls.js: " + d.details); });
    hls.loadSource(base + (opus ? "opus" : "aac") + "/index.m3u8");
    hls.attachMedia(audio);
  }
  st.node = location.host;
  setupAudio();
  const analyser = ctx ? ctx.createAnalyser() : null;
  if (analyser) {
    ctx.createMediaElementSource(audio).connect(analyser);
    analyser.connect(ctx.destination);
  }
  const samples = new Float32Array(2048);
  setState("connecting");
  let lastTime = 0;
  setInterval(() => {
    // what the element has played stands for frames decoded (20 ms each)
    if (audio.currentTime > lastTime) {
      st.framesDecoded = Math.floor(audio.currentTime * 50);
      lastTime = audio.currentTime;
      if (["connecting", "joined"].includes(st.state)) setPlaying();
    }
    if (analyser) {
      analyser.getFloatTimeDomainData(samples);
      let sum = 0;
      for (const x of samples) sum += x * x;
      st.levelDb = 10 * Math.log10(sum / samples.length + 1e-12);
    }
    // the delay: hls.js's own estimate, or the stream's clock (PROGRAM-DATE-TIME) against ours
    const start = audio.getStartDate ? audio.getStartDate().getTime() : NaN;
    st.delaySec = hls ? hls.latency : (isFinite(start) ? (Date.now() - start) / 1000 - audio.currentTime : NaN);
  }, 250);
  $("play").onclick = () => { if (ctx) ctx.resume(); audio.play(); };
  audio.play().catch(() => setState("click-to-play"));
}

// join `target` (else this page's own node); resolves once joined, and
// plays until the session ends. `how.resume`: the origin sequence number to resume after (a move);
// `how.connectMs`: give up on a node that does not take the connection by
// then, and on a refusal (a move tries the next node instead of waiting)
async function listen(target, how = {}) {
  // a speaker has no fallback: LL-HLS only listens
  if (!target && !speaker && (!("WebTransport" in window) || !("AudioDecoder" in window))) {
    const url = await hlsUrl();
    if (url) return listenHls(url);
  }
  if (!("WebTransport" in window)) {
    setTransport("none: this browser lacks WebTransport");
    setState("error", "this browser lacks WebTransport");
    return;
  }
  if (!("AudioDecoder" in window)) {
    setState("error", "this browser lacks WebCodecs (its AudioDecoder)");
    return;
  }
  setTransport("WebTransport (HTTP/3)");
  const gen = ++generation;
  setupAudio();
  let node;
  try {
    node = target || await ownNode();
  } catch (e) {
    setState("error", e.message);
    return;
  }
  const opts = {};
  if (node.cert) {
    opts.serverCertificateHashes = [{ algorithm: "sha-256", value: hexBytes(node.cert) }];
  }
  st.node = node.node || location.host;
  setState("connecting");
  const wt = new WebTransport(node.url, opts);
  if (how.connectMs) {
    let timer;
    const late = new Promise((_, fail) => { timer = setTimeout(() => fail(new Error("no answer from " + st.node)), how.connectMs); });
    try { await Promise.race([wt.ready, late]); } catch (e) { wt.close(); throw e; } finally { clearTimeout(timer); }
  } else {
    await wt.ready;
  }
  // a close after a refusal or an error keeps that message on screen; a
  // connection we have moved on from says nothing
  const closed = (why) => {
    if (gen === generation && !["rejected", "ended", "error"].includes(st.state)) setState("closed", why);
  };
  wt.closed.then(() => closed(""), (e) => closed(e.message));
  const stream = await wt.createBidirectionalStream();
  const w = stream.writable.getWriter();
  await w.write(framedJoin(st.room, params.get("token") || "", how.resume ?? null));
  setState("joining");
  const control = frames(stream.readable);
  const first = await control.next();
  if (first.done) throw new Error("the node closed the control stream");
  const answer = parseControl(first.value);
  if (answer.type === "reject") {
    wt.close();
    if (how.connectMs) throw new Error(st.node + ": " + answer.reason);
    if (RETRY.includes(answer.reason)) {
      // a node in a cluster knows one with room: ask it (or ?via=) and go there
      if (await goWhereJoinSays(answer.reason)) return;
      // a full or draining node may have room again soon: back off and ask again
      const wait = Math.min(30, 2 ** st.retries++) * (0.8 + 0.4 * Math.random());
      setState("rejected", answer.reason + ", retrying in " + wait.toFixed(1) + " s");
      await new Promise((r) => setTimeout(r, wait * 1000));
      return listen(target);
    }
    if (answer.reason === "bad_token" && !params.get("token")) {
      // as the CLI says it: the node's word would blame a token never given
      setState("rejected", "this room needs a token (add &token=… to the address)");
    } else {
      setState("rejected", answer.reason + (answer.redirect ? ", go to " + answer.redirect : ""));
    }
    return;
  }
  st.retries = 0;
  st.ssrc = answer.ssrc;
  // a new session numbers its packets its own way: counted on in the
  // origin's numbering where both sessions give it, else from scratch
  if (answer.origin === null || seqOff === null) highSeq = firstSeq = -1;
  seqOff = answer.origin;
  tsBase = -1;
  session = { writer: w, sessionId: answer.sessionId };
  // stage.js sends a hand or a reaction on this session's control stream
  window.relaySend = (build) => w.write(build(answer.sessionId)).catch(() => {});
  probeAt = 0;
  lastDatagram = performance.now();
  setState("joined");
  if (speaker) speaker.start(wt);
  else refreshAlternates();
  const decoder = makeDecoder();
  // later control messages: the node draining or the room going away
  (async () => {
    for await (const m of control) {
      const msg = parseControl(m);
      if (msg.type === "speakers") { st.speakers = msg.speakers; renderStage(); continue; }
      if (msg.type === "keepalive") { echoAt = performance.now(); continue; }
      if (msg.type === "reactions" || msg.type === "invite") {
        if (msg.type === "reactions") st.reactions = msg.counts; else st.invited = true;
        document.dispatchEvent(new CustomEvent("relay-stage", { detail: msg }));
        continue;
      }
      if (msg.type !== "reject") continue;
      document.dispatchEvent(new CustomEvent("relay-stage", { detail: msg }));
      setState("ended", msg.reason + (msg.redirect ? ", go to " + msg.redirect : ""));
      // a draining node in a cluster: its /join names where to go on
      if (msg.reason === "draining" && gen === generation) await goWhereJoinSays("draining");
    }
  })().catch(() => {});
  // played in the background: a move awaits only the join
  (async () => {
    const reader = wt.datagrams.readable.getReader();
    for (;;) {
      const { value, done } = await reader.read().catch(() => ({ done: true }));
      if (done || gen !== generation) break;
      onDatagram(value, decoder);
    }
    if (gen !== generation) wt.close();
  })();
}

function render() {
  const now = performance.now();
  while (window1s.length && window1s[0][0] < now - 1000) window1s.shift();
  st.bitrateKbps = Math.round(window1s.reduce((a, x) => a + x[1], 0) * 8 / 100) / 10;
  $("bitrate").textContent = st.bitrateKbps.toFixed(1) + " kbit/s";
  $("packets").textContent = st.packets;
  const expected = highSeq < 0 ? 0 : highSeq - firstSeq + 1;
  $("lost").textContent = st.lost + (expected ? " (" + (100 * st.lost / expected).toFixed(2) + " %)" : "");
  $("frames").textContent = st.framesDecoded;
  $("errors").textContent = st.decodeErrors;
  $("level").textContent = isFinite(st.levelDb) ? st.levelDb.toFixed(1) + " dBFS" : "–";
  $("meter").style.width = Math.max(0, Math.min(100, 100 + 2 * st.levelDb)) + "%";
  $("audio").textContent = st.audio;
  $("delay").textContent = isFinite(st.delaySec) ? st.delaySec.toFixed(2) + " s" : "–";
}
setInterval(render, 250);

// once the node has ended the session (draining, room removed), the
// connection closing after it is expected, not an error
// WebTransport that cannot connect (UDP blocked, a refused handshake) falls
// back to the node's LL-HLS when it has it
const firstTry = params.get("transport") === "hls" && !speaker ? hlsUrl().then((url) => {
  if (!url) throw new Error("this node offers no LL-HLS");
  return listenHls(url);
}) : listen();
firstTry.catch(async (e) => {
  if (st.state === "ended" || st.moves !== 0) return;
  if (speaker) return setState("error", e.message || e);
  const url = ["starting", "connecting"].includes(st.state) && st.transport.startsWith("WebTransport")
    ? await hlsUrl() : null;
  if (url) return listenHls(url).catch((e2) => setState("error", e2.message || e2));
  setState("error", e.message || e);
});
