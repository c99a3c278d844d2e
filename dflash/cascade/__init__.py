"""Adaptive model cascades evaluated honestly: a graded task world (tasks.py), a model ladder trained on it
(ladder.py), and, on top, exact replay of stopping policies over collected generations."""
