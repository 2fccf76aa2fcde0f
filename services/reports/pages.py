"""The HTML reports: a ranking evaluation (`selaras evaluate ranking`) and a persona model (`selaras personas`),
each one HTML fragment with its tables and inline SVG plots, built from the JSON those commands already produce.

A report is rendered once, by the command, and stored as it is (store.py): the recommend service serves what was
rendered and never re-computes a figure. `document` wraps a fragment into a standalone page (the copy the command
writes to the data directory, readable without any service).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path
from typing import Any, Final, Literal

from services.reports.svg import Bar, Interval, bar_chart, heatmap, interval_chart

Kind = Literal["ranking", "personas"]
NAME: Final = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
CSS_FILE: Final = Path(__file__).resolve().parent / "static" / "reports.css"
PIPELINE: Final = "lightgbm_pipeline"  # the served pipeline's key in an evaluation (recommend/evaluation.py)
METHOD_LABELS: Final = {
    PIPELINE: "LightGBM (served)",
    "popular": "popular",
    "popular_24h": "popular 24 h",
    "popular_7d": "popular 7 days",
    "covisitation": "co-visitation",
    "lightgbm_no_personal": "LightGBM, no personal",
}


@dataclass(frozen=True)
class Report:
    name: str
    kind: Kind
    title: str
    created_at: str  # ISO 8601, when the command rendered it
    summary: str  # one line for the list of reports
    html: str  # the fragment: headings, tables and <svg> plots

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ValueError(f"report name {self.name!r}: lower-case letters, digits, '.', '_', '-' (max 64)")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _num(value: Any, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _pct(value: float) -> str:
    return f"{value:.0%}" if abs(value) >= 0.1 or value == 0 else f"{value:.1%}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], kind: str) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    table = f'<table class="{kind}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="table-wrap">{table}</div>'


def _figure(figure_id: str, caption: str, svg: str) -> str:
    return f'<figure id="{figure_id}">{svg}<figcaption>{escape(caption)}</figcaption></figure>'


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def ranking_report(evaluation: Mapping[str, Any], name: str, created_at: str) -> Report:
    """NDCG and hit rate with 95% intervals per method, the served pipeline minus each baseline, candidate
    recall per method and per candidate generator, and every metric in a table."""
    config, counts, methods = evaluation["config"], evaluation["counts"], evaluation["methods"]
    ks = sorted(int(k) for k in config["ks"])
    k = 10 if 10 in ks else ks[len(ks) // 2]  # the cut-off with intervals (recommend/evaluation.py _primary_k)
    order = sorted(methods, key=lambda m: (m != PIPELINE, -(methods[m].get(f"ndcg@{k}") or 0.0)))

    def intervals(metric: str) -> list[Interval]:
        return [
            Interval(
                _label(m),
                float(methods[m][f"{metric}@{k}"]),
                methods[m].get(f"{metric}@{k}_ci95_low"),
                methods[m].get(f"{metric}@{k}_ci95_high"),
                highlight=m == PIPELINE,
            )
            for m in order
        ]

    parts = [
        f'<p class="meta">Protocol <b>{escape(config["protocol"])}</b>, target <b>{escape(config["target"])}</b>: '
        f"{counts.get('test_queries', 0):,} test queries from {counts.get('visitors_evaluated', 0):,} visitors "
        f"({counts.get('visitors_skipped_few_interactions', 0):,} skipped with fewer than "
        f"{config.get('min_interactions', 3)} interactions); {counts.get('train_queries', 0):,} training queries. "
        "Intervals are 95%, clustered by visitor.</p>",
        f"<h2>NDCG@{k}</h2>",
        _figure("ndcg", f"NDCG@{k} per method, 95% interval", interval_chart(f"NDCG@{k}", intervals("ndcg"), _num)),
        f"<h2>Hit rate@{k}</h2>",
        _figure("hit-rate", f"HR@{k} per method, 95% interval", interval_chart(f"HR@{k}", intervals("hr"), _num)),
    ]
    comparisons = evaluation.get("comparisons") or {}
    if comparisons:
        rows = [
            Interval(
                f"− {_label(m)}", float(next(iter(d.values()))), d.get("ci95_low"), d.get("ci95_high"), highlight=True
            )
            for m, d in comparisons.items()
        ]
        parts += [
            f"<h2>Served pipeline minus each baseline (NDCG@{k})</h2>",
            _figure(
                "differences",
                "Paired difference per test query; an interval right of zero means the pipeline is better",
                interval_chart(f"NDCG@{k} difference", rows, lambda v: f"{v:+.4f}", zero_line=True),
            ),
        ]
    recall = [Bar(_label(m), float(methods[m].get("candidate_recall") or 0.0), m == PIPELINE) for m in order]
    parts += [
        "<h2>Candidate recall</h2>",
        _figure(
            "candidate-recall",
            "Share of test targets among each method's candidates (a target no candidate holds is a miss)",
            bar_chart("candidate recall", recall, _pct),
        ),
    ]
    generators = evaluation.get("generator_recall") or {}
    if generators:
        bars = [Bar(source, float(share)) for source, share in generators.items()]
        parts += [
            "<h2>Recall per candidate generator</h2>",
            _figure(
                "generator-recall",
                "Share of test targets first proposed by each generator of the served pipeline (they add up to its "
                "candidate recall)",
                bar_chart("recall per generator", bars, _pct),
            ),
        ]
    metrics = [f"{m}@{cut}" for cut in ks for m in ("hr", "ndcg", "mrr")] + ["coverage", "candidate_recall"]
    rows_ = [[metric, *(_num(methods[m].get(metric)) for m in order)] for metric in metrics]
    parts += ["<h2>All metrics</h2>", _table(["metric", *(_label(m) for m in order)], rows_, "metrics")]
    pipeline = methods.get(PIPELINE, {})
    summary = (
        f"{config['protocol']}, target {config['target']}: NDCG@{k} {_num(pipeline.get(f'ndcg@{k}'))}, "
        f"HR@{k} {_num(pipeline.get(f'hr@{k}'))} ({counts.get('test_queries', 0):,} queries)"
    )
    title = f"Ranking evaluation ({config['protocol']}, target {config['target']})"
    return Report(name, "ranking", title, created_at, summary, "".join(parts))


def personas_report(
    report: Mapping[str, Any],
    personas: Sequence[Mapping[str, Any]],
    trait_names: Sequence[str],
    centres: Sequence[Sequence[float]],
    name: str,
    created_at: str,
) -> Report:
    """Persona sizes, how k was chosen, each persona's centre over every trait (standardised) and its top
    traits against the population. `personas[i]` is the persona of `centres[i]` (persona_jobs.persona_table)."""
    labels = [f"{p['persona_id']} · {p['name_en']}" for p in personas]
    sizes = [Bar(label, float(p.get("visitors") or 0)) for label, p in zip(labels, personas, strict=True)]
    db = {int(k): float(v) for k, v in (report.get("davies_bouldin_by_k") or {}).items()}
    silhouette = {int(k): float(v) for k, v in (report.get("silhouette_by_k") or {}).items()}
    chosen = int(report["k"])
    parts = [
        f'<p class="meta">Model v{escape(str(report["version"]))}: k = {chosen} personas, fitted on '
        f"{int(report.get('n_fit') or 0):,} visitors, {int(report.get('visitors') or 0):,} visitors assigned. "
        "k is the one with the lowest Davies–Bouldin index.</p>",
        "<h2>Visitors per persona</h2>",
        _figure(
            "sizes", "Visitors assigned to each persona", bar_chart("visitors per persona", sizes, "{:,.0f}".format)
        ),
    ]
    if db:
        bars = [Bar(f"k = {k}", v, k == chosen) for k, v in sorted(db.items())]
        parts += [
            "<h2>Choosing k</h2>",
            _figure(
                "choice-of-k",
                "Davies–Bouldin index per k (lower is better; the chosen k in green)",
                bar_chart("Davies-Bouldin by k", bars, lambda v: f"{v:.3f}"),
            ),
            _table(
                ["k", "Davies–Bouldin", "silhouette"],
                [[str(k), f"{db[k]:.3f}", _num(silhouette.get(k), 3)] for k in sorted(db)],
                "choice",
            ),
        ]
    parts += [
        "<h2>Centres</h2>",
        _figure(
            "centres",
            "Each persona's centre per trait, in standard deviations from the mean visitor (orange above, blue below)",
            heatmap("persona centres", labels, trait_names, centres, clip=2.0),
        ),
        "<h2>What sets each persona apart</h2>",
    ]
    for label, persona in zip(labels, personas, strict=True):
        traits = persona.get("top_traits") or []
        bars = [Bar(str(t["trait"]), float(t["ratio"])) for t in traits]
        parts.append(
            f'<section class="persona" data-persona="{int(persona["persona_id"])}"><h3>{escape(label)} '
            f'<span class="muted">({escape(str(persona["name_id"]))})</span></h3>'
            f'<p>{escape(str(persona["description_en"]))}<br><span class="muted">'
            f"{escape(str(persona['description_id']))}</span></p>"
        )
        if bars:
            parts.append(
                _figure(
                    f"traits-{int(persona['persona_id'])}",
                    "Top traits: the persona's mean over the population's mean",
                    bar_chart("top traits", bars, lambda v: f"{v:.1f}×"),
                )
            )
        parts.append("</section>")
    summary = f"v{report['version']}: {chosen} personas, {int(report.get('visitors') or 0):,} visitors"
    return Report(name, "personas", f"Personas (model v{report['version']})", created_at, summary, "".join(parts))


def document(report: Report) -> str:
    """A standalone page: the fragment with the reports' style sheet inlined (no script, no outside file)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(report.title)}</title><style>{CSS_FILE.read_text()}</style></head>"
        f'<body><main class="report"><h1>{escape(report.title)}</h1>'
        f'<p class="muted">{escape(report.created_at)}</p>{report.html}</main></body></html>'
    )
