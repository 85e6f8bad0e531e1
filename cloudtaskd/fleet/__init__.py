"""The fleet: providers, their catalogs, the orchestrator and the agent bootstrap."""
