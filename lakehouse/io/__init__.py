"""The only code that touches storage: Delta tables, Postgres, MLflow."""
