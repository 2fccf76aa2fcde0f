"""The experiment store on Redis: each update is one Lua script, atomic per experiment.

Redis keys of one experiment share the hash tag `{<namespace>:exp:<experiment id>}`, so each script's keys
live in one Redis Cluster slot.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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
    VisitorHead,
    clean_label,
    covariate_args,
    day_of,
    denominator_args,
    names_visitor,
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

# KEYS: visitor, sums, days, record, then (with a recommendation id) the recommendation's "exposed" marker.
# ARGV: arm, segment, ts, day, record json ('' = none), record ttl, visitor ttl, entry count, then (group,
# metric, dy) triples, then a covariate count and (metric, value) pairs. The segment and the covariates are
# frozen at first exposure.
_EXPOSURE_SCRIPT = (
    _LUA_COMMON
    + """
local visitor = KEYS[1]
local arm, seg, ts, day = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local current = redis.call('HGET', visitor, 'arm')
if current and current ~= arm then return {'arm_conflict', current} end
-- KEYS[5] (with a recommendation id): one exposure per recommendation, so a re-sent script adds nothing.
if KEYS[5] and not redis.call('SET', KEYS[5], '1', 'NX', 'EX', tonumber(ARGV[6])) then return {'duplicate', arm} end
local count = tonumber(ARGV[8])
if not current then
  redis.call('HSET', visitor, 'arm', arm, 'seg', seg, 'first', ARGV[3], 'last', ARGV[3])
  local base = 9 + 3 * count
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
  local group, metric, dy = ARGV[9 + 3 * i], ARGV[10 + 3 * i], tonumber(ARGV[11 + 3 * i])
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
if ARGV[5] ~= '' then redis.call('SET', KEYS[4], ARGV[5], 'EX', tonumber(ARGV[6])) end
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
        # RedisCluster has the same register_script; the stubs only declare it on Redis.
        scripts = cast(redis.Redis, client)
        self._exposure = scripts.register_script(_EXPOSURE_SCRIPT)
        self._outcome = scripts.register_script(_OUTCOME_SCRIPT)

    def _tag(self, experiment_id: str) -> str:
        return f"{{{self.ns}:exp:{experiment_id}}}"

    def _keys(self, experiment_id: str, visitor_id: str) -> list[str]:
        tag = self._tag(experiment_id)
        return [f"{tag}:v:{visitor_id}", f"{tag}:sums", f"{tag}:days"]

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except RedisError as exc:
            raise StorageUnavailable(f"experiment store unavailable: {type(exc).__name__}") from exc

    def record_exposure(self, write: ExposureWrite) -> Applied:
        entries = denominator_args(write.denominators)
        tag = self._tag(write.experiment_id)
        keys = [*self._keys(write.experiment_id, write.visitor_id), f"{tag}:rec:{write.recommendation_id or ''}"]
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
            len(entries),
        ]
        for entry in entries:
            args.extend(entry)
        covariates = covariate_args(write.covariates)
        args.append(len(covariates))
        for metric, value in covariates:
            args.extend((metric, repr(value)))
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
                pipe.get(f"{self._tag(experiment_id)}:rec:{recommendation_id}")
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
        return sum(
            int(self._call(lambda e=e: self.client.delete(self._keys(e, visitor_id)[0]))) for e in experiment_ids
        )

    def _scan(self, pattern: str) -> list[str]:
        return cast(
            list[str], self._call(lambda: [_decode(k) for k in self.client.scan_iter(match=pattern, count=1000)])
        )

    def _visitor_value_keys(self, visitor_id: str) -> list[str]:
        """The visitor's running-value keys in every experiment. Export and erasure are rare: a SCAN over the
        experiment keys is acceptable. The pattern narrows the scan; the exact check decides (a visitor id may
        contain glob characters or "}:v:")."""
        prefix = "{" + self.ns + ":exp:"
        return [
            key
            for key in self._scan(_glob_escape(prefix) + "*" + _glob_escape("}:v:" + visitor_id))
            if key[len(prefix) :].split("}:v:", 1)[-1] == visitor_id
        ]

    def visitor_experiments(self, visitor_id: str) -> list[str]:
        prefix = "{" + self.ns + ":exp:"
        return sorted({key[len(prefix) :].split("}:v:", 1)[0] for key in self._visitor_value_keys(visitor_id)})

    def erase_visitor(self, visitor_id: str) -> ErasedVisitor:
        prefix = "{" + self.ns + ":exp:"
        values = self._visitor_value_keys(visitor_id)
        records = self._scan(_glob_escape(prefix) + "*}:rec:*")
        doomed: list[str] = []
        for start in range(0, len(records), 500):
            chunk = records[start : start + 500]
            raws = self._call(lambda chunk=chunk: [self.client.get(k) for k in chunk])
            doomed.extend(k for k, raw in zip(chunk, raws, strict=True) if raw and names_visitor(raw, visitor_id))
        # One key per call: in a cluster the keys live in different slots.
        deleted_values = sum(int(self._call(lambda k=k: self.client.delete(k))) for k in values)
        deleted_records = sum(int(self._call(lambda k=k: self.client.delete(k))) for k in doomed)
        return ErasedVisitor(deleted_values, deleted_records)

    def close(self) -> None:
        self.client.close()
