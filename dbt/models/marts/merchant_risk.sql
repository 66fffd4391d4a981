-- One row per merchant and day: volume and value, deviation from the merchant's own trailing 7- and
-- 30-day baseline, fraud rates, and the ranked risk flag with its reason (macros/risk_flag.sql).

with

daily as (
    select * from {{ ref('int_merchant_daily') }}
),

{{ risk_flag_columns('merchant_id') }},

final as (
    select
        merchant_id,
        day,
        tx_count,
        amount_sum_usd,
        amount_mean_usd,
        n_distinct_users,
        amount_outlier_share,
        tx_count_z_7d,
        tx_count_z_30d,
        amount_sum_z_7d,
        amount_sum_z_30d,
        fraud_count_to_date,
        fraud_rate_to_date,
        is_matured,
        fraud_rate_matured,
        risk_level,
        risk_reason_code,
        risk_reason,
        risk_score,
        risk_rank
    from ranked
)

select * from final
