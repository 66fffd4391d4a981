{{ config(materialized='incremental', unique_key=['day', 'kind'],
          incremental_strategy='delete+insert', on_schema_change='append_new_columns') }}

-- Per UTC processing day and stream (events, labels): what the ingest batches received and did
-- with it. Days are processing days (the batch's processed_at; too-late events: detected_at).

with

{% if is_incremental() -%}
days_to_rebuild as (
    {{ days_to_rebuild([(ref('stg_dq_batches'), 'processed_date'), (ref('stg_too_late_events'), 'detected_date')], 'day') }}
),
{%- endif %}

batches as (
    select * from {{ ref('stg_dq_batches') }}
    {% if is_incremental() %}where processed_date in (select day from days_to_rebuild){% endif %}
),

too_late as (
    select * from {{ ref('stg_too_late_events') }}
    {% if is_incremental() %}where detected_date in (select day from days_to_rebuild){% endif %}
),

batch_totals as (
    select
        processed_date as day,
        kind,
        count(*) as n_batches,
        count(*) filter (where is_reconciled) as n_batches_reconciled,
        sum(n_source_files) as n_source_files,
        sum(records_in) as records_in,
        sum(inserted) as inserted,
        sum(duplicates) as duplicates,
        sum(duplicates_in_batch) as duplicates_in_batch,
        sum(duplicates_existing) as duplicates_existing,
        sum(quarantined) as quarantined,
        sum(warned) as warned
    from batches
    group by 1, 2
),

check_totals as (
    select
        batches.processed_date as day,
        batches.kind,
        failures.key as check_name,
        sum(failures.value::bigint) as n_failed
    from batches
    cross join lateral jsonb_each_text(coalesce(batches.check_failures, '{}'::jsonb)) as failures
    group by 1, 2, 3
),

checks_by_day as (
    select
        day,
        kind,
        jsonb_object_agg(check_name, n_failed order by check_name) filter (where n_failed > 0) as failures_by_check
    from check_totals
    group by 1, 2
),

too_late_by_day as (
    select
        detected_date as day,
        'events'::text as kind,
        count(*) as too_late_events
    from too_late
    group by 1, 2
),

keys as (
    select day, kind from batch_totals
    union
    select day, kind from too_late_by_day
),

final as (
    select
        keys.day,
        keys.kind,
        coalesce(b.n_batches, 0) as n_batches,
        coalesce(b.n_batches_reconciled, 0) as n_batches_reconciled,
        coalesce(b.n_source_files, 0) as n_source_files,
        coalesce(b.records_in, 0) as records_in,
        coalesce(b.inserted, 0) as inserted,
        coalesce(b.duplicates, 0) as duplicates,
        coalesce(b.duplicates_in_batch, 0) as duplicates_in_batch,
        coalesce(b.duplicates_existing, 0) as duplicates_existing,
        coalesce(b.quarantined, 0) as quarantined,
        coalesce(b.warned, 0) as warned,
        coalesce(c.failures_by_check, '{}'::jsonb) as failures_by_check,
        coalesce(t.too_late_events, 0) as too_late_events,
        b.quarantined::double precision / nullif(b.records_in, 0) as quarantine_rate,
        b.duplicates::double precision / nullif(b.records_in, 0) as duplicate_rate,
        coalesce(b.n_batches_reconciled = b.n_batches
                 and b.records_in = b.inserted + b.duplicates + b.quarantined, true) as is_reconciled,
        {{ inputs_watermark([ref('stg_dq_batches'), ref('stg_too_late_events')]) }} as inputs_mirrored_at
    from keys
    left join batch_totals as b on b.day = keys.day and b.kind = keys.kind
    left join checks_by_day as c on c.day = keys.day and c.kind = keys.kind
    left join too_late_by_day as t on t.day = keys.day and t.kind = keys.kind
)

select * from final
