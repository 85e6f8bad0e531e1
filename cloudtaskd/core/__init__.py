"""The queue core: the store and its tables, the states, the dispatch round and the agent hub."""
