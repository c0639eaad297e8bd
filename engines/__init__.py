"""Code that runs on the slaves: the model, the data, training and inference.

Nothing here imports ``controller``: a slave needs only torch and this package.
"""
