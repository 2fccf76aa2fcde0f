"""The published-protocol evaluations as a Markdown report (docs/quality.md), ours next to the published
figures, and the data sets of a folder ("<name>.txt" + "<name>_item2attributes.json")."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from services.recommend.training.history_eval import PIPELINE, HistoryEvaluation

LABELS = {
    PIPELINE: "Selaras served pipeline (generators → LightGBM → rules)",
    "covisitation": "Selaras co-visitation index alone (next-item score)",
    "popular": "Selaras most popular",
}


def data_sets(folder: Path) -> list[tuple[str, Path, Path | None]]:
    """(name, histories file, attributes file or None) for every "<name>.txt" in the folder."""
    out = []
    for path in sorted(folder.glob("*.txt")):
        attributes = folder / f"{path.stem}_item2attributes.json"
        out.append((path.stem, path, attributes if attributes.exists() else None))
    return out


def _interval(row: dict[str, float], metric: str) -> str:
    return f"{row[metric]:.4f} ({row[f'{metric}_ci95_low']:.4f}–{row[f'{metric}_ci95_high']:.4f})"


def markdown(results: Sequence[HistoryEvaluation], timings: dict[str, dict[str, float]]) -> str:
    lines = [
        "# Ranking quality on public purchase histories",
        "",
        "Protocol of the published full-ranking tables: leave-last-out (each user's last interaction is the",
        "test target), every user, full ranking over the whole catalog (a target no generator proposes is a",
        "miss), items the user already interacted with excluded, HR@10 and NDCG@10 as means over users with",
        "95% intervals. Candidate recall: the share of test targets among the served candidates. The model is",
        "the one `selaras train --histories` produces, trained on every user's history without the test item;",
        "ranking runs through the serving code (`SlotPipeline.rank_slot`). Reproduce with",
        "`make eval-public DATA=<folder with the .txt and _item2attributes.json files>`. What each candidate",
        "generator adds: docs/quality-ablation.md (`make eval-ablation`); the demo shop before and after:",
        "docs/quality-demo.md.",
        "",
    ]
    for result in results:
        lines += [
            f"## {result.name}",
            "",
            f"{result.users:,} users, {result.interactions:,} interactions, {result.items:,} items; "
            f"{result.max_candidates} candidates served per request, generators: {', '.join(result.sources)}.",
            "",
            "| method | HR@10 (95% CI) | NDCG@10 (95% CI) | candidate recall |",
            "|---|---|---|---|",
        ]
        for method, row in result.methods.items():
            recall = f"{row['candidate_recall']:.3f}" if method != "popular" else "–"
            lines.append(
                f"| {LABELS.get(method, method)} | {_interval(row, 'hr@10')} | {_interval(row, 'ndcg@10')} | {recall} |"
            )
        for method, (hr, ndcg) in result.published.items():
            lines.append(f"| reference: {method} | {hr:.4f} | {ndcg:.4f} | |")
        timing = timings.get(result.name, {})
        lines += [
            "",
            "Time: "
            + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in {**result.seconds, **timing}.items())
            + f"; ranker trained on {int(result.model_metrics.get('train_queries', 0)):,} queries "
            f"(best iteration {int(result.model_metrics.get('best_iteration', 0))}).",
            "",
        ]
    return "\n".join(lines)
