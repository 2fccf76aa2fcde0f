"""In-process CPU of `/v1/recommend` ranking, two source trees compared on the same demo world (no HTTP).

    git worktree add --detach ../before <commit>
    REDIS_URL=redis://127.0.0.1:6379/0 python bench/embedding_cpu.py --before ../before --after .

Builds (once; kept under --data-dir and in Redis under --namespace) the demo world `make bench` uses (2,000
items, 1,000 visitors x 30 days), then runs each tree in its own process, alternately, `--runs` times: the
process loads the world's model and item cache like the service, reads the stored visitor rows first (Redis
is not timed) and ranks `make bench`'s request bodies (3 slots) through `RecommendService.recommend`. Reported
per request: the "candidates" stage (wall time from the pipeline's own histogram, as `make bench` reads it, and
the thread's CPU time), the whole `recommend` call (wall and process CPU: CPU counts BLAS threads too), median
over the runs. Each process also
records every generator call's candidates and columns and every answer, and the two trees' records are
compared: identical candidates and answers, the columns' largest difference. A third arm serves the before
tree's model without its item embeddings: the difference to it is what the embedding work costs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

SLOTS = [  # bench/run.py's SLOTS
    {"name": "home", "kind": "product", "count": 12},
    {"name": "hero", "kind": "banner", "count": 1},
    {"name": "cta", "kind": "cta", "count": 2},
]
COLUMNS = ("x_embedding", "x_embedding_rank", "x_embedding_last")


def bodies(visitors: list[str], n: int, now: str, anonymous_share: float = 0.2) -> list[dict[str, Any]]:
    """bench/run.py's request bodies, with a fixed `context.now` so both trees rank at the same moment."""
    rng = np.random.default_rng(1)
    cities = ["Jakarta", "Surabaya", "Bandung", "Medan", "Makassar", "Denpasar"]
    out = []
    for i in range(n):
        visitor = f"anon-{i}" if rng.random() < anonymous_share else str(rng.choice(visitors))
        context = {
            "device": str(rng.choice(["mobile", "desktop", "app"])),
            "channel": "web",
            "city": str(rng.choice(cities)),
            "now": now,
        }
        out.append({"visitor_id": visitor, "slots": SLOTS, "context": context})
    return out


def build(data_dir: Path, namespace: str, redis_url: str) -> dict[str, Any]:
    marker = data_dir / "embedding-cpu-world.json"
    if marker.exists():
        return dict(json.loads(marker.read_text()))
    from services.common.settings import CommonSettings
    from services.demo.world import build_world

    settings = CommonSettings(data_dir=data_dir, redis_url=redis_url, namespace=namespace, feast_project=namespace)
    world = build_world(settings)  # bench/run.py's world: 1,000 visitors x 30 days, seed 7, 2,000 items
    info = {"visitors": [v.visitor_id for v in world.simulator.visitors], "end": world.end.isoformat()}
    marker.write_text(json.dumps(info))
    return info


def stage_sum(stage: str) -> float:
    from services.recommend.ranking.pipeline import STAGE_SECONDS

    for metric in STAGE_SECONDS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum") and sample.labels.get("stage") == stage:
                return float(sample.value)
    return 0.0


def worker(args: argparse.Namespace) -> None:
    """One tree, one run: timings to stdout as JSON; with --record, every generator call and answer pickled."""
    from services.recommend.repository import RecommendRepository
    from services.recommend.schemas import RecommendRequest
    from services.recommend.service import RecommendService
    from services.recommend.settings import RecommendSettings

    info = json.loads((args.data_dir / "embedding-cpu-world.json").read_text())
    settings = RecommendSettings(
        data_dir=args.data_dir,
        redis_url=args.redis_url,
        namespace=args.namespace,
        feast_project=args.namespace,
        log_impressions=False,
    )
    repository = RecommendRepository.open(settings)
    service = RecommendService(settings, repository)
    service.refresh_cache()
    service.reload_model()
    assert service.model is not None and service.model.embeddings is not None, "the world's model has embeddings"
    if args.no_embeddings:  # the floor: the same model served without them (their columns missing)
        service.model.embeddings = None
    requests = [RecommendRequest.model_validate(b) for b in bodies(info["visitors"], args.requests, args.now)]
    stored = [service.read_visitor(r.visitor_id) for r in requests]
    repository.close()  # nothing below touches Redis
    gc.collect()
    gc.freeze()

    records: list[Any] = []
    if args.record:
        generator = service.pipeline.generator
        products = generator.products

        def recording(*a: Any, **k: Any) -> Any:
            found = products(*a, **k)
            records.append((found.idx, found.sources, {c: found.signals.get(c) for c in COLUMNS}))
            return found

        generator.products = recording  # type: ignore[method-assign]
    answers: list[list[list[tuple[str, float]]]] = []
    for _ in range(args.warmup):
        for request, row in zip(requests, stored, strict=True):
            answer = service.recommend(request, stored=row)
            if args.record and len(answers) < len(requests):
                answers.append([[(i["item_id"], i["score"]) for i in s["items"]] for s in answer["slots"]])
    if args.record:
        with open(args.record, "wb") as handle:
            pickle.dump({"candidates": records[: len(requests)], "answers": answers}, handle)
        return

    # The stage's CPU as well as its wall time (the histogram): on a shared machine wall time also counts waits.
    pipeline = service.pipeline
    candidates = pipeline._candidates
    candidates_cpu = [0.0]

    def timed(*a: Any, **k: Any) -> Any:
        started = time.thread_time()
        found = candidates(*a, **k)
        candidates_cpu[0] += time.thread_time() - started
        return found

    pipeline._candidates = timed  # type: ignore[method-assign]
    candidates_before = stage_sum("candidates")
    wall, cpu = time.perf_counter(), time.process_time()
    for request, row in zip(requests, stored, strict=True):
        service.recommend(request, stored=row)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = len(requests)
    result = {
        "candidates_ms": 1000 * (stage_sum("candidates") - candidates_before) / n,
        "candidates_cpu_ms": 1000 * candidates_cpu[0] / n,
        "recommend_wall_ms": 1000 * wall / n,
        "recommend_cpu_ms": 1000 * cpu / n,
        "known": sum(1 for s in stored if s.row),
    }
    sys.stdout.write(json.dumps(result) + "\n")


