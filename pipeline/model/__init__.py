"""Everything a logged model is, and nothing else: image decoding, the transform presets, the
network and its weights, inference, the model card and the MLflow pyfunc.

This package travels inside every logged model (MLflow ``code_paths``: ``pipeline/__init__.py``
+ ``pipeline/model/``), so it imports nothing from the rest of ``pipeline``. Import its modules
by their full name (``from pipeline.model.network import FoodNet``) everywhere, in the
repository and inside a loaded model alike.
"""
