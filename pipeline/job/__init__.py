"""The job of ``diprune run CONFIG``: the job file (``config``), the job itself (``run``), its content-hash
cache, gates, report (JSON and Markdown), plots and MLflow records.

May import: everything but ``pipeline.cli``.
"""
