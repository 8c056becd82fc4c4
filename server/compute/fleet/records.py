"""Task records in Redis, shared by every API server and worker of the fleet.

Why Redis and not PostgreSQL: it is already the fleet's default broker and its event bus
(pub/sub), so the compute side needs no database of its own, no schema and no migrations;
a record changes many times in its short life (claims, progress, lease renewals) and is
retired after ``retain_finished_s`` by a TTL, not by a vacuum; and every transition is one
Lua script, atomic on the server, that also publishes the change. What PostgreSQL would add
is durability by default: run the fleet's Redis with ``appendonly yes`` (every write logged,
fsync every second) so a restart of Redis loses at most a second of transitions, which the
adapter's idempotent submit and the workers' claims absorb.

Keys, under the namespace ``ns`` (``SARTIQ_COMPUTE_SERVER__NAMESPACE``):

* ``ns:task:<id>``: a hash, the record (see ``TaskRecord``);
* ``ns:key:<idempotency key>``: the id the key created (the idempotency index; the
  scripts that retire a record derive it from the record's ``key`` field, so Redis Cluster,
  which needs every key declared, is not supported);
* ``ns:pending`` / ``ns:running``: sets of live ids; ``ns:created`` / ``ns:ended``: counters;
* ``ns:workers``: a sorted set of worker processes by the time their heartbeat expires;
* channel ``ns:events:<id>``: the record's version, published at each change.

States: pending -> running -> completed | failed | cancelled, and pending -> cancelled. A
worker *claims* a task before running it: the claim names the worker's token and lasts
``lease_s`` from its last renewal; while it lasts no other worker runs the task, and a
claim that lapsed (its worker died or stalled) is taken over by the next delivery, counted
in ``attempts``. Progress, renewals and the final write all name the token: a worker that
lost its claim writes nothing more. Times are Redis's own clock, in milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter

from server.compute.server.board import NamedOutput, task_output
from server.compute.wire import TaskAnswer, WireStatus

TERMINAL = ("completed", "failed", "cancelled")

# -- the scripts: each is one atomic transition -------------------------------------------

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# The terminal write shared by the scripts: status, end time, counters, retention, event.
_END = """
-- keys: the prefix of the idempotency index (the record names its key)
local function finish(task, status, now, ttl, ended, keys, channel)
  redis.call('HSET', task, 'status', status, 'completed_at', now, 'claim', '')
  redis.call('INCR', ended)
  local version = redis.call('HINCRBY', task, 'version', 1)
  redis.call('PEXPIRE', task, ttl)
  redis.call('PEXPIRE', keys .. redis.call('HGET', task, 'key'), ttl)
  redis.call('PUBLISH', channel, version)
end
local function changed(task, channel)
  redis.call('PUBLISH', channel, redis.call('HINCRBY', task, 'version', 1))
end
"""

# KEYS: keyidx, task, pending, created. ARGV: id, key, task_type, org, params, inputs.
# Returns the id the key names: ARGV[1] when this call created it.
CREATE = (
    _NOW
    + """
local existing = redis.call('GET', KEYS[1])
if existing then return existing end
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'key', ARGV[2], 'task_type', ARGV[3],
  'org', ARGV[4], 'params', ARGV[5], 'inputs', ARGV[6], 'status', 'pending', 'progress', '0',
  'created_at', now, 'attempts', 0, 'cancel', 0, 'version', 1, 'outputs', '[]', 'claim', '')
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('INCR', KEYS[4])
return ARGV[1]
"""
)

# KEYS: task, pending, running, ended, key prefix, channel. ARGV: token, lease_ms, ttl_ms.
# Returns {outcome, detail}: claimed (attempt) | held (ms left) | terminal | cancelled | gone.
CLAIM = (
    _NOW
    + _END
    + """
