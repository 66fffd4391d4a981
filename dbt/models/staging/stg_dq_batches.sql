with

source as (
    {{ source_or_empty('lakehouse', 'silver_dq_batches', {
        'kind': 'text', 'app_id': 'text', 'batch_id': 'bigint', 'source_files': 'integer',
        'records_in': 'bigint', 'inserted': 'bigint', 'duplicates': 'bigint',
        'duplicates_in_batch': 'bigint', 'duplicates_existing': 'bigint', 'quarantined': 'bigint',
        'warned': 'bigint', 'check_failures': 'jsonb', 'reconciled': 'boolean',
        'processed_at': 'timestamptz', 'mirrored_at': 'timestamptz'}) }}
),

final as (
    select
        kind,
        app_id,
        batch_id,
        source_files as n_source_files,
        records_in,
        inserted,
        duplicates,
        duplicates_in_batch,
        duplicates_existing,
        quarantined,
        warned,
        check_failures::jsonb as check_failures,
        reconciled as is_reconciled,
        processed_at,
        (processed_at at time zone 'UTC')::date as processed_date,
        date_trunc('hour', processed_at, 'UTC') as processed_hour_at,
        mirrored_at
    from source
)

select * from final
