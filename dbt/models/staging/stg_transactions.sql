with

source as (
    select * from {{ source('lakehouse', 'gold_transaction_features') }}
),

final as (
    select
        event_id,
        user_id,
        merchant_id,
        country,
        event_time as event_at,
        event_date,
        date_trunc('hour', event_time, 'UTC') as event_hour_at,
        amount_base as amount_usd,
        user_amount_ratio_30d,
        mirrored_at
    from source
)

select * from final
