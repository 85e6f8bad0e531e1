"""Example python-mode worker: a plain or async function of (task_id, data)."""


async def square(task_id: str, data: dict) -> dict:
    return {"square": data["n"] ** 2}
