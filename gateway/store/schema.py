"""The shared store's schema, by version: every table the replicas share, in the schema `mcp_armor`.

`Database.migrate` applies the steps a store lacks, in one transaction; `schema_version` says which
version a store holds. Each part's tables are described where they are used: the audit chain in
`gateway/audit/shared.py`, the approval queue in `gateway/audit/shared_approvals.py`, rate-limit counts
in `gateway/policy/shared_rates.py`, session records in `gateway/core/shared_sessions.py`, approved pins in
`gateway/catalog/shared_pins.py`.
"""

from __future__ import annotations

SCHEMA = "mcp_armor"
GENESIS = "0" * 64

AUDIT = (
    # The chain: one row per event, `body` its canonical text (what the hash covers); the other columns
    # are copies of body fields for queries, checked against the body by `audit verify`.
    """CREATE TABLE events (
        seq bigint PRIMARY KEY,
        prev_hash text NOT NULL,
        hash text NOT NULL,
        body text NOT NULL,
        kind text NOT NULL,
        session_id text,
        call_id text,
        tool text,
        decision text,
        outcome text,
        ts text NOT NULL,
        principal text,
        lease text
    )""",
    "CREATE INDEX events_session ON events (session_id, seq)",
    "CREATE INDEX events_lease ON events (lease) WHERE lease IS NOT NULL",
    # Exactly one decision and one outcome per call, one start and one end per session: a second one (a
    # batch retried after a commit whose answer was lost, a late outcome of a call already settled as
    # interrupted) is skipped by `append_events`, never stored.
    "CREATE UNIQUE INDEX events_call_once ON events (call_id, kind) WHERE kind IN ('decision', 'outcome')",
    "CREATE UNIQUE INDEX events_session_once ON events (session_id, kind) "
    "WHERE kind IN ('session_start', 'session_end')",
    "CREATE TABLE head (id int PRIMARY KEY CHECK (id = 1), seq bigint NOT NULL, hash text NOT NULL)",
    f"INSERT INTO head VALUES (1, 0, '{GENESIS}')",
    # Events are appended, never changed: a mistake (or a script) that tries is refused by the server.
    # Whoever owns the table can drop the trigger; the chain and its anchors catch what they do then.
    """CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN
        RAISE EXCEPTION 'mcp-armor: audit events are appended, never changed or removed';
    END $fn$""",
    "CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events "
    "FOR EACH ROW EXECUTE FUNCTION events_append_only()",
    "CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events "
    "FOR EACH STATEMENT EXECUTE FUNCTION events_append_only()",
    # One group of events appended to the chain in the caller's transaction: the head row is locked,
    # so appends from every replica take turns and the chain stays one. Each event's hash is
    # SHA-256(prev hash bytes || UTF-8 body), as gateway/audit/chain.py computes it.
    # One group of events appended to the chain in the caller's transaction: the head row is locked,
    # so appends from every replica take turns and the chain stays one. Each event's hash is
    # SHA-256(prev hash bytes || UTF-8 body), as gateway/audit/chain.py computes it. `durable` false: the
    # commit is acknowledged once the server has it, and written to disk by its WAL writer a moment later
    # (for groups that hold no decision: a decision is always on disk before its call is forwarded).
    #
    # `data` is the group as one text, which costs the caller far less to send than an array per column:
    # events apart by U+001E, each its body and then its columns (`kind`, `session_id`, `call_id`, `tool`,
    # `decision`, `outcome`, `ts`, `principal`, `lease`) apart by U+001F, a lone U+001D for NULL. Neither
    # is ever in a body (canonical JSON writes every control character as an escape) or in a column (the
    # gateway writes them as U+FFFD there).
    """CREATE FUNCTION append_events(
        data text, durable boolean, OUT head_seq bigint, OUT head_hash text, OUT appended int
    ) LANGUAGE plpgsql AS $fn$
    #variable_conflict use_column
    DECLARE
        bodies text[];
        kinds text[];
        sessions text[];
        calls text[];
        tools text[];
        decisions text[];
        outcomes text[];
        stamps text[];
        principals text[];
        leases text[];
        s bigint;
        h text;
        n int;
        first_seq bigint;
        first_hash text;
        e record;
        seen text[] := '{}';
        once text;
        keep int[];
        prevs text[];
        hashes text[];
    BEGIN
        IF NOT durable THEN
            PERFORM set_config('synchronous_commit', 'off', true);
        END IF;
        SELECT array_agg(f[1] ORDER BY i), array_agg(nullif(f[2], E'\\x1d') ORDER BY i),
               array_agg(nullif(f[3], E'\\x1d') ORDER BY i), array_agg(nullif(f[4], E'\\x1d') ORDER BY i),
               array_agg(nullif(f[5], E'\\x1d') ORDER BY i), array_agg(nullif(f[6], E'\\x1d') ORDER BY i),
               array_agg(nullif(f[7], E'\\x1d') ORDER BY i), array_agg(f[8] ORDER BY i),
               array_agg(nullif(f[9], E'\\x1d') ORDER BY i), array_agg(nullif(f[10], E'\\x1d') ORDER BY i)
        INTO bodies, kinds, sessions, calls, tools, decisions, outcomes, stamps, principals, leases
        FROM unnest(string_to_array(data, E'\\x1e')) WITH ORDINALITY AS r (line, i),
             LATERAL (SELECT string_to_array(r.line, E'\\x1f') AS f) AS fields;
        SELECT seq, hash INTO first_seq, first_hash FROM head WHERE id = 1 FOR UPDATE;
        n := coalesce(array_length(bodies, 1), 0);
        h := first_hash;
        BEGIN
            -- Nearly always no event is there already: chain them all and insert them at once (the unique
            -- indexes check, and a duplicate sends the group down the careful path below).
            IF n = 1 THEN
                h := encode(sha256(decode(first_hash, 'hex') || convert_to(bodies[1], 'UTF8')), 'hex');
                INSERT INTO events (seq, prev_hash, hash, body, kind, session_id, call_id, tool, decision, outcome,
                                    ts, principal, lease)
                VALUES (first_seq + 1, first_hash, h, bodies[1], kinds[1], sessions[1], calls[1], tools[1],
                        decisions[1], outcomes[1], stamps[1], principals[1], leases[1]);
            ELSIF n > 1 THEN
                prevs := '{}';
                hashes := '{}';
                FOREACH once IN ARRAY bodies LOOP
                    prevs := prevs || h;
                    h := encode(sha256(decode(h, 'hex') || convert_to(once, 'UTF8')), 'hex');
                    hashes := hashes || h;
                END LOOP;
                INSERT INTO events (seq, prev_hash, hash, body, kind, session_id, call_id, tool, decision, outcome,
                                    ts, principal, lease)
                SELECT first_seq + i, prevs[i], hashes[i], bodies[i], kinds[i], sessions[i], calls[i], tools[i],
                       decisions[i], outcomes[i], stamps[i], principals[i], leases[i]
                FROM generate_series(1, n) AS i;
            END IF;
            s := first_seq + n;
        EXCEPTION WHEN unique_violation THEN
            -- Some event is one of a kind that is there already (a group retried after the answer to its
            -- commit was lost, a late outcome of a call settled as interrupted): leave each such event out.
            h := first_hash;
            n := 0;
            keep := '{}';
            prevs := '{}';
            hashes := '{}';
            FOR e IN SELECT * FROM unnest(kinds, sessions, calls, bodies) WITH ORDINALITY
                     AS t (kind, session_id, call_id, body, i) LOOP
                once := CASE WHEN e.kind IN ('decision', 'outcome') THEN e.kind || ' ' || e.call_id
                             WHEN e.kind IN ('session_start', 'session_end') THEN e.kind || ' ' || e.session_id END;
                IF once IS NOT NULL THEN
                    -- Each kind spelled out, so that the partial unique indexes serve the lookups.
                    IF once = ANY (seen)
                       OR (e.kind = 'decision' AND EXISTS (
                           SELECT 1 FROM events WHERE call_id = e.call_id AND kind = 'decision'))
                       OR (e.kind = 'outcome' AND EXISTS (
                           SELECT 1 FROM events WHERE call_id = e.call_id AND kind = 'outcome'))
                       OR (e.kind = 'session_start' AND EXISTS (
                           SELECT 1 FROM events WHERE session_id = e.session_id AND kind = 'session_start'))
                       OR (e.kind = 'session_end' AND EXISTS (
                           SELECT 1 FROM events WHERE session_id = e.session_id AND kind = 'session_end')) THEN
                        CONTINUE;
                    END IF;
                    seen := seen || once;
                END IF;
                prevs := prevs || h;
                h := encode(sha256(decode(h, 'hex') || convert_to(e.body, 'UTF8')), 'hex');
                hashes := hashes || h;
                keep := keep || e.i::int;
                n := n + 1;
            END LOOP;
            INSERT INTO events (seq, prev_hash, hash, body, kind, session_id, call_id, tool, decision, outcome,
                                ts, principal, lease)
            SELECT first_seq + j, prevs[j], hashes[j], bodies[k], kinds[k], sessions[k], calls[k], tools[k],
                   decisions[k], outcomes[k], stamps[k], principals[k], leases[k]
            FROM unnest(keep) WITH ORDINALITY AS w (k, j);
            s := first_seq + n;
        END;
        IF n > 0 THEN
            UPDATE head SET seq = s, hash = h WHERE id = 1;
        END IF;
        head_seq := s;
        head_hash := h;
        appended := n;
    END $fn$""",
    # Replicas: each live gateway process holds a session-level advisory lock on `lock_key` for as long
    # as its connection lives; one whose lock is free and that has not been seen for a while is gone,
    # and the calls and sessions it left open are settled by a survivor (gateway/audit/shared.py).
    """CREATE TABLE replicas (
        name text PRIMARY KEY,
        lock_key bigint NOT NULL UNIQUE,
        host text NOT NULL,
        pid int NOT NULL,
        started timestamptz NOT NULL DEFAULT now(),
        seen timestamptz NOT NULL DEFAULT now(),
        settled timestamptz
    )""",
    # Keys every replica must share (the audit's masking key, the approval state's keys): made once,
    # by whichever replica asks first.
    "CREATE TABLE keys (name text PRIMARY KEY, value bytea NOT NULL)",
)

