"""The published protocol on a small generated history whose next item is predictable: the served pipeline
(generators -> LightGBM -> rules) finds it, the co-visitation baseline is honest and non-zero on purchases
alone, and `selaras evaluate public` writes the report."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from services.cli import app as cli
from services.profile.sequences import Histories, read_histories
from services.recommend.ranking.item_embeddings import ItemEmbeddings
from services.recommend.repository import RecommendRepository
from services.recommend.settings import RecommendSettings
from services.recommend.training.history_eval import PIPELINE, evaluate_histories
from services.recommend.training.train import TrainConfig

ITEMS = 60


def write_histories(folder: Path, users: int = 500, seed: int = 11) -> Path:
    """Users walk the catalog forwards (item i, then i+1 or i+2), with a random item now and then."""
    rng = random.Random(seed)
    lines = []
    for user in range(users):
        item = rng.randrange(ITEMS)
        sequence: list[int] = []
        for _ in range(rng.randint(5, 9)):
            sequence.append(item if rng.random() > 0.15 else rng.randrange(ITEMS))
            item = (item + rng.choice((1, 1, 2))) % ITEMS
        lines.append(" ".join(str(x) for x in [user, *dict.fromkeys(sequence)]))
    path = folder / "Walk.txt"
    path.write_text("\n".join(lines) + "\n")
    # Attribute 0 is the root, 100+ a fine category of 5 neighbouring items, 200+ one of 3 brands.
    attributes = {str(i): [0, 100 + i // 5, 200 + i % 3] for i in range(ITEMS)}
    (folder / "Walk_item2attributes.json").write_bytes(orjson.dumps(attributes))
    return path


@pytest.fixture(scope="module")
def histories(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Histories]:
    folder = tmp_path_factory.mktemp("histories")
    path = write_histories(folder)
    return folder, read_histories(path, folder / "Walk_item2attributes.json")


def test_the_served_pipeline_finds_the_next_item_and_beats_the_baselines(histories: tuple[Path, Histories]) -> None:
    _, data = histories
    result = evaluate_histories("Walk", data, RecommendSettings(), TrainConfig(max_queries=10**6))
    pipeline, covisitation, popular = (result.methods[m] for m in (PIPELINE, "covisitation", "popular"))
    assert result.users == 500
    assert pipeline["candidate_recall"] > 0.8
    assert covisitation["ndcg@10"] > 0.2  # purchases alone teach co-visitation (it used to score 0.0)
    assert pipeline["ndcg@10"] > 3 * popular["ndcg@10"]
    assert pipeline["ndcg@10"] > covisitation["ndcg@10_ci95_low"]
    for row in (pipeline, covisitation, popular):
        assert row["ndcg@10_ci95_low"] < row["ndcg@10"] < row["ndcg@10_ci95_high"]
        assert row["ndcg@10"] <= row["hr@10"]
    assert result.model_metrics["train_queries"] > 200


def test_evaluate_public_writes_the_markdown_report(histories: tuple[Path, Histories], tmp_path: Path) -> None:
    folder, _ = histories
    report = tmp_path / "quality.md"
    args = ["evaluate", "public", str(folder), "--report", str(report), "--max-users", "150"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = report.read_text()
    assert "## Walk" in text and "Selaras served pipeline" in text and "95% CI" in text
    assert orjson.loads(report.with_suffix(".json").read_bytes())[0]["users"] == 150


def test_evaluate_ranking_with_histories_uses_the_published_protocol(
    histories: tuple[Path, Histories], tmp_path: Path
) -> None:
    folder, _ = histories
    out = tmp_path / "walk.json"
    args = ["evaluate", "ranking", "--histories", str(folder / "Walk.txt"), "--max-visitors", "100", "--out", str(out)]
    args += ["--attributes", str(folder / "Walk_item2attributes.json")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = orjson.loads(out.read_bytes())
    assert report["users"] == 100 and report["methods"][PIPELINE]["candidate_recall"] > 0.5


def test_ablation_adds_generators_one_at_a_time(histories: tuple[Path, Histories], tmp_path: Path) -> None:
    folder, _ = histories
    report = tmp_path / "ablation.md"
    args = ["evaluate", "ablation", str(folder / "Walk.txt"), "--report", str(report), "--max-users", "100"]
    args += ["--fusion-pool", "40"]
    # 20 of the 60 items per request: the generators then have to choose.
    result = CliRunner().invoke(cli, args, env={"RECOMMEND_MAX_CANDIDATES": "20"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [line for line in report.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6  # the fifth step adds the item embeddings, the last the learned cut of a pool of 40
    assert "learned fusion" in rows[-1] and "40" in rows[-1]
    recalls = [float(row.split("|")[2]) for row in rows]
    assert recalls[1] > recalls[0]  # the next-item generator finds what popularity and categories miss


def test_train_with_histories_saves_the_item_embeddings_with_the_model(
    histories: tuple[Path, Histories], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, loaded = histories
    monkeypatch.delenv("REDIS_URL", raising=False)  # the embedded store under --data-dir
    monkeypatch.delenv("SELARAS_REDIS_URL", raising=False)
    args = ["train", "--histories", str(folder / "Walk.txt"), "--data-dir", str(tmp_path)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    repository = RecommendRepository.open(RecommendSettings(data_dir=tmp_path))
    try:
        newest = repository.model_index().newest
        assert newest is not None
        raw = repository.model_embeddings(newest)
    finally:
        repository.close()
    assert raw is not None
    embeddings = ItemEmbeddings.from_bytes(raw)
    # Learned on everything the served model knows: every item of every history.
    assert set(embeddings.ids) == {item for sequence in loaded.sequences for item in sequence}
