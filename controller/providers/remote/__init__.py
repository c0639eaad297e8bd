"""Slaves reached over SSH, shared by the ``ssh`` and ``aws`` providers: the transport, data and code
sync, the bootstrap, engines on the nodes, and the reverse tunnels to the controller."""
