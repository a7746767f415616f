"""Data and targets: datasets (npz, image folders, iterables), dense labels and their locations, the
fixed shards, what a model's outputs mean, and the user's task (which classes).

May import: ``pipeline.errors``, ``pipeline.choices`` (and ``graph_ops``); nothing else of the pipeline.
"""
