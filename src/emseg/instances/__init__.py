"""Objects, not only classes: instance labels from semantic predictions and instance metrics."""
