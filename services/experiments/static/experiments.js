// Selaras experiment dashboard: reads /v1/experiments and /v1/experiments/{key}/report, draws plain SVG.
// No build step and no third-party code; every value is inserted as text, never as HTML.
"use strict";

const STRINGS = {
  id: {
    title: "Eksperimen",
    apiKey: "Kunci API (admin)",
    load: "Muat",
    needKey: "Halaman ini memerlukan kunci API dengan cakupan admin. Kunci hanya disimpan di tab ini.",
    experiments: "Daftar eksperimen",
    noExperiments: "Belum ada eksperimen di experiments.yaml.",
    status: { running: "berjalan", scheduled: "terjadwal", ended: "selesai", disabled: "nonaktif" },
    armsTitle: "Varian",
    arm: "Varian",
    kind: "Peringkat",
    personalized: "dipersonalisasi",
    generic: "umum (populer sesuai konteks)",
    weight: "Bobot",
    visitors: "Pengunjung",
    share: "Porsi",
    holdout: "holdout (tanpa personalisasi)",
    trafficSplit: "Pembagian trafik",
    observed: "teramati",
    expected: "diharapkan",
    upliftTitle: "Kenaikan vs kontrol",
    ci: "Selang kepercayaan 95%",
    alwaysValid: "Selang selalu-valid (aman dilihat setiap hari)",
    metric: "Metrik",
    uplift: "Kenaikan",
    pValue: "nilai p",
    pHolm: "p (Holm)",
    pBH: "p (BH)",
    chance: "Peluang menang",
    targeting: "Sasaran",
    everybody: "semua pengunjung",
    cuped: "Kenaikan CUPED",
    cupedCi: "Selang 95% CUPED",
    varianceReduction: "Pengurangan varians",
    manage: "Kelola (kunci admin)",
    start: "Mulai",
    stop: "Hentikan",
    coverage: "Cakupan (%)",
    weights: "Bobot (%)",
    rebalance: "acak ulang semua pengunjung (hasil mulai dari nol)",
    apply: "Terapkan",
    winner: "Varian pemenang",
    promoteConfirm: "akhiri eksperimen",
    promote: "Promosikan",
    saving: "Menyimpan…",
    saved: "Tersimpan: {status} (generasi {generation})",
    confirmFirst: "Centang \"akhiri eksperimen\" dulu: promosi mengakhiri eksperimen.",
    cumulative: "Kenaikan kumulatif",
    day: "Hari",
    bySlot: "Per slot",
    byPersona: "Per persona (dibekukan saat paparan pertama)",
    group: "Kelompok",
    noData: "Belum ada data.",
    srmOk: "Pembagian trafik sesuai konfigurasi (uji SRM p = {p}).",
    srmWarning: "Ketidaksesuaian rasio sampel (SRM, p = {p}): pembagian atau pencatatan bermasalah. Jangan percayai kenaikan di bawah ini.",
    period: "Periode",
    window: "jendela atribusi {h} jam",
    verdict: "Kesimpulan",
    ready: "siap diputuskan",
    notReady: "belum siap",
    decisions: {
      ship_treatment: "Varian perlakuan menang",
      keep_control: "Pertahankan kontrol",
      no_detectable_difference: "Tidak ada perbedaan yang terdeteksi",
      keep_running: "Lanjutkan eksperimen",
      investigate_srm: "Periksa SRM terlebih dahulu",
      investigate_guardrail: "Periksa metrik pengaman",
    },
    reasons: {
      srm: "ketidaksesuaian rasio sampel (p = {p_value}): penugasan atau pencatatan rusak",
      min_sample: "varian terkecil baru memiliki {smallest} dari {required} pengunjung yang dibutuhkan",
      winner: "{arm} mengalahkan {control} pada {metric} sebesar {uplift}; selang selalu-valid tidak memuat nol",
      guardrail: "{arm} menang pada {metric} tetapi lebih buruk pada {harmed}",
      loser: "semua varian lebih buruk daripada {control}",
      planned_reached: "target {planned} pengunjung tercapai tanpa perbedaan yang jelas",
      no_difference_yet: "belum ada perbedaan yang jelas; {total} dari {planned} pengunjung yang direncanakan",
    },
    metrics: {
      ctr: "CTR (klik per tayangan)",
      conversion: "Konversi (pengunjung membeli)",
      revenue: "Pendapatan per pengunjung",
      add_to_cart: "Tambah ke keranjang",
      open_rate: "Rasio buka pesan",
    },
    methodNote:
      "Unit analisis adalah pengunjung. Kenaikan relatif memakai uji Welch (metode delta atau log-rasio); selang selalu-valid tetap sah walau hasil dilihat berkali-kali. CUPED menyesuaikan dengan nilai metrik sebelum paparan pertama (pengurangan varians = seberapa sempit selangnya). p (Holm) mengoreksi banyak metrik, p (BH) mengoreksi banyak segmen.",
  },
  en: {
    title: "Experiments",
    apiKey: "API key (admin)",
    load: "Load",
    needKey: "This page needs an API key with the admin scope. The key is kept in this tab only.",
    experiments: "Experiments",
    noExperiments: "No experiments in experiments.yaml yet.",
    status: { running: "running", scheduled: "scheduled", ended: "ended", disabled: "disabled" },
    armsTitle: "Arms",
    arm: "Arm",
    kind: "Ranking",
    personalized: "personalized",
    generic: "generic (popular in context)",
    weight: "Weight",
    visitors: "Visitors",
    share: "Share",
    holdout: "holdout (never personalized)",
    trafficSplit: "Traffic split",
    observed: "observed",
    expected: "expected",
    upliftTitle: "Uplift vs control",
    ci: "95% confidence interval",
    alwaysValid: "Always-valid interval (safe to check daily)",
    metric: "Metric",
    uplift: "Uplift",
    pValue: "p-value",
    pHolm: "p (Holm)",
    pBH: "p (BH)",
    chance: "Chance to win",
    targeting: "Targeting",
    everybody: "every visitor",
    cuped: "CUPED uplift",
    cupedCi: "CUPED 95% interval",
    varianceReduction: "Variance reduction",
    manage: "Manage (admin key)",
    start: "Start",
    stop: "Stop",
    coverage: "Coverage (%)",
    weights: "Weights (%)",
    rebalance: "re-randomize everybody (results start from zero)",
    apply: "Apply",
    winner: "Winning arm",
    promoteConfirm: "end the experiment",
    promote: "Promote",
    saving: "Saving…",
    saved: "Saved: {status} (generation {generation})",
    confirmFirst: "Tick \"end the experiment\" first: promoting ends the experiment.",
    cumulative: "Cumulative uplift",
    day: "Day",
    bySlot: "By slot",
    byPersona: "By persona (frozen at first exposure)",
    group: "Group",
    noData: "No data yet.",
    srmOk: "Traffic split matches the configuration (SRM test p = {p}).",
    srmWarning: "Sample ratio mismatch (SRM, p = {p}): assignment or logging is broken. Do not trust the uplift below.",
    period: "Period",
    window: "attribution window {h} h",
    verdict: "Verdict",
    ready: "ready to decide",
    notReady: "not ready",
    decisions: {
      ship_treatment: "Treatment wins",
      keep_control: "Keep control",
      no_detectable_difference: "No detectable difference",
      keep_running: "Keep running",
      investigate_srm: "Investigate the SRM first",
      investigate_guardrail: "Check the guardrail metrics",
    },
    reasons: {
      srm: "sample ratio mismatch (p = {p_value}): assignment or logging is broken",
      min_sample: "the smallest arm has {smallest} of the {required} visitors required",
      winner: "{arm} beats {control} on {metric} by {uplift}; the always-valid interval excludes zero",
      guardrail: "{arm} wins on {metric} but is worse on {harmed}",
      loser: "every arm is worse than {control}",
      planned_reached: "the planned {planned} visitors were reached without a clear difference",
      no_difference_yet: "no clear difference yet; {total} of the planned {planned} visitors",
    },
    metrics: {
      ctr: "CTR (clicks per impression)",
      conversion: "Conversion (visitor bought)",
      revenue: "Revenue per visitor",
      add_to_cart: "Add-to-cart rate",
      open_rate: "Message open rate",
    },
    methodNote:
      "The unit of analysis is the visitor. Relative uplift uses a Welch test (delta or log-ratio method); the always-valid interval stays valid however often you look. CUPED adjusts for each visitor's value of the metric before the first exposure (variance reduction = how much narrower its interval is). p (Holm) corrects for several metrics, p (BH) for several segments.",
  },
};
const ARM_COLORS = ["#64748b", "#0a7d4f", "#7c3aed", "#b45309", "#0369a1", "#be185d", "#4d7c0f", "#9f1239"];
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  lang: pickLanguage(),
  key: readKey(),
  experiments: [],
  selected: null,
  report: null,
};