local s = redis.call('HMGET', KEYS[1], 'status', 'cancel', 'claim_until', 'id')
if not s[1] then return {'gone', ''} end
if s[1] == 'completed' or s[1] == 'failed' or s[1] == 'cancelled' then
  return {'terminal', ''}
end
if s[1] == 'running' and tonumber(s[3]) > now then
  return {'held', tostring(tonumber(s[3]) - now)}
end
if s[2] == '1' then
  redis.call('SREM', KEYS[2], s[4])
  redis.call('SREM', KEYS[3], s[4])
  finish(KEYS[1], 'cancelled', now, tonumber(ARGV[3]), KEYS[4], KEYS[5], KEYS[6])
  return {'cancelled', ''}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'claim', ARGV[1],
  'claim_until', now + tonumber(ARGV[2]))
if redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then
  redis.call('HSET', KEYS[1], 'started_at', now)
end
redis.call('SREM', KEYS[2], s[4])
redis.call('SADD', KEYS[3], s[4])
changed(KEYS[1], KEYS[6])
return {'claimed', tostring(attempt)}
"""
)

# KEYS: task, channel. ARGV: token, lease_ms, progress ('' for a renewal alone).
# Returns lost | cancel | ok.
RENEW = (
    _NOW
    + _END
    + """
local s = redis.call('HMGET', KEYS[1], 'claim', 'cancel', 'progress')
if s[1] ~= ARGV[1] then return 'lost' end
redis.call('HSET', KEYS[1], 'claim_until', now + tonumber(ARGV[2]))
if ARGV[3] ~= '' and tonumber(ARGV[3]) > tonumber(s[3]) then
  redis.call('HSET', KEYS[1], 'progress', ARGV[3])
  changed(KEYS[1], KEYS[2])
end
if s[2] == '1' then return 'cancel' end
return 'ok'
"""
)

# KEYS: task, running, ended, key prefix, channel.
# ARGV: token, status, outputs JSON, error category, error message, ttl_ms.
# Returns lost | ok.
FINISH = (
    _NOW
    + _END
    + """
local s = redis.call('HMGET', KEYS[1], 'claim', 'id')
if s[1] ~= ARGV[1] then return 'lost' end
redis.call('HSET', KEYS[1], 'outputs', ARGV[3], 'error_category', ARGV[4],
  'error_message', ARGV[5])
if ARGV[2] == 'completed' then redis.call('HSET', KEYS[1], 'progress', '1') end
redis.call('SREM', KEYS[2], s[2])
finish(KEYS[1], ARGV[2], now, tonumber(ARGV[6]), KEYS[3], KEYS[4], KEYS[5])
return 'ok'
"""
)

# KEYS: task, pending, ended, key prefix, channel. ARGV: ttl_ms.
# Returns gone | terminal | cancelled (it was pending) | requested (it runs).
CANCEL = (
    _NOW
    + _END
    + """
local s = redis.call('HMGET', KEYS[1], 'status', 'id')
if not s[1] then return 'gone' end
if s[1] == 'completed' or s[1] == 'failed' or s[1] == 'cancelled' then return 'terminal' end
redis.call('HSET', KEYS[1], 'cancel', 1)
if s[1] == 'pending' then
  redis.call('SREM', KEYS[2], s[2])
  finish(KEYS[1], 'cancelled', now, tonumber(ARGV[1]), KEYS[3], KEYS[4], KEYS[5])
  return 'cancelled'
end
changed(KEYS[1], KEYS[5])
return 'requested'
"""
)

# KEYS: workers. ARGV: name, ttl_ms. Returns the live workers (heartbeat not expired).
HEARTBEAT = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)

# KEYS: workers. Returns the number of live workers.
LIVE_WORKERS = (
    _NOW
    + """
