// Selaras reports: lists /v1/reports and shows one report's stored fragment (tables and inline SVG, rendered by
// the command that wrote it). No build step and no third-party code.
"use strict";

function readKey() {
  // A key in the fragment (#key=...) never reaches the server or its logs; kept for this tab only, and shared
  // with the /experiments page.
  const match = /(?:^|&)key=([^&]+)/.exec(location.hash.slice(1));
  if (match) {
    sessionStorage.setItem("selaras-key", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("selaras-key") || "";
}

let key = readKey();

async function api(path) {
  const response = await fetch(path, { headers: key ? { "X-API-Key": key } : {} });
  if (response.status === 401 || response.status === 403) {
    document.getElementById("key-form").hidden = false;
    throw new Error((await response.json()).detail || "unauthorized");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || String(response.status));
  return body;
}

function showError(error) {
  const box = document.getElementById("error");
  box.hidden = !error;
  box.textContent = error ? String(error.message || error) : "";
}

function el(tag, attributes, text) {
  const node = document.createElement(tag);
  Object.entries(attributes || {}).forEach(([name, value]) => node.setAttribute(name, value));
  if (text !== undefined) node.textContent = text;
  return node;
}

async function showList() {
  const body = await api("/v1/reports");
  const list = document.getElementById("reports");
  list.replaceChildren(...body.reports.map((report) => {
    const item = el("li", { "data-report": report.name });
    item.append(el("a", { href: `/reports/${encodeURIComponent(report.name)}` }, report.title),
      el("span", { class: "muted" }, ` · ${report.summary} · ${report.created_at}`));
    return item;
  }));
  document.getElementById("empty").hidden = body.reports.length > 0;
  document.getElementById("list").hidden = false;
  document.title = "Selaras · Reports";
}

async function showReport(name) {
  const report = await api(`/v1/reports/${encodeURIComponent(name)}`);
  document.title = `Selaras · ${report.title}`;
  document.getElementById("report-title").textContent = report.title;
  document.getElementById("report-meta").textContent = `${report.summary} · ${report.created_at}`;
  // The fragment was rendered by the command from its own figures (every label escaped); parsed as a document,
  // its scripts would not run, and the page's Content-Security-Policy allows none but this file anyway.
  const parsed = new DOMParser().parseFromString(report.html, "text/html");
  document.getElementById("report-body").replaceChildren(...parsed.body.childNodes);
  document.getElementById("report").hidden = false;
}

async function load() {
  const name = decodeURIComponent(location.pathname.replace(/^\/reports\/?/, ""));
  try {
    if (name) await showReport(name);
    else await showList();
    document.getElementById("key-form").hidden = true;
    showError(null);
  } catch (error) {
    showError(error);
  }
}

// A link with a key (#key=...) opened on this page already: read it and load again.
window.addEventListener("hashchange", () => {
  if (/(?:^|&)key=/.test(location.hash.slice(1))) {
    key = readKey();
    load();
  }
});

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = document.getElementById("api-key").value.trim();
  sessionStorage.setItem("selaras-key", key);
  load();
});
load();
