"""cloudtaskd: the cloudtask control daemon (queue, agent hub, provisioning, control API)."""

__version__ = "0.1.0"
