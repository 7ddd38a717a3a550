"""The store's schema: numbered migrations, the current version kept in ``PRAGMA user_version``.

This is a public contract (see store/SCHEMA.md): columns are only ever added, through a new migration.
"""

SCHEMA_VERSION = 2

MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE agents (
    agent_id          TEXT PRIMARY KEY,
    run_id            TEXT,
    root_pid          INTEGER,
    root_create_time  REAL,
    token_hash        TEXT,
    status            TEXT NOT NULL DEFAULT 'registered',
    created_at        REAL NOT NULL,
    started_at        REAL,
    ended_at          REAL,
    meta              TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX agents_run ON agents(run_id);

CREATE TABLE flows (
    id                 INTEGER PRIMARY KEY,
    flow_id            TEXT NOT NULL UNIQUE,
    proxy_id           TEXT,
    agent_id           TEXT,
    pid                INTEGER,
    client_conn_id     TEXT,
    client_addr        TEXT,
    attribution        TEXT NOT NULL,
    method             TEXT,
    url                TEXT,
    scheme             TEXT,
    host               TEXT,
    port               INTEGER,
    path               TEXT,
    request_headers    TEXT,
    request_body       BLOB,
    status_code        INTEGER,
    response_headers   TEXT,
    response_body      BLOB,
    streamed           INTEGER NOT NULL DEFAULT 0,
    state              TEXT NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'done', 'error')),
    error              TEXT,
    t_request          REAL,
    t_response_headers REAL,
    t_first_byte       REAL,
    t_end              REAL,
    meta               TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX flows_agent ON flows(agent_id, id);
CREATE INDEX flows_state ON flows(state);
CREATE INDEX flows_time ON flows(t_request);

CREATE TABLE proxies (
    proxy_id     TEXT PRIMARY KEY,
    pid          INTEGER NOT NULL,
    create_time  REAL,
    listen       TEXT NOT NULL DEFAULT '[]',
    ca_cert      TEXT,
    started_at   REAL NOT NULL,
    stopped_at   REAL
);
""",
    # The writer's commit watermark: every event this proxy queued before this time is committed.
    2: """
ALTER TABLE proxies ADD COLUMN committed_through REAL;
""",
}

# Indexes a writable open adds when missing. Not a migration: the columns, and so what older readers and
# read-only opens understand, stay as they are.
INDEXES: dict[str, str] = {
    # The proxy re-reads the agents that have not ended every second: without this, a scan of every agent the
    # store ever held (hundreds of thousands after a long training run).
    "agents_live": "CREATE INDEX IF NOT EXISTS agents_live ON agents(status) WHERE status IN ('registered', 'running')",
}

FLOW_COLUMNS: tuple[str, ...] = (
    "id", "flow_id", "proxy_id", "agent_id", "pid", "client_conn_id", "client_addr", "attribution",
    "method", "url", "scheme", "host", "port", "path", "request_headers", "request_body",
    "status_code", "response_headers", "response_body", "streamed", "state", "error",
    "t_request", "t_response_headers", "t_first_byte", "t_end", "meta",
)

AGENT_COLUMNS: tuple[str, ...] = (
    "agent_id", "run_id", "root_pid", "root_create_time", "token_hash", "status",
    "created_at", "started_at", "ended_at", "meta",
)
