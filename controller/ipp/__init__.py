"""The ipyparallel side on the master: the profile and its connection files, the controller, the client,
the local processes of a cluster and the engines forked for it."""
