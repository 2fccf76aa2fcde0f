"""The experiment store on Redis: each update is one Lua script, atomic per experiment.

Redis keys of one experiment share the hash tag `{<namespace>:exp:<experiment id>}`, so each script's keys
live in one Redis Cluster slot.

Erasure and export find a visitor's data without walking the keyspace: `<namespace>:experiments:ids` holds the
id of every experiment ever exposed (running, disabled or removed from the config), and in each experiment the
visitor's running values are `{...}:v:<visitor>` and the visitor's exposure records are listed in
`{...}:vrecs:<visitor>` (written by the exposure script with the record). Both are exact by construction: a
visitor id is only ever a key suffix, never a pattern. Data written before these indexes existed is indexed once
by `reindex()` (`selaras experiments reindex`), the only place that SCANs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.cluster import RedisCluster
from redis.exceptions import RedisError

from services.common.errors import StorageUnavailable
from services.common.storage import DEDUPE_TTL_S
from services.experiments.store.base import (
    VISITOR_TTL_S,
    Applied,
    ErasedVisitor,
    ExperimentStore,
    ExposureWrite,
    OutcomeWrite,
    Reindexed,
    VisitorHead,
    check_record,
    clean_label,
    covariate_args,
    day_of,
    denominator_args,
    record_visitor,
    value_args,
)
from services.experiments.store.sums import METRICS

# ------------------------------------------------------------------------------------------------
# Redis
# ------------------------------------------------------------------------------------------------

# Shared by both scripts: add an increment to the sums (and the per-day sums for group "all") and
# remember it for the caller. string.format keeps 17 significant digits (tostring keeps 14).
_LUA_COMMON = """
local sums, days = KEYS[2], KEYS[3]
local out = {}
local function fmt(v) return string.format('%.17g', v) end
local function add(arm, day, group, name, v)
  redis.call('HINCRBYFLOAT', sums, arm .. '|' .. group .. '|' .. name, fmt(v))
  if group == 'all' then redis.call('HINCRBYFLOAT', days, day .. '|' .. arm .. '|' .. name, fmt(v)) end
  out[#out + 1] = group .. '|' .. name
  out[#out + 1] = fmt(v)
end
local function num(v) if v then return tonumber(v) end return 0 end
local METRICS = {__METRICS__}
-- CUPED: the visitor's frozen pre-exposure value of a metric, or nil (no pre-period).
local function covariate(visitor, metric)
  local c = redis.call('HGET', visitor, 'cov|' .. metric)
  if c then return tonumber(c) end
  return nil
end
""".replace("__METRICS__", ", ".join(f"'{m}'" for m in METRICS))

# KEYS: visitor, sums, days, record, the visitor's record index, then (with a recommendation id) the
# recommendation's "exposed" marker. ARGV: arm, segment, ts, day, record json ('' = none), record ttl, visitor
# ttl, recommendation id, entry count, then (group, metric, dy) triples, then a covariate count and (metric,
# value) pairs. The segment and the covariates are frozen at first exposure.
_EXPOSURE_SCRIPT = (
    _LUA_COMMON
    + """
local visitor = KEYS[1]
local arm, seg, ts, day = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local current = redis.call('HGET', visitor, 'arm')
if current and current ~= arm then return {'arm_conflict', current} end
-- KEYS[6] (with a recommendation id): one exposure per recommendation, so a re-sent script adds nothing.
if KEYS[6] and not redis.call('SET', KEYS[6], '1', 'NX', 'EX', tonumber(ARGV[6])) then return {'duplicate', arm} end
local count = tonumber(ARGV[9])
if not current then
  redis.call('HSET', visitor, 'arm', arm, 'seg', seg, 'first', ARGV[3], 'last', ARGV[3])
  local base = 10 + 3 * count
  for i = 0, tonumber(ARGV[base]) - 1 do
    redis.call('HSET', visitor, 'cov|' .. ARGV[base + 1 + 2 * i], ARGV[base + 2 + 2 * i])
  end
else
  seg = redis.call('HGET', visitor, 'seg')
  if ts > num(redis.call('HGET', visitor, 'last')) then redis.call('HSET', visitor, 'last', ARGV[3]) end
  if ts < num(redis.call('HGET', visitor, 'first')) then redis.call('HSET', visitor, 'first', ARGV[3]) end
end
local segment = 'seg:' .. seg
local function enter(group)
  if redis.call('HSETNX', visitor, group .. '|n', '1') == 1 then
    add(arm, day, group, 'n', 1)
    for _, metric in ipairs(METRICS) do
      local c = covariate(visitor, metric)
      if c then
        if c > 0 then
          add(arm, day, group, metric .. '|c', c)
          add(arm, day, group, metric .. '|c2', c * c)
        end
        add(arm, day, group, metric .. '|cn', 1)
      end
    end
  end
end
enter('all')
enter(segment)
for i = 0, count - 1 do
  local group, metric, dy = ARGV[10 + 3 * i], ARGV[11 + 3 * i], tonumber(ARGV[12 + 3 * i])
  local groups = {group}
  if group == 'all' then groups = {'all', segment} else enter(group) end
  if dy > 0 then
    for _, g in ipairs(groups) do
      local base = g .. '|' .. metric
      local y_old = num(redis.call('HGET', visitor, base .. '|y'))
      local x_old = num(redis.call('HGET', visitor, base .. '|x'))
      redis.call('HINCRBYFLOAT', visitor, base .. '|y', fmt(dy))
      add(arm, day, g, metric .. '|y', dy)
      add(arm, day, g, metric .. '|y2', 2 * y_old * dy + dy * dy)
      if x_old > 0 then add(arm, day, g, metric .. '|xy', x_old * dy) end
      local c = covariate(visitor, metric)
      if c then
        if c > 0 then add(arm, day, g, metric .. '|cy', c * dy) end
        add(arm, day, g, metric .. '|cyp', dy)
      end
    end
  end
end
if ARGV[5] ~= '' then
  local ttl = tonumber(ARGV[6])
  redis.call('SET', KEYS[4], ARGV[5], 'EX', ttl)
  -- KEYS[5], the visitor's records (recommendation id -> when the record expires, Redis clock), so erasure finds
  -- them without a scan. Entries of expired records go here; the index outlives its longest-lived record.
  local now = tonumber(redis.call('TIME')[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  redis.call('ZADD', KEYS[5], now + ttl + 1, ARGV[8])
  if redis.call('TTL', KEYS[5]) < ttl then redis.call('EXPIRE', KEYS[5], ttl) end
end
redis.call('EXPIRE', visitor, tonumber(ARGV[7]))
local result = {'ok', arm}
for i = 1, #out do result[#result + 1] = out[i] end
return result
"""
)

# KEYS: visitor, sums, days, seen. ARGV: expected arm ('' = any), ts, day, lower, upper, window ('' = unset),
# seen ttl, slot group ('' = none), entry count, then (metric, mode b|a, dx) triples.
_OUTCOME_SCRIPT = (
    _LUA_COMMON
    + """
local visitor = KEYS[1]
local ts, day = tonumber(ARGV[2]), ARGV[3]
local head = redis.call('HMGET', visitor, 'arm', 'seg', 'first', 'last')
local arm = head[1]
if not arm then return {'not_exposed'} end
if ARGV[1] ~= '' and ARGV[1] ~= arm then return {'arm_mismatch', arm} end
if ARGV[4] ~= '' and ts < tonumber(ARGV[4]) then return {'outside_window', arm} end
if ARGV[5] ~= '' and ts > tonumber(ARGV[5]) then return {'outside_window', arm} end
if ARGV[6] ~= '' and (ts < num(head[3]) or ts > num(head[4]) + tonumber(ARGV[6])) then
  return {'outside_window', arm}
end
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', tonumber(ARGV[7])) then return {'duplicate', arm} end
local groups = {'all', 'seg:' .. head[2]}
if ARGV[8] ~= '' and redis.call('HEXISTS', visitor, ARGV[8] .. '|n') == 1 then groups[#groups + 1] = ARGV[8] end
local count = tonumber(ARGV[9])
for i = 0, count - 1 do
  local metric, mode, dx = ARGV[10 + 3 * i], ARGV[11 + 3 * i], tonumber(ARGV[12 + 3 * i])
  for _, g in ipairs(groups) do
    local base = g .. '|' .. metric
    local x_old = num(redis.call('HGET', visitor, base .. '|x'))
    local y_old = num(redis.call('HGET', visitor, base .. '|y'))
    local d = dx
    if mode == 'b' then
      if x_old > 0 then d = 0 else d = 1 end
    end
    if d > 0 then
      redis.call('HINCRBYFLOAT', visitor, base .. '|x', fmt(d))
      add(arm, day, g, metric .. '|x', d)
      add(arm, day, g, metric .. '|x2', 2 * x_old * d + d * d)
      if y_old > 0 then add(arm, day, g, metric .. '|xy', y_old * d) end
      local c = covariate(visitor, metric)
      if c then
        if c > 0 then add(arm, day, g, metric .. '|cx', c * d) end
        add(arm, day, g, metric .. '|cxp', d)
      end
      if mode == 'h' then
        -- histogram_increments in Python: the same bucket expression and moves. For visitors with a
        -- pre-period the bucket also keeps their count, Σc, Σc·x and Σx (CUPED on capped values).
        local x_new = x_old + d
        local k_new = math.ceil(4 * math.log(x_new) / math.log(2))
        local h_new = metric .. '|h' .. string.format('%d', k_new)
        if x_old > 0 and math.ceil(4 * math.log(x_old) / math.log(2)) == k_new then
          add(arm, day, g, h_new .. ':x', d)
          add(arm, day, g, h_new .. ':x2', 2 * x_old * d + d * d)
          if c then
            if c > 0 then add(arm, day, g, h_new .. ':cx', c * d) end
            add(arm, day, g, h_new .. ':xp', d)
          end
        else
          if x_old > 0 then
            local h_old = metric .. '|h' .. string.format('%d', math.ceil(4 * math.log(x_old) / math.log(2)))
            add(arm, day, g, h_old .. ':n', -1)
            add(arm, day, g, h_old .. ':x', -x_old)
            add(arm, day, g, h_old .. ':x2', -x_old * x_old)
            if c then
              add(arm, day, g, h_old .. ':cn', -1)
              if c > 0 then
                add(arm, day, g, h_old .. ':c', -c)
                add(arm, day, g, h_old .. ':cx', -c * x_old)
              end
              add(arm, day, g, h_old .. ':xp', -x_old)
            end
          end
          add(arm, day, g, h_new .. ':n', 1)
          add(arm, day, g, h_new .. ':x', x_new)
          add(arm, day, g, h_new .. ':x2', x_new * x_new)
          if c then
            add(arm, day, g, h_new .. ':cn', 1)
            if c > 0 then
              add(arm, day, g, h_new .. ':c', c)
              add(arm, day, g, h_new .. ':cx', c * x_new)
            end
            add(arm, day, g, h_new .. ':xp', x_new)
          end
        end
      end
    end
  end
end
local result = {'ok', arm}
for i = 1, #out do result[#result + 1] = out[i] end
return result
"""
)


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _applied(result: Sequence[Any]) -> Applied:
    status = _decode(result[0])
    arm = _decode(result[1]) if len(result) > 1 else ""
    increments: dict[str, float] = {}
    for i in range(2, len(result) - 1, 2):
        name = _decode(result[i])
        increments[name] = increments.get(name, 0.0) + float(_decode(result[i + 1]))
    return Applied(status, arm, increments)


@dataclass(frozen=True)
class _Parsed:
    experiment_id: str
    kind: str  # "v" (running values), "rec" (an exposure record), "sums", "vrecs", ...
    rest: str  # the visitor id of "v", the recommendation id of "rec"


def _glob_escape(text: str) -> str:
    """`text` matched literally by a Redis SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _opt(value: float | None) -> str:
    return "" if value is None else repr(float(value))


class RedisExperimentStore(ExperimentStore):
    backend = "redis"

    def __init__(self, client: redis.Redis | RedisCluster, namespace: str, dedupe_ttl_s: int = DEDUPE_TTL_S):
        self.client = client
        self.ns = namespace
        self.dedupe_ttl_s = dedupe_ttl_s  # how long a counted outcome event's id is remembered
        self.registry_key = f"{namespace}:experiments:registry"
        # Every experiment ever exposed, for erasure and export. Another slot than the experiment's keys (in a
        # cluster), so added outside the exposure script, before it; once per experiment per store instance.
        self.ids_key = f"{namespace}:experiments:ids"
        self._known_ids: set[str] = set()
        # RedisCluster has the same register_script; the stubs only declare it on Redis.
        scripts = cast(redis.Redis, client)
        self._exposure = scripts.register_script(_EXPOSURE_SCRIPT)
        self._outcome = scripts.register_script(_OUTCOME_SCRIPT)

    def _tag(self, experiment_id: str) -> str:
        return f"{{{self.ns}:exp:{experiment_id}}}"

    def _keys(self, experiment_id: str, visitor_id: str) -> list[str]:
        tag = self._tag(experiment_id)
        return [f"{tag}:v:{visitor_id}", f"{tag}:sums", f"{tag}:days"]

    def _records_index(self, experiment_id: str, visitor_id: str) -> str:
        """The visitor's exposure records in the experiment: a sorted set of recommendation ids scored by when
        the record expires (Redis clock)."""
        return f"{self._tag(experiment_id)}:vrecs:{visitor_id}"

    def _record_key(self, experiment_id: str, recommendation_id: str) -> str:
        return f"{self._tag(experiment_id)}:rec:{recommendation_id}"

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except RedisError as exc:
            raise StorageUnavailable(f"experiment store unavailable: {type(exc).__name__}") from exc

    def record_exposure(self, write: ExposureWrite) -> Applied:
        entries = denominator_args(write.denominators)
        check_record(write)
        tag = self._tag(write.experiment_id)
        keys = [
            *self._keys(write.experiment_id, write.visitor_id),
            self._record_key(write.experiment_id, write.recommendation_id or ""),
            self._records_index(write.experiment_id, write.visitor_id),
        ]
        if write.recommendation_id:
            keys.append(f"{tag}:exposed:{write.recommendation_id}")
        record = json.dumps(write.record, separators=(",", ":")) if write.record and write.recommendation_id else ""
        args: list[Any] = [
            write.arm,
            clean_label(write.segment),
            repr(float(write.ts)),
            day_of(write.ts),
            record,
            write.record_ttl_s,
            VISITOR_TTL_S,
            write.recommendation_id or "",
            len(entries),
        ]
        for entry in entries:
            args.extend(entry)
        covariates = covariate_args(write.covariates)
        args.append(len(covariates))
        for metric, value in covariates:
            args.extend((metric, repr(value)))
        if write.experiment_id not in self._known_ids:
            # Before the script: whatever it writes is then in an experiment erasure and export visit.
            self._call(lambda: self.client.sadd(self.ids_key, write.experiment_id))
            self._known_ids.add(write.experiment_id)
        result = self._call(lambda: self._exposure(keys=keys, args=args))
        return _applied(cast(list[Any], result))

    def record_outcomes(self, writes: Sequence[OutcomeWrite]) -> list[Applied]:
        if not writes:
            return []

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for write in writes:
                entries = value_args(write.values)
                keys = [
                    *self._keys(write.experiment_id, write.visitor_id),
                    f"{self._tag(write.experiment_id)}:seen:{write.event_id}",
                ]
                args: list[Any] = [
                    write.expected_arm or "",
                    repr(float(write.ts)),
                    day_of(write.ts),
                    _opt(write.lower),
                    _opt(write.upper),
                    _opt(write.window_s),
                    self.dedupe_ttl_s,
                    write.slot_group or "",
                    len(entries),
                ]
                for entry in entries:
                    args.extend(entry)
                self._outcome(keys=keys, args=args, client=pipe)
            return cast(list[Any], pipe.execute())

        return [_applied(result) for result in self._call(run)]

    def exposure_records(
        self, experiment_ids: Sequence[str], recommendation_ids: Sequence[str]
    ) -> dict[str, tuple[str, dict[str, Any]]]:
        pairs = [(e, r) for r in dict.fromkeys(recommendation_ids) for e in experiment_ids]
        if not pairs:
            return {}

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for experiment_id, recommendation_id in pairs:
                pipe.get(self._record_key(experiment_id, recommendation_id))
            return cast(list[Any], pipe.execute())

        found: dict[str, tuple[str, dict[str, Any]]] = {}
        for (experiment_id, recommendation_id), raw in zip(pairs, self._call(run), strict=True):
            if raw and recommendation_id not in found:
                found[recommendation_id] = (experiment_id, json.loads(raw))
        return found

    def visitor_heads(
        self, experiment_ids: Sequence[str], visitor_ids: Sequence[str]
    ) -> dict[tuple[str, str], VisitorHead]:
        pairs = [(e, v) for v in dict.fromkeys(visitor_ids) for e in experiment_ids]
        if not pairs:
            return {}

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for experiment_id, visitor_id in pairs:
                pipe.hmget(self._keys(experiment_id, visitor_id)[0], ["arm", "first", "last"])
            return cast(list[Any], pipe.execute())

        heads: dict[tuple[str, str], VisitorHead] = {}
        for pair, (arm, first, last) in zip(pairs, self._call(run), strict=True):
            if arm is not None:
                heads[pair] = VisitorHead(_decode(arm), float(first or 0), float(last or 0))
        return heads

    def _hash_floats(self, key: str) -> dict[str, float]:
        raw = cast(dict[bytes, bytes], self._call(lambda: self.client.hgetall(key)))
        return {k.decode(): float(v) for k, v in raw.items()}

    def raw_sums(self, experiment_id: str) -> dict[str, float]:
        return self._hash_floats(f"{self._tag(experiment_id)}:sums")

    def raw_days(self, experiment_id: str) -> dict[str, float]:
        return self._hash_floats(f"{self._tag(experiment_id)}:days")

    def publish_registry(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        def run() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self.registry_key)
            if entries:
                pipe.hset(self.registry_key, mapping={k: json.dumps(v) for k, v in entries.items()})
            pipe.execute()

        self._call(run)

    def registry(self) -> dict[str, dict[str, Any]]:
        raw = cast(dict[bytes, bytes], self._call(lambda: self.client.hgetall(self.registry_key)))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def forget_visitor(self, experiment_ids: Sequence[str], visitor_id: str) -> int:
        keys = [self._keys(e, visitor_id)[0] for e in dict.fromkeys(experiment_ids)]
        # One key per DEL: in a cluster the keys live in different slots.
        return sum(int(n) for n in self._pipelined(lambda pipe: [pipe.delete(k) for k in keys]))

    def _pipelined(self, queue: Any) -> list[Any]:
        """Run the commands `queue(pipe)` adds in one round trip (per node in a cluster)."""

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            queue(pipe)
            return cast(list[Any], pipe.execute())

        return cast(list[Any], self._call(run))

    def _experiment_ids(self) -> list[str]:
        return sorted(_decode(e) for e in self._call(lambda: self.client.smembers(self.ids_key)))

    def visitor_experiments(self, visitor_id: str) -> list[str]:
        experiments = self._experiment_ids()
        found = self._pipelined(lambda pipe: [pipe.exists(self._keys(e, visitor_id)[0]) for e in experiments])
        return [e for e, exists in zip(experiments, found, strict=True) if exists]

    def erase_visitor(self, visitor_id: str) -> ErasedVisitor:
        """One SMEMBERS, then per experiment the visitor's index, then one DEL per running-values key and per
        record: the cost of what the visitor has, whatever else the database holds."""
        experiments = self._experiment_ids()
        indexes = [self._records_index(e, visitor_id) for e in experiments]
        listed = self._pipelined(lambda pipe: [pipe.zrange(index, 0, -1) for index in indexes])
        records = [
            (index, member, self._record_key(e, _decode(member)))
            for e, index, members in zip(experiments, indexes, listed, strict=True)
            for member in members
        ]

        def queue(pipe: Any) -> None:
            for experiment_id in experiments:
                pipe.delete(self._keys(experiment_id, visitor_id)[0])
            for _, _, key in records:
                pipe.delete(key)
            # The members read, not the whole index: a record an exposure adds meanwhile stays listed.
            for index, member, _ in records:
                pipe.zrem(index, member)

        deleted = self._pipelined(queue)
        values = sum(int(n) for n in deleted[: len(experiments)])
        deleted_records = sum(int(n) for n in deleted[len(experiments) : len(experiments) + len(records)])
        return ErasedVisitor(values, deleted_records)

    def _scan_experiment_keys(self) -> list[_Parsed]:
        """Every key of the namespace's experiments, parsed: a SCAN of the whole database (reindex only)."""
        prefix = "{" + self.ns + ":exp:"

        def run() -> list[str]:
            return [_decode(k) for k in self.client.scan_iter(match=_glob_escape(prefix) + "*", count=1000)]

        parsed: list[_Parsed] = []
        for key in cast(list[str], self._call(run)):
            # "<experiment id>}:<kind>:<rest>"; experiment ids hold no "}:" (the hash tag ends at the first "}").
            experiment_id, found, tail = key[len(prefix) :].partition("}:")
            if found:
                kind, _, rest = tail.partition(":")
                parsed.append(_Parsed(experiment_id, kind, rest))
        return parsed

    def reindex(self) -> Reindexed:
        """Index what was written before the per-visitor indexes existed: add every experiment holding keys to
        the experiment ids, and every exposure record to the index of the visitor it names (the parsed record's
        visitor id, exactly). Walks the whole keyspace once (SCAN): run it once per namespace after the upgrade
        (`selaras experiments reindex`), not per request. Safe while the services run, and to run again."""
        parsed = self._scan_experiment_keys()
        experiments = sorted({p.experiment_id for p in parsed})
        if experiments:
            self._call(lambda: self.client.sadd(self.ids_key, *experiments))
        records = [p for p in parsed if p.kind == "rec"]
        indexed = 0
        for start in range(0, len(records), 500):
            chunk = records[start : start + 500]

            def read(pipe: Any, chunk: list[_Parsed] = chunk) -> None:
                for p in chunk:
                    pipe.get(self._record_key(p.experiment_id, p.rest))
                    pipe.pttl(self._record_key(p.experiment_id, p.rest))

            now = int(cast(tuple[int, int], self._call(lambda: self.client.time()))[0])
            found = self._pipelined(read)
            # index key -> (recommendation id -> score), and the longest record TTL it must outlive.
            entries: dict[str, dict[str, float]] = {}
            ttls: dict[str, int] = {}
            for p, raw, pttl in zip(chunk, found[0::2], found[1::2], strict=True):
                visitor_id = record_visitor(raw)
                if visitor_id is None or int(pttl) == -2:
                    continue
                ttl = VISITOR_TTL_S if int(pttl) < 0 else math.ceil(int(pttl) / 1000)
                index = self._records_index(p.experiment_id, visitor_id)
                entries.setdefault(index, {})[p.rest] = float(now + ttl + 1)
                ttls[index] = max(ttls.get(index, 0), ttl)
            self._pipelined(lambda pipe, entries=entries: [pipe.zadd(k, m) for k, m in entries.items()])
            current = self._pipelined(lambda pipe, entries=entries: [pipe.ttl(k) for k in entries])
            longer = [(k, ttls[k]) for k, t in zip(entries, current, strict=True) if int(t) < ttls[k]]
            self._pipelined(lambda pipe, longer=longer: [pipe.expire(k, ttl) for k, ttl in longer])
            indexed += sum(len(m) for m in entries.values())
        return Reindexed(len(experiments), indexed)

    def close(self) -> None:
        self.client.close()
