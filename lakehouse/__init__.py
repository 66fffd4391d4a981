"""lakehouse: a real-time fraud and risk signal pipeline on Spark, Delta Lake and Postgres."""
