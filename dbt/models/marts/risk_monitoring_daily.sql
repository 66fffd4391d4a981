{{ config(materialized='incremental', unique_key='day', incremental_strategy='delete+insert',
          on_schema_change='append_new_columns') }}

{{ risk_monitoring('day') }}
