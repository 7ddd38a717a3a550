"""The SQLite store: the one contract between the addon (writer) and the manager (reader).

See SCHEMA.md beside this file for the tables, which users may query directly.
"""

from rollouttap.store.db import connect, transaction
from rollouttap.store.reader import AGENT_STATUSES, LIVE_STATUSES, Store
from rollouttap.store.codings import decode_body
from rollouttap.store.records import AgentRecord, FlowRecord, header_value
from rollouttap.store.redact import (
    hash_token, is_redacted, is_secret_name, map_secret_query, new_token, redact_headers, redact_query,
    token_matches,
)
from rollouttap.store.schema import SCHEMA_VERSION
from rollouttap.store.writer import StoreWriter

__all__ = [
    "AGENT_STATUSES", "LIVE_STATUSES", "SCHEMA_VERSION", "AgentRecord", "FlowRecord", "Store", "StoreWriter",
    "connect", "decode_body", "hash_token", "header_value", "is_redacted", "is_secret_name", "map_secret_query",
    "new_token", "redact_headers", "redact_query", "token_matches", "transaction",
]
