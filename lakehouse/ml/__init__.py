"""The nightly fraud model: pinned training set, scikit-learn pipelines, evaluation, threshold report,
MLflow registry with a champion gate, and the scorer the stream calls."""
