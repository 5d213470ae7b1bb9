"""Training rows in: JSONL/CSV/Parquet text rows, tabular tables, prompt templates."""
