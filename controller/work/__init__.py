"""The work that runs on a cluster: jobs as chains of short tasks, the scheduler that sends them, and what
each kind of work adds (training runs, data-parallel runs, inference, sweeps, benches and their reports)."""
