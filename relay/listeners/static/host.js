// The host's page: the room's stage from the node's /stage/ROOM API (polled
// every second) with a button per action, each a POST with the host's
// token (docs/speakers.md). window.relayHost holds the last state, for
// tests and for debugging from the console.
"use strict";

const hostParams = new URLSearchParams(location.search);
const hostRoom = hostParams.get("room") || "demo";
const host = window.relayHost = { state: "starting", error: "", stage: null, actions: 0 };
document.getElementById("room").textContent = hostRoom;

function showState(state, error) {
  host.state = state;
  host.error = error || "";
  const el = document.getElementById("state");
  el.textContent = state + (error ? ": " + error : "");
  el.className = state === "error" ? "error" : state === "hosting" ? "playing" : "";
}

async function stageApi(action, query) {
  const path = "/stage/" + encodeURIComponent(hostRoom) + (action ? "/" + action : "") + (query ? "?" + query : "");
  const answer = await fetch(path, { method: action ? "POST" : "GET",
    headers: { Authorization: "Bearer " + (hostParams.get("token") || "") } });
  const body = await answer.json();
  if (!answer.ok) throw new Error(body.error || answer.status);
  return body;
}

async function act(action, key, value) {
  try {
    await stageApi(action, key ? key + "=" + encodeURIComponent(value) : "");
    host.actions++;
    await refresh();
  } catch (e) {
    showState("error", action + ": " + e.message);
  }
}

function row(text, buttons) {
  const li = document.createElement("li");
  li.append(Object.assign(document.createElement("span"), { textContent: text }));
  for (const [label, onclick] of buttons) {
    const b = Object.assign(document.createElement("button"), { textContent: label, onclick });
    b.dataset.action = label.toLowerCase();
    li.append(b);
  }
  return li;
}

function render(s) {
  document.getElementById("on-stage").replaceChildren(...s.speakers.map((sp) => row(
    sp.name + (sp.muted ? " (muted)" : "") + (sp.speaking ? " · speaking" : ""), [
      [sp.muted ? "Unmute" : "Mute", () => act(sp.muted ? "unmute" : "mute", "speaker", sp.id)],
      ["Audience", () => act("audience", "speaker", sp.id)],
      ["Remove", () => act("remove", "sub", sp.id)]])));
  document.getElementById("hands").replaceChildren(...s.hands.map((h) => row(h.name + " (" + h.sub + ")", [
    ["Invite", () => act("invite", "sub", h.sub)], ["Remove", () => act("remove", "sub", h.sub)]])));
  document.getElementById("removed").replaceChildren(...Object.keys(s.removed).map((sub) => row(sub, [
    ["Let back", () => act("unban", "sub", sub)]])));
  document.getElementById("end").disabled = s.ended;
}

async function refresh() {
  try {
    host.stage = await stageApi("", "");
    render(host.stage);
    showState(host.stage.ended ? "ended" : "hosting");
  } catch (e) {
    showState("error", e.message);
  }
}

document.getElementById("end").onclick = () => act("end");
refresh();
setInterval(refresh, 1000);
