"""The shared engine: the training loop and its config, sliding-window inference, blocks and the dask executor, run folders."""
