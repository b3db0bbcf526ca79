"""`python -m fp8exp.report`: did FP8 cost accuracy, and was it faster? The runs (runs), their
statistics (stats), configurations (rows), words and tables (tables), plots (plots), the
inference table (inference), language models' loss parity (parity), the files they make
(document) and the answer on the sweep's parent run (parent)."""
