"""The wire between cloudtaskd and its agents, owned by neither: one codec both import.

    messages.py    every message type, the general encoder, and the parsers (errors name the field)
    frames.py      the fast encoders of the busy frames (grants, reports, credit), which splice
                   pre-encoded JSON; each equals the general encoding parsed back (tests/unit/wire/test_wire.py)
    workerspec.py  the worker description (cloudtask.yaml / worker.json) both sides validate
    jsonx.py       JSON: orjson when installed, the standard library otherwise

Ships to instances beside the agent (cloudtaskd/fleet/bootstrap.py), so like the agent it keeps to Python
3.9 and the standard library; see docs/protocol.md for the messages in prose.
"""
