"""CLI commands for next-best messages: `selaras train-messages` and `selaras evaluate messages FILE` (the
demo's `selaras simulate-messages` lives with the demo). Heavy modules are imported inside the commands so
`selaras --help` stays fast."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import numpy as np
import typer
from rich.table import Table

from services.common.terminal import console
from services.features.aggregations import SegmentRules

if TYPE_CHECKING:
    from pydantic import TypeAdapter

    from services.common.catalog import CatalogItem
    from services.messages.model import MessageModel
    from services.messages.ope import Evaluation
    from services.messages.policy_file import PolicyFile
    from services.messages.replay import LoggedDecisions
    from services.messages.reward import Reward

T = TypeVar("T")

DataDir = Annotated[Path, typer.Option("--data-dir", envvar="SELARAS_DATA_DIR", help="Where Selaras keeps its data.")]


def _settings(data_dir: Path) -> Any:
    from services.recommend.settings import RecommendSettings

    os.environ["SELARAS_DATA_DIR"] = str(data_dir.resolve())
    return RecommendSettings(data_dir=data_dir)


def _when(text: str | None) -> float | None:
    if text is None:
        return None
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise typer.BadParameter(f"{text!r} needs a time zone, e.g. 2026-11-20T00:00:00+07:00")
    return moment.timestamp()


RewardOption = Annotated[
    str | None,
    typer.Option(help="conversion, visit, revenue or mix (default: RECOMMEND_MESSAGES_REWARD, else conversion)"),
]
RevenueCapOption = Annotated[float | None, typer.Option(help="Cap on one decision's revenue (reward revenue, mix).")]
MixOption = Annotated[
    str | None, typer.Option(help="Weights of reward mix, e.g. conversion=1,visit=0.2,revenue=0.00001")
]


def chosen_reward(kind: str | None, revenue_cap: float | None, mix: str | None) -> Reward:
    """The reward from the CLI options over the settings (RECOMMEND_MESSAGES_REWARD...)."""
    import dataclasses

    from services.messages.settings import MessageSettings

    reward = MessageSettings().reward_spec()
    changes: dict[str, Any] = {}
    if kind is not None:
        changes["kind"] = kind
    if revenue_cap is not None:
        changes["revenue_cap"] = revenue_cap
    for part in filter(None, (mix or "").split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in ("conversion", "visit", "revenue"):
            raise typer.BadParameter(f"--mix names conversion, visit or revenue, got {name!r}")
        try:
            changes[f"{name.strip()}_weight"] = float(value)
        except ValueError as exc:
            raise typer.BadParameter(f"--mix: {part!r} needs a number after '='") from exc
    try:
        return dataclasses.replace(reward, **changes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def report_exclusions(data: LoggedDecisions) -> None:
    """Say which logged decisions were left out and why (never estimate silently on a damaged log)."""
    from services.messages.replay import EXCLUSION_REASONS

    total = sum(data.excluded.values())
    if not total:
        return
    console.print(
        f"[yellow]{total:,} of {total + data.size:,} logged decisions left out:[/] "
        + "; ".join(f"{count:,} {EXCLUSION_REASONS.get(reason, reason)}" for reason, count in data.excluded.items())
    )


def train_messages(
    data_dir: DataDir = Path("data"),
    window_hours: Annotated[float, typer.Option(help="Outcome window after the send time.")] = 24.0,
    until: Annotated[
        str | None, typer.Option(help="Only decisions sent before this ISO time (hold out the rest).")
    ] = None,
    seed: int = 7,
    learner: Annotated[
        str | None, typer.Option(help="funnel (opens, clicks, purchases) or uplift (the reward directly)")
    ] = None,
    reward: RewardOption = None,
    revenue_cap: RevenueCapOption = None,
    mix: MixOption = None,
) -> None:
    """Train the next-best-message uplift model from the logged decisions and outcomes; save it as the newest."""
    from services.messages.replay import replay_decisions
    from services.messages.repository import MessageRepository
    from services.messages.settings import MessageSettings
    from services.messages.train import MessageTrainConfig, train_message_model
    from services.recommend.repository import RecommendRepository

    settings = _settings(data_dir)
    repository = RecommendRepository.open(settings)
    try:
        messages = MessageRepository(repository)
        with console.status("replaying the event log"):
            data = replay_decisions(
                messages.logged_events(),
                messages.catalog(),
                window_hours,
                consent_defaults=settings.consent_defaults(),
                rules=SegmentRules.from_settings(settings),
                traits=settings.trait_schema(),
            )
        # The analytics purpose as stored now (a withdrawal applies to past data too): never trained on.
        refused = messages.refusing_analytics(data.visitor_ids, settings.consent_defaults())
        data = data.without_visitors(refused, "no_analytics_consent")
        report_exclusions(data)
        cut = _when(until)
        if cut is not None:
            data = data.subset(data.send_at < cut)
        chosen_learner = learner or MessageSettings().learner
        if chosen_learner not in ("funnel", "uplift"):
            raise typer.BadParameter(f"--learner is funnel or uplift, got {chosen_learner!r}")
        config = MessageTrainConfig(
            window_h=window_hours, seed=seed, learner=chosen_learner, reward=chosen_reward(reward, revenue_cap, mix)
        )
        with console.status(f"training on {data.size:,} decisions"):
            result = train_message_model(data, config)
        messages.save_model(result.model.version, result.model.to_bytes(), result.model.created_at)
    except ValueError as exc:
        console.print(f"[red]cannot train:[/] {exc}")
        raise typer.Exit(2) from exc
    finally:
        repository.close()
    table = Table(
        title=f"message model {result.model.version} ({result.model.learner}, {result.model.reward.describe()})"
    )
    table.add_column("stage")
    table.add_column("rows", justify="right")
    table.add_column("positives", justify="right")
    table.add_column("kind")
    table.add_column("valid AUC", justify="right")
    table.add_column("valid RMSE", justify="right")
    for stage in result.model.stages:
        info = result.metrics[stage]
        auc, rmse = info.get("valid_auc"), info.get("valid_rmse")
        table.add_row(
            stage,
            f"{info['rows']:,}",
            f"{info['positives']:,}",
            info["kind"],
            f"{auc:.3f}" if auc else "-",
            f"{rmse:.4f}" if rmse is not None else "-",
        )
    console.print(table)
    metrics = result.metrics
    measured = metrics.get("measured_uplift")
    check = (
        f"measured against the control group {measured:+.4f} "
        f"(95% CI {metrics['measured_uplift_ci95'][0]:+.4f} to {metrics['measured_uplift_ci95'][1]:+.4f})"
        if measured is not None
        else "the control group is too small to measure it yet (20 decisions needed)"
    )
    console.print(
        f"decisions {metrics['decisions']:,}, sent {metrics['sent']:,}, control {metrics['control']:,}; "
        f"predicted mean uplift of the sends {metrics.get('predicted_uplift', 0):+.4f}; {check}"
    )


def _read_jsonl(path: Path, adapter: TypeAdapter[T]) -> Iterator[T]:
    """The file's records (JSON Lines, .gz too) in the API's schema; raises InvalidInput (a ValueError naming
    the line) at the first line that is not."""
    from services.profile.importer import InvalidInput, InvalidLine, read_jsonl

    for _, parsed in read_jsonl(path, adapter):
        if isinstance(parsed, InvalidLine):
            raise InvalidInput(parsed)
        yield parsed


def evaluate_messages_command(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="JSON Lines of events (.jsonl or .jsonl.gz)")
    ],
    catalog: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Catalog JSON Lines (default: the store's)")
    ] = None,
    data_dir: DataDir = Path("data"),
    model_version: Annotated[str | None, typer.Option(help="Message model to evaluate (default: the newest)")] = None,
    since: Annotated[str | None, typer.Option(help="Only decisions sent at or after this ISO time")] = None,
    until: Annotated[str | None, typer.Option(help="Only decisions sent before this ISO time")] = None,
    window_hours: Annotated[float, typer.Option(help="Outcome window after the send time.")] = 24.0,
    min_uplift: Annotated[float, typer.Option(help="The learned policy sends only above this uplift.")] = 0.001,
    send_cost: Annotated[float, typer.Option(help="Reward subtracted per message sent (fatigue).")] = 0.0,
    reward: RewardOption = None,
    revenue_cap: RevenueCapOption = None,
    mix: MixOption = None,
    policy: Annotated[
        list[Path] | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="A policy to score: CSV or JSON Lines of visitor_id,action (a template id or none); repeatable. "
            "Visitors missing from the file are sent nothing.",
        ),
    ] = None,
    cross_fit: Annotated[
        int,
        typer.Option(
            help="Train the learned policy on this log itself, cross-fitted over K folds by visitor (K >= 2), "
            "instead of scoring a stored model"
        ),
    ] = 0,
    learner: Annotated[
        str | None, typer.Option(help="With --cross-fit: funnel or uplift (default: RECOMMEND_MESSAGES_LEARNER)")
    ] = None,
    seed: Annotated[int, typer.Option(help="With --cross-fit: the folds' and the models' seed")] = 7,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
) -> None:
    """Estimate the value of the learned message policy, of every single-message policy, of sending nothing
    and of policies given as files from logged decisions (IPS, self-normalised IPS, doubly robust; 95% CIs,
    effective sample size, largest weight)."""
    from services.messages import crossfit
    from services.messages.model import MessageModel
    from services.messages.ope import evaluate_messages
    from services.messages.policy_file import InvalidPolicyFile, read_policy_file
    from services.messages.replay import replay_decisions
    from services.messages.repository import MessageRepository
    from services.messages.settings import MessageSettings
    from services.messages.train import MessageTrainConfig
    from services.profile.importer import EVENT_ADAPTER, ITEM_ADAPTER, InvalidInput
    from services.recommend.repository import RecommendRepository

    model: MessageModel | None = None
    chosen = chosen_reward(reward, revenue_cap, mix)
    if cross_fit == 1 or cross_fit < 0:
        raise typer.BadParameter("--cross-fit is 0 (off) or a number of folds, at least 2")
    if cross_fit and model_version:
        raise typer.BadParameter("--cross-fit trains its own models on the log: leave out --model-version")
    chosen_learner = learner or MessageSettings().learner
    if chosen_learner not in ("funnel", "uplift"):
        raise typer.BadParameter(f"--learner is funnel or uplift, got {chosen_learner!r}")
    settings = _settings(data_dir)
    try:
        items: list[CatalogItem] | None = list(_read_jsonl(catalog, ITEM_ADAPTER)) if catalog else None
    except InvalidInput as exc:
        console.print(f"[red]cannot read {catalog}:[/] {exc}")
        raise typer.Exit(2) from exc
    repository = RecommendRepository.open(settings)
    try:
        messages = MessageRepository(repository)
        version = None if cross_fit else model_version or messages.model_index().serving
        blob = messages.model_blob(version) if version else None
        if blob is not None:
            model = MessageModel.from_bytes(blob)
        elif model_version and not cross_fit:
            console.print(f"[red]message model {model_version} not found in {data_dir}[/]")
            raise typer.Exit(2)
        if items is None:
            items = messages.catalog()
    finally:
        repository.close()
    if model is None and not cross_fit:
        console.print("[yellow]no message model found: only 'send nothing' and single-message policies[/]")
    templates = {i.item_id for i in items or [] if i.message is not None}
    files: list[PolicyFile] = []
    for path in policy or []:
        try:
            files.append(read_policy_file(path, templates))
        except InvalidPolicyFile as exc:
            console.print(f"[red]cannot read policy {path}:[/] {exc}")
            raise typer.Exit(2) from exc
    # The model's own trait columns (and category codes); without a model, the ones declared now.
    traits = model.traits if model is not None else settings.trait_schema()
    try:
        with console.status(f"replaying {file.name}"):
            data = replay_decisions(
                _read_jsonl(file, EVENT_ADAPTER),
                items or [],
                window_hours,
                consent_defaults=settings.consent_defaults(),
                rules=SegmentRules.from_settings(settings),
                traits=traits,
            )
    except InvalidInput as exc:
        console.print(f"[red]cannot read {file}:[/] {exc}")
        raise typer.Exit(2) from exc
    report_exclusions(data)
    start, stop = _when(since), _when(until)
    if start is not None:
        data = data.subset(data.send_at >= start)
    if stop is not None:
        data = data.subset(data.send_at < stop)
    names = {i.item_id: f"{i.title} ({i.message.trigger})" for i in items or [] if i.message is not None}
    targets, coverage = _file_targets(data, files)
    learned: MessageModel | crossfit.Predictions | None = model
    try:
        if cross_fit:
            config = MessageTrainConfig(window_h=window_hours, seed=seed, learner=chosen_learner, reward=chosen)
            with console.status(f"cross-fitting the {chosen_learner} learner over {cross_fit} folds"):
                learned = crossfit.cross_fit(data, config, cross_fit)
        elif model is not None:
            _warn_if_trained_on(model, data)
        evaluation = evaluate_messages(data, learned, min_uplift, send_cost, names, reward=chosen, targets=targets)
    except ValueError as exc:
        console.print(f"[red]cannot evaluate:[/] {exc}")
        raise typer.Exit(2) from exc
    evaluation.coverage = coverage
    console.print(evaluation_table(evaluation))
    for name, covered in coverage.items():
        console.print(
            f"{name}: {covered['missing_visitors']:,} visitors of the log ({covered['missing_decisions']:,} "
            f"decisions) are not in the file and are sent nothing; its message was not eligible at "
            f"{covered['not_eligible']:,} decisions (nothing sent); {covered['unused_visitors']:,} visitors of "
            "the file have no decision in the log"
        )
    best = evaluation.learned_vs_best_single
    comparisons = [c for c in evaluation.comparisons if best is None or c.baseline == best.baseline]
    for comparison in comparisons:
        difference = comparison.difference
        value, low, high = difference.value, difference.ci_low, difference.ci_high
        verdict = "beats" if low > 0 else ("is below" if high < 0 else "is not distinguishable from")
        console.print(
            f"{comparison.policy} policy {verdict} {comparison.baseline}"
            f"{' (the best single message)' if best is not None else ''}: "
            f"DR difference {value:+.4f} (95% CI {low:+.4f} to {high:+.4f}) per decision"
        )
    if json_out is not None:
        json_out.write_text(json.dumps(evaluation.to_json(), indent=2, ensure_ascii=False))
        console.print(f"wrote {json_out}")


def _file_targets(
    data: LoggedDecisions, files: list[PolicyFile]
) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, dict[str, int]]]:
    """Each policy file as target actions on the logged decisions, and what it left out."""
    from services.messages.policy_file import file_policy_actions

    targets: dict[str, tuple[str, np.ndarray]] = {}
    coverage: dict[str, dict[str, int]] = {}
    for policy_file in files:
        name = policy_file.name
        while name in targets:  # two files with the same name
            name += "'"
        mapped = file_policy_actions(data, policy_file)
        description = f"{len(policy_file.actions):,} visitors' actions from the file; others: nothing"
        targets[name] = (description, mapped.actions)
        coverage[name] = mapped.to_json()
    return targets, coverage


def _warn_if_trained_on(model: MessageModel, data: LoggedDecisions) -> None:
    """Say so when the stored model learned from the decisions it is scored on (its estimate flatters it)."""
    trained = model.metrics.get("trained_on") or {}
    first, last = trained.get("first_send_at"), trained.get("last_send_at")
    if first is None or last is None:
        return
    overlap = int(((data.send_at >= first) & (data.send_at <= last)).sum())
    if overlap:
        console.print(
            f"[yellow]model {model.version} was trained on the period of {overlap:,} of these decisions: its "
            "estimate is optimistic. Use --cross-fit 5 (or --since after its training) for an honest one.[/]"
        )


def evaluation_table(evaluation: Evaluation) -> Table:
    from services.messages.ope import rank

    crossfit = f"; learned policy cross-fitted over {evaluation.cross_fit_folds} folds by visitor" * bool(
        evaluation.cross_fit_folds
    )
    table = Table(
        title=f"message policies on {evaluation.decisions:,} decisions ({evaluation.reward.describe()} within "
        f"{evaluation.window_h:g} h, {evaluation.visitors:,} visitors; logged policy {evaluation.logged_value:.4f}"
        f"{crossfit})"
    )
    for column in ("policy", "DR [95% CI]", "SNIPS [95% CI]", "IPS [95% CI]", "ESS", "max w", "matched", "sends"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for p in rank(evaluation.policies):
        table.add_row(
            p.policy,
            f"{p.dr.value:.4f} [{p.dr.ci_low:.4f}, {p.dr.ci_high:.4f}]",
            f"{p.snips.value:.4f} [{p.snips.ci_low:.4f}, {p.snips.ci_high:.4f}]",
            f"{p.ips.value:.4f} [{p.ips.ci_low:.4f}, {p.ips.ci_high:.4f}]",
            f"{p.ess:,.0f}",
            f"{p.max_weight:.1f}",
            f"{p.matched:,}",
            f"{p.send_share:.0%}",
        )
    return table


def register_message_commands(app: typer.Typer, evaluate_app: typer.Typer) -> None:
    """Add the message commands to the `selaras` CLI (and `messages` to its `evaluate` group)."""
    app.command("train-messages")(train_messages)
    evaluate_app.command("messages")(evaluate_messages_command)