return redis.call('ZCOUNT', KEYS[1], now, '+inf')
"""
)


_OUTPUTS = TypeAdapter(list[NamedOutput])


@dataclass(frozen=True, slots=True)
class Keys:
    """Every Redis key and channel of one namespace."""

    ns: str

    def task(self, task_id: str) -> str:
        """The record's hash."""
        return f"{self.ns}:task:{task_id}"

    def key(self, idempotency_key: str) -> str:
        """The idempotency index entry of a key."""
        return f"{self.ns}:key:{idempotency_key}"

    def events(self, task_id: str) -> str:
        """The channel a task's changes are published on."""
        return f"{self.ns}:events:{task_id}"

    @property
    def pending(self) -> str:
        """The set of pending task ids."""
        return f"{self.ns}:pending"

    @property
    def running(self) -> str:
        """The set of running task ids."""
        return f"{self.ns}:running"

    @property
    def created(self) -> str:
        """The count of tasks ever created."""
        return f"{self.ns}:created"

    @property
    def ended(self) -> str:
        """The count of tasks ever ended."""
        return f"{self.ns}:ended"

    @property
    def workers(self) -> str:
        """Worker processes by heartbeat expiry."""
        return f"{self.ns}:workers"


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task's record, as read from its hash."""

    id: str
    idempotency_key: str
    task_type: str
    organization: str
    params: dict[str, Any]
    # The SHA-256 of each input the API server stored for it: all its processor may read.
    inputs: tuple[str, ...]
    status: WireStatus
    progress: float
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    outputs: list[NamedOutput]
    error_category: str | None
    error_message: str | None
    attempts: int
    cancel_requested: bool
    # Whether an API server confirmed a delivery was sent to the broker.
    queued: bool
    version: int

    @classmethod
    def from_hash(cls, fields: Mapping[Any, Any]) -> TaskRecord:
        """The record a hash holds (``HGETALL``).

        Raises:
            ValueError: the hash is not a task record (a field missing or malformed).
        """
        f = {_text(k): _text(v) for k, v in fields.items()}
        try:
            status = f["status"]
            if status not in ("pending", "running", *TERMINAL):
                raise ValueError(f"unknown status {status!r}")
            return cls(
                id=f["id"],
                idempotency_key=f["key"],
                task_type=f["task_type"],
                organization=f.get("org", ""),
                params=json.loads(f["params"]),
                inputs=tuple(json.loads(f.get("inputs") or "[]")),
                status=status,  # type: ignore[arg-type]  # checked above
                progress=min(max(float(f["progress"]), 0.0), 1.0),
                created_at=_time(f["created_at"]),
                started_at=_maybe_time(f.get("started_at")),
                completed_at=_maybe_time(f.get("completed_at")),
                outputs=_OUTPUTS.validate_json(f.get("outputs") or "[]"),
                error_category=f.get("error_category") or None,
                error_message=f.get("error_message") or None,
                attempts=int(f.get("attempts", "0")),
                cancel_requested=f.get("cancel") == "1",
                queued=f.get("queued") == "1",
                version=int(f["version"]),
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"not a task record: {exc}") from None

    @property
    def terminal(self) -> bool:
        """Whether the task is completed, failed or cancelled."""
        return self.status in TERMINAL

    def answer(self) -> TaskAnswer:
        """The wire answer: state, and each output by its output path, hash and size."""
        return TaskAnswer(
            id=self.id,
            idempotency_key=self.idempotency_key,
            task_type=self.task_type,
            status=self.status,
            progress=self.progress,
            created_at=self.created_at,
            started_at=self.started_at,
            completed_at=self.completed_at,
            output=task_output(self.id, self.outputs if self.status == "completed" else []),
            error_category=self.error_category,
            error_message=self.error_message,
        )


def outputs_json(outputs: list[NamedOutput]) -> str:
    """The ``outputs`` field of a record."""
    return _OUTPUTS.dump_json(outputs).decode()


def _time(value: str) -> datetime:
    return datetime.fromtimestamp(int(value) / 1000, UTC)


def _maybe_time(value: str | None) -> datetime | None:
    return _time(value) if value else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
