"""Cheap questions: question types and costs, the answers file, lazy cubes from answers."""
