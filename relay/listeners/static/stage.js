// The stage's side of the listener's and the speaker's pages (after
// listen.js): raise a hand, react, see the room's reactions, and follow a
// host's decisions. An invitation moves the listener's page to the
// speaker's (/speak, the same token: the host allowed its `sub` to speak);
// a speaker sent back to the audience moves to /listen. Hands and reactions
// go on the session's control stream (docs/protocol.md: HAND, REACTION).
"use strict";

const EMOJI = ["👏", "❤️", "😂", "🎉", "🔥", "👍"];   // the node's fixed set, by index
const HAND = 8, REACTION = 9;
const stage = window.relayStage = { hand: false, sentReactions: 0 };

function stageMessage(kind, flags, sessionId, extra) {
  const body = new Uint8Array(4 + sessionId.length + extra.length);
  body.set([0x0b, 1, kind, flags]);
  body.set(sessionId, 4);
  body.set(extra, 4 + sessionId.length);
  const framed = new Uint8Array(2 + body.length);
  framed.set([body.length >> 8, body.length & 0xff]);
  framed.set(body, 2);
  return framed;
}

function elt(tag, text, onclick) {
  const el = document.createElement(tag);
  el.textContent = text;
  if (onclick) el.onclick = onclick;
  return el;
}

function pageFor(path) {
  const q = new URLSearchParams(location.search);
  q.delete("processing");
  return path + "?" + q.toString();
}

document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("audience");
  if (!box) return;
  const handButton = elt("button", "Raise hand", () => {
    stage.hand = !stage.hand;
    handButton.textContent = stage.hand ? "Lower hand" : "Raise hand";
    if (window.relaySend) window.relaySend((sid) => stageMessage(HAND, stage.hand ? 1 : 0, sid, []));
  });
  handButton.id = "hand";
  if (window.relaySpeaker) handButton.hidden = true;   // on stage already
  box.append(handButton);
  EMOJI.forEach((e, i) => {
    const b = elt("button", e, () => {
      stage.sentReactions++;
      if (window.relaySend) window.relaySend((sid) => stageMessage(REACTION, 0, sid, [i]));
    });
    b.className = "react";
    box.append(b);
  });
  const shown = elt("div", "");
  shown.id = "reactions";
  box.append(shown);
});

document.addEventListener("relay-stage", (ev) => {
  const msg = ev.detail;
  if (msg.type === "reactions") {
    const shown = document.getElementById("reactions");
    if (shown) shown.textContent = Object.entries(msg.counts).map(([i, n]) => EMOJI[i] + " " + n).join("  ");
  } else if (msg.type === "invite" && !window.relaySpeaker) {
    // the host asked us on stage: the speaker's page joins with our token
    location.href = pageFor("/speak");
  } else if (msg.type === "reject" && msg.reason === "audience" && window.relaySpeaker) {
    location.href = pageFor("/listen");
  }
});
