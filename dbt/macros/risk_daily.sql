{#- The daily figures of merchant_risk and country_risk (one definition for both keys): volume, value,
    users, amount outliers and the trailing 7/30-day z-scores from gold (lakehouse/transforms/risk.py),
    with the fraud counts recomputed from the labels known now (gold's counts date from the last time
    the stream or a backfill wrote the day) and maturity judged as of today.

    key:        the grouping column (merchant_id or country)
    gold_daily: the staging model of the gold daily risk table of that key -#}
{% macro risk_daily_figures(key, gold_daily) -%}
with

gold_daily as (
    select * from {{ ref(gold_daily) }}
),

fraud as (
    select
        {{ key }},
        event_date as day,
        count(*) filter (where is_fraud_known) as fraud_count_to_date
    from {{ ref('int_transactions_enriched') }}
    group by 1, 2
),

final as (
    select
        gold_daily.{{ key }},
        gold_daily.day,
        gold_daily.tx_count,
        gold_daily.amount_sum_usd,
        gold_daily.n_distinct_users,
        gold_daily.amount_sum_usd / nullif(gold_daily.tx_count, 0) as amount_mean_usd,
        gold_daily.amount_outlier_share,
        gold_daily.tx_count_z_7d,
        gold_daily.tx_count_z_30d,
        gold_daily.amount_sum_z_7d,
        gold_daily.amount_sum_z_30d,
        coalesce(fraud.fraud_count_to_date, 0) as fraud_count_to_date,
        coalesce(fraud.fraud_count_to_date, 0)::double precision / nullif(gold_daily.tx_count, 0)
            as fraud_rate_to_date,
        {{ is_matured('gold_daily.day') }} as is_matured,
        case when {{ is_matured('gold_daily.day') }}
            then coalesce(fraud.fraud_count_to_date, 0)::double precision / nullif(gold_daily.tx_count, 0)
        end as fraud_rate_matured
    from gold_daily
    left join fraud on fraud.{{ key }} = gold_daily.{{ key }} and fraud.day = gold_daily.day
)

select * from final
{%- endmacro %}
