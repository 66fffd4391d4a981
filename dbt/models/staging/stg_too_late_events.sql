with

source as (
    {{ source_or_empty('lakehouse', 'gold_too_late_events', {
        'event_id': 'text', 'user_id': 'text', 'merchant_id': 'text', 'country': 'text',
        'amount_base': 'double precision', 'event_time': 'timestamptz', 'event_date': 'date',
        'watermark': 'timestamptz', 'lateness_seconds': 'double precision', 'reason': 'text',
        'batch_id': 'bigint', 'detected_at': 'timestamptz', 'mirrored_at': 'timestamptz'}) }}
),

final as (
    select
        event_id,
        user_id,
        merchant_id,
        country,
        amount_base as amount_usd,
        event_time as event_at,
        event_date,
        watermark as watermark_at,
        lateness_seconds,
        reason,
        batch_id,
        detected_at,
        (detected_at at time zone 'UTC')::date as detected_date,
        mirrored_at
    from source
)

select * from final