def run_tree(tree: Path, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--data-dir",
        str(args.data_dir),
        "--namespace",
        args.namespace,
        "--redis-url",
        args.redis_url,
        "--requests",
        str(args.requests),
        "--now",
        args.now,
        *extra,
    ]
    # One hash seed for both trees: the generators iterate sets of strings (a visitor's cart items), whose order
    # follows the seed, and so does the candidates' order.
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: {done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return dict(json.loads(lines[-1])) if lines else {}


def compare_records(before: Path, after: Path) -> dict[str, Any]:
    a, b = (pickle.loads(p.read_bytes()) for p in (before, after))
    same_candidates = len(a["candidates"]) == len(b["candidates"]) and all(
        np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a["candidates"], b["candidates"], strict=True)
    )
    worst: dict[str, float] = {}
    identical: dict[str, bool] = {}
    for name in COLUMNS:
        diffs = [
            float(np.nanmax(np.abs(x[2][name] - y[2][name]), initial=0.0))
            for x, y in zip(a["candidates"], b["candidates"], strict=True)
        ]
        worst[name] = max(diffs, default=0.0)
        identical[name] = all(
            np.array_equal(x[2][name], y[2][name], equal_nan=True)
            for x, y in zip(a["candidates"], b["candidates"], strict=True)
        )
    return {
        "generator_calls": len(a["candidates"]),
        "same_candidates_and_sources": same_candidates,
        "columns_identical": identical,
        "columns_max_abs_diff": worst,
        "same_answers": a["answers"] == b["answers"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=None, help="the other source tree (a git worktree)")
    parser.add_argument("--after", type=Path, default=Path.cwd())
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/embedding-cpu-world"))
    parser.add_argument("--namespace", default="embcpu")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="passes over the requests before the timed one")
    parser.add_argument("--now", default=None, help="the requests' business time (default: the world's end)")
    parser.add_argument("--record", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-embeddings", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    if args.before is None:
        parser.error("--before: the source tree to compare with is required")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    info = build(args.data_dir, args.namespace, args.redis_url)
    args.now = args.now or info.get("end") or datetime.now(UTC).isoformat()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    # The before tree's model also served without its embeddings: what the embedding work costs in all.
    arms: dict[str, tuple[Path, tuple[str, ...]]] = {
        "before": (trees["before"], ()),
        "after": (trees["after"], ()),
        "before_without_embeddings": (trees["before"], ("--no-embeddings",)),
    }
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for _ in range(args.runs):  # alternately, so a change in the machine's load hits every arm alike
        for name, (tree, extra) in arms.items():
            samples[name].append(run_tree(tree, args, *extra))
    medians = {
        name: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for name, runs in samples.items()
    }
    report: dict[str, Any] = {"requests": args.requests, "runs": args.runs, "medians": medians}
    report["ratio_after_to_before"] = {
        key: medians["after"][key] / medians["before"][key] for key in medians["before"] if key != "known"
    }
    report["embedding_cost_ms"] = {
        name: {
            key: medians[name][key] - medians["before_without_embeddings"][key]
            for key in medians[name]
            if key != "known"
        }
        for name in ("before", "after")
    }
    records = {name: args.data_dir / f"record-{name}.pickle" for name in trees}
    for name, tree in trees.items():
        run_tree(tree, args, "--record", str(records[name]))
    report["outputs"] = compare_records(records["before"], records["after"])
    sys.stdout.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
