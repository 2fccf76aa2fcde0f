"""Offline evaluation of the item-to-item strategies on a small history file the test writes: transitions are
learned from purchases alone, attribute neighbours find look-alikes, both beat most popular, and the CLI
prints and writes the figures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import orjson
from typer.testing import CliRunner

from services.cli import app as cli
from services.profile.sequences import read_histories
from services.recommend.training.histories import train_on_histories
from services.recommend.training.item2item_eval import evaluate_item2item
from services.recommend.training.train import TrainConfig

ITEMS = 60


def write_histories(folder: Path, users: int = 400, seed: int = 5) -> tuple[Path, Path]:
    """Users walk the catalog forwards (item i, then i+1 or i+2) with a random item now and then; attribute
    100+ is a fine category of five neighbouring items (so the next item often shares the anchor's)."""
    rng = random.Random(seed)
    lines = []
    for user in range(users):
        item = rng.randrange(ITEMS)
        sequence: list[int] = []
        for _ in range(rng.randint(4, 8)):
            sequence.append(item if rng.random() > 0.15 else rng.randrange(ITEMS))
            item = (item + rng.choice((1, 1, 2))) % ITEMS
        lines.append(" ".join(str(x) for x in [f"u{user}", *dict.fromkeys(sequence)]))
    path = folder / "Walk.txt"
    path.write_text("\n".join(lines) + "\n")
    attributes = folder / "Walk_item2attributes.json"
    attributes.write_bytes(orjson.dumps({str(i): [0, 100 + i // 5, 200 + i % 3] for i in range(ITEMS)}))
    return path, attributes


def test_both_strategies_beat_most_popular_and_transitions_find_the_next_item(tmp_path: Path) -> None:
    path, attributes = write_histories(tmp_path)
    result = evaluate_item2item("Walk", read_histories(path, attributes))
    together, similar, popular = (result.methods[m] for m in ("bought_together", "similar", "popular"))
    assert result.users == 400 and result.items == ITEMS
    assert together["hr@10"] > 0.6  # the next item is one or two steps on: transitions from purchases alone
    assert together["ndcg@10"] > 3 * popular["ndcg@10"]
    assert similar["ndcg@10"] > popular["ndcg@10_ci95_high"]  # the fine category holds the next item often
    for row in (together, similar, popular):
        assert row["ndcg@10_ci95_low"] < row["ndcg@10"] < row["ndcg@10_ci95_high"]
        assert row["ndcg@10"] <= row["hr@10"]
    assert together["coverage"] > 0.9


def test_a_sample_of_users_is_reproducible(tmp_path: Path) -> None:
    path, attributes = write_histories(tmp_path)
    data = read_histories(path, attributes)
    first, second = (evaluate_item2item("Walk", data, max_users=100, seed=3) for _ in range(2))
    assert first.users == 100 and first.methods == second.methods


def test_the_cli_prints_and_writes_the_report(tmp_path: Path) -> None:
    path, attributes = write_histories(tmp_path, users=120)
    out = tmp_path / "item2item.json"
    args = ["evaluate", "item2item", "--histories", str(path), "--attributes", str(attributes), "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "bought_together" in result.output and "similar" in result.output
    report = json.loads(out.read_text())
    assert report["users"] == 120 and set(report["methods"]) == {"similar", "bought_together", "popular"}
    bad = tmp_path / "bad.txt"
    bad.write_text("u1\n")
    refused = CliRunner().invoke(cli, ["evaluate", "item2item", "--histories", str(bad)])
    assert refused.exit_code == 2 and "invalid input" in refused.output


def test_the_served_personal_rerank_of_the_neighbours_is_measured(tmp_path: Path) -> None:
    path, attributes = write_histories(tmp_path)
    data = read_histories(path, attributes)
    model, _, _ = train_on_histories(data.truncated(1), 500, TrainConfig(max_queries=10**6, seed=3))
    result = evaluate_item2item("Walk", data, model=model)
    for strategy in ("similar", "bought_together"):
        personal, plain = result.methods[f"{strategy}_personal"], result.methods[strategy]
        assert personal["users"] == plain["users"] == 400
        assert personal["ndcg@10"] > 3 * result.methods["popular"]["ndcg@10"]
        assert personal["ndcg@10"] > plain["ndcg@10_ci95_low"] - 0.05  # never much worse than the plain order
    # Look-alikes re-ranked by the ranker (which sees what follows what) find the next item far more often.
    assert result.methods["similar_personal"]["ndcg@10"] > result.methods["similar"]["ndcg@10_ci95_high"]
