"""cloudtask agent: runs on each instance, leases tasks from cloudtaskd and runs the user's worker.

Ships alone to instances: depends only on the standard library and aiohttp (orjson if present).
"""
