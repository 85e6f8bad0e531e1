"""The PostgreSQL backend's foundation: connections (connect), schema (migrate), the orchestrator's
leader lock (leader) and wake-ups between replicas (notify). See docs/replicas.md for what exists."""