APPROVALS: tuple[str, ...] = (
    # The approval queue, as `approvals.db` holds it (gateway/audit/approvals.py), with the session and
    # the holding gateway (`host:pid`, a `replicas` name) copied out of `call` for the queries.
    """CREATE TABLE approvals (
        id text PRIMARY KEY,
        created double precision NOT NULL,
        expires double precision NOT NULL,
        status text NOT NULL,
        binding text NOT NULL,
        call text NOT NULL,
        decided_at double precision,
        decided_by text,
        channel text,
        note text,
        session_id text NOT NULL,
        holder text NOT NULL
    )""",
    "CREATE INDEX approvals_status ON approvals (status, created)",
    "CREATE INDEX approvals_created ON approvals (created)",
    "CREATE INDEX approvals_waiting ON approvals (session_id) WHERE status = 'pending'",
    # Bumped in the transaction of every change to the queue: a waiting gateway or a console page reads
    # this one row to learn whether anything changed.
    "CREATE TABLE approvals_version (id int PRIMARY KEY CHECK (id = 1), version bigint NOT NULL)",
    "INSERT INTO approvals_version VALUES (1, 0)",
    # The one-time nonces of 2026-07-28 approval states already redeemed, on any replica, kept until
    # the state has expired.
    "CREATE TABLE approval_states_used (nonce text PRIMARY KEY, expires double precision NOT NULL)",
    "CREATE INDEX approval_states_used_expires ON approval_states_used (expires)",
)
RATES = (
    # One row per call counted against a rate-limited rule, stamped by the database's clock (never a
    # replica's); `expires` (the stamp plus the rule's period) is when the row stops counting and may go.
    """CREATE TABLE rate_hits (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        counted_as text NOT NULL CHECK (counted_as IN ('principal', 'session')),
        name text NOT NULL,
        rule text NOT NULL,
        at timestamptz NOT NULL,
        expires timestamptz NOT NULL
    )""",
    "CREATE INDEX rate_hits_window ON rate_hits (counted_as, name, rule, at)",
    "CREATE INDEX rate_hits_expires ON rate_hits (expires)",
    # For each rule, the seconds until it lets another call of the caller through at `stamp` (0: it
    # would now). A rule is at its limit while its `limit`-th newest hit is still inside the window.
    """CREATE FUNCTION rate_waits(
        who_kind text, who_name text, rules text[], limits int[], periods float8[], stamp timestamptz
    ) RETURNS float8[] LANGUAGE sql AS $fn$
        SELECT coalesce(array_agg(coalesce((
            SELECT greatest(extract(epoch FROM at - stamp) + periods[i], 0.001) FROM rate_hits
            WHERE counted_as = who_kind AND name = who_name AND rule = rules[i]
              AND at > stamp - make_interval(secs => periods[i])
            ORDER BY at DESC OFFSET limits[i] - 1 LIMIT 1
        ), 0) ORDER BY i), '{}')
        FROM generate_series(1, coalesce(array_length(rules, 1), 0)) AS i
    $fn$""",
    # One call counted against its rules, all or none, in one statement (one transaction): each key
    # (caller, rule) is locked in one order, so charges of one key from every replica take turns and
    # each counts what the one before it inserted; the time is read once the locks are held. At its
    # limit an enforced rule refuses the whole charge (nothing is inserted); a monitored one is only
    # not counted. `forget`: sessions whose own hits go first; `prune`: every expired hit goes too.
    """CREATE FUNCTION charge_rates(
        who_kind text, who_name text, rules text[], limits int[], periods float8[], enforced boolean[],
        forget text[], prune boolean
    ) RETURNS TABLE (rule text, hit bigint, wait float8) LANGUAGE plpgsql AS $fn$
    #variable_conflict use_column
    DECLARE
        key int;
        stamp timestamptz;
        waits float8[];
        refused boolean;
        n int := coalesce(array_length(rules, 1), 0);
    BEGIN
        -- Rows another transaction is deleting already are skipped, so that two sweeps never wait on
        -- each other (a row left by one that failed is swept the next time).
        IF coalesce(array_length(forget, 1), 0) > 0 THEN
            DELETE FROM rate_hits WHERE id IN (
                SELECT id FROM rate_hits WHERE counted_as = 'session' AND name = ANY (forget)
                FOR UPDATE SKIP LOCKED);
        END IF;
        IF prune THEN
            DELETE FROM rate_hits WHERE id IN (
                SELECT id FROM rate_hits WHERE expires <= clock_timestamp() FOR UPDATE SKIP LOCKED);
        END IF;
        -- The two-key form (class 'rate'), apart from the one-key advisory locks the replicas hold.
        FOR key IN SELECT DISTINCT hashtext(who_kind || chr(31) || who_name || chr(31) || r)
                   FROM unnest(rules) AS r ORDER BY 1 LOOP
            PERFORM pg_advisory_xact_lock(1918989413, key);
        END LOOP;
        stamp := clock_timestamp();
        waits := rate_waits(who_kind, who_name, rules, limits, periods, stamp);
        refused := EXISTS (SELECT FROM generate_series(1, n) AS i WHERE waits[i] > 0 AND enforced[i]);
        IF refused THEN
            RETURN QUERY SELECT rules[i], NULL::bigint, waits[i] FROM generate_series(1, n) AS i;
            RETURN;
        END IF;
        RETURN QUERY
            WITH counted AS (
                INSERT INTO rate_hits (counted_as, name, rule, at, expires)
                SELECT who_kind, who_name, rules[i], stamp, stamp + make_interval(secs => periods[i])
                FROM generate_series(1, n) AS i WHERE waits[i] = 0
                RETURNING id, rule
            )
            SELECT rules[i], counted.id, waits[i]
            FROM generate_series(1, n) AS i LEFT JOIN counted ON counted.rule = rules[i] AND waits[i] = 0;
    END $fn$""",
)
SESSIONS: tuple[str, ...] = (
    # Handshake-era HTTP sessions, by the replica holding them (`host:pid`): a request for a session that
    # reaches another replica is told where it lives. Written off the event loop, never before a session
    # opens: a row can lag behind, or be missing after the store was away; the audit log is the record.
    """CREATE TABLE sessions (
        id text PRIMARY KEY,
        replica text NOT NULL,
        principal text,
        transport text NOT NULL,
        opened timestamptz NOT NULL DEFAULT now(),
        closed timestamptz
    )""",
    "CREATE INDEX sessions_open ON sessions (replica) WHERE closed IS NULL",
)

PINS = (
    # The approved upstream definitions (`upstreams.lock`'s document, as TOML) in one row; `revision`
    # goes up by one on every write, and a write names the revision it changed, so two replicas
    # approving at once never lose one another's approval (gateway/catalog/shared_pins.py).
    """CREATE TABLE pins (
        id int PRIMARY KEY CHECK (id = 1),
        revision bigint NOT NULL,
        document text NOT NULL,
        written timestamptz NOT NULL DEFAULT now()
    )""",
)

MIGRATIONS: dict[int, tuple[str, ...]] = {1: AUDIT + APPROVALS + RATES + SESSIONS + PINS}
"""The statements that bring a store from the version before to each version."""
SCHEMA_VERSION = max(MIGRATIONS)
