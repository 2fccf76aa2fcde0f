"""A policy given as a file (`selaras evaluate messages --policy FILE`) and cross-fitting of the learned policy.

The randomized log of `test_message_uplift.py`: gold customers react to message a (+30 visit points), everybody
to b (+10), baseline 20%; so "a for gold, b for basic" is worth 0.40 visits and the single messages 0.35 / 0.30.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from services.common.settings import CommonSettings
from services.messages.crossfit import cross_fit, visitor_folds
from services.messages.ope import LEARNED, NOTHING, evaluate_messages
from services.messages.policy_file import InvalidPolicyFile, file_policy_actions, read_policy_file
from services.messages.replay import LoggedDecisions
from services.messages.reward import Reward
from services.messages.train import MessageTrainConfig, train_message_model
from tests.conftest import REDIS_URL
from tests.messages.test_message_endpoints import drop_feast_rows
from tests.messages.test_message_logs import CATALOG, A, B, log, page_view, run_cli, write
from tests.messages.test_message_uplift import BASE, randomized_log

VISIT = Reward("visit")


@pytest.fixture(scope="module")
def data() -> LoggedDecisions:
    return randomized_log(6000, seed=21)


def segment_file(data: LoggedDecisions, path: Path, every: int = 1) -> Path:
    """a for gold, b for basic, for every `every`-th visitor of the log."""
    gold = data.V[:, -1] == 1.0
    lines = ["visitor_id,action,score"]
    lines += [
        f"{v},{'a' if g else 'b'},0.5"
        for i, (v, g) in enumerate(zip(data.visitor_ids, gold, strict=True))
        if i % every == 0
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_policy_file_is_scored_next_to_the_other_policies(data: LoggedDecisions, tmp_path: Path) -> None:
    policy = read_policy_file(segment_file(data, tmp_path / "crm_segments.csv"), {"a", "b"})
    assert policy.name == "file:crm_segments" and len(policy.actions) == data.size
    mapped = file_policy_actions(data, policy)
    assert mapped.missing_visitors == 0 and mapped.not_eligible == 0
    evaluation = evaluate_messages(data, None, reward=VISIT, targets={policy.name: ("crm", mapped.actions)})
    values = {p.policy: p for p in evaluation.policies}
    truth = {policy.name: BASE + 0.20, "only:a": BASE + 0.15, "only:b": BASE + 0.10, NOTHING: BASE}
    for name, value in truth.items():
        for estimate in (values[name].ips, values[name].snips, values[name].dr):
            assert estimate.ci_low <= value <= estimate.ci_high, (name, estimate)
    assert values[policy.name].send_share == 1.0 and values[policy.name].max_weight == pytest.approx(1 / 0.3)
    # Compared with each single message, paired: it beats both.
    against = {c.baseline: c.difference for c in evaluation.against_singles(policy.name)}
    assert set(against) == {"only:a", "only:b"} and all(d.ci_low > 0 for d in against.values())
    assert against["only:a"].ci_low <= 0.05 <= against["only:a"].ci_high


def test_visitors_missing_from_the_file_are_sent_nothing_and_counted(data: LoggedDecisions, tmp_path: Path) -> None:
    rows = [{"visitor_id": v, "action": "a"} for v in data.visitor_ids[::2]] + [{"visitor_id": "x", "action": "none"}]
    path = tmp_path / "half.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(orjson.dumps(row) for row in rows)))
    mapped = file_policy_actions(data, read_policy_file(path, {"a", "b"}))
    assert mapped.missing_visitors == mapped.missing_decisions == data.size // 2
    assert mapped.unused_visitors == 1
    assert (mapped.actions[1::2] == -1).all() and (mapped.actions[::2] >= 0).all()
    # A message that is not eligible at a decision is not sent there (as for the single-message policies).
    only_b = data.subset(np.arange(data.size) % 2 == 0)
    only_b.cand_template = ["b"] * len(only_b.cand_template)
    assert file_policy_actions(only_b, read_policy_file(path, {"a", "b"})).not_eligible == only_b.size


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.csv", "visitor_id,message\nc-1,a\n", "line 1: the header needs the columns visitor_id and action"),
        ("p.csv", "visitor_id,action\nc-1,a\nc-2,newsletter\n", "line 3: action: 'newsletter' is not a message"),
        (
            "p.csv",
            "visitor_id,action\nc-1,a\nc-2,none\nc-1,b\n",
            "line 4: visitor_id: 'c-1' is already given on line 2",
        ),
        ("p.csv", "visitor_id,action\nc-1,\n", "line 2: action: missing"),
        ("p.csv", "visitor_id,action\n", "line 1: the file names no visitor"),
        ("p.jsonl", '{"visitor_id": "c-1", "action": "a"}\n\n{"visitor_id": "c-2"}\n', "line 3: action: missing"),
        ("p.jsonl", '{"visitor_id": "c-1", "action": "a"}\n{oops\n', "line 2: not JSON"),
        ("p.jsonl", '{"visitor_id": 7, "action": "a"}\n', "line 1: visitor_id: must be text"),
        ("p.jsonl", '["c-1", "a"]\n', "line 1: not a JSON object"),
    ],
)
def test_bad_policy_files_name_the_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InvalidPolicyFile, match=message):
        read_policy_file(path, {"a", "b"})


def test_cross_fitting_scores_each_decision_with_a_model_that_never_saw_its_visitor(data: LoggedDecisions) -> None:
    data = data.subset(np.arange(data.size) < 3000)  # half the log: four trainings stay quick
    config = MessageTrainConfig(seed=3, learner="uplift", reward=VISIT)
    folds = visitor_folds(["v1", "v2", "v1", "v3", "v2", "v4"] * 3, 3, seed=3)
    assert folds[0] == folds[2] and folds[1] == folds[4] and set(folds) == {0, 1, 2}
    predictions = cross_fit(data, config, folds=3)
    assert predictions.folds == 3 and predictions.reward == VISIT
    # The held-out predictions of fold 0 are the ones of a model trained on folds 1 and 2 only.
    held = visitor_folds(data.visitor_ids, 3, seed=3) == 0
    model = train_message_model(data.subset(~held), config).model
    part = data.subset(held)
    uplift, _, baseline = model.uplift(part.V, part.A, part.cand_owner)
    np.testing.assert_allclose(predictions.baseline[held], baseline)
    np.testing.assert_allclose(predictions.uplift[held[data.cand_owner]], uplift)

    evaluation = evaluate_messages(data, predictions, min_uplift=0.02, reward=VISIT)
    learned = next(p for p in evaluation.policies if p.policy == LEARNED)
    assert "cross-fitted over 3 folds" in learned.description and evaluation.cross_fit_folds == 3
    assert learned.dr.ci_low <= BASE + 0.20 <= learned.dr.ci_high
    assert evaluation.to_json()["cross_fit"] == {"folds": 3, "by": "visitor"}
    assert evaluation.model_version is None
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_fit(data, config, folds=1)


@pytest.fixture
def settings(settings_factory: Callable[..., Any]) -> Iterator[CommonSettings]:
    made: CommonSettings = settings_factory(CommonSettings, redis_timeout_s=5.0)
    yield made
    drop_feast_rows(REDIS_URL, made.feast_project)


def test_evaluate_messages_scores_a_policy_file_and_cross_fits_through_the_cli(
    settings: CommonSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = log(240)
    share = {0: 0.1, 1: 0.8, 2: 0.4}  # nothing, A, B: visits within a day
    rng = np.random.default_rng(5)
    rows += [page_view(f"v{i}", hours=5, minutes=i) for i in range(240) if rng.random() < share[i % 3]]
    rows.sort(key=lambda row: row["timestamp"])
    catalog = write(tmp_path / "catalog.jsonl", [item.model_dump(mode="json") for item in CATALOG])
    events = write(tmp_path / "log.jsonl", rows)
    policy = tmp_path / "crm.csv"
    policy.write_text("visitor_id,action\n" + "".join(f"v{i},{A}\n" for i in range(0, 200)))
    report = tmp_path / "ope.json"
    common = ("evaluate", "messages", str(events), "--catalog", str(catalog), "--reward", "visit")
    code, output = run_cli(
        monkeypatch, settings, *common, "--policy", str(policy), "--cross-fit", "3", "--learner", "uplift",
        "--json", str(report),
    )  # fmt: skip
    assert code == 0, output
    assert "cross-fitted over 3 folds by visitor" in output
    assert "file:crm: 40 visitors of the log (40 decisions) are not in the file and are sent nothing" in output
    body = orjson.loads(report.read_bytes())
    policies = {p["policy"]: p for p in body["policies"]}
    assert (
        body["cross_fit"] == {"folds": 3, "by": "visitor"}
        and body["policy_files"]["file:crm"]["missing_visitors"] == 40
    )
    assert policies["file:crm"]["send_share"] == pytest.approx(200 / 240, abs=1e-4)
    assert policies["file:crm"]["dr"][0] > policies[f"only:{B}"]["dr"][0] and "learned" in policies

    bad = tmp_path / "bad.csv"
    bad.write_text(f"visitor_id,action\nv1,{A}\nv2,{B}\nv1,none\n")
    code, output = run_cli(monkeypatch, settings, *common, "--policy", str(bad))
    assert (
        code == 2 and "cannot read policy" in output and "line 4: visitor_id: 'v1' is already given on line 2" in output
    )
    code, output = run_cli(monkeypatch, settings, *common, "--cross-fit", "1")
    assert code != 0 and "--cross-fit" in output
    code, output = run_cli(monkeypatch, settings, *common, "--cross-fit", "3", "--model-version", "msg-1")
    assert code != 0 and "leave out --model-version" in output


def null_log(n: int, seed: int) -> LoggedDecisions:
    """No message changes anything (30% visit whatever is sent), and eight noise columns to overfit on."""
    rng = np.random.default_rng(seed)
    data = randomized_log(n, seed)
    data.V[:, :8] = rng.normal(size=(n, 8))
    data.visited = rng.random(n) < 0.3
    return data


def test_cross_fitting_removes_the_optimism_of_scoring_a_model_on_its_own_training_log() -> None:
    """Simulation: on logs where every policy is worth 0.30 visits, a model trained and scored on the same log
    looks better than it is (its interval rarely covers the truth); cross-fitted, it is estimated honestly."""
    in_sample, crossed = [], []
    for seed in range(20):
        data = null_log(800, seed=500 + seed)
        config = MessageTrainConfig(seed=seed, learner="uplift", reward=VISIT, num_boost_round=100, threads=1)
        for predictions, out in (
            (train_message_model(data, config).model, in_sample),
            (cross_fit(data, config, folds=3), crossed),
        ):
            learned = next(
                p for p in evaluate_messages(data, predictions, 0.0, reward=VISIT).policies if p.policy == LEARNED
            )
            out.append((learned.dr.value - 0.3) / learned.dr.se)
    assert np.mean(in_sample) > 1.0 and np.mean(np.abs(in_sample) < 1.96) < 0.7, in_sample
    assert abs(np.mean(crossed)) < 0.75 and np.mean(np.abs(crossed) < 1.96) >= 0.85, crossed
