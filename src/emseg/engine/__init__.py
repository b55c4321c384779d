"""The shared engine: the training loop and its config, sliding-window inference, blocks, the dask
executor and the resumable outputs, run folders."""
