"""One named cluster's life: start and stop it (``lifecycle``), see it (``status``), let new engines join
(``joining``), and keep it elastic: resize it (``resize``), decide its size (``policy``), keep it so
(``keeper``).

``resize`` adds and drains slaves of a running cluster, one resize at a time per cluster (a lock file);
``policy`` is the pure decision (what to add or release, and why) from a snapshot and a clock; ``keeper``
is the background process that takes snapshots, asks the policy and acts through ``resize``.
"""
