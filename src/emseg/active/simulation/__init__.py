"""The simulated active-learning loop: its config, the iteration loop, question arms, curves."""
