with

source as (
    select * from {{ source('lakehouse', 'gold_user_features_5m') }}
),

final as (
    select
        user_id,
        window_start as window_start_at,
        window_end as window_end_at,
        (window_start at time zone 'UTC')::date as window_date,
        date_trunc('hour', window_start, 'UTC') as window_hour_at,
        tx_count,
        amount_sum as amount_sum_usd,
        amount_mean as amount_mean_usd,
        amount_max as amount_max_usd,
        distinct_merchants as n_distinct_merchants,
        distinct_countries as n_distinct_countries,
        mirrored_at
    from source
)

select * from final
