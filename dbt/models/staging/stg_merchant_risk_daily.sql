with

source as (
    select * from {{ source('lakehouse', 'gold_merchant_risk_daily') }}
),

final as (
    select
        merchant_id,
        day,
        tx_count,
        amount_sum as amount_sum_usd,
        distinct_users as n_distinct_users,
        amount_outlier_share,
        tx_count_z_7d,
        tx_count_z_30d,
        amount_sum_z_7d,
        amount_sum_z_30d,
        mirrored_at
    from source
)

select * from final
