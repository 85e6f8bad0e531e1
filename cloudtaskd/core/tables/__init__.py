"""The store's tables, one module each, holding all of that table's SQL as named functions that take
the transaction (`Tx`) or a read connection: tasks, jobs (with the runs columns), uploads, pools,
cancels, purges, meta, instances, events. Nothing else in cloudtaskd writes SQL for them;
states.py builds the state lists the statements use, so a new state is written in states.py and one migration."""
