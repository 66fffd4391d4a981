with

source as (
    {{ source_or_empty('lakehouse', 'silver_labels', {
        'event_id': 'text', 'is_fraud': 'boolean', 'scenario': 'text',
        'reported_at': 'timestamptz', 'mirrored_at': 'timestamptz'}) }}
),

final as (
    select
        event_id,
        is_fraud,
        scenario,
        reported_at,
        mirrored_at
    from source
)

select * from final
