{#- Body of risk_monitoring_hourly (grain 'hour') and risk_monitoring_daily (grain 'day').

    Transactions, windows and scores are grouped by EVENT time; quarantine and duplicate rates by
    PROCESSING time (the ingest batch's processed_at), because a quarantined record has no trusted
    event time and a duplicate is a property of the delivery, not of the payment. A period appears
    when it has either (window figures are joined to it; a window belongs to the period it starts in). -#}
{% macro risk_monitoring(grain) -%}
{%- set hourly = grain == 'hour' -%}
{%- set tx_period = 'event_hour_at' if hourly else 'event_date' -%}
{%- set win_period = 'window_hour_at' if hourly else 'window_date' -%}
{%- set dq_period = 'processed_hour_at' if hourly else 'processed_date' -%}
{%- set period = 'hour_at' if hourly else 'day' -%}
{%- set inputs = [ref('int_transactions_enriched'), ref('stg_user_windows_5m'), ref('stg_dq_batches')] -%}

with

{% if is_incremental() -%}
days_to_rebuild as (
    {{ days_to_rebuild([(inputs[0], 'event_date'), (inputs[1], 'window_date'), (inputs[2], 'processed_date')], 'day') }}
),
{%- endif %}

transactions as (
    select * from {{ inputs[0] }}
    {% if is_incremental() %}where event_date in (select day from days_to_rebuild){% endif %}
),

windows as (
    select * from {{ inputs[1] }}
    {% if is_incremental() %}where window_date in (select day from days_to_rebuild){% endif %}
),

batches as (
    select * from {{ inputs[2] }}
    where kind = 'events'
    {% if is_incremental() %}and processed_date in (select day from days_to_rebuild){% endif %}
),

transaction_stats as (
    select
        {{ tx_period }} as period,
        count(*) as n_transactions,
        sum(amount_usd) as amount_usd_sum,
        count(distinct user_id) as n_distinct_users,
        percentile_cont(0.5) within group (order by amount_usd) as amount_usd_p50,
        percentile_cont(0.95) within group (order by amount_usd) as amount_usd_p95,
        percentile_cont(0.99) within group (order by amount_usd) as amount_usd_p99,
        max(amount_usd) as amount_usd_max,
        count(*) filter (where is_scored) as n_scored,
        count(*) filter (where is_alert) as n_alerts,
        count(*) filter (where is_fraud_known) as n_fraud_known,
        bool_and(is_label_matured) as is_matured
    from transactions
    group by 1
),

window_stats as (
    select
        {{ win_period }} as period,
        percentile_cont(0.5) within group (order by tx_count) as tx_per_user_5m_p50,
        percentile_cont(0.95) within group (order by tx_count) as tx_per_user_5m_p95,
        max(tx_count) as tx_per_user_5m_max
    from windows
    group by 1
),

batch_stats as (
    select
        {{ dq_period }} as period,
        sum(records_in) as n_records_in,
        sum(quarantined) as n_quarantined,
        sum(duplicates) as n_duplicates
    from batches
    group by 1
),

periods as (
    select period from transaction_stats
    union
    select period from batch_stats
),

final as (
    select
        periods.period as {{ period }},
        {%- if hourly %}
        (periods.period at time zone 'UTC')::date as day,
        {%- endif %}
        coalesce(t.n_transactions, 0) as n_transactions,
        coalesce(t.amount_usd_sum, 0) as amount_usd_sum,
        coalesce(t.n_distinct_users, 0) as n_distinct_users,
        w.tx_per_user_5m_p50,
        w.tx_per_user_5m_p95,
        w.tx_per_user_5m_max,
        t.amount_usd_p50,
        t.amount_usd_p95,
        t.amount_usd_p99,
        t.amount_usd_max,
        coalesce(t.n_scored, 0) as n_scored,
        coalesce(t.n_alerts, 0) as n_alerts,
        t.n_alerts::double precision / nullif(t.n_scored, 0) as alert_share,
        coalesce(t.n_fraud_known, 0) as n_fraud_known,
        t.n_fraud_known::double precision / nullif(t.n_transactions, 0) as fraud_rate_to_date,
        coalesce(t.is_matured, false) as is_matured,
        case when t.is_matured then t.n_fraud_known::double precision / nullif(t.n_transactions, 0) end
            as fraud_rate_matured,
        coalesce(b.n_records_in, 0) as n_records_in,
        coalesce(b.n_quarantined, 0) as n_quarantined,
        coalesce(b.n_duplicates, 0) as n_duplicates,
        b.n_quarantined::double precision / nullif(b.n_records_in, 0) as quarantine_rate,
        b.n_duplicates::double precision / nullif(b.n_records_in, 0) as duplicate_rate,
        {{ inputs_watermark(inputs) }} as inputs_mirrored_at
    from periods
    left join transaction_stats as t on t.period = periods.period
    left join window_stats as w on w.period = periods.period
    left join batch_stats as b on b.period = periods.period
)

select * from final
{%- endmacro %}
