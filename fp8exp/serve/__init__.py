"""A trained model that answers requests: saved as an MLflow pyfunc model (save), loaded and run
on raw strings (model, which imports nothing else of fp8exp), the predict command (predict) and
the inference benchmark (bench)."""
