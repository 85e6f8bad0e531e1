"""One class per worker mode (`WorkerSpec.mode`); `agent.runner.Runner` picks one and guards its slots."""
