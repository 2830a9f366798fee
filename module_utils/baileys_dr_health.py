# -*- coding: utf-8 -*-
# Copyright: contributors to baileys-dr
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read-only health check of the PostgreSQL auth-state store (module baileys_db_health).

Every figure comes from one aggregate query (never rows loaded into Python).
The connection is asynchronous so that each query waits on a client-side
deadline too: a frozen server (SIGSTOP, dead network) enforces no
statement_timeout, and a health check that hangs is worse than one that says
"critical". An unhealthy store is a result, never an exception.
"""

from __future__ import annotations

import copy
import json
import math
import select
import time

from ansible.module_utils.baileys_dr_arming import read_arming_state
from ansible.module_utils.baileys_dr_ages import bucket_conditions
from ansible.module_utils.baileys_dr_codec import COMPANY_ID_RE, KEY_TYPES, PRE_KEYS_STORED_WARNING, PROTECTED_KEY_TYPES
from ansible.module_utils.baileys_dr_identity import IDENTITY_SQL, health_view, identities_from_rows
from ansible.module_utils.baileys_dr_postgres import connection_kwargs, describe_target, psycopg2, scrub
from ansible.module_utils.baileys_dr_deletion_guard import standby_refusal

STATUSES = ("healthy", "warning", "critical")
STATUS_VALUE = {name: index for index, name in enumerate(STATUSES)}

PROTECTED_TYPES = PROTECTED_KEY_TYPES

# A value strictly above a level gets that level (the original dashboard alerted on "> 500 ms",
# "> 80 % of the pool", "> 5 waiting"). None disables a level.
DEFAULT_THRESHOLDS = {
    # The dashboard alerted on a query over 500 ms; the review's SLO was a p95 under 100 ms.
    "latency_p95_seconds": {"warning": 0.1, "critical": 0.5},
    # The dashboard warned above 80 % of the pool; near 100 % new connections are refused.
    "connections_ratio": {"warning": 0.8, "critical": 0.95},
    # The dashboard warned above 5 waiting clients.
    "waiting_locks": {"warning": 5, "critical": 20},
    # The longest lock wait: the application's statement_timeout is far longer than a key write.
    "lock_wait_seconds": {"warning": 10, "critical": 60},
    # Dead / (live + dead) tuples of the worst table; autovacuum starts near 0.2.
    "dead_tuple_ratio": {"warning": 0.2, "critical": 0.5},
    # A company whose creds have no key cannot decrypt anything after a restart.
    "companies_without_keys": {"warning": 0, "critical": None},
    # Keys of a company without creds: the application ignores them (left behind by a delete).
    "companies_keys_without_creds": {"warning": 0, "critical": None},
    # expires_at is not a deletion signal (DOMAIN.md section 1): informational unless set.
    "expired_keys": {"warning": None, "critical": None},
    # Stored pre-keys of the company that holds most (they are never deleted by default: report, do not delete).
    "pre_keys_stored": {"warning": PRE_KEYS_STORED_WARNING, "critical": None},
}

# The keys' age: since their last write (their creation when never updated), in the buckets cleanup counts in too.
AGE_CONDITIONS = bucket_conditions("written", "now()")
AGE_BUCKETS = AGE_CONDITIONS[:-1]
UNKNOWN_TYPE = "(unknown)"
TABLES = ("whatsapp_auth", "whatsapp_keys")

Q_SERVER = (
    "SELECT current_setting('server_version'), current_setting('server_version_num')::int, pg_is_in_recovery(), "
    "current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int, "
    "pg_database_size(current_database()), "
    "CASE WHEN pg_is_in_recovery() THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END, "
    "to_regclass('whatsapp_auth') IS NOT NULL AND to_regclass('whatsapp_keys') IS NOT NULL"
)
Q_READ_ONLY = "SET default_transaction_read_only = on"
Q_PING = "SELECT 1"
Q_SAMPLE_KEYS = "SELECT company_id, key_type, key_id FROM whatsapp_keys LIMIT %s"
# The application's key lookup (Baileys keys.get, one id).
Q_KEY_LOOKUP = "SELECT value FROM whatsapp_keys WHERE company_id = $1 AND key_type = $2 AND key_id = $3"
Q_CONNECTIONS = (
    "SELECT coalesce(application_name, ''), coalesce(state, 'unknown'), count(*) FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' GROUP BY 1, 2 ORDER BY 1, 2"
)
Q_LOCKS = {
    True: "SELECT count(*), coalesce(max(extract(epoch FROM now() - waitstart)), 0)::float8 FROM pg_locks WHERE NOT granted",
    False: (
        "SELECT count(*), coalesce(max(extract(epoch FROM now() - a.query_start)), 0)::float8 "
        "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE NOT l.granted"
    ),
}
Q_LOCK_SAMPLE = {
    True: (
        "SELECT l.pid, l.locktype, l.mode, coalesce(l.relation::regclass::text, ''), coalesce(a.application_name, ''), "
        "coalesce(extract(epoch FROM now() - l.waitstart), 0)::float8, pg_blocking_pids(l.pid) "
        "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE NOT l.granted ORDER BY l.waitstart LIMIT %s"
    ),
    False: (
        "SELECT l.pid, l.locktype, l.mode, coalesce(l.relation::regclass::text, ''), coalesce(a.application_name, ''), "
        "coalesce(extract(epoch FROM now() - a.query_start), 0)::float8, pg_blocking_pids(l.pid) "
        "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE NOT l.granted ORDER BY a.query_start LIMIT %s"
    ),
}
Q_KEYS = (
    "SELECT CASE WHEN key_type = ANY(%(known)s) THEN key_type ELSE '" + UNKNOWN_TYPE + "' END, count(*), "
    "count(*) FILTER (WHERE expires_at < now()), "
    + ", ".join("count(*) FILTER (WHERE %s)" % condition for _, condition in AGE_BUCKETS)
    + ", count(*) FILTER (WHERE %s) " % AGE_CONDITIONS[-1][1]
    + "FROM (SELECT key_type, expires_at, coalesce(updated_at, created_at) AS written FROM whatsapp_keys) k GROUP BY 1 ORDER BY 1"
)
_NO_KEYS = "NOT EXISTS (SELECT 1 FROM whatsapp_keys k WHERE k.company_id = a.company_id)"
_NO_CREDS = "NOT EXISTS (SELECT 1 FROM whatsapp_auth a WHERE a.company_id = k.company_id)"
Q_COMPANIES = "SELECT count(*), count(*) FILTER (WHERE " + _NO_KEYS + ") FROM whatsapp_auth a"
Q_NO_KEYS_SAMPLE = "SELECT company_id FROM whatsapp_auth a WHERE " + _NO_KEYS + " ORDER BY company_id COLLATE \"C\" LIMIT %s"
Q_NO_CREDS = "SELECT count(DISTINCT company_id), count(*) FROM whatsapp_keys k WHERE " + _NO_CREDS
Q_NO_CREDS_SAMPLE = (
    "SELECT company_id, count(*) FROM whatsapp_keys k WHERE " + _NO_CREDS
    + " GROUP BY company_id ORDER BY company_id COLLATE \"C\" LIMIT %s"
)
# Per company: stored pre-keys against the creds' counters (ids below firstUnuploadedPreKeyId were uploaded, ids from it
# to nextPreKeyId were generated and not uploaded yet, ids at or above nextPreKeyId should not exist) and the oldest's age.
_CREDS_ID = "CASE WHEN jsonb_typeof(creds -> '%s') = 'number' THEN (creds ->> '%s')::numeric END"
Q_PRE_KEYS = (
    "WITH c AS (SELECT company_id, " + _CREDS_ID % ("nextPreKeyId", "nextPreKeyId") + " AS next_id, "
    + _CREDS_ID % ("firstUnuploadedPreKeyId", "firstUnuploadedPreKeyId") + " AS first_id FROM whatsapp_auth), "
    "p AS (SELECT company_id, CASE WHEN key_id ~ '^[0-9]{1,18}$' THEN key_id::numeric END AS id, "
    "coalesce(created_at, updated_at) AS born FROM whatsapp_keys WHERE key_type = 'pre-key') "
    "SELECT coalesce(c.company_id, p.company_id), c.company_id IS NOT NULL, c.next_id, c.first_id, count(p.company_id), "
    "count(*) FILTER (WHERE p.id < c.first_id), count(*) FILTER (WHERE p.id >= c.first_id AND p.id < c.next_id), "
    "count(*) FILTER (WHERE p.id >= c.next_id), min(p.id), max(p.id), extract(epoch FROM now() - min(p.born))::float8 "
    "FROM c FULL JOIN p ON p.company_id = c.company_id GROUP BY 1, 2, 3, 4 ORDER BY 1"
)
_TABLE_OIDS = "(" + ", ".join("to_regclass('%s')" % table for table in TABLES) + ")"
Q_TABLES = (
    "SELECT c.relname, pg_table_size(c.oid), pg_indexes_size(c.oid), coalesce(s.n_live_tup, 0), coalesce(s.n_dead_tup, 0), "
    "extract(epoch FROM s.last_vacuum)::float8, extract(epoch FROM s.last_autovacuum)::float8, "
    "extract(epoch FROM s.last_analyze)::float8, extract(epoch FROM s.last_autoanalyze)::float8, "
    "coalesce(s.vacuum_count, 0), coalesce(s.autovacuum_count, 0), coalesce(s.analyze_count, 0), coalesce(s.autoanalyze_count, 0) "
    "FROM pg_class c LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid WHERE c.oid IN " + _TABLE_OIDS + " ORDER BY 1"
)
Q_INDEXES = (
    "SELECT t.relname, i.relname, pg_relation_size(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid "
    "JOIN pg_class t ON t.oid = x.indrelid WHERE x.indrelid IN " + _TABLE_OIDS + " ORDER BY 1, 2"
)


def scope_sql(sql, companies):
    """sql reading only these companies' rows of whatsapp_auth and whatsapp_keys: two common table expressions named
    like the tables shadow them (inside its own definition a non-recursive CTE's name is still the table). The ids are
    written as literals: each is checked against COMPANY_ID_RE first, so a quote cannot reach the SQL."""
    if not companies or "FROM whatsapp_" not in sql:
        return sql
    for company in companies:
        if not COMPANY_ID_RE.match(company):
            raise HealthArgumentError("companies: %r is not a company id ([A-Za-z0-9_-]{1,50})" % (company,))
    listed = ", ".join("'%s'" % company for company in sorted(set(companies)))
    ctes = ", ".join("%s AS (SELECT * FROM %s WHERE company_id IN (%s))" % (table, table, listed) for table in TABLES)
    return "WITH %s, %s" % (ctes, sql[len("WITH "):]) if sql.startswith("WITH ") else "WITH %s %s" % (ctes, sql)


class HealthArgumentError(ValueError):
    """A bad module argument (the only reason the module fails)."""


class QueryTimeout(Exception):
    """The server did not answer within the client-side deadline."""


def merge_thresholds(overrides):
    """DEFAULT_THRESHOLDS with overrides merged per check and level; bad input names the input."""
    merged = copy.deepcopy(DEFAULT_THRESHOLDS)
    for name, levels in (overrides or {}).items():
        if name not in merged:
            raise HealthArgumentError("thresholds: unknown check %r (known: %s)" % (name, ", ".join(sorted(merged))))
        if not isinstance(levels, dict):
            raise HealthArgumentError("thresholds.%s must be a dict with warning and/or critical, got %r" % (name, levels))
        for level, value in levels.items():
            if level not in ("warning", "critical"):
                raise HealthArgumentError("thresholds.%s: unknown level %r (warning, critical)" % (name, level))
            if value is not None and value != "":
                try:
                    if isinstance(value, bool):
                        raise ValueError()
                    value = float(value)
                    if math.isnan(value):
                        raise ValueError()
                except (TypeError, ValueError):
                    raise HealthArgumentError("thresholds.%s.%s must be a number or null, got %r" % (name, level, value)) from None
            merged[name][level] = None if value in (None, "") else value
        warning, critical = merged[name]["warning"], merged[name]["critical"]
        if warning is not None and critical is not None and warning > critical:
            raise HealthArgumentError("thresholds.%s: warning (%s) is above critical (%s)" % (name, warning, critical))
    return merged


def rate(value, levels):
    """Status of a value against {warning, critical}: strictly above a level gets it."""
    if value is None:
        return "healthy"
    if levels.get("critical") is not None and value > levels["critical"]:
        return "critical"
    if levels.get("warning") is not None and value > levels["warning"]:
        return "warning"
    return "healthy"


def worst(statuses):
    return max(statuses, key=lambda s: STATUS_VALUE[s]) if statuses else "healthy"


def quantile(sorted_values, q):
    """Nearest-rank quantile (monotonic in q, so p50 <= p95 <= p99)."""
    if not sorted_values:
        return None
    rank = max(1, int(math.ceil(q * len(sorted_values))))
    return sorted_values[rank - 1]


def shown(text, limit=80):
    """An id fit for a report line: as is when valid, JSON-escaped and shortened otherwise (hostile input)."""
    if COMPANY_ID_RE.match(text):
        return text
    escaped = json.dumps(text)
    return escaped if len(escaped) <= limit else escaped[: limit - 4] + '..."'


class AsyncConnection:
    """A psycopg2 asynchronous connection whose every wait has a deadline."""

    def __init__(self, params, application_name, wait_seconds):
        self.params = params
        self.wait_seconds = wait_seconds
        kwargs = connection_kwargs(params, application_name)
        self.conn = psycopg2.connect(async_=True, **kwargs)
        self._wait(float(kwargs["connect_timeout"]))
        self.cursor = self.conn.cursor()

    def _wait(self, seconds):
        deadline = time.monotonic() + seconds if seconds else None
        while True:
            state = self.conn.poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise QueryTimeout("no answer from the server within %g s" % seconds)
            if state == psycopg2.extensions.POLL_READ:
                select.select([self.conn.fileno()], [], [], remaining)
            elif state == psycopg2.extensions.POLL_WRITE:
                select.select([], [self.conn.fileno()], [], remaining)

    def execute(self, sql, args=None):
        self.cursor.execute(sql, args)
        self._wait(self.wait_seconds)

    def fetchall(self, sql, args=None):
        self.execute(sql, args)
        return self.cursor.fetchall() if self.cursor.description is not None else []

    def close(self):
        try:
            self.conn.close()
        except psycopg2.Error:  # closing a broken connection
            pass


class DbHealth:
    """Collects the figures, rates them and builds the Prometheus samples."""

    def __init__(self, params, clock=time.perf_counter, wall=time.time):
        self.params = params
        self.clock = clock
        self.wall = wall
        self.thresholds = merge_thresholds(params.get("thresholds"))
        self.protected = list(params.get("protected_types") or ())
        self.sample_size = params.get("sample_size", 10)
        self.queries = []
        self.errors = {}
        self.checks = {}
        self.db = None
        self.result = {}

    # -- plumbing ------------------------------------------------------------------------------

    def _query(self, sql, args=None, shown_sql=None):
        # With companies (this application host's), the key, company, pre-key and identity figures count only theirs.
        sql = scope_sql(sql, self.params.get("companies"))
        if (shown_sql or sql) not in self.queries:
            self.queries.append(shown_sql or sql)
        return self.db.fetchall(sql, args)

    def _section(self, name, function):
        """Run one group of queries; a query error marks its checks critical, a timeout ends the run."""
        try:
            function()
            return True
        except QueryTimeout as exc:
            self.errors[name] = "%s (the server stopped answering)" % exc
            self.db.close()
            self.db = None
            raise
        except psycopg2.Error as exc:
            self.errors[name] = scrub(exc, self.params).strip() or type(exc).__name__
            return False

    def _check(self, name, value, message, levels=None, status=None):
        levels = levels if levels is not None else self.thresholds.get(name, {})
        self.checks[name] = {
            "status": status or rate(value, levels),
            "value": value,
            "warning": levels.get("warning"),
            "critical": levels.get("critical"),
            "message": message,
        }

    # -- the run -------------------------------------------------------------------------------

    def run(self):
        started_wall, started = self.wall(), self.clock()
        target = describe_target(self.params)
        result = self.result
        result.update(reachable=False, target=target, checked_at=started_wall)
        statement_timeout = self.params.get("statement_timeout") or 0
        # The server's statement_timeout should fire first; the client-side deadline is for a frozen server.
        wait = statement_timeout / 1000.0 + float(self.params.get("connect_timeout") or 10) if statement_timeout else 0
        try:
            self.db = AsyncConnection(self.params, "baileys-dr-health", wait)
            self._query(Q_READ_ONLY)
            self._query(Q_PING)
            result["reachable"] = True
        except (psycopg2.Error, QueryTimeout) as exc:
            if self.db is not None:
                self.db.close()
                self.db = None
            result["error"] = "cannot connect to PostgreSQL at %s: %s" % (target, scrub(exc, self.params).strip())
        if result["reachable"]:
            self._check("reachability", 1, "connected to %s" % target, levels={}, status="healthy")
            try:
                self._collect()
            except QueryTimeout:
                self._check("reachability", 0, "%s stopped answering: %s" % (target, "; ".join(self.errors.values())),
                            levels={}, status="critical")
            finally:
                if self.db is not None:
                    self.db.close()
        else:
            self._check("reachability", 0, result["error"], levels={}, status="critical")
        if self.params.get("standby_dir"):
            self._standby(self.params["standby_dir"])
        if self.params.get("arming_record"):
            self.result["arming"] = read_arming_state(self.params["arming_record"], self.params.get("arming_max_age") or 3600,
                                                      self.wall())
        self._identity()
        for name, message in self.errors.items():
            # A figure that could not be read is not a healthy figure.
            self.checks.setdefault(name, {"value": None, "warning": None, "critical": None})
            self.checks[name].update(status="critical", message="query failed: %s" % message)
        result["errors"] = dict(self.errors)
        result["checks"] = self.checks
        result["status"] = worst([c["status"] for c in self.checks.values()])
        result["thresholds"] = self.thresholds
        result["duration_seconds"] = round(self.clock() - started, 6)
        result["queries"] = self.queries
        result["metrics"] = self.metrics()
        return result

    def _collect(self):
        sections = (
            ("server", self._server),
            ("latency", self._latency),
            ("connections", self._connections),
            ("locks", self._locks),
        )
        for name, function in sections:
            self._section(name, function)
        if not self.result.get("schema_present", False):
            if "server" not in self.errors:
                self._check("schema", None, "whatsapp_auth or whatsapp_keys is missing (wrong database or search_path?)",
                            levels={}, status="critical")
            return
        for name, function in (("keys", self._keys), ("companies", self._companies), ("pre_keys", self._pre_keys),
                               ("tables", self._tables), ("identity", self._identities)):
            self._section(name, function)

    def _server(self):
        row = self._query(Q_SERVER)[0]
        version, version_num, in_recovery, max_connections, reserved, db_size, replay_lag, schema_present = row
        self.result.update(
            server={
                "version": version,
                "version_num": version_num,
                "in_recovery": in_recovery,
                "replay_lag_seconds": replay_lag,
                "max_connections": max_connections,
                "superuser_reserved_connections": reserved,
                "database_size_bytes": db_size,
            },
            schema_present=schema_present,
        )
        expected = self.params.get("expected_role") or "primary"
        role = "standby" if in_recovery else "primary"
        status = "critical" if expected != "any" and role != expected else "healthy"
        self._check("role", role, "the server is a %s (expected: %s)" % (role, expected), levels={}, status=status)

    def _latency(self):
        probes = self.params.get("probes", 20)
        samples = self._query(Q_SAMPLE_KEYS, (min(probes, 100),)) if self.result.get("schema_present") else []
        # An empty store still gets an index probe, with an id that does not exist.
        targets = samples or [("(none)", "pre-key", "(none)")]
        sql = Q_KEY_LOOKUP.replace("$1", "%s").replace("$2", "%s").replace("$3", "%s")
        if self.result.get("schema_present"):
            self.queries.append(Q_KEY_LOOKUP)
        else:
            sql = Q_PING
            self.queries.append(Q_PING)
        timings = []
        for index in range(probes):
            target = targets[index % len(targets)]
            started = self.clock()
            self.db.fetchall(sql, target if sql != Q_PING else None)
            timings.append(self.clock() - started)
        timings.sort()
        latency = {
            "probes": probes,
            "shape": "key lookup" if sql != Q_PING else "SELECT 1 (no schema)",
            "p50_seconds": quantile(timings, 0.50),
            "p95_seconds": quantile(timings, 0.95),
            "p99_seconds": quantile(timings, 0.99),
            "avg_seconds": sum(timings) / len(timings),
            "min_seconds": timings[0],
            "max_seconds": timings[-1],
        }
        self.result["latency"] = latency
        self._check("latency_p95_seconds", latency["p95_seconds"],
                    "p50 %.1f ms, p95 %.1f ms, p99 %.1f ms over %d key lookups" % (
                        latency["p50_seconds"] * 1000, latency["p95_seconds"] * 1000, latency["p99_seconds"] * 1000, probes))

    def _connections(self):
        rows = self._query(Q_CONNECTIONS)
        total = sum(count for _, _, count in rows)
        server = self.result.get("server") or {}
        max_connections = server.get("max_connections") or 0
        ratio = total / max_connections if max_connections else None
        self.result["connections"] = {
            "total": total,
            "max_connections": max_connections,
            "ratio": ratio,
            "by_application": [{"application": app, "state": state, "count": count} for app, state, count in rows],
        }
        self._check("connections_ratio", ratio, "%d client connections of max_connections %s" % (total, max_connections or "?"))

    def _locks(self):
        has_waitstart = ((self.result.get("server") or {}).get("version_num") or 0) >= 140000
        waiting, longest = self._query(Q_LOCKS[has_waitstart])[0]
        sample = []
        if waiting:
            rows = self._query(Q_LOCK_SAMPLE[has_waitstart], (self.sample_size,))
            for pid, locktype, mode, relation, application, seconds, blockers in rows:
                sample.append({"pid": pid, "locktype": locktype, "mode": mode, "relation": relation, "application": application,
                               "wait_seconds": seconds, "blocked_by": list(blockers or [])})
        self.result["locks"] = {"waiting": waiting, "longest_wait_seconds": longest, "sample": sample}
        self._check("waiting_locks", waiting, "%d lock requests waiting" % waiting)
        self._check("lock_wait_seconds", longest, "longest lock wait %.1f s" % longest)

    def _keys(self):
        rows = self._query(Q_KEYS, {"known": list(KEY_TYPES)})
        by_type, ages, expired, expired_by_type = {}, {name: 0 for name, _ in AGE_BUCKETS}, 0, {}
        unknown_age = 0
        for row in rows:
            key_type, count, expired_count = row[0], row[1], row[2]
            by_type[key_type] = count
            expired_by_type[key_type] = expired_count
            expired += expired_count
            for (bucket, _), value in zip(AGE_BUCKETS, row[3:3 + len(AGE_BUCKETS)]):
                ages[bucket] += value
            unknown_age += row[-1]
        if unknown_age:
            ages["unknown"] = unknown_age
        protected = sum(by_type.get(t, 0) for t in self.protected)
        self.result["keys"] = {
            "total": sum(by_type.values()),
            "by_type": by_type,
            "age_buckets": ages,
            "expired": expired,
            "expired_by_type": expired_by_type,
            "protected": protected,
            "expired_protected": sum(expired_by_type.get(t, 0) for t in self.protected),
            "protected_types": self.protected,
            "unknown_types": by_type.get(UNKNOWN_TYPE, 0),
        }
        self._check("expired_keys", expired, "%d keys past expires_at (%d of them protected types: never delete by expires_at)" % (
            expired, self.result["keys"]["expired_protected"]))

    def _companies(self):
        total, without_keys = self._query(Q_COMPANIES)[0]
        no_keys_sample = [shown(r[0]) for r in self._query(Q_NO_KEYS_SAMPLE, (self.sample_size,))] if without_keys else []
        orphan_companies, orphan_keys = self._query(Q_NO_CREDS)[0]
        no_creds_sample = []
        if orphan_companies:
            no_creds_sample = [{"company_id": shown(c), "keys": n} for c, n in self._query(Q_NO_CREDS_SAMPLE, (self.sample_size,))]
        self.result["companies"] = {
            "total": total,
            "without_keys": without_keys,
            "without_keys_sample": no_keys_sample,
            "keys_without_creds": {"companies": orphan_companies, "keys": orphan_keys, "sample": no_creds_sample},
        }
        self._check("companies_without_keys", without_keys, "%d of %d companies have creds but no keys%s" % (
            without_keys, total, (": " + ", ".join(no_keys_sample)) if no_keys_sample else ""))
        self._check("companies_keys_without_creds", orphan_companies, "%d companies have %d keys but no creds%s" % (
            orphan_companies, orphan_keys, (": " + ", ".join(s["company_id"] for s in no_creds_sample)) if no_creds_sample else ""))

    def _pre_keys(self):
        companies = {}
        number = lambda v: None if v is None else (int(v) if v == int(v) else float(v))  # noqa: E731
        for (company, has_creds, next_id, first_id, stored, uploaded, not_uploaded, beyond, min_id, max_id,
             oldest) in self._query(Q_PRE_KEYS):
            companies[shown(company)] = {
                "stored": stored, "creds": has_creds,
                "next_pre_key_id": number(next_id), "first_unuploaded_pre_key_id": number(first_id),
                "uploaded": uploaded, "not_uploaded": not_uploaded, "at_or_above_next": beyond,
                "min_id": number(min_id), "max_id": number(max_id), "oldest_age_seconds": oldest,
            }
        warning = self.thresholds["pre_keys_stored"]["warning"]
        over = sorted(c for c, info in companies.items() if warning is not None and info["stored"] > warning)
        most = max(companies, key=lambda c: companies[c]["stored"]) if companies else None
        self.result["pre_keys"] = {
            "total": sum(info["stored"] for info in companies.values()),
            "max_stored": companies[most]["stored"] if most else 0,
            "over_warning": over,
            "companies": companies,
        }
        self._check("pre_keys_stored", self.result["pre_keys"]["max_stored"],
                    "%s holds the most pre-keys (%d; an account has on the order of 800 uploaded at a time)%s; "
                    "pre-keys are never deleted by default" % (
                        most, companies[most]["stored"], ("; over %s: %s" % (int(warning), ", ".join(over[:self.sample_size])))
                        if over else "") if most else "no pre-keys")

    def _tables(self):
        floor = self.params.get("dead_tuples_floor", 1000)
        tables = {}
        for row in self._query(Q_TABLES):
            (name, size, indexes_size, live, dead, vacuum, autovacuum, analyze, autoanalyze,
             vacuums, autovacuums, analyzes, autoanalyzes) = row
            tables[name] = {
                "size_bytes": size, "indexes_size_bytes": indexes_size, "total_size_bytes": size + indexes_size,
                "live_tuples": live, "dead_tuples": dead,
                "dead_tuple_ratio": dead / (live + dead) if live + dead else 0.0,
                "last_vacuum": vacuum, "last_autovacuum": autovacuum, "last_analyze": analyze, "last_autoanalyze": autoanalyze,
                "vacuum_count": vacuums, "autovacuum_count": autovacuums, "analyze_count": analyzes, "autoanalyze_count": autoanalyzes,
                "indexes": {},
            }
        for table, index, size in self._query(Q_INDEXES):
            tables[table]["indexes"][index] = size
        self.result["tables"] = tables
        # Small tables reach any ratio with a handful of dead rows: below the floor they count as clean.
        rated = {n: (t["dead_tuple_ratio"] if t["dead_tuples"] >= floor else 0.0) for n, t in tables.items()}
        worst_table = max(rated, key=rated.get) if rated else None
        value = rated[worst_table] if worst_table else 0.0
        self._check("dead_tuple_ratio", value, "%s: %d dead of %d tuples (tables under %d dead tuples count as clean)" % (
            worst_table, tables[worst_table]["dead_tuples"], tables[worst_table]["dead_tuples"] + tables[worst_table]["live_tuples"],
            floor) if worst_table else "no tables")

    def _standby(self, path):
        """standby_refresh: critical while the last refresh of the standby copy was refused by its deletion guard (the copy
        then keeps an older generation on purpose, and the database probably lost rows). Files only, read-only."""
        state = standby_refusal(path)
        self.result["standby"] = dict(state, path=path)
        kept = "generation %s (database time %s)" % (state["generation"], state["snapshot_at"]) if state["generation"] else "no manifest"
        if state["refused"] is not None:
            refused = state["refused"]
            reasons = refused.get("reasons") if isinstance(refused.get("reasons"), list) else [refused.get("reasons")]
            self._check("standby_refresh", 1, "the last refresh of the standby copy %s was refused%s: %s; it keeps %s. Restore the "
                        "deleted rows from it (docs/runbook.md, scenario 3) or, if the deletion was intended, run snapshot.yml "
                        "with -e baileys_snapshot_force=true" % (
                            path, " at %s" % refused["refused_at"] if refused.get("refused_at") else "",
                            "; ".join(str(r) for r in reasons if r) or "no reason recorded", kept),
                        levels={}, status="critical")
        elif state["error"]:
            self._check("standby_refresh", None, "the standby copy %s cannot be read: %s" % (path, state["error"]), levels={},
                        status="warning")
        elif not state["exists"]:
            self._check("standby_refresh", None, "no standby copy at %s" % path, levels={}, status="healthy")
        else:
            self._check("standby_refresh", 0, "no refused refresh; the standby copy %s holds %s, last good refresh %s" % (
                path, kept, state["last_good_refresh"]), levels={}, status="healthy")

    def _identities(self):
        self.identities = identities_from_rows(self._query(IDENTITY_SQL))

    def _identity(self):
        """identity: critical when a company's identity changed since the last snapshot; credentials_cache (files only)."""
        p = self.params
        if not (p.get("standby_dir") or p.get("sessions_dir") or p.get("app_root")):
            return
        report, checks = health_view(getattr(self, "identities", None), p.get("standby_dir"), p.get("sessions_dir"),
                                     p.get("app_root"), self.sample_size, self.wall())
        self.result["identity"] = report
        for name, value, status, message in checks:
            self._check(name, value, message, levels={}, status=status)

    # -- Prometheus samples (module baileys_metrics) ---------------------------------------------

    def metrics(self):
        out = []

        def add(name, help_text, value, labels=None, kind="gauge"):
            if value is None:
                return
            out.append({"name": "baileys_dr_" + name, "type": kind, "help": help_text, "value": float(value),
                        "labels": {k: str(v) for k, v in (labels or {}).items()}})

        r = self.result
        answered = r.get("reachable") and self.checks.get("reachability", {}).get("status") == "healthy"
        add("db_up", "1 when the auth-state database answered the health check.", 1 if answered else 0)
        server = r.get("server") or {}
        add("db_in_recovery", "1 when the database server is a standby (pg_is_in_recovery).",
            None if "in_recovery" not in server else int(server["in_recovery"]))
        add("db_replay_lag_seconds", "Seconds since the last transaction a standby replayed.", server.get("replay_lag_seconds"))
        add("db_size_bytes", "Size of the auth-state database.", server.get("database_size_bytes"))
        add("db_max_connections", "The server's max_connections.", server.get("max_connections"))
        latency = r.get("latency") or {}
        for q in ("0.5", "0.95", "0.99"):
            key = "p%s_seconds" % {"0.5": "50", "0.95": "95", "0.99": "99"}[q]
            add("db_latency_seconds", "Latency of the application's key lookup, by quantile of the health probes.",
                latency.get(key), {"quantile": q})
        add("db_latency_average_seconds", "Average latency of the health probes.", latency.get("avg_seconds"))
        add("db_latency_probes", "Probe queries the latency figures come from.", latency.get("probes"))
        for item in (r.get("connections") or {}).get("by_application", []):
            add("db_connections", "Client connections by application_name and state.", item["count"],
                {"application": item["application"], "state": item["state"]})
        locks = r.get("locks") or {}
        add("db_waiting_locks", "Lock requests not granted.", locks.get("waiting"))
        add("db_lock_wait_max_seconds", "Longest current lock wait.", locks.get("longest_wait_seconds"))
        keys = r.get("keys") or {}
        for key_type, count in sorted((keys.get("by_type") or {}).items()):
            add("keys", "Signal keys by type.", count, {"key_type": key_type})
        for bucket, count in (keys.get("age_buckets") or {}).items():
            add("keys_age", "Signal keys by time since their last write.", count, {"bucket": bucket})
        add("keys_expired", "Keys past expires_at (not a deletion signal).", keys.get("expired"))
        add("keys_protected", "Keys of protected types (never deleted by cleanup).", keys.get("protected"))
        add("keys_expired_protected", "Keys of protected types past expires_at.", keys.get("expired_protected"))
        for company, info in sorted(((r.get("pre_keys") or {}).get("companies") or {}).items()):
            labels = {"company": company}
            add("pre_keys", "Stored pre-keys by company (never deleted by default).", info["stored"], labels)
            add("pre_keys_uploaded", "Stored pre-keys below creds.firstUnuploadedPreKeyId, by company.", info["uploaded"], labels)
            add("pre_keys_not_uploaded", "Stored pre-keys from creds.firstUnuploadedPreKeyId to nextPreKeyId, by company.",
                info["not_uploaded"], labels)
            add("pre_keys_next_id", "creds.nextPreKeyId by company.", info["next_pre_key_id"], labels)
            add("pre_keys_first_unuploaded_id", "creds.firstUnuploadedPreKeyId by company.", info["first_unuploaded_pre_key_id"], labels)
            add("pre_keys_oldest_age_seconds", "Age of the oldest stored pre-key by company (since it was written).",
                info["oldest_age_seconds"], labels)
        companies = r.get("companies") or {}
        add("companies", "Companies with creds.", companies.get("total"))
        add("companies_without_keys", "Companies with creds but no keys.", companies.get("without_keys"))
        orphans = companies.get("keys_without_creds") or {}
        add("companies_keys_without_creds", "Companies with keys but no creds.", orphans.get("companies"))
        add("keys_without_creds", "Keys of companies without creds.", orphans.get("keys"))
        for table, info in sorted((r.get("tables") or {}).items()):
            labels = {"table": table}
            add("table_size_bytes", "Table size without indexes (heap, TOAST, maps).", info["size_bytes"], labels)
            add("table_indexes_size_bytes", "Size of the table's indexes.", info["indexes_size_bytes"], labels)
            add("table_live_tuples", "Estimated live tuples.", info["live_tuples"], labels)
            add("table_dead_tuples", "Estimated dead tuples.", info["dead_tuples"], labels)
            for kind, prefix in (("manual", ""), ("auto", "auto")):
                by_kind = dict(labels, kind=kind)
                add("table_last_vacuum_timestamp_seconds", "Last vacuum of the table.", info["last_" + prefix + "vacuum"], by_kind)
                add("table_last_analyze_timestamp_seconds", "Last analyze of the table.", info["last_" + prefix + "analyze"], by_kind)
                add("table_vacuums_total", "Vacuums of the table since statistics were reset.",
                    info[prefix + "vacuum_count"], by_kind, "counter")
                add("table_analyzes_total", "Analyzes of the table since statistics were reset.",
                    info[prefix + "analyze_count"], by_kind, "counter")
            for index, size in sorted(info["indexes"].items()):
                add("index_size_bytes", "Size of each index of the auth-state tables.", size, {"table": table, "index": index})
        status_help = "Health check status: 0 healthy, 1 warning, 2 critical."
        for check, info in self.checks.items():
            add("health_status", status_help, STATUS_VALUE[info["status"]], {"check": check})
        if "status" in r:
            add("health_status", status_help, STATUS_VALUE[r["status"]], {"check": "overall"})
        arming = r.get("arming")
        if arming:
            add("failover_armed", "1 when the last standby refresh armed the failover (its arming record holds).", int(arming["armed"]))
            add("failover_armed_since_timestamp_seconds", "Since when the failover has been armed without a break.",
                arming.get("armed_since_epoch"))
        add("health_duration_seconds", "Duration of the health check.", r.get("duration_seconds"))
        add("health_last_run_timestamp_seconds", "When the health check ran.", r.get("checked_at"))
        return out
