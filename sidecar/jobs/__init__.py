"""The job store: every checkpoint's samples rendered exactly once, across restarts (SQLite)."""
