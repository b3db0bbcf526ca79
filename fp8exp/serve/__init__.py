"""A trained model that answers requests: saved as an MLflow pyfunc model (save, logged), loaded,
tokenized and run on raw strings to classify or generate text (textmodel, which imports nothing else
of fp8exp and ships with every model; pyfunc, MLflow's entry to it), the predict command (predict)
and the inference benchmark (bench)."""
