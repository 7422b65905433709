"""The shared store: state that gateway replicas share in one PostgreSQL database (`[gateway] store`).

`postgres.py` opens the database named by the store URL (psycopg 3, the `postgres` extra) and keeps its
schema (`schema.py`, versioned). The audit log, the approval queue, rate-limit counters, session records
and the keys behind approval state each keep their own tables there; SQLite files stay the default.
"""
