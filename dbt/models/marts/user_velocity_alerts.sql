{{ config(materialized='incremental', unique_key=['user_id', 'window_start_at'],
          incremental_strategy='delete+insert', on_schema_change='append_new_columns') }}

-- Five-minute windows (sliding every minute) in which a user made more than `velocity_max_tx`
-- payments or spent more than `velocity_max_amount_usd`. One burst shows up in each overlapping
-- window that holds it. Thresholds changed with --vars apply to days rebuilt from then on; run with
-- --full-refresh to re-judge the whole history.

with

{% if is_incremental() -%}
days_to_rebuild as (
    {{ days_to_rebuild([(ref('stg_user_windows_5m'), 'window_date')], 'window_date') }}
),
{%- endif %}

windows as (
    select * from {{ ref('stg_user_windows_5m') }}
    {% if is_incremental() %}where window_date in (select day from days_to_rebuild){% endif %}
),

judged as (
    select
        *,
        tx_count > {{ var('velocity_max_tx') }} as is_count_exceeded,
        amount_sum_usd > {{ var('velocity_max_amount_usd') }} as is_amount_exceeded
    from windows
),

final as (
    select
        user_id,
        window_start_at,
        window_end_at,
        window_date,
        tx_count,
        amount_sum_usd,
        amount_max_usd,
        n_distinct_merchants,
        n_distinct_countries,
        is_count_exceeded,
        is_amount_exceeded,
        case
            when is_count_exceeded and is_amount_exceeded then 'count_and_amount'
            when is_count_exceeded then 'count'
            else 'amount'
        end as alert_reason,
        {{ var('velocity_max_tx') }} as max_tx_threshold,
        {{ var('velocity_max_amount_usd') }}::double precision as max_amount_usd_threshold,
        {{ inputs_watermark([ref('stg_user_windows_5m')]) }} as inputs_mirrored_at
    from judged
    where is_count_exceeded or is_amount_exceeded
)

select * from final
