"""Run plumbing: MLflow tracking (``tracking``) and the Model Registry (``registry``)."""
