"""cloudtaskctl: the command-line client of cloudtaskd (commands, API client, progress display)."""
