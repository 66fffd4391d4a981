with

source as (
    {{ source_or_empty('lakehouse', 'risk_scores', {
        'event_id': 'text', 'user_id': 'text', 'merchant_id': 'text', 'country': 'text',
        'event_time': 'timestamptz', 'event_date': 'date', 'amount_base': 'double precision',
        'score': 'double precision', 'threshold': 'double precision', 'is_alert': 'boolean',
        'model_name': 'text', 'model_version': 'text', 'top_reasons': 'text',
        'scored_at': 'timestamptz', 'mirrored_at': 'timestamptz'}) }}
),

final as (
    select
        event_id,
        event_date,
        score,
        threshold as score_threshold,
        is_alert,
        model_name,
        model_version,
        top_reasons,
        scored_at,
        mirrored_at
    from source
)

select * from final
