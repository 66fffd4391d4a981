{#- Late-arriving rows in incremental marts.

    Every mirrored row carries `mirrored_at` (when the mirror last wrote it). A mart stores, in each
    row it (re)builds, `inputs_mirrored_at` = the newest mirrored_at over all its inputs at build time.
    On an incremental run it recomputes exactly the days that may have changed:
      * every day with an input row mirrored after the mart's previous watermark (minus a safety
        margin for mirror transactions still open while dbt read): late events, late labels
        (a chargeback changes the fraud rate of its transaction's day), new scores, new batches;
      * every day whose rows were deleted from a mirrored table after that watermark (source
        `mirror_deleted_days`, kept by a trigger on each table: a deleted row leaves no row behind);
      * the last `lookback_days` days before the newest day already in the mart, and every day
        younger than `label_maturity_days`: its "matured" flag flips with the passing of time alone.
    Days are recomputed whole (delete+insert on the mart's key), so a rebuilt day equals a full refresh.
-#}

{% macro inputs_watermark(relations) -%}
    (select max(m) from (
        {%- for rel in relations %}
        select max(mirrored_at) as m from {{ rel }}{{ " union all" if not loop.last }}
        {%- endfor %}
    ) as w)
{%- endmacro %}

{#- `changed`: (relation, date column) pairs; a row mirrored after the watermark marks its day changed. -#}
{% macro days_to_rebuild(changed, day_column) -%}
    {%- if is_incremental() -%}
    with previous as (
        select
            coalesce(max(inputs_mirrored_at), '-infinity'::timestamptz)
                - interval '{{ var("mirror_safety_minutes", 10) }} minutes' as watermark,
            max({{ day_column }}) as last_day
        from {{ this }}
    )
    {%- for rel, day_expr in changed %}
    select distinct src.{{ day_expr }} as day
    from {{ rel }} as src, previous
    where src.mirrored_at > previous.watermark
    union
    {%- endfor %}
    select deleted.day
    from (
        {{ source_or_empty('lakehouse', 'mirror_deleted_days',
                           {'table_name': 'text', 'day': 'date', 'deleted_at': 'timestamptz'}) }}
    ) as deleted, previous
    where deleted.deleted_at > previous.watermark
    union
    select d::date as day
    from previous,
        generate_series(
            least(previous.last_day - {{ var("lookback_days") }},
                  {{ utc_today() }} - {{ var("label_maturity_days") }} - 1),
            greatest(previous.last_day, {{ utc_today() }}),
            interval '1 day') as d
    {%- endif -%}
{%- endmacro %}

{#- Today in UTC, whatever the session time zone of an external server. -#}
{% macro utc_today() -%}
    (now() at time zone 'utc')::date
{%- endmacro %}

{#- A day's fraud labels are final once `label_maturity_days` have passed since it (see dbt_project.yml). -#}
{% macro is_matured(day_expr) -%}
    ({{ day_expr }} + {{ var("label_maturity_days") }} <= {{ utc_today() }})
{%- endmacro %}
