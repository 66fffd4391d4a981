{{ config(materialized='incremental', unique_key='day', incremental_strategy='delete+insert',
          on_schema_change='append_new_columns') }}

-- Per event day with model scores: alerts against the daily alert budget, and alert precision and
-- recall against the fraud labels. Labels are final only once the day has matured
-- (`label_maturity_days`): precision/recall are given then; the *_to_date variants use the labels
-- reported so far (a payment without a label counts as legitimate) and can still change.

with

{% if is_incremental() -%}
days_to_rebuild as (
    {{ days_to_rebuild([(ref('int_transactions_enriched'), 'event_date')], 'day') }}
),
{%- endif %}

scored as (
    select * from {{ ref('int_transactions_enriched') }}
    where is_scored
    {% if is_incremental() %}and event_date in (select day from days_to_rebuild){% endif %}
),

daily as (
    select
        event_date as day,
        count(*) as n_scored,
        count(*) filter (where is_alert) as n_alerts,
        count(*) filter (where is_alert and is_fraud_known) as n_true_positives,
        count(*) filter (where is_alert and not is_fraud_known) as n_false_positives,
        count(*) filter (where not is_alert and is_fraud_known) as n_false_negatives,
        count(*) filter (where is_fraud_known) as n_fraud_known,
        avg(score) as score_mean,
        bool_and(is_label_matured) as is_matured,
        string_agg(distinct model_name || ':' || model_version, ', ') as model_versions
    from scored
    group by 1
),

final as (
    select
        day,
        n_scored,
        n_alerts,
        n_true_positives,
        n_false_positives,
        n_false_negatives,
        n_fraud_known,
        score_mean,
        model_versions,
        {{ var('alert_budget_per_day') }} as alert_budget,
        n_alerts::double precision / {{ var('alert_budget_per_day') }} as alert_budget_used,
        n_alerts > {{ var('alert_budget_per_day') }} as is_over_budget,
        n_alerts::double precision / nullif(n_scored, 0) as alert_rate,
        n_true_positives::double precision / nullif(n_alerts, 0) as precision_to_date,
        n_true_positives::double precision / nullif(n_fraud_known, 0) as recall_to_date,
        is_matured,
        case when is_matured then n_true_positives::double precision / nullif(n_alerts, 0) end as alert_precision,
        case when is_matured then n_true_positives::double precision / nullif(n_fraud_known, 0) end as alert_recall,
        {{ inputs_watermark([ref('int_transactions_enriched')]) }} as inputs_mirrored_at
    from daily
)

select * from final