function pickLanguage() {
  const asked = new URLSearchParams(location.search).get("lang");
  if (asked === "en" || asked === "id") return asked;
  const saved = sessionStorage.getItem("selaras-lang");
  return saved === "en" || saved === "id" ? saved : "id";
}

function readKey() {
  // A key in the fragment (#key=...) never reaches the server or its logs; keep it for this tab only.
  const match = /(?:^|&)key=([^&]+)/.exec(location.hash.slice(1));
  if (match) {
    sessionStorage.setItem("selaras-key", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("selaras-key") || "";
}

function t(path) {
  return path.split(".").reduce((node, part) => (node == null ? node : node[part]), STRINGS[state.lang]) ?? path;
}

function fill(template, params) {
  return template.replace(/\{(\w+)\}/g, (_, name) => (params[name] === undefined ? "" : String(params[name])));
}

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

const fmt = {
  pct(v, digits = 1) {
    return v == null ? "–" : `${v > 0 ? "+" : ""}${(v * 100).toFixed(digits)}%`;
  },
  p(v) {
    if (v == null) return "–";
    return v < 0.0001 ? "<0.0001" : v.toFixed(4);
  },
  num(v, digits = 0) {
    return v == null ? "–" : Number(v).toLocaleString(state.lang === "id" ? "id-ID" : "en-US", {
      maximumFractionDigits: digits, minimumFractionDigits: digits,
    });
  },
  metric(name, v) {
    if (v == null) return "–";
    if (name === "revenue") return `Rp ${fmt.num(v, 0)}`;
    return `${(v * 100).toFixed(2)}%`;
  },
};

async function api(path) {
  const headers = state.key ? { "X-API-Key": state.key } : {};
  const response = await fetch(path, { headers });
  if (response.status === 401 || response.status === 403) {
    document.getElementById("key-form").hidden = false;
    throw new Error((await response.json()).detail || "unauthorized");
  }
  if (!response.ok) throw new Error(`${response.status} ${await response.text()}`);
  return response.json();
}

async function send(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers["X-API-Key"] = state.key;
  const response = await fetch(path, { method, headers, body: JSON.stringify(body) });
  const answer = await response.json().catch(() => ({}));
  if (response.status === 401 || response.status === 403) {
    document.getElementById("key-form").hidden = false;
  }
  if (!response.ok) {
    // The error envelope: {"error", "detail", "errors": [{"field", "message"}]} (422 names the field).
    const fields = (answer.errors || []).map((e) => `${e.field}: ${e.message}`).join("; ");
    throw new Error(`${response.status} ${answer.detail || answer.error || ""}${fields ? ` (${fields})` : ""}`);
  }
  return answer;
}

function showError(error) {
  const box = document.getElementById("error");
  box.hidden = !error;
  box.textContent = error ? String(error.message || error) : "";
}

async function loadList() {
  try {
    const body = await api("/v1/experiments");
    state.experiments = body.experiments;
    document.getElementById("key-form").hidden = true;
    showError(null);
    const wanted = new URLSearchParams(location.search).get("experiment");
    const first = state.experiments.find((e) => e.key === wanted) || state.experiments.find((e) => e.enabled) || state.experiments[0];
    renderList();
    if (first) await select(first.key);
  } catch (error) {
    showError(error);
  }
}

async function select(key) {
  state.selected = key;
  renderList();
  try {
    state.report = await api(`/v1/experiments/${encodeURIComponent(key)}/report`);
    showError(null);
    renderReport();
  } catch (error) {
    showError(error);
  }
}

function renderStatic() {
  document.documentElement.lang = state.lang;
  document.title = `Selaras · ${t("title")}`;
  for (const node of document.querySelectorAll("[data-i18n]")) node.textContent = t(node.dataset.i18n);
  for (const button of document.querySelectorAll(".lang button")) {
    button.classList.toggle("active", button.dataset.lang === state.lang);
  }
}

function renderList() {
  const list = document.getElementById("experiment-list");
  list.replaceChildren();
  if (!state.experiments.length) {
    list.append(el("li", {}, t("noExperiments")));
    return;
  }
  for (const experiment of state.experiments) {
    const link = el("a", { href: `?experiment=${encodeURIComponent(experiment.key)}`, "data-key": experiment.key }, experiment.key);
    link.append(el("span", { class: `status ${experiment.status}` }, t(`status.${experiment.status}`)));
    if (experiment.key === state.selected) link.classList.add("active");
    link.addEventListener("click", (event) => {
      event.preventDefault();
      history.replaceState(null, "", `?experiment=${encodeURIComponent(experiment.key)}&lang=${state.lang}`);
      select(experiment.key);
    });
    const item = el("li");
    item.append(link);
    list.append(item);
  }
}

function armColor(report, name) {
  const index = report.arms.findIndex((arm) => arm.name === name);
  return ARM_COLORS[index < 0 ? 0 : index % ARM_COLORS.length];
}

function renderReport() {
  const report = state.report;
  if (!report) return;
  document.getElementById("detail").hidden = false;
  document.getElementById("experiment-title").textContent = report.key;
  document.getElementById("experiment-description").textContent = report.description || "";
  const config = state.experiments.find((e) => e.key === report.key) || {};
  const period = [report.start, report.end].map((v) => (v ? v.slice(0, 10) : "…")).join(" → ");
  document.getElementById("experiment-meta").textContent =
    `${t(`status.${report.status}`)} · ${t("period")}: ${period}` +
    (config.attribution_window_hours ? ` · ${fill(t("window"), { h: config.attribution_window_hours })}` : "") +
    ` · ${t("targeting")}: ${describeAudience(config)}`;
  renderSrm(report);
  renderVerdict(report);
  renderControls(report);
  renderArms(report);
  renderSplit(report);
  renderUplift(report);
  renderTimeline(report);
  renderBreakdown("slot-table", report, report.breakdowns.slot);
  renderBreakdown("persona-table", report, report.breakdowns.persona);
}

function describeAudience(config) {
  // Who may enter: the targeting conditions and the namespace range, as configured.
  const parts = Object.entries(config.targeting || {})
    .filter(([, value]) => value != null)
    .map(([name, value]) => `${name} = ${Array.isArray(value) ? value.join(", ") : value}`);
  if (config.namespace) {
    const [start, end] = config.namespace_range || [0, 1];
    parts.push(`namespace ${config.namespace} [${start}, ${end})`);
  }
  return parts.length ? parts.join("; ") : t("everybody");
}

function renderSrm(report) {
  const warning = document.getElementById("srm-warning");
  const ok = document.getElementById("srm-ok");
  const p = fmt.p(report.srm.p_value);
  warning.hidden = !report.srm.flagged;
  ok.hidden = report.srm.flagged || report.srm.p_value == null;
  warning.textContent = fill(t("srmWarning"), { p });
  ok.textContent = fill(t("srmOk"), { p });
}

function renderVerdict(report) {
  const box = document.getElementById("verdict");
  const verdict = report.verdict;
  box.replaceChildren();
  box.className = `banner${verdict.ready ? " ready" : ""}`;
  box.dataset.decision = verdict.decision;
  box.append(el("strong", {}, `${t("verdict")}: ${t(`decisions.${verdict.decision}`)} (${verdict.ready ? t("ready") : t("notReady")})`));
  const list = el("ul");
  for (const reason of verdict.reasons) {
    const params = { ...reason.params };
    if (params.uplift !== undefined) params.uplift = fmt.pct(params.uplift);
    if (params.p_value !== undefined) params.p_value = fmt.p(params.p_value);
    if (params.metric) params.metric = t(`metrics.${params.metric}`);
    if (Array.isArray(params.harmed)) params.harmed = params.harmed.map((m) => t(`metrics.${m}`)).join(", ");
    for (const name of ["smallest", "total", "required", "planned"]) {
      if (params[name] !== undefined) params[name] = fmt.num(params[name]);
    }
    const template = t(`reasons.${reason.code}`);
    list.append(el("li", {}, template === `reasons.${reason.code}` ? reason.text : fill(template, params)));
  }
  box.append(list);
}

function renderArms(report) {
  const table = document.getElementById("arms-table");
  const head = el("tr");
  for (const label of [t("arm"), t("kind"), t("weight"), t("visitors"), t("share")]) head.append(el("th", {}, label));
  for (const metric of report.metrics) head.append(el("th", {}, t(`metrics.${metric.name}`)));
  table.tHead.replaceChildren(head);
  const body = table.tBodies[0];
  body.replaceChildren();
  const rows = report.arms.map((arm) => ({ ...arm, label: arm.name }));
  if (report.holdout) rows.push({ name: "holdout", label: t("holdout"), holdout: true, ...report.holdout });
  for (const arm of rows) {
    const row = el("tr", { "data-arm": arm.name });
    const name = el("td", {}, arm.label);
    name.style.borderLeft = `4px solid ${arm.holdout ? "#94a3b8" : armColor(report, arm.name)}`;
    row.append(name);
    row.append(el("td", {}, arm.holdout ? "–" : arm.personalized ? t("personalized") : t("generic")));
    row.append(el("td", {}, arm.holdout ? "–" : fmt.num(arm.weight * 100, 0) + "%"));
    row.append(el("td", { "data-field": "n" }, fmt.num(arm.n)));
    row.append(el("td", {}, arm.share == null ? "–" : fmt.num(arm.share * 100, 1) + "%"));
    for (const metric of report.metrics) {
      const summary = arm.metrics[metric.name] || {};
      row.append(el("td", { "data-metric": metric.name }, fmt.metric(metric.name, summary.mean)));
    }
    body.append(row);
  }
}

function renderSplit(report) {
  const box = document.getElementById("traffic-split");
  box.replaceChildren();
  const total = Object.values(report.srm.observed).reduce((a, b) => a + b, 0);
  for (const [kind, values] of [["observed", report.srm.observed], ["expected", report.srm.expected]]) {
    const label = el("div", { class: "muted" }, t(kind));
    const bar = el("div", { class: "split-bar", "data-split": kind });
    for (const arm of report.arms) {
      const share = total ? values[arm.name] / total : arm.weight;
      const part = el("div", {}, `${arm.name} ${fmt.num(share * 100, 1)}%`);
      part.style.width = `${Math.max(share * 100, 0)}%`;
      part.style.background = armColor(report, arm.name);
      bar.append(part);
    }
    box.append(label, bar);
  }
}

function renderUplift(report) {
  const holder = document.getElementById("uplift-chart");
  holder.replaceChildren();
  const results = report.results;
  const values = results.flatMap((r) => [r.ci_lower, r.ci_upper, r.always_valid.ci_lower, r.always_valid.ci_upper, r.uplift])
    .filter((v) => v != null && Number.isFinite(v));
  const span = Math.min(Math.max(0.05, ...values.map(Math.abs)) * 1.15, 5);
  const width = 760, rowHeight = 34, left = 230, right = 70;
  const height = Math.max(rowHeight * results.length + 30, 60);
  const chart = svg("svg", { id: "uplift-svg", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  const x = (v) => left + ((Math.max(-span, Math.min(span, v)) + span) / (2 * span)) * (width - left - right);
  chart.append(svg("line", { x1: x(0), x2: x(0), y1: 0, y2: height - 20, stroke: "#1c2430", "stroke-width": 1 }));
  for (const tick of [-span, -span / 2, span / 2, span]) {
    chart.append(svg("text", { x: x(tick), y: height - 6, "text-anchor": "middle" }, fmt.pct(tick, 0)));
  }
  results.forEach((result, i) => {
    const y = 10 + i * rowHeight;
    const label = `${t(`metrics.${result.metric}`)}${report.arms.length > 2 ? ` · ${result.arm}` : ""}`;
    chart.append(svg("text", { x: 4, y: y + 14 }, label));
    const group = svg("g", {
      class: "uplift-row",
      "data-metric": result.metric,
      "data-arm": result.arm,
      "data-uplift": result.uplift ?? "",
      "data-ci-lower": result.ci_lower ?? "",
      "data-ci-upper": result.ci_upper ?? "",
    });
    const valid = result.always_valid;
    if (valid.ci_lower != null && valid.ci_upper != null) {
      group.append(svg("rect", { x: x(valid.ci_lower), y: y + 2, width: Math.max(x(valid.ci_upper) - x(valid.ci_lower), 1), height: 18, fill: "#9ec5fe" }));
    }
    if (result.uplift != null) {
      const start = Math.min(x(0), x(result.uplift));
      const color = result.uplift >= 0 ? "#0a7d4f" : "#b42318";
      group.append(svg("rect", { class: "bar", x: start, y: y + 6, width: Math.max(Math.abs(x(result.uplift) - x(0)), 1), height: 10, fill: color }));
    }
    if (result.ci_lower != null && result.ci_upper != null) {
      group.append(svg("line", { x1: x(result.ci_lower), x2: x(result.ci_upper), y1: y + 11, y2: y + 11, stroke: "#1d4ed8", "stroke-width": 3 }));
      for (const end of [result.ci_lower, result.ci_upper]) {
        group.append(svg("line", { x1: x(end), x2: x(end), y1: y + 4, y2: y + 18, stroke: "#1d4ed8", "stroke-width": 3 }));
      }
    }
    group.append(svg("text", { x: width - right + 6, y: y + 14 }, fmt.pct(result.uplift)));
    chart.append(group);
  });
  holder.append(chart);

  const table = document.getElementById("results-table");
  const head = el("tr");
  const labels = [t("metric"), t("arm"), t("uplift"), t("ci"), t("alwaysValid"), t("pValue"), t("pHolm"), t("chance"),
    t("cuped"), t("cupedCi"), t("varianceReduction")];
  for (const label of labels) {
    head.append(el("th", {}, label));
  }
  table.tHead.replaceChildren(head);
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const r of results) {
    const row = el("tr", { "data-metric": r.metric, "data-arm": r.arm });
    row.append(el("td", {}, t(`metrics.${r.metric}`)), el("td", {}, r.arm));
    row.append(el("td", { class: r.significant ? (r.uplift > 0 ? "pos" : "neg") : "" }, fmt.pct(r.uplift)));
    row.append(el("td", {}, `${fmt.pct(r.ci_lower)} … ${fmt.pct(r.ci_upper)}`));
    row.append(el("td", {}, `${fmt.pct(r.always_valid.ci_lower)} … ${fmt.pct(r.always_valid.ci_upper)}`));
    row.append(el("td", {}, fmt.p(r.p_value)), el("td", {}, fmt.p(r.p_value_holm)));
    row.append(el("td", {}, r.chance_to_win == null ? "–" : `${(r.chance_to_win * 100).toFixed(1)}%`));
    // CUPED beside the unadjusted numbers: adjusted uplift and interval, and how much variance it removed.
    const c = r.cuped || {};
    row.append(el("td", { "data-field": "cuped-uplift", class: c.significant ? (c.uplift > 0 ? "pos" : "neg") : "" }, fmt.pct(c.uplift)));
    row.append(el("td", { "data-field": "cuped-ci" }, r.cuped ? `${fmt.pct(c.ci_lower)} … ${fmt.pct(c.ci_upper)}` : "–"));
    const reduction = c.variance_reduction_pct;
    row.append(el("td", { "data-field": "variance-reduction", "data-value": reduction ?? "" },
      reduction == null ? "–" : `${reduction.toFixed(1)}%`));
    body.append(row);
  }
}

function renderControls(report) {
  const config = state.experiments.find((e) => e.key === report.key) || {};
  const ended = config.winner != null;
  document.getElementById("control-start").disabled = Boolean(config.enabled) || ended;
  document.getElementById("control-stop").disabled = !config.enabled;
  document.getElementById("control-coverage").value = config.coverage == null ? "" : Math.round(config.coverage * 1000) / 10;
  const weights = document.getElementById("control-weights");
  weights.replaceChildren();
  const select = document.getElementById("control-arm");
  select.replaceChildren();
  for (const arm of config.arms || []) {
    const label = el("label", {}, `${arm.name} `);
    label.append(el("input", { type: "number", min: "0", max: "100", step: "1", "data-weight-of": arm.name, value: String(Math.round(arm.weight * 1000) / 10) }));
    weights.append(label);
    if (arm.name !== config.control) select.append(el("option", { value: arm.name }, arm.name));
  }
  select.append(el("option", { value: config.control || "" }, config.control || ""));
  document.getElementById("control-promote").disabled = ended;
}

async function change(method, suffix, body) {
  const key = state.selected;
  const status = document.getElementById("admin-status");
  status.dataset.state = "pending";
  status.textContent = t("saving");
  try {
    const answer = await send(method, `/v1/experiments/${encodeURIComponent(key)}${suffix}`, body);
    state.experiments = (await api("/v1/experiments")).experiments;
    await select(key);
    // Said once the page shows the new state (the controls follow it), not before.
    status.dataset.state = "ok";
    status.textContent = fill(t("saved"), { status: t(`status.${answer.status}`), generation: answer.generation });
  } catch (error) {
    status.dataset.state = "error";
    status.textContent = String(error.message || error);
  }
}

function bindControls() {
  document.getElementById("control-start").addEventListener("click", () => change("PATCH", "", { enabled: true }));
  document.getElementById("control-stop").addEventListener("click", () => change("PATCH", "", { enabled: false }));
  document.getElementById("control-coverage-apply").addEventListener("click", () => {
    const percent = Number(document.getElementById("control-coverage").value);
    change("PATCH", "", { coverage: percent / 100 });
  });
  document.getElementById("control-weights-apply").addEventListener("click", () => {
    const weights = {};
    for (const input of document.querySelectorAll("#control-weights input")) weights[input.dataset.weightOf] = Number(input.value) / 100;
    change("PATCH", "", { weights, rebalance: document.getElementById("control-rebalance").checked });
  });
  document.getElementById("control-promote").addEventListener("click", () => {
    if (!document.getElementById("control-promote-confirm").checked) {
      const status = document.getElementById("admin-status");
      status.dataset.state = "error";
      status.textContent = t("confirmFirst");
      return;
    }
    change("POST", "/promote", { arm: document.getElementById("control-arm").value });
  });
}

function renderTimeline(report) {
  const holder = document.getElementById("timeline-chart");
  holder.replaceChildren();
  document.getElementById("timeline-metric").textContent = t(`metrics.${report.primary_metric}`);
  const arm = report.arms.find((a) => a.name !== report.control);
  const points = report.timeline
    .map((p) => ({ day: p.day, ...(p.arms[arm ? arm.name : ""] || {}) }))
    .filter((p) => p.uplift != null);
  if (!points.length) {
    holder.append(el("p", { class: "muted" }, t("noData")));
    return;
  }
  const width = 760, height = 260, left = 56, right = 16, top = 12, bottom = 34;
  // Scale on the uplift and its fixed interval: the early always-valid band is very wide and is clipped.
  const values = points.flatMap((p) => [p.uplift, p.ci_lower, p.ci_upper]).filter((v) => v != null && Number.isFinite(v));
  const span = Math.min(Math.max(0.05, ...values.map(Math.abs)) * 1.1, 5);
  const x = (i) => left + (points.length === 1 ? 0.5 : i / (points.length - 1)) * (width - left - right);
  const y = (v) => top + (1 - (Math.max(-span, Math.min(span, v)) + span) / (2 * span)) * (height - top - bottom);
  const chart = svg("svg", { id: "timeline-svg", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "data-points": points.length });
  for (const tick of [-span, -span / 2, 0, span / 2, span]) {
    chart.append(svg("line", { x1: left, x2: width - right, y1: y(tick), y2: y(tick), stroke: tick === 0 ? "#1c2430" : "#e5e7eb" }));
    chart.append(svg("text", { x: left - 6, y: y(tick) + 4, "text-anchor": "end" }, fmt.pct(tick, 0)));
  }
  const band = (lowerKey, upperKey, fill) => {
    const usable = points.map((p, i) => [i, p[lowerKey], p[upperKey]]).filter(([, lo, hi]) => lo != null && hi != null);
    if (usable.length < 1) return;
    const upper = usable.map(([i, , hi]) => `${x(i)},${y(hi)}`);
    const lower = usable.reverse().map(([i, lo]) => `${x(i)},${y(lo)}`);
    chart.append(svg("polygon", { points: [...upper, ...lower].join(" "), fill, "fill-opacity": 0.55 }));
  };
  band("always_valid_lower", "always_valid_upper", "#9ec5fe");
  band("ci_lower", "ci_upper", "#60a5fa");
  chart.append(svg("polyline", {
    class: "uplift-line",
    points: points.map((p, i) => `${x(i)},${y(p.uplift)}`).join(" "),
    fill: "none",
    stroke: "#c2410c",
    "stroke-width": 3,
  }));
  points.forEach((p, i) => {
    chart.append(svg("circle", { cx: x(i), cy: y(p.uplift), r: 3.5, fill: "#c2410c", "data-day": p.day, "data-uplift": p.uplift }));
  });
  const step = Math.max(1, Math.ceil(points.length / 8));
  points.forEach((p, i) => {
    if (i % step === 0 || i === points.length - 1) {
      chart.append(svg("text", { x: x(i), y: height - 10, "text-anchor": "middle" }, p.day.slice(5)));
    }
  });
  holder.append(chart);
}

function renderBreakdown(id, report, rows) {
  const table = document.getElementById(id);
  const metric = report.primary_metric;
  const head = el("tr");
  head.append(el("th", {}, t("group")));
  for (const arm of report.arms) head.append(el("th", {}, `${t("visitors")} ${arm.name}`));
  for (const label of [t(`metrics.${metric}`), t("uplift"), t("ci"), t("pBH")]) head.append(el("th", {}, label));
  table.tHead.replaceChildren(head);
  const body = table.tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const row = el("tr");
    row.append(el("td", { colspan: String(report.arms.length + 5) }, t("noData")));
    body.append(row);
    return;
  }
  for (const group of rows) {
    const result = group.results.find((r) => r.metric === metric) || {};
    const row = el("tr", { "data-group": group.group });
    row.append(el("td", {}, group.group));
    for (const arm of report.arms) row.append(el("td", {}, fmt.num((group.arms[arm.name] || {}).n)));
    const means = report.arms.map((arm) => fmt.metric(metric, (((group.arms[arm.name] || {}).metrics || {})[metric] || {}).mean));
    row.append(el("td", {}, means.join(" / ")));
    row.append(el("td", { class: result.significant_bh ? (result.uplift > 0 ? "pos" : "neg") : "" }, fmt.pct(result.uplift)));
    row.append(el("td", {}, `${fmt.pct(result.ci_lower)} … ${fmt.pct(result.ci_upper)}`));
    row.append(el("td", {}, fmt.p(result.p_value_bh)));
    body.append(row);
  }
}

function init() {
  renderStatic();
  for (const button of document.querySelectorAll(".lang button")) {
    button.addEventListener("click", () => {
      state.lang = button.dataset.lang;
      sessionStorage.setItem("selaras-lang", state.lang);
      renderStatic();
      renderList();
      renderReport();
    });
  }
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = document.getElementById("api-key").value.trim();
    sessionStorage.setItem("selaras-key", state.key);
    loadList();
  });
  bindControls();
  loadList();
}

init();
