-- One row per payment with what is known about it now: its fraud label (if reported) and its
-- model score (if scored). `mirrored_at` is the newest of the three rows' mirror times, so a label or
-- score arriving late marks the payment's day as changed for the incremental marts.
with

transactions as (
    select * from {{ ref('stg_transactions') }}
),

labels as (
    select * from {{ ref('stg_labels') }}
),

scores as (
    select * from {{ ref('stg_risk_scores') }}
),

final as (
    select
        transactions.event_id,
        transactions.user_id,
        transactions.merchant_id,
        transactions.country,
        transactions.event_at,
        transactions.event_date,
        transactions.event_hour_at,
        transactions.amount_usd,
        transactions.user_amount_ratio_30d,
        labels.event_id is not null as is_labelled,
        coalesce(labels.is_fraud, false) as is_fraud_known,
        labels.scenario as fraud_scenario,
        labels.reported_at as label_reported_at,
        {{ is_matured('transactions.event_date') }} as is_label_matured,
        scores.event_id is not null as is_scored,
        scores.score,
        scores.is_alert,
        scores.model_name,
        scores.model_version,
        greatest(transactions.mirrored_at, labels.mirrored_at, scores.mirrored_at) as mirrored_at
    from transactions
    left join labels on labels.event_id = transactions.event_id
    left join scores on scores.event_id = transactions.event_id
)

select * from final
