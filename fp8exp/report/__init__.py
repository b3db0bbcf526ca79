"""`python -m fp8exp.report`: did FP8 cost accuracy, and was it faster? The runs (runs), their
statistics (stats), configurations (rows), words and tables (tables), plots (plots), the
inference table (inference), and the files they make (document)."""
